//! Storage live migration on the worker: each disk's whole chain is mirrored into the
//! destination directory while the guest runs (`storage::mirror`), then, with guest I/O
//! held for the final pass and the checksum verification, the export switches to the new
//! files and `disks.json` records them; the old files are removed only after that. The job
//! record (`storage-move.json` in the VM directory) is rewritten as it progresses, so
//! vireod lists it, and survives a daemon restart.

use crate::vm::Vm;
use api::storage_move::{MoveJob, MoveState, MoveStorage, MovedFile, JOB_FILE};
use api::{ErrorBody, ErrorKind};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use storage::mirror::{DirSink, MirrorOptions};
use storage::DiskService;

/// Longest time a disk copies before it is switched even if the guest dirties it faster
/// than it converges (the final pass then holds guest I/O longer).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

struct Running {
    job: Arc<Mutex<MoveJob>>,
    cancel: Arc<AtomicBool>,
}

static CURRENT: Mutex<Option<Running>> = Mutex::new(None);

/// An error answered to vireod.
pub struct DiskError(ErrorKind, String);

impl IntoResponse for DiskError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::WrongState | ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_GATEWAY,
        };
        let body = ErrorBody {
            kind: self.0,
            error: self.1,
        };
        (status, Json(body)).into_response()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Routes merged into the control router.
pub fn routes() -> Router<Arc<Vm>> {
    Router::new()
        .route("/storage-move", get(show).post(start))
        .route("/storage-move/cancel", post(cancel))
}

fn wrong(msg: impl Into<String>) -> DiskError {
    DiskError(ErrorKind::WrongState, msg.into())
}

fn invalid(msg: impl Into<String>) -> DiskError {
    DiskError(ErrorKind::Invalid, msg.into())
}

/// Writes the job record atomically (temp file, fsync, rename).
fn persist(vm_dir: &Path, j: &MoveJob) {
    let path = vm_dir.join(JOB_FILE);
    let tmp = vm_dir.join(format!("{JOB_FILE}.tmp"));
    let r = serde_json::to_vec_pretty(j)
        .map_err(std::io::Error::other)
        .and_then(|b| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&b)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        });
    if let Err(e) = r {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

async fn show(State(_vm): State<Arc<Vm>>) -> Result<Json<MoveJob>, DiskError> {
    if let Some(r) = lock(&CURRENT).as_ref() {
        return Ok(Json(lock(&r.job).clone()));
    }
    let (_, dir) =
        crate::disks::service().ok_or_else(|| wrong("the disk service is not running"))?;
    let b = std::fs::read(dir.join(JOB_FILE))
        .map_err(|_| DiskError(ErrorKind::NotFound, "no storage move job".into()))?;
    serde_json::from_slice(&b)
        .map(Json)
        .map_err(|e| DiskError(ErrorKind::Failed, format!("{JOB_FILE}: {e}")))
}

async fn cancel(State(_vm): State<Arc<Vm>>) -> Result<Json<MoveJob>, DiskError> {
    let g = lock(&CURRENT);
    let r = g
        .as_ref()
        .ok_or_else(|| wrong("no storage move is running"))?;
    let j = lock(&r.job).clone();
    if j.state.is_final() {
        return Err(wrong(format!(
            "storage move {} has ended ({})",
            j.id,
            j.state.as_str()
        )));
    }
    r.cancel.store(true, Ordering::SeqCst);
    Ok(Json(j))
}

/// Every file of disk `disk`'s chain: leaf, parents, then other checkpoints' images.
pub(crate) fn chain_files(svc: &DiskService, disk: usize) -> Vec<PathBuf> {
    let mut files = svc.chain(disk).map(|c| c.chain_paths()).unwrap_or_default();
    for c in svc.state().checkpoints {
        if let Some(p) = c.images.get(disk) {
            if !files.contains(p) {
                files.push(p.clone());
            }
        }
    }
    files
}

async fn start(
    State(_vm): State<Arc<Vm>>,
    Json(req): Json<MoveStorage>,
) -> Result<Json<MoveJob>, DiskError> {
    let (svc, vm_dir) =
        crate::disks::service().ok_or_else(|| wrong("the disk service is not running"))?;
    if !req.path.is_absolute() {
        return Err(invalid("the destination must be an absolute path"));
    }
    let disks: Vec<usize> = match req.disk {
        Some(d) if d >= svc.disks() => {
            return Err(invalid(format!(
                "the VM has no disk {d} (it has {})",
                svc.disks()
            )))
        }
        Some(d) => vec![d],
        None => (0..svc.disks()).collect(),
    };
    let mut total = 0;
    for &d in &disks {
        for f in chain_files(&svc, d) {
            if f.parent() == Some(req.path.as_path()) {
                return Err(invalid(format!(
                    "disk {d} already has {} in {}",
                    f.display(),
                    req.path.display()
                )));
            }
            if let Some(n) = f.file_name() {
                if req.path.join(n).exists() {
                    return Err(invalid(format!(
                        "{} exists; remove it or choose another directory",
                        req.path.join(n).display()
                    )));
                }
            }
            total += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        }
    }
    let mut g = lock(&CURRENT);
    if let Some(r) = g.as_ref() {
        let j = lock(&r.job);
        if !j.state.is_final() {
            return Err(DiskError(
                ErrorKind::Conflict,
                format!(
                    "storage move {} is running (`vireo job show {}`)",
                    j.id, j.id
                ),
            ));
        }
    }
    let job = MoveJob {
        id: format!("mv{}", &uuid_hex()[..10]),
        dir: req.path.clone(),
        disk: disks[0],
        disks,
        state: MoveState::Copying,
        bytes_copied: 0,
        bytes_remaining: total,
        bytes_total: total,
        dirty_bytes_per_sec: 0,
        max_io_pause_ms: 0,
        moved: Vec::new(),
        error: None,
        started: storage::now_unix(),
        config_updated: false,
    };
    persist(&vm_dir, &job);
    let shared = Arc::new(Mutex::new(job.clone()));
    let cancel = Arc::new(AtomicBool::new(false));
    *g = Some(Running {
        job: shared.clone(),
        cancel: cancel.clone(),
    });
    drop(g);
    let limit = req.max_bytes_per_sec;
    std::thread::Builder::new()
        .name("vireo-storage-move".into())
        .spawn(move || run(&svc, &vm_dir, &shared, &cancel, limit))
        .map_err(|e| DiskError(ErrorKind::Failed, format!("starting the move: {e}")))?;
    tracing::info!(job = %job.id, dir = %job.dir.display(), "storage move started");
    Ok(Json(job))
}

fn uuid_hex() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
    .chars()
    .rev()
    .collect()
}

fn run(
    svc: &Arc<DiskService>,
    vm_dir: &Path,
    job: &Mutex<MoveJob>,
    cancel: &AtomicBool,
    limit: Option<u64>,
) {
    let update = |f: &dyn Fn(&mut MoveJob)| {
        let mut j = lock(job);
        f(&mut j);
        persist(vm_dir, &j);
    };
    let (dir, disks) = {
        let j = lock(job);
        (j.dir.clone(), j.disks.clone())
    };
    let mut done_bytes = 0;
    for d in disks {
        update(&|j| {
            j.disk = d;
            j.state = MoveState::Copying;
        });
        match move_disk(svc, d, &dir, job, vm_dir, cancel, limit, done_bytes) {
            Ok((moved, copied, pause)) => {
                done_bytes += copied;
                update(&|j| {
                    j.moved.extend(moved.iter().cloned());
                    j.max_io_pause_ms = j.max_io_pause_ms.max(pause);
                    j.bytes_copied = done_bytes;
                });
            }
            Err((state, e)) => {
                tracing::warn!(disk = d, "storage move ended: {e}");
                update(&|j| {
                    j.state = state;
                    j.error = (state == MoveState::Failed).then(|| e.clone());
                });
                return;
            }
        }
    }
    update(&|j| {
        j.state = MoveState::Done;
        j.bytes_remaining = 0;
    });
    tracing::info!(dir = %dir.display(), "storage move done");
}

type MoveErr = (MoveState, String);

#[allow(clippy::too_many_arguments)]
fn move_disk(
    svc: &Arc<DiskService>,
    d: usize,
    dir: &Path,
    job: &Mutex<MoveJob>,
    vm_dir: &Path,
    cancel: &AtomicBool,
    limit: Option<u64>,
    base: u64,
) -> Result<(Vec<MovedFile>, u64, u64), MoveErr> {
    let failed = |e: storage::mirror::MirrorError| (MoveState::Failed, e.full_message());
    let opts = MirrorOptions {
        max_bytes_per_sec: limit,
        ..Default::default()
    };
    let m = svc
        .mirror_disk(d, Box::new(DirSink::new(dir)), opts)
        .map_err(failed)?;
    let t0 = Instant::now();
    let mut last_persist = Instant::now();
    loop {
        let p = m.progress();
        {
            let mut j = lock(job);
            j.bytes_copied = base + p.bytes_copied;
            j.bytes_remaining = p.bytes_remaining;
            j.dirty_bytes_per_sec = p.dirty_bytes_per_sec;
            if last_persist.elapsed() > Duration::from_millis(500) {
                persist(vm_dir, &j);
                last_persist = Instant::now();
            }
        }
        if cancel.load(Ordering::SeqCst) {
            let _ = m.cancel();
            return Err((MoveState::Cancelled, "cancelled".into()));
        }
        if m.is_finished() || p.converged || t0.elapsed() > CONVERGE_TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    {
        let mut j = lock(job);
        j.state = MoveState::Switching;
        persist(vm_dir, &j);
    }
    let out = svc.complete_move(d, m).map_err(failed)?;
    // The new files are verified and in use: the old ones go.
    for f in &out.source_files {
        if let Err(e) = std::fs::remove_file(f) {
            tracing::warn!("removing the old {}: {e}", f.display());
        }
    }
    let moved = out
        .source_files
        .iter()
        .zip(&out.files)
        .map(|(from, to)| MovedFile {
            disk: d,
            from: from.clone(),
            to: to.clone(),
        })
        .collect();
    tracing::info!(
        disk = d,
        bytes = out.bytes_copied,
        final_pass = out.final_pass_bytes,
        io_pause_ms = out.io_pause.as_millis() as u64,
        checksum = format!("{:08x}", out.checksum),
        "disk moved"
    );
    Ok((moved, out.bytes_copied, out.io_pause.as_millis() as u64))
}
