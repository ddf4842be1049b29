//! The `--listen` endpoint: mutual TLS on one TCP port. ALPN picks the protocol: the peer
//! API (HTTP/1.1, `peers.rs`) or a byte tunnel (migration streams, `manager/migration.rs`).

use crate::manager::Manager;
use crate::peers::{PeerId, Peers};
use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use migration::tls::{peer_fingerprint, server_config, ALPN_STREAM};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Binds `addr` and serves peers until the process ends.
pub async fn serve(addr: &str, manager: Arc<Manager>, peers: Arc<Peers>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the peer endpoint {addr}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(
        server_config(&peers.identity).context("building the TLS configuration")?,
    );
    let app = crate::peers::peer_router(manager.clone());
    tracing::info!(listen = %addr, fingerprint = %peers.identity.fingerprint(), "serving peers over mutual TLS");
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting a peer connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let app = app.clone();
            let manager = manager.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %remote, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %remote, "TLS handshake timed out");
                        return;
                    }
                };
                let conn = tls.get_ref().1;
                let Some(fp) = peer_fingerprint(conn.peer_certificates()) else {
                    tracing::warn!(peer = %remote, "peer presented no certificate");
                    return;
                };
                let who = PeerId {
                    fingerprint: fp,
                    addr: remote.to_string(),
                };
                if conn.alpn_protocol() == Some(ALPN_STREAM) {
                    manager.serve_stream(tls, who).await;
                    return;
                }
                let svc = TowerToHyperService::new(app.layer(axum::Extension(who)));
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(peer = %remote, "peer connection ended: {e}");
                }
            });
        }
    });
    Ok(())
}
