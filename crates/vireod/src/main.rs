//! `vireod`: the Vireo host daemon. Wiring only: the store, the manager, the routes and the
//! supervision loop. VMs run in their own `vireo-worker` processes and survive a restart or a
//! kill -9 of this daemon.

mod balancer;
mod checkpoint_routes;
mod error;
mod host;
mod manager;
mod memory_routes;
mod migration_routes;
mod peers;
mod process;
mod replica_routes;
mod routes;
mod storage_move_routes;
mod store;
mod switch_routes;
mod switches;
mod tls;

use anyhow::{bail, Context};
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "vireod", version, about = "Vireo host daemon")]
struct Args {
    /// Directory holding the VM inventory, NVRAM, saved states and run files.
    #[arg(long, default_value = "/var/lib/vireo")]
    state_dir: PathBuf,
    /// API socket (root-only).
    #[arg(long, default_value = "/run/vireo/vireod.sock")]
    socket: PathBuf,
    /// Accelerator that VMs with `auto` get: auto probes KVM and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
    /// The vireo-worker executable (default: next to vireod).
    #[arg(long, env = "VIREO_WORKER")]
    worker: Option<PathBuf>,
    /// Serve other hosts (migration) over mutual TLS on ADDR:PORT.
    #[arg(long)]
    listen: Option<String>,
}

fn choose_host_accel(requested: &str) -> (api::Accel, String) {
    let req = match requested {
        "kvm" => qemu::accel::AccelRequest::Kvm,
        "tcg" => qemu::accel::AccelRequest::Tcg,
        _ => qemu::accel::AccelRequest::Auto,
    };
    let probe = qemu::accel::probe_kvm_cached();
    let (accel, reason) = qemu::accel::choose_accel(req, probe);
    let accel = match accel {
        qemu::cmdline::Accel::Kvm => api::Accel::Kvm,
        qemu::cmdline::Accel::Tcg => api::Accel::Tcg,
    };
    (accel, reason)
}

async fn bind(socket: &PathBuf) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!("another vireod is already serving {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(listener)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;
    let worker_bin = match args.worker {
        Some(w) => w,
        None => std::env::current_exe()
            .context("locating vireod")?
            .with_file_name("vireo-worker"),
    };
    if !worker_bin.is_file() {
        bail!(
            "vireo-worker not found at {} (build it, or pass --worker)",
            worker_bin.display()
        );
    }
    let auto_accel = tokio::task::spawn_blocking({
        let a = args.accel.clone();
        move || choose_host_accel(&a)
    })
    .await?;
    tracing::info!(accel = ?auto_accel.0, "accelerator: {}", auto_accel.1);
    let manager = Arc::new(
        manager::Manager::open(manager::HostConfig {
            state_dir: args.state_dir.clone(),
            worker_bin,
            auto_accel,
        })
        .context("opening the VM inventory")?,
    );
    let peers =
        peers::init(&args.state_dir, args.listen.clone()).context("loading the host identity")?;
    // Re-attach to VMs that kept running while we were away before serving anything.
    manager.supervise_once().await;
    let listener = bind(&args.socket).await?;
    tracing::info!(socket = %args.socket.display(), state_dir = %args.state_dir.display(), "vireod ready");
    let sup = manager.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            sup.supervise_once().await;
        }
    });
    tokio::spawn(balancer::run(manager.clone()));
    tokio::spawn(manager.clone().migration_watchdog());
    tokio::spawn(manager.clone().replica_scheduler());
    if let Some(addr) = &args.listen {
        tls::serve(addr, manager.clone(), peers).await?;
    }
    let app = routes::router(manager);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
        }
        tracing::info!("vireod stopping; VMs keep running");
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}
