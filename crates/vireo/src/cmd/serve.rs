//! `vireo disk serve`: a standalone NBD export of a disk or VHDX chain (like qemu-nbd).

use anyhow::Context;
use std::path::Path;
use std::sync::Arc;

/// Serves `path` on the unix socket `socket` (export name `""` and `disk0`) until Ctrl-C.
pub fn serve(path: &Path, socket: &Path, read_only: bool) -> anyhow::Result<()> {
    let chain = Arc::new(
        storage::DiskChain::open(path, read_only)
            .with_context(|| format!("opening {}", path.display()))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = nbd::Server::new(nbd::ServerConfig::default())?;
        server.add_export("", chain.clone())?;
        server.add_export("disk0", chain.clone())?;
        let listener = nbd::bind_unix(socket)?;
        eprintln!("serving {} on {}", chain.chain_paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" <- "), socket.display());
        let stop = server.shutdown_token();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            stop.cancel();
        });
        server.serve_unix(listener).await?;
        nbd::Export::flush(chain.as_ref())?;
        let _ = std::fs::remove_file(socket);
        anyhow::Ok(())
    })
}
