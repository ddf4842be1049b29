//! Calling another vireod: HTTP/JSON over mutual TLS (one request per connection, like the
//! local client), and opening byte tunnels to it.

use crate::identity::HostIdentity;
use crate::tls::{self, StreamHeader, ALPN_HTTP, ALPN_STREAM, SERVER_NAME};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// TCP connect failed or timed out: the request was not delivered.
    #[error("cannot reach host {address}: {detail}")]
    Connect {
        /// Peer address.
        address: String,
        /// Cause.
        detail: String,
    },
    /// The TLS handshake failed (wrong fingerprint, not a vireod): not delivered.
    #[error("TLS with host {address} failed: {detail}")]
    Tls {
        /// Peer address.
        address: String,
        /// Cause.
        detail: String,
    },
    /// The peer answered with an error.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The peer's message.
        message: String,
    },
    /// The exchange broke after the request may have been delivered.
    #[error("exchange with host {address} broke: {detail}")]
    Broken {
        /// Peer address.
        address: String,
        /// Cause.
        detail: String,
    },
    /// Local TLS configuration.
    #[error("TLS configuration")]
    Config(#[source] tls::TlsError),
}

impl PeerError {
    /// Classification.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            PeerError::Connect { .. } | PeerError::Broken { .. } => crate::ErrorKind::Unreachable,
            PeerError::Tls { .. } => crate::ErrorKind::Untrusted,
            PeerError::Refused { status: 403, .. } => crate::ErrorKind::Untrusted,
            PeerError::Refused { .. } => crate::ErrorKind::Refused,
            PeerError::Config(_) => crate::ErrorKind::InvalidInput,
        }
    }

    /// True when the peer certainly did not act on the request.
    pub fn not_delivered(&self) -> bool {
        matches!(
            self,
            PeerError::Connect { .. }
                | PeerError::Tls { .. }
                | PeerError::Config(_)
                | PeerError::Refused { .. }
        )
    }
}

/// Error body of the peer API (same shape as the local API's).
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
}

/// A client for one peer.
#[derive(Debug, Clone)]
pub struct PeerClient {
    identity: Arc<HostIdentity>,
    address: String,
    fingerprint: Option<String>,
    connect_timeout: Duration,
    timeout: Duration,
}

impl PeerClient {
    /// A client for `address`, accepting only `fingerprint` (`None`: any, to look first).
    pub fn new(identity: Arc<HostIdentity>, address: &str, fingerprint: Option<&str>) -> Self {
        PeerClient {
            identity,
            address: address.to_string(),
            fingerprint: fingerprint.map(str::to_string),
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(30),
        }
    }

    /// Same client with another per-call timeout.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The peer's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    async fn connect(&self, alpn: &[u8]) -> Result<(TlsStream<TcpStream>, String), PeerError> {
        let cfg = tls::client_config(&self.identity, self.fingerprint.as_deref(), alpn)
            .map_err(PeerError::Config)?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| PeerError::Connect {
                address: self.address.clone(),
                detail: format!("no answer within {:?}", self.connect_timeout),
            })?
            .map_err(|e| PeerError::Connect {
                address: self.address.clone(),
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| PeerError::Tls {
            address: self.address.clone(),
            detail: e.to_string(),
        })?;
        let tls = tokio::time::timeout(
            self.connect_timeout * 2,
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| PeerError::Tls {
            address: self.address.clone(),
            detail: "handshake timed out".into(),
        })?
        .map_err(|e| PeerError::Tls {
            address: self.address.clone(),
            detail: e.to_string(),
        })?;
        let fp = tls::peer_fingerprint(tls.get_ref().1.peer_certificates()).ok_or_else(|| {
            PeerError::Tls {
                address: self.address.clone(),
                detail: "the peer presented no certificate".into(),
            }
        })?;
        Ok((tls, fp))
    }

    /// Connects only to learn the peer's certificate fingerprint.
    pub async fn probe_fingerprint(&self) -> Result<String, PeerError> {
        self.connect(ALPN_HTTP).await.map(|(_, fp)| fp)
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, PeerError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// POST `body` to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PeerError> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, PeerError> {
        let (tls, _) = self.connect(ALPN_HTTP).await?;
        let broken = |detail: String| PeerError::Broken {
            address: self.address.clone(),
            detail,
        };
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| broken(e.to_string()))?,
            None => Vec::new(),
        };
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| broken(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", SERVER_NAME)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(payload)))
                .map_err(|e| broken(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| broken(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| broken(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                let data: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
                serde_json::from_slice(data).map_err(|e| broken(format!("bad answer: {e}")))
            } else {
                let message = serde_json::from_slice::<ErrorBody>(&bytes)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| {
                        format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim())
                    });
                Err(PeerError::Refused {
                    status: status.as_u16(),
                    message,
                })
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(broken(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Opens a byte tunnel for `header` (the peer connects it to its end).
    pub async fn open_stream(
        &self,
        header: &StreamHeader,
    ) -> Result<TlsStream<TcpStream>, PeerError> {
        let (mut tls, _) = self.connect(ALPN_STREAM).await?;
        tokio::time::timeout(self.timeout, tls::send_header(&mut tls, header))
            .await
            .map_err(|_| PeerError::Broken {
                address: self.address.clone(),
                detail: "no answer to the stream header".into(),
            })?
            .map_err(|e| PeerError::Refused {
                status: 403,
                message: e.to_string(),
            })?;
        Ok(tls)
    }
}
