//! Live migration in the worker: QEMU's own migration carries memory and device state.
//!
//! Source: `POST /migration/start` sets the capabilities (pause-before-switchover,
//! auto-converge, multifd) and limits and starts `migrate` to the unix socket the daemon
//! tunnels over mutual TLS; `/migration/release-disks` closes the disk images at the
//! pre-switchover pause (shared storage: the destination opens them next);
//! `/migration/continue` lets QEMU switch over; `/migration/cancel` cancels (QEMU resumes
//! the guest); `/migration/finish` quits the source QEMU once the destination runs the VM.
//!
//! Destination: the worker of a launch with `incoming` serves placeholder NBD exports that
//! look exactly like the source's (QEMU connects its NBD clients at start but does no I/O
//! while incoming), starts QEMU with `-incoming defer` and calls `migrate-incoming`.
//! `/migration/activate` replaces the placeholders by the real disk service (QEMU's NBD
//! client reconnects on its first request), `/migration/resume` runs the guest.
//!
//! Shared-nothing (source): `/migration/mirror-start` mirrors every disk's whole chain
//! (`storage::mirror` into a [`StreamSink`]) into a unix socket per disk, which the daemon
//! tunnels over mutual TLS to the destination's `receive_chain`; the guest keeps running and
//! its writes are mirrored. `/migration/mirror-complete`, called at the pre-switchover
//! pause, runs each mirror's final pass, verifies the destination by checksum and commits
//! it there; `/migration/mirror-cancel` stops them (the destination removes its files).

use crate::vm::Vm;
use anyhow::Context;
use api::migration::{
    ExportFacts, IncomingLaunch, WorkerChainFiles, WorkerMigrateStart, WorkerMigrateStatus,
    WorkerMirrorDone, WorkerMirrorStart, WorkerMirrorStatus,
};
use api::worker::{ExitRecord, LaunchSpec};
use api::{ErrorBody, ErrorKind};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use storage::mirror::{DiskMirror, MirrorOptions, StreamSink};

static LAUNCH: OnceLock<LaunchSpec> = OnceLock::new();
static PLACEHOLDERS: Mutex<Vec<(nbd::Server, tokio::task::JoinHandle<()>)>> =
    Mutex::new(Vec::new());
/// Disk mirrors of an outgoing shared-nothing migration.
static MIRRORS: Mutex<Vec<DiskMirror>> = Mutex::new(Vec::new());
/// Runtime driving the mirror streams: the worker's own runtime is single-threaded and the
/// mirror threads block on their stream, so the streams get a runtime of their own.
static MIRROR_RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fn mirror_rt() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    if let Some(rt) = MIRROR_RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vireo-mirror-io")
        .enable_all()
        .build()
        .context("starting the mirror stream runtime")?;
    Ok(MIRROR_RT.get_or_init(|| rt))
}

fn mirrors() -> std::sync::MutexGuard<'static, Vec<DiskMirror>> {
    MIRRORS.lock().unwrap_or_else(|p| p.into_inner())
}

/// An export with the size and abilities of a disk that is not here yet: QEMU's NBD client
/// connects to it while the VM waits for its state; any I/O fails (none happens).
struct Placeholder(ExportFacts);

impl nbd::Export for Placeholder {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn flags(&self) -> nbd::ExportFlags {
        let f = self.0.flags;
        nbd::ExportFlags {
            read_only: f & (1 << 1) != 0,
            rotational: f & (1 << 4) != 0,
            can_trim: f & (1 << 5) != 0,
            can_multi_conn: f & (1 << 8) != 0,
            can_fast_zero: f & (1 << 11) != 0,
        }
    }
    fn block_size(&self) -> nbd::BlockSize {
        match self.0.block_size {
            Some((minimum, preferred, maximum)) => nbd::BlockSize {
                minimum,
                preferred,
                maximum,
            },
            None => nbd::BlockSize::default(),
        }
    }
    fn read_at(&self, _buf: &mut [u8], _off: u64) -> io::Result<()> {
        Err(io::Error::other("the disk is not handed over yet"))
    }
    fn write_at(&self, _buf: &[u8], _off: u64, _fua: bool) -> io::Result<()> {
        Err(io::Error::other("the disk is not handed over yet"))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves placeholder exports on the disk sockets of an incoming launch.
pub fn serve_placeholders(l: &LaunchSpec, inc: &IncomingLaunch) -> anyhow::Result<()> {
    let _ = LAUNCH.set(l.clone());
    let mut held = PLACEHOLDERS.lock().unwrap_or_else(|p| p.into_inner());
    for (i, facts) in inc.disks.iter().enumerate() {
        let server = nbd::Server::new(nbd::ServerConfig::default())
            .context("creating a placeholder NBD server")?;
        server
            .add_export(storage::export_name(i), Arc::new(Placeholder(*facts)))
            .context("adding a placeholder export")?;
        let listener = nbd::bind_unix(storage::socket_path(&l.run_dir, i))
            .context("binding a placeholder disk socket")?;
        let s = server.clone();
        let task = tokio::spawn(async move {
            let _ = s.serve_unix(listener).await;
        });
        held.push((server, task));
    }
    Ok(())
}

/// On a QEMU started with `-incoming defer`: same capabilities as the source, then
/// `migrate-incoming`. Returns at once; the state arrives through the daemon's tunnel.
pub async fn start_incoming(vm: &Vm, inc: &IncomingLaunch) -> anyhow::Result<()> {
    if inc.multifd_channels > 0 {
        vm.qmp
            .migrate_set_capabilities(&[("multifd", true)])
            .await
            .context("enabling multifd")?;
        vm.qmp
            .migrate_set_parameters(json!({ "multifd-channels": inc.multifd_channels }))
            .await
            .context("setting multifd channels")?;
    }
    vm.qmp
        .migrate_incoming(&inc.uri)
        .await
        .context("QMP migrate-incoming")?;
    Ok(())
}

/// Routes merged into the control router.
pub fn routes() -> Router<Arc<Vm>> {
    Router::new()
        .route("/migration/start", post(start))
        .route("/migration/status", get(status))
        .route("/migration/continue", post(cont))
        .route("/migration/cancel", post(cancel))
        .route("/migration/release-disks", post(release_disks))
        .route("/migration/finish", post(finish))
        .route("/migration/activate", post(activate))
        .route("/migration/resume", post(resume))
        .route("/migration/chain-files", get(chain_files))
        .route("/migration/mirror-start", post(mirror_start))
        .route("/migration/mirror-status", get(mirror_status))
        .route("/migration/mirror-complete", post(mirror_complete))
        .route("/migration/mirror-cancel", post(mirror_cancel))
}

/// An error answered to vireod.
pub struct MigError(String);

impl IntoResponse for MigError {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_GATEWAY,
            Json(ErrorBody {
                kind: ErrorKind::Failed,
                error: self.0,
            }),
        )
            .into_response()
    }
}

impl From<anyhow::Error> for MigError {
    fn from(e: anyhow::Error) -> Self {
        MigError(format!("{e:#}"))
    }
}

type R<T> = Result<Json<T>, MigError>;

async fn start(State(vm): State<Arc<Vm>>, Json(req): Json<WorkerMigrateStart>) -> R<Value> {
    let mut caps = vec![
        ("pause-before-switchover", true),
        ("auto-converge", req.auto_converge),
        ("events", true),
    ];
    if req.multifd_channels > 0 {
        caps.push(("multifd", true));
    }
    vm.qmp
        .migrate_set_capabilities(&caps)
        .await
        .context("setting migration capabilities")?;
    let mut params = json!({
        "max-bandwidth": if req.bandwidth == 0 { i64::MAX as u64 } else { req.bandwidth },
        "downtime-limit": req.max_downtime_ms.clamp(1, 2_000_000),
    });
    if req.multifd_channels > 0 {
        params["multifd-channels"] = json!(req.multifd_channels);
    }
    vm.qmp
        .migrate_set_parameters(params)
        .await
        .context("setting migration parameters")?;
    vm.qmp.migrate(&req.uri).await.context("QMP migrate")?;
    tracing::info!(uri = %req.uri, "outgoing migration started");
    Ok(Json(Value::Null))
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(n) => cur = n,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

async fn status(State(vm): State<Arc<Vm>>) -> R<WorkerMigrateStatus> {
    let m = vm.qmp_simple("query-migrate").await?;
    let st = vm.qmp_simple("query-status").await?;
    let status = m
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("none")
        .to_string();
    Ok(Json(WorkerMigrateStatus {
        run_state: st
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string(),
        transferred: u(&m, &["ram", "transferred"]),
        remaining: u(&m, &["ram", "remaining"]),
        total: u(&m, &["ram", "total"]),
        dirty_pages_rate: u(&m, &["ram", "dirty-pages-rate"]),
        passes: u(&m, &["ram", "dirty-sync-count"]),
        expected_downtime_ms: u(&m, &["expected-downtime"]),
        downtime_ms: m.get("downtime").and_then(|d| d.as_u64()),
        error: m
            .get("error-desc")
            .and_then(|d| d.as_str())
            .map(str::to_string),
        status,
    }))
}

async fn cont(State(vm): State<Arc<Vm>>) -> R<Value> {
    vm.qmp
        .execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )
        .await
        .context("QMP migrate-continue")?;
    Ok(Json(Value::Null))
}

async fn cancel(State(vm): State<Arc<Vm>>) -> R<Value> {
    vm.qmp
        .migrate_cancel()
        .await
        .context("QMP migrate_cancel")?;
    // Wait until QEMU has left the migration (it resumes a guest that was running).
    for _ in 0..200 {
        let m = vm.qmp_simple("query-migrate").await?;
        match m.get("status").and_then(|s| s.as_str()) {
            Some("cancelling")
            | Some("active")
            | Some("pre-switchover")
            | Some("device")
            | Some("setup") => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break,
        }
    }
    Ok(Json(Value::Null))
}

async fn release_disks(State(_vm): State<Arc<Vm>>) -> R<Value> {
    tokio::task::spawn_blocking(crate::disks::shutdown)
        .await
        .context("closing the disks")?;
    tracing::info!("disk images closed for the handover");
    Ok(Json(Value::Null))
}

async fn finish(State(vm): State<Arc<Vm>>) -> R<Value> {
    vm.set_exit(ExitRecord {
        reason: "moved to another host".into(),
        clean: true,
        saved: false,
    });
    // Not `quit`: the disks were handed over, so QEMU's NBD clients have no server, and a
    // quit drains them, waiting out their reconnect delay (60 s) before QEMU exits. Nothing
    // is lost by SIGKILL: QEMU flushed and inactivated its disks when its migration
    // completed, and the destination owns them now. The main loop sees QMP close and exits.
    // SAFETY: kill(2) on QEMU, this worker's own child (not reaped yet, so the pid is ours).
    let rc = unsafe { libc::kill(vm.qemu_pid as libc::pid_t, libc::SIGKILL) };
    if rc != 0 {
        tracing::warn!(
            pid = vm.qemu_pid,
            "stopping the source QEMU: {}",
            io::Error::last_os_error()
        );
    }
    Ok(Json(Value::Null))
}

async fn activate(State(_vm): State<Arc<Vm>>) -> R<Value> {
    let Some(l) = LAUNCH.get() else {
        return Err(MigError(
            "this worker is not a migration destination".into(),
        ));
    };
    let held: Vec<_> = std::mem::take(&mut *PLACEHOLDERS.lock().unwrap_or_else(|p| p.into_inner()));
    for (s, task) in held {
        s.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    crate::disks::start(l).context("opening the disks on the destination")?;
    tracing::info!("disks handed over: served by the disk service");
    Ok(Json(Value::Null))
}

async fn resume(State(vm): State<Arc<Vm>>) -> R<Value> {
    // The source reports completion when it has sent the last byte; the destination may
    // still be loading the final device state for a moment, so wait out "inmigrate".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut s = String::new();
    while tokio::time::Instant::now() < deadline {
        let st = vm.qmp_simple("query-status").await?;
        s = st
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_string();
        if s != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if s != "paused" && s != "running" {
        return Err(
            anyhow::anyhow!("the incoming state is not complete (QEMU status {s:?})").into(),
        );
    }
    if s == "paused" {
        vm.qmp.cont().await.context("starting the guest")?;
    }
    vm.booted.store(true, Ordering::SeqCst);
    tracing::info!("incoming VM runs");
    Ok(Json(Value::Null))
}

fn disk_service() -> Result<Arc<storage::DiskService>, MigError> {
    crate::disks::service()
        .map(|(s, _)| s)
        .ok_or_else(|| MigError("the disk service is not running".into()))
}

/// The memory-state files of standard checkpoints: they travel with disk 0's chain in a
/// shared-nothing move (byte copies with a CRC32C check, like the frozen layers).
fn memory_states(svc: &storage::DiskService) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for c in svc.state().checkpoints {
        if let Some(m) = c.memory_state {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

async fn chain_files(State(_vm): State<Arc<Vm>>) -> R<WorkerChainFiles> {
    let svc = disk_service()?;
    let mut disks: Vec<Vec<std::path::PathBuf>> = (0..svc.disks())
        .map(|d| crate::storage_move::chain_files(&svc, d))
        .collect();
    if let Some(first) = disks.first_mut() {
        for m in memory_states(&svc) {
            if !first.contains(&m) {
                first.push(m);
            }
        }
    }
    Ok(Json(WorkerChainFiles { disks }))
}

/// Cancels mirrors off the async runtime (cancel joins the mirror thread).
async fn drop_mirrors(ms: Vec<DiskMirror>) {
    if ms.is_empty() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || {
        for m in ms {
            let _ = m.cancel();
        }
    })
    .await;
}

async fn mirror_start(State(_vm): State<Arc<Vm>>, Json(req): Json<WorkerMirrorStart>) -> R<Value> {
    let svc = disk_service()?;
    if req.sockets.len() != svc.disks() {
        return Err(MigError(format!(
            "{} mirror sockets for {} disks",
            req.sockets.len(),
            svc.disks()
        )));
    }
    if !mirrors().is_empty() {
        return Err(MigError("the disks are already being mirrored".into()));
    }
    let rt = mirror_rt()?;
    let n = req.sockets.len().max(1) as u64;
    let limit = (req.bandwidth > 0).then(|| (req.bandwidth / n).max(1 << 20));
    let sockets = req.sockets.clone();
    let started = tokio::task::spawn_blocking(move || {
        let mut started: Vec<DiskMirror> = Vec::new();
        for (i, sock) in sockets.iter().enumerate() {
            let r = rt
                .block_on(tokio::net::UnixStream::connect(sock))
                .with_context(|| format!("connecting disk {i}'s mirror stream"))
                .and_then(|stream| {
                    let sink = StreamSink::new(rt.handle().clone(), stream);
                    let opts = MirrorOptions {
                        max_bytes_per_sec: limit,
                        extra_frozen: if i == 0 {
                            memory_states(&svc)
                        } else {
                            Vec::new()
                        },
                        ..Default::default()
                    };
                    svc.mirror_disk(i, Box::new(sink), opts)
                        .map_err(|e| anyhow::anyhow!("mirroring disk {i}: {}", e.full_message()))
                });
            match r {
                Ok(m) => started.push(m),
                Err(e) => {
                    for m in started {
                        let _ = m.cancel();
                    }
                    return Err(e);
                }
            }
        }
        Ok(started)
    })
    .await
    .context("starting the mirrors")??;
    tracing::info!(
        disks = started.len(),
        "disk mirrors to the destination started"
    );
    *mirrors() = started;
    Ok(Json(Value::Null))
}

async fn mirror_status(State(_vm): State<Arc<Vm>>) -> R<WorkerMirrorStatus> {
    let ms = mirrors();
    let mut st = WorkerMirrorStatus {
        disks: ms.len(),
        converged: !ms.is_empty(),
        ..Default::default()
    };
    for (i, m) in ms.iter().enumerate() {
        let p = m.progress();
        st.bytes_copied += p.bytes_copied;
        st.bytes_remaining += p.bytes_remaining;
        st.dirty_bytes_per_sec += p.dirty_bytes_per_sec;
        st.converged &= p.converged;
        if st.error.is_none() && (m.is_finished() || p.error.is_some()) {
            st.error = Some(format!(
                "disk {i}: {}",
                p.error.unwrap_or_else(|| "the mirror stopped".into())
            ));
        }
    }
    Ok(Json(st))
}

async fn mirror_complete(State(_vm): State<Arc<Vm>>) -> R<WorkerMirrorDone> {
    let ms: Vec<DiskMirror> = std::mem::take(&mut *mirrors());
    if ms.is_empty() {
        return Err(MigError("no disk mirror is running".into()));
    }
    let done = tokio::task::spawn_blocking(move || {
        let mut out = WorkerMirrorDone::default();
        let mut it = ms.into_iter().enumerate();
        while let Some((i, m)) = it.next() {
            match m.complete() {
                Ok(o) => {
                    out.source_files.extend(o.source_files.iter().cloned());
                    out.checksums.push(o.checksum);
                    out.bytes_copied += o.bytes_copied;
                    out.final_pass_bytes += o.final_pass_bytes;
                    out.io_pause_ms = out.io_pause_ms.max(o.io_pause.as_millis() as u64);
                }
                Err(e) => {
                    for (_, rest) in it {
                        let _ = rest.cancel();
                    }
                    return Err(anyhow::anyhow!(
                        "completing disk {i}'s mirror: {}",
                        e.full_message()
                    ));
                }
            }
        }
        Ok(out)
    })
    .await
    .context("completing the mirrors")??;
    tracing::info!(
        bytes = done.bytes_copied,
        final_pass = done.final_pass_bytes,
        io_pause_ms = done.io_pause_ms,
        "disks in sync at the destination (verified)"
    );
    Ok(Json(done))
}

async fn mirror_cancel(State(_vm): State<Arc<Vm>>) -> R<Value> {
    let ms: Vec<DiskMirror> = std::mem::take(&mut *mirrors());
    drop_mirrors(ms).await;
    Ok(Json(Value::Null))
}
