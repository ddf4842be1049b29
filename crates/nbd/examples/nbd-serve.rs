//! Serves one raw image file over NBD on a unix socket.
//!
//! `nbd-serve --socket PATH --file IMG [--read-only] [--name NAME]`
//!
//! SIGINT/SIGTERM shut it down gracefully (in-flight requests answered,
//! export flushed); a restart on the same path replaces the stale socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(about = "Serve a raw image over NBD on a unix socket")]
struct Args {
    /// Unix socket path to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Raw image file (or block device) to serve.
    #[arg(long)]
    file: PathBuf,
    /// Serve read-only.
    #[arg(long)]
    read_only: bool,
    /// Export name ("" is the default export).
    #[arg(long, default_value = "")]
    name: String,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let export = nbd::FileExport::open(&args.file, args.read_only)
            .with_context(|| format!("opening {}", args.file.display()))?;
        let config = nbd::ServerConfig {
            max_in_flight: args.max_in_flight,
            ..Default::default()
        };
        let server = nbd::Server::new(config)?;
        server.add_export(args.name.clone(), Arc::new(export))?;
        let listener = nbd::bind_unix(&args.socket)
            .with_context(|| format!("listening on {}", args.socket.display()))?;
        tracing::info!(socket = %args.socket.display(), file = %args.file.display(), "serving");
        let stop = server.shutdown_token();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            stop.cancel();
        });
        server.serve_unix(listener).await?;
        let _ = std::fs::remove_file(&args.socket);
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
