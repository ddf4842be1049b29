//! Mutual TLS between hosts. Both ends present their self-signed host certificate; the
//! TLS layer checks that each end holds the key of the certificate it shows, and trust is
//! decided by fingerprint: the client pins the server's fingerprint here, the server looks
//! the client's fingerprint up in its [`crate::TrustStore`] before serving a request.
//!
//! One port carries two kinds of connections, told apart by ALPN: [`ALPN_HTTP`] for the
//! host-to-host API, [`ALPN_STREAM`] for a byte tunnel (migration memory stream, disk
//! stream) that starts with one [`StreamHeader`] line.

use crate::identity::{fingerprint, HostIdentity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of the host-to-host HTTP API.
pub const ALPN_HTTP: &[u8] = b"http/1.1";
/// ALPN of a byte tunnel.
pub const ALPN_STREAM: &[u8] = b"vireo-stream/1";
/// Server name used in the handshake (peers are identified by fingerprint, not name).
pub const SERVER_NAME: &str = "vireo-host";

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("building the TLS configuration")]
    Config(#[source] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn key(id: &HostIdentity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der().to_vec()))
}

fn cert(id: &HostIdentity) -> Vec<CertificateDer<'static>> {
    vec![CertificateDer::from(id.cert_der().to_vec())]
}

/// Accepts any client certificate whose key signs the handshake; the application then
/// authorizes by fingerprint (an untrusted host may still say hello).
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts the server only when its fingerprint is the pinned one (or any, when nothing is
/// pinned yet: the first look at a peer during `host trust`).
#[derive(Debug)]
struct PinnedServer {
    provider: Arc<CryptoProvider>,
    expected: Option<String>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.expected {
            Some(fp) if *fp != fingerprint(end_entity.as_ref()) => {
                Err(rustls::Error::General(format!(
                    "the peer's certificate fingerprint is {}, not the trusted {fp}",
                    fingerprint(end_entity.as_ref())
                )))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server side: requires a client certificate, offers both ALPNs.
pub fn server_config(id: &HostIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let p = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(AnyClientCert(p)))
        .with_single_cert(cert(id), key(id))
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_STREAM.to_vec(), ALPN_HTTP.to_vec()];
    Ok(Arc::new(cfg))
}

/// The client side: presents our certificate, pins the server's fingerprint (`None`: accept
/// any, to look at a peer before trusting it), asks for `alpn`.
pub fn client_config(
    id: &HostIdentity,
    expected: Option<&str>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let p = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer {
            provider: p,
            expected: expected.map(str::to_string),
        }))
        .with_client_auth_cert(cert(id), key(id))
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// The fingerprint of the certificate the other end presented.
pub fn peer_fingerprint(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs
        .and_then(|c| c.first())
        .map(|c| fingerprint(c.as_ref()))
}

/// First line of a tunnel connection: which migration and which channel it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// Migration id.
    pub migration: String,
    /// `memory` (QEMU's migration stream) or `disk<i>` (an NBD stream).
    pub channel: String,
}

/// Longest header line accepted.
const MAX_HEADER: usize = 1024;

/// Reads one `\n`-terminated line (at most [`MAX_HEADER`] bytes).
pub async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_HEADER {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "tunnel header line too long",
            ));
        }
    }
    String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "header is not UTF-8"))
}

/// Client side of a tunnel: sends the header and waits for the peer's `ok`.
pub async fn send_header<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    h: &StreamHeader,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(h)?;
    line.push(b'\n');
    s.write_all(&line).await?;
    s.flush().await?;
    let answer = read_line(s).await?;
    if answer == "ok" {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the peer refused the stream: {answer}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair(
        server: &HostIdentity,
        client: &HostIdentity,
        pin: Option<&str>,
    ) -> Result<(Option<String>, Option<String>), String> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acc = tokio_rustls::TlsAcceptor::from(server_config(server).unwrap());
        let srv = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            match acc.accept(tcp).await {
                Ok(mut s) => {
                    let fp = peer_fingerprint(s.get_ref().1.peer_certificates());
                    let mut b = [0u8; 2];
                    let _ = s.read_exact(&mut b).await;
                    fp
                }
                Err(_) => None,
            }
        });
        let conn = tokio_rustls::TlsConnector::from(client_config(client, pin, ALPN_HTTP).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let r = conn.connect(name, tcp).await;
        let seen = match r {
            Ok(mut s) => {
                s.write_all(b"hi").await.unwrap();
                s.flush().await.unwrap();
                peer_fingerprint(s.get_ref().1.peer_certificates())
            }
            Err(e) => {
                srv.abort();
                return Err(e.to_string());
            }
        };
        Ok((srv.await.unwrap(), seen))
    }

    /// Both ends learn each other's fingerprint; a wrong pin is refused in the handshake.
    #[tokio::test]
    async fn mutual_and_pinned() {
        let d = tempfile::tempdir().unwrap();
        let a = HostIdentity::load_or_create(&d.path().join("a"), "a").unwrap();
        let b = HostIdentity::load_or_create(&d.path().join("b"), "b").unwrap();
        let (srv_saw, cli_saw) = pair(&a, &b, Some(a.fingerprint())).await.unwrap();
        assert_eq!(srv_saw.as_deref(), Some(b.fingerprint()));
        assert_eq!(cli_saw.as_deref(), Some(a.fingerprint()));
        let err = pair(&a, &b, Some(b.fingerprint())).await.unwrap_err();
        assert!(err.contains("fingerprint"), "{err}");
    }
}
