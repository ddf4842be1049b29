//! `vireo-switch`: one process per virtual switch. It owns the switch's ports (QEMU stream
//! sockets, a host TAP, an AF_PACKET uplink), runs the dataplane thread, serves the control
//! API on a unix socket, and persists its configuration in its run directory so that a
//! restarted switch comes back with the same ports. It runs independently of vireod.
//!
//! ```text
//! vireo-switch --config FILE --control PATH --run-dir DIR
//! ```
//! On start, `DIR/switch.json` (written by a previous run) wins over `--config`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use switch::{
    Backend, Dataplane, PortConfig, PortRole, Registry, SwitchConfig, SwitchType, VlanMode,
};

mod backend;
mod control;
mod engine;
mod persist;
mod sys;

/// One Vireo virtual switch.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Initial switch configuration (JSON SwitchConfig); ignored if the run dir has state.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control socket path.
    #[arg(long)]
    control: PathBuf,
    /// Run directory: persisted state, default port sockets.
    #[arg(long)]
    run_dir: PathBuf,
}

/// The host TAP interface name of a switch (IFNAMSIZ allows 15 characters).
fn host_ifname(name: &str) -> String {
    let mut n = format!("vsw-{name}");
    n.truncate(15);
    n
}

/// Adds the ports a switch type implies (host TAP, uplink) if the config lacks them.
fn ensure_builtin_ports(cfg: &mut SwitchConfig) {
    let has = |cfg: &SwitchConfig, role| cfg.ports.iter().any(|p| p.role == role);
    let wants_host = cfg.switch_type == SwitchType::Internal
        || (cfg.switch_type == SwitchType::External && cfg.share_host);
    if wants_host && !has(cfg, PortRole::Host) {
        let mut p = PortConfig::new(
            "host",
            Backend::Tap {
                ifname: host_ifname(&cfg.name),
            },
        );
        p.role = PortRole::Host;
        p.vlan = VlanMode::Access {
            vlan: cfg.host_vlan.unwrap_or(1),
        };
        cfg.ports.push(p);
    }
    if cfg.switch_type == SwitchType::External && !has(cfg, PortRole::Uplink) {
        if let Some(up) = cfg.uplink.clone() {
            let mut p = PortConfig::new("uplink", Backend::Packet { ifname: up });
            p.role = PortRole::Uplink;
            p.vlan = VlanMode::Trunk {
                allowed: (1..=4094).collect(),
                native: Some(1),
            };
            cfg.ports.push(p);
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("vireo-switch: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating run dir {}", args.run_dir.display()))?;
    let mut cfg = match persist::load(&args.run_dir)? {
        Some(c) => {
            tracing::info!(switch = %c.name, ports = c.ports.len(), "restoring persisted switch");
            c
        }
        None => {
            let Some(path) = &args.config else {
                bail!(
                    "no --config given and no state in {}",
                    args.run_dir.display()
                );
            };
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?
        }
    };
    ensure_builtin_ports(&mut cfg);
    let dp = Dataplane::new(&cfg, &Registry::with_builtins()).context("building the switch")?;
    let name = cfg.name.clone();
    let run_dir = args.run_dir.clone();
    persist::save(&run_dir, &dp.config())?;
    std::fs::write(run_dir.join("switch.pid"), std::process::id().to_string())?;
    let (handle, thread) = engine::start(dp, run_dir.clone())?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match std::fs::remove_file(&args.control) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing stale control socket"),
        }
        let listener = tokio::net::UnixListener::bind(&args.control)
            .with_context(|| format!("binding {}", args.control.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&args.control, std::fs::Permissions::from_mode(0o600))?;
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let st = control::AppState {
            engine: handle.clone(),
            run_dir,
            shutdown: shutdown.clone(),
        };
        tracing::info!(switch = %name, control = %args.control.display(), "switch running");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = shutdown.notified() => {}
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        axum::serve(listener, control::router(st))
            .with_graceful_shutdown(stop)
            .await
            .context("serving the control API")?;
        handle.call(|e| e.stop = true).await;
        let _ = std::fs::remove_file(&args.control);
        anyhow::Ok(())
    })?;
    let _ = thread.join();
    tracing::info!("switch stopped");
    Ok(())
}
