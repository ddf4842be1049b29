//! The VM's disk service (every disk is an NBD export of `storage`) and the checkpoint and
//! job routes of the control API. The guest is quiesced here, around the storage calls:
//! production checkpoints freeze the guest's file systems through the agent; standard ones
//! pause the VM, switch the disks and save memory and device state with QEMU's background
//! snapshot, so the vCPUs run again before the RAM is written (see [`crate::checkpoint`]).

use crate::vm::Vm;
use anyhow::Context;
use api::checkpoint::{
    CheckpointInfo, CheckpointTree, CheckpointType, ConsolidateDisks, JobInfo, NewCheckpoint,
    RemoveCheckpoint, RenameCheckpoint,
};
use api::worker::LaunchSpec;
use api::{ErrorBody, ErrorKind};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use storage::wire::{checkpoint_info, job_info, tree};
use storage::{CheckpointKind, DiskConfig, DiskService, StorageError};

static SERVICE: OnceLock<Arc<DiskService>> = OnceLock::new();
static VM_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The VM directory (where `console.log` and `disks.json` live).
pub fn vm_dir(l: &LaunchSpec) -> PathBuf {
    l.console_log
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| l.run_dir.clone())
}

/// Serves every disk of the launch on `<run_dir>/disk<i>.nbd.sock` (also after a worker
/// restart: same chains from `disks.json`, same sockets, so QEMU reconnects).
pub fn start(l: &LaunchSpec) -> anyhow::Result<()> {
    let cfg: Vec<DiskConfig> =
        l.vm.disks
            .iter()
            .map(|d| DiskConfig {
                path: d.path.clone(),
                read_only: d.read_only,
            })
            .collect();
    let svc =
        DiskService::start(&vm_dir(l), &l.run_dir, &cfg).context("starting the disk service")?;
    let _ = SERVICE.set(svc);
    let _ = VM_DIR.set(vm_dir(l));
    Ok(())
}

/// Stops serving and closes the images cleanly (QEMU has exited).
pub fn shutdown() {
    if let Some(s) = SERVICE.get() {
        if let Err(e) = s.close() {
            tracing::warn!("closing the disks: {e:#}");
        }
    }
}

/// Routes merged into the control router.
pub fn routes() -> Router<Arc<Vm>> {
    Router::new()
        .route("/checkpoints", get(list).post(create))
        .route("/checkpoints/{cp}/remove", post(remove))
        .route("/checkpoints/{cp}/rename", post(rename))
        .route("/disks/consolidate", post(consolidate))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/resume", post(resume))
}

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

impl From<StorageError> for DiskError {
    fn from(e: StorageError) -> Self {
        let kind = match e.kind() {
            storage::ErrorKind::NotFound => ErrorKind::NotFound,
            storage::ErrorKind::InvalidInput => ErrorKind::Invalid,
            storage::ErrorKind::Busy | storage::ErrorKind::Unsupported => ErrorKind::WrongState,
            _ => ErrorKind::Failed,
        };
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        DiskError(kind, msg)
    }
}

fn failed(e: impl std::fmt::Display) -> DiskError {
    DiskError(ErrorKind::Failed, e.to_string())
}

/// The disk service and the VM directory, once started (storage migration uses them).
pub fn service() -> Option<(Arc<DiskService>, PathBuf)> {
    Some((SERVICE.get()?.clone(), VM_DIR.get()?.clone()))
}

fn svc() -> Result<Arc<DiskService>, DiskError> {
    SERVICE.get().cloned().ok_or_else(|| {
        DiskError(
            ErrorKind::WrongState,
            "the disk service is not running".into(),
        )
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, DiskError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(failed)?
        .map_err(DiskError::from)
}

async fn list(State(_vm): State<Arc<Vm>>) -> Result<Json<CheckpointTree>, DiskError> {
    Ok(Json(tree(&svc()?.state())))
}

async fn create(
    State(vm): State<Arc<Vm>>,
    Json(req): Json<NewCheckpoint>,
) -> Result<Json<CheckpointInfo>, DiskError> {
    let s = svc()?;
    match req.kind {
        CheckpointType::Production => {
            vm.agent.fsfreeze_freeze().await.map_err(|e| {
                DiskError(ErrorKind::Failed, format!("freezing the guest file systems through the agent failed: {e} (is the guest agent running? a standard checkpoint needs no agent)"))
            })?;
            let t = Instant::now();
            let name = req.name.clone();
            let r =
                blocking(move || s.create_checkpoint(name, CheckpointKind::Production, None)).await;
            let thawed = vm.agent.fsfreeze_thaw().await;
            tracing::info!(
                frozen_ms = t.elapsed().as_millis() as u64,
                "production checkpoint"
            );
            if let Err(e) = thawed {
                tracing::warn!("thawing the guest file systems: {e}");
            }
            r.map(|c| Json(checkpoint_info(&c)))
        }
        CheckpointType::Standard => {
            let dir = VM_DIR.get().cloned().unwrap_or_default();
            let state_file = dir.join(format!("vmstate-{}.bin", uuid_like()));
            let name = req.name.clone();
            let sf = state_file.clone();
            let (r, taken) = crate::checkpoint::take_standard(&vm, &state_file, move || {
                s.create_checkpoint(name, CheckpointKind::Standard, Some(sf))
            })
            .await
            .map_err(|e| failed(format!("{e:#}")))?;
            tracing::info!(
                paused_ms = taken.paused.as_millis() as u64,
                total_ms = taken.total.as_millis() as u64,
                background = taken.background,
                "standard checkpoint"
            );
            r.map(|c| Json(checkpoint_info(&c)))
                .map_err(DiskError::from)
        }
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

async fn remove(
    State(_vm): State<Arc<Vm>>,
    Path(cp): Path<String>,
) -> Result<Json<RemoveCheckpoint>, DiskError> {
    let s = svc()?;
    let job = blocking(move || s.remove_checkpoint(&cp)).await?;
    Ok(Json(RemoveCheckpoint {
        job: job.as_ref().map(job_info),
    }))
}

/// Starts (or resumes) absorbing the running leaves' parent layers into the leaves
/// (after a Replica failover: the recovery-point layers under the VM's disks).
async fn consolidate(State(_vm): State<Arc<Vm>>) -> Result<Json<ConsolidateDisks>, DiskError> {
    let s = svc()?;
    let (job, in_use) = blocking(move || {
        let job = s.consolidate()?;
        let mut in_use: Vec<PathBuf> = (0..s.disks())
            .flat_map(|d| crate::storage_move::chain_files(&s, d))
            .map(|p| p.canonicalize().unwrap_or(p))
            .collect();
        in_use.sort();
        in_use.dedup();
        Ok((job, in_use))
    })
    .await?;
    Ok(Json(ConsolidateDisks {
        job: job.as_ref().map(job_info),
        in_use,
    }))
}

async fn rename(
    State(_vm): State<Arc<Vm>>,
    Path(cp): Path<String>,
    Json(req): Json<RenameCheckpoint>,
) -> Result<Json<CheckpointInfo>, DiskError> {
    let s = svc()?;
    blocking(move || s.rename_checkpoint(&cp, &req.name))
        .await
        .map(|c| Json(checkpoint_info(&c)))
}

async fn cancel(
    State(_vm): State<Arc<Vm>>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, DiskError> {
    Ok(Json(job_info(&svc()?.cancel_job(&id)?)))
}

async fn resume(
    State(_vm): State<Arc<Vm>>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, DiskError> {
    Ok(Json(job_info(&svc()?.resume_job(&id)?)))
}
