//! `vireo-worker`: owns one running VM. It starts QEMU (in its own session, so the VM
//! outlives this process), or re-attaches to a running one with `--attach`, and then serves
//! vireod's control API on `worker.sock`, relays the serial console, and runs the guest
//! integration services. It exits when QEMU exits, leaving `exit.json` to say why.

mod checkpoint;
mod console;
mod control;
mod disks;
mod guest;
mod launch;
mod memory;
mod migration;
mod nics;
mod replica;
mod storage_move;
mod vm;

use agent::client::AgentClient;
use anyhow::{bail, Context};
use api::worker::{ExitRecord, LaunchSpec};
use clap::Parser;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "vireo-worker",
    version,
    about = "Vireo per-VM worker (started by vireod)"
)]
struct Args {
    /// The VM's run directory (holds launch.json, sockets, pid files).
    #[arg(long)]
    run_dir: PathBuf,
    /// Re-attach to the QEMU already running for this VM instead of starting one.
    #[arg(long)]
    attach: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(run(args));
    if let Err(e) = &r {
        // vireod shows the last line of the log as the cause.
        eprintln!("error: {e:#}");
    }
    r
}

async fn run(args: Args) -> anyhow::Result<()> {
    let run_dir = args.run_dir;
    let launch: LaunchSpec = serde_json::from_slice(
        &std::fs::read(run_dir.join("launch.json")).context("reading launch.json")?,
    )
    .context("parsing launch.json")?;
    std::fs::write(run_dir.join("worker.pid"), std::process::id().to_string())
        .context("writing worker.pid")?;

    let console_facts = Arc::new(Mutex::new(console::ConsoleFacts::default()));
    // The disks are served before QEMU starts (or, re-attaching, so that it reconnects).
    match &launch.incoming {
        // A migration destination gets its disks at the handover (crate::migration).
        Some(inc) if !args.attach => migration::serve_placeholders(&launch, inc)?,
        _ => disks::start(&launch)?,
    }
    replica::resume();
    let (qemu_pid, started_at) = if args.attach {
        let pid = std::fs::read_to_string(run_dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .context("no qemu.pid: nothing to attach to")?;
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("QEMU (pid {pid}) is not running");
        }
        let started = std::fs::metadata(run_dir.join("qemu.pid"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(pid, "re-attaching to running QEMU");
        (pid, started)
    } else {
        let pid = launch::spawn_qemu(&launch).await?;
        (pid, now_unix())
    };

    // The console must be connected before the guest runs so nothing it prints is lost.
    let console_task = tokio::spawn(console::run(
        run_dir.join("serial.sock"),
        run_dir.join("console.sock"),
        launch.console_log.clone(),
        console_facts.clone(),
    ));
    let qmp =
        qemu::qmp::QmpClient::connect_retry(run_dir.join("qmp.sock"), Duration::from_secs(30))
            .await
            .context("connecting to QEMU's QMP socket")?;
    let agent = Arc::new(AgentClient::new(run_dir.join("qga.sock")));
    let guest = Arc::new(Mutex::new(guest::GuestState::new()));
    let vm = Arc::new(vm::Vm {
        qmp,
        agent: agent.clone(),
        guest: guest.clone(),
        console: console_facts,
        qemu_pid,
        started_at,
        accel: launch.accel,
        attached: args.attach,
        booted: AtomicBool::new(args.attach),
        exit: Mutex::new(None),
    });

    let sock = run_dir.join("worker.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).context("binding worker.sock")?;
    let server = tokio::spawn(axum::serve(listener, control::router(vm.clone())).into_future());

    if !args.attach {
        // Give the serial relay a moment to connect before the first instruction runs.
        for _ in 0..40 {
            if console_task.is_finished()
                || std::os::unix::net::UnixStream::connect(run_dir.join("console.sock")).is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if let Some(inc) = &launch.incoming {
            migration::start_incoming(&vm, inc).await?;
        } else {
            if let Some(saved) = &launch.restore_from {
                launch::restore(&vm.qmp, saved).await?;
            }
            vm.qmp.cont().await.context("starting the guest")?;
            vm.booted.store(true, Ordering::SeqCst);
        }
    }
    tokio::spawn(guest::heartbeat_loop(agent, guest));
    memory::start(vm.clone(), launch.virtio_mem_region.unwrap_or(0));

    // Wait for QEMU to end: the QMP connection closes.
    let mut events = vm.qmp.events();
    let mut guest_shutdown: Option<String> = None;
    loop {
        if vm.qmp.is_closed() || !std::path::Path::new(&format!("/proc/{qemu_pid}")).exists() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
            Ok(Ok(ev)) if ev.event == "SHUTDOWN" => {
                let by_guest = ev
                    .data
                    .get("guest")
                    .and_then(|g| g.as_bool())
                    .unwrap_or(false);
                if by_guest {
                    guest_shutdown = Some("the guest shut down".into());
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
            _ => {}
        }
    }
    // QEMU is gone; don't wait for a zombie: reaping happens in launch.
    launch::reap(qemu_pid);
    let rec = vm
        .exit
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .or_else(|| {
            guest_shutdown.map(|r| ExitRecord {
                reason: r,
                clean: true,
                saved: false,
            })
        })
        .unwrap_or(ExitRecord {
            reason: "QEMU exited unexpectedly (see qemu.log in the run directory)".into(),
            clean: false,
            saved: false,
        });
    tracing::info!("VM ended: {}", rec.reason);
    std::fs::write(run_dir.join("exit.json"), serde_json::to_vec(&rec)?)
        .context("writing exit.json")?;
    server.abort();
    disks::shutdown();
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
