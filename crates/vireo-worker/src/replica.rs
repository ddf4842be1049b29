//! Replica on the worker: change tracking on the VM's disks (one `storage::tracking`
//! tracker per disk, files in `<vm dir>/replica/`) and the cut of a cycle into a file that
//! vireod ships. A restarted worker re-attaches the trackers when `<vm dir>/replica/tracking`
//! exists, so tracking survives worker and host crashes (the tracker files are write-ahead).

use crate::vm::Vm;
use api::replica::{
    CutRequest, ExportReplica, ExportedDisks, ResyncRequest, TrackRequest, TrackStatus,
};
use api::{ErrorBody, ErrorKind};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use replica::CutStats;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use storage::tracking::{self, ChangeTracker, TrackedDisk};

static TRACKED: Mutex<Vec<TrackedDisk>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error answered to vireod.
pub struct ReplicaError(ErrorKind, String);

impl IntoResponse for ReplicaError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::WrongState => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        (
            status,
            Json(ErrorBody {
                kind: self.0,
                error: self.1,
            }),
        )
            .into_response()
    }
}

fn failed(e: &dyn std::error::Error) -> ReplicaError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    ReplicaError(ErrorKind::Failed, msg)
}

/// Routes merged into the control router.
pub fn routes() -> Router<Arc<Vm>> {
    Router::new()
        .route("/replica", get(status))
        .route("/replica/track", post(track))
        .route("/replica/untrack", post(untrack))
        .route("/replica/cut", post(cut))
        .route("/replica/commit", post(commit))
        .route("/replica/abort", post(abort))
        .route("/replica/resync", post(resync))
        .route("/replica/export", post(export))
}

fn dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("replica")
}

fn marker(vm_dir: &Path) -> PathBuf {
    dir(vm_dir).join("tracking")
}

fn attach(mark_all: bool) -> Result<TrackStatus, ReplicaError> {
    let (svc, vm_dir) = crate::disks::service().ok_or_else(|| {
        ReplicaError(
            ErrorKind::WrongState,
            "the disk service is not running".into(),
        )
    })?;
    let d = dir(&vm_dir);
    std::fs::create_dir_all(&d).map_err(|e| failed(&e))?;
    let mut disks = Vec::new();
    let mut resumed = Vec::new();
    for i in 0..svc.disks() {
        let Some(chain) = svc.chain(i) else { continue };
        let size = nbd::Export::size(chain.as_ref());
        let (t, r) =
            ChangeTracker::open(&d.join(format!("disk{i}.cbt")), size).map_err(|e| failed(&e))?;
        if mark_all {
            t.mark_all().map_err(|e| failed(&e))?;
        }
        tracking::attach(&chain, t.clone()).map_err(|e| failed(&e))?;
        resumed.push(format!("{r:?}"));
        disks.push(TrackedDisk { chain, tracker: t });
    }
    std::fs::write(marker(&vm_dir), b"1").map_err(|e| failed(&e))?;
    *lock(&TRACKED) = disks;
    tracing::info!(?resumed, mark_all, "replica change tracking attached");
    Ok(status_now())
}

fn status_now() -> TrackStatus {
    let t = lock(&TRACKED);
    TrackStatus {
        tracking: !t.is_empty(),
        dirty_grains: tracking::dirty_total(&t),
        resync_required: t.iter().any(|d| d.tracker.resync_required()),
        generation: t.first().map(|d| d.tracker.generation()).unwrap_or(0),
        disk_sizes: t.iter().map(|d| d.tracker.disk_size()).collect(),
    }
}

/// Re-attaches the trackers of a replicated VM (worker start; after `disks::start`).
pub fn resume() {
    let Some((_, vm_dir)) = crate::disks::service() else {
        return;
    };
    if marker(&vm_dir).exists() {
        if let Err(e) = attach(false) {
            tracing::warn!("re-attaching replica change tracking: {}", e.1);
        }
    }
}

async fn status() -> Json<TrackStatus> {
    Json(status_now())
}

async fn track(Json(req): Json<TrackRequest>) -> Result<Json<TrackStatus>, ReplicaError> {
    tokio::task::spawn_blocking(move || attach(req.mark_all))
        .await
        .map_err(|e| failed(&e))?
        .map(Json)
}

async fn untrack() -> Result<Json<TrackStatus>, ReplicaError> {
    let disks = std::mem::take(&mut *lock(&TRACKED));
    for d in &disks {
        tracking::detach(&d.chain);
        let _ = std::fs::remove_file(d.tracker.path());
    }
    if let Some((_, vm_dir)) = crate::disks::service() {
        let _ = std::fs::remove_file(marker(&vm_dir));
    }
    Ok(Json(status_now()))
}

fn tracked() -> Result<Vec<TrackedDisk>, ReplicaError> {
    let t = lock(&TRACKED).clone();
    if t.is_empty() {
        return Err(ReplicaError(
            ErrorKind::WrongState,
            "change tracking is not attached to this VM's disks".into(),
        ));
    }
    Ok(t)
}

/// Cuts a cycle into `req.path`. An application-consistent cut freezes the guest's file
/// systems through the agent first (they flush their dirty data and stop writing) and
/// thaws them as soon as the cut is written, whatever happened; when the freeze fails the
/// cut is crash-consistent and says why, so replication never stops over an agent.
async fn cut(
    State(vm): State<Arc<Vm>>,
    Json(req): Json<CutRequest>,
) -> Result<Json<CutStats>, ReplicaError> {
    let disks = tracked()?;
    // Partial cycles (initial replication) are never recovery points: no freeze for them.
    let want_freeze = req.app_consistent && tracking::dirty_total(&disks) <= req.max_grains;
    let mut freeze_error = None;
    let frozen_at = if want_freeze {
        match vm.agent.fsfreeze_freeze().await {
            Ok(n) => {
                tracing::info!(
                    filesystems = n,
                    seq = req.seq,
                    "guest file systems frozen for the cut"
                );
                Some(std::time::Instant::now())
            }
            Err(e) => {
                // A freeze that failed half way thaws what it froze; make sure of it.
                let _ = vm.agent.fsfreeze_thaw().await;
                freeze_error = Some(format!("freezing the guest's file systems failed: {e}"));
                None
            }
        }
    } else {
        None
    };
    let frozen = frozen_at.is_some();
    let r = tokio::task::spawn_blocking(move || {
        let cut = if req.stream {
            replica::cut_streaming
        } else {
            replica::cut_to_file_marked
        };
        cut(&disks, &req.vm, req.seq, req.max_grains, &req.path, frozen)
    })
    .await;
    let frozen_ms = match frozen_at {
        Some(t) => {
            let thawed = vm.agent.fsfreeze_thaw().await;
            let ms = t.elapsed().as_millis() as u64;
            match thawed {
                Ok(_) => tracing::info!(frozen_ms = ms, "guest file systems thawed"),
                Err(e) => tracing::warn!("thawing the guest file systems after the cut: {e}"),
            }
            ms
        }
        None => 0,
    };
    let mut stats = r.map_err(|e| failed(&e))?.map_err(|e| failed(&e))?;
    stats.frozen_ms = frozen_ms;
    if let Some(e) = freeze_error {
        tracing::warn!(seq = stats.seq, "{e}: the cut is crash-consistent");
        stats.app_consistent_error = Some(e);
    }
    Ok(Json(stats))
}

async fn commit(Json(seq): Json<u64>) -> Result<Json<TrackStatus>, ReplicaError> {
    let disks = tracked()?;
    tokio::task::spawn_blocking(move || replica::primary::commit(&disks, seq))
        .await
        .map_err(|e| failed(&e))?
        .map_err(|e| failed(&e))?;
    Ok(Json(status_now()))
}

async fn abort() -> Result<Json<TrackStatus>, ReplicaError> {
    replica::primary::abort(&tracked()?);
    Ok(Json(status_now()))
}

/// Checksum resync: compares the live disks (tracking attached, so later writes are
/// recorded) with the replica's sums in `req.path` and marks the differing blocks.
async fn resync(
    Json(req): Json<ResyncRequest>,
) -> Result<Json<replica::ResyncStats>, ReplicaError> {
    let disks = tracked()?;
    tokio::task::spawn_blocking(move || {
        let b = std::fs::read(&req.path).map_err(|e| failed(&e))?;
        let remote = replica::Sums::decode(&b)
            .map_err(|e| ReplicaError(ErrorKind::Invalid, e.to_string()))?;
        replica::resync::mark_differences(&disks, &remote).map_err(|e| {
            let kind = match e.kind() {
                replica::ErrorKind::InvalidInput => ErrorKind::Invalid,
                _ => ErrorKind::Failed,
            };
            let f = failed(&e);
            ReplicaError(kind, f.1)
        })
    })
    .await
    .map_err(|e| failed(&e))?
    .map(Json)
}

/// Copies every disk, read through the disk service while the guest runs, into
/// `req.dir/disk<i>.vhdx` (a seed for the replica; it need not be consistent: the checksum
/// compare at the first cycle ships whatever changed).
async fn export(Json(req): Json<ExportReplica>) -> Result<Json<ExportedDisks>, ReplicaError> {
    let (svc, _) = crate::disks::service().ok_or_else(|| {
        ReplicaError(
            ErrorKind::WrongState,
            "the disk service is not running".into(),
        )
    })?;
    tokio::task::spawn_blocking(move || {
        let mut out = ExportedDisks::default();
        for i in 0..svc.disks() {
            let Some(chain) = svc.chain(i) else { continue };
            let size = nbd::Export::size(chain.as_ref());
            let name = format!("disk{i}.vhdx");
            let n = replica::seed::export_image(
                size,
                |off, buf| nbd::Export::read_at(chain.as_ref(), buf, off),
                &req.dir.join(&name),
            )
            .map_err(|e| failed(&e))?;
            out.disk_sizes.push(size);
            out.files.push(name);
            out.bytes += n;
        }
        Ok(Json(out))
    })
    .await
    .map_err(|e| failed(&e))?
}
