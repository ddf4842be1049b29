//! After a committed failover the VM runs on a differencing layer over the recovery point
//! it was started from, which sits on every older point down to the store's base (and,
//! after planned round trips, on the layers of earlier generations). Like Hyper-V merging
//! the recovery snapshots when a failover completes, the layers are merged away: the VM's
//! worker runs a `consolidate` job (each leaf absorbs its parents down to the bottom image,
//! live; `vireo job list` shows it), then the layer files of the replica directory that no
//! disk of the VM uses any more are deleted. The chain stays two layers deep however many
//! times the VM fails over and back.
//!
//! It runs from the replica scheduler, retried every [`RETRY`] until done: a VM that is off
//! waits for its next start, a job the administrator cancelled waits for `vireo job
//! resume`. Files are deleted only after the worker reports what its disks use at that
//! moment; only `.vhdx`/`.avhdx` files of this VM's own layer directories (`store*`,
//! `failover-*`) are candidates.

use super::{lock, read_json, replica_lock, save_json, ReplicaRec, Running};
use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use api::checkpoint::ConsolidateDisks;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage::{DiskState, MergeState};

/// Time between two attempts for one VM.
const RETRY: Duration = Duration::from_secs(20);
/// Poll interval of a running job.
const POLL: Duration = Duration::from_secs(1);

/// VMs being consolidated now, and when each was last tried.
static ATTEMPTS: Mutex<BTreeMap<String, (bool, Option<Instant>)>> = Mutex::new(BTreeMap::new());

impl Manager {
    /// Starts the consolidation of every committed failover that needs one (called by the
    /// replica scheduler).
    pub(super) fn replica_consolidations(self: &Arc<Self>) {
        for (dir, rec) in self.replica_recs() {
            let Some(f) = rec.failover.clone() else {
                continue;
            };
            // A test copy may run on a point's layers: its test-stop comes first.
            if !rec.committed || rec.consolidated || rec.test.is_some() {
                continue;
            }
            {
                let mut a = lock(&ATTEMPTS);
                let e = a.entry(rec.vm.clone()).or_insert((false, None));
                if e.0 || e.1.is_some_and(|t| t.elapsed() < RETRY) {
                    continue;
                }
                *e = (true, Some(Instant::now()));
            }
            let m = self.clone();
            tokio::spawn(async move {
                let outcome = m.consolidate_failover(&dir, &f).await;
                let note = match &outcome {
                    Ok(removed) => {
                        tracing::info!(vm = %rec.vm, removed, "recovery-point layers merged into the failed-over VM's disks");
                        None
                    }
                    Err(e) => {
                        tracing::info!(vm = %rec.vm, "merging the recovery-point layers: {}", e.message);
                        Some(e.message.clone())
                    }
                };
                if let Err(e) = m
                    .record_consolidation(&dir, &rec.vm, outcome.is_ok(), note)
                    .await
                {
                    tracing::warn!(vm = %rec.vm, "recording the layer merge: {}", e.message);
                }
                if let Some(e) = lock(&ATTEMPTS).get_mut(&rec.vm) {
                    e.0 = false;
                }
            });
        }
    }

    /// Merges the layers under the failed-over VM `f` and deletes the unused ones in `dir`;
    /// returns how many files were deleted.
    async fn consolidate_failover(&self, dir: &Path, f: &Running) -> ApiResult<usize> {
        let (uuid, _) = self.find(&f.vm)?;
        let client = self.running_worker(&f.vm, &uuid).await.map_err(|_| {
            ApiError::wrong_state(format!(
                "waiting for {} to run (its recovery-point layers are merged while it runs)",
                f.vm
            ))
        })?;
        let started: ConsolidateDisks = client.post("/disks/consolidate", &()).await?;
        if let Some(job) = started.job {
            let vm_dir = self.store.vm_dir(&uuid);
            loop {
                tokio::time::sleep(POLL).await;
                let st = DiskState::load(&vm_dir)
                    .ok()
                    .flatten()
                    .and_then(|st| st.jobs.into_iter().find(|j| j.id == job.id));
                match st.map(|j| j.state) {
                    Some(MergeState::Done) | None => break,
                    Some(MergeState::Copying { .. }) if self.qemu_pid(&uuid).is_some() => {}
                    Some(MergeState::Copying { .. }) => {
                        return Err(ApiError::wrong_state(format!(
                            "{} stopped while its layers were merged: job {} continues at its next start",
                            f.vm, job.id
                        )))
                    }
                    Some(MergeState::Cancelled { .. }) => {
                        return Err(ApiError::wrong_state(format!(
                            "merging the recovery-point layers under {} was cancelled: `vireo job resume {}`",
                            f.vm, job.id
                        )))
                    }
                    Some(MergeState::Failed { reason }) => {
                        return Err(ApiError::failed(format!(
                            "merging the recovery-point layers under {} failed (job {}): {reason}",
                            f.vm, job.id
                        )))
                    }
                }
            }
        }
        // What the disks use now (a second call starts nothing once every leaf is merged).
        let now: ConsolidateDisks = client.post("/disks/consolidate", &()).await?;
        if let Some(job) = now.job {
            return Err(ApiError::wrong_state(format!(
                "more layers to merge under {} (job {})",
                f.vm, job.id
            )));
        }
        let in_use: BTreeSet<PathBuf> = now.in_use.into_iter().collect();
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || remove_unused_layers(&dir, &in_use))
            .await
            .map_err(ApiError::internal)?
    }

    /// Notes the outcome in the replica record (under the VM's replica lock: other
    /// commands rewrite the record too).
    async fn record_consolidation(
        &self,
        dir: &Path,
        vm: &str,
        done: bool,
        note: Option<String>,
    ) -> ApiResult<()> {
        let l = replica_lock(vm);
        let _g = l.lock().await;
        let path = dir.join("replica-vm.json");
        let Some(mut rec) = read_json::<ReplicaRec>(&path) else {
            return Ok(());
        };
        if rec.consolidated == done && rec.consolidate_note == note {
            return Ok(());
        }
        rec.consolidated = done;
        rec.consolidate_note = note;
        save_json(&path, &rec)
    }
}

/// Deletes the layer files of `dir`'s layer directories that are not in `in_use`
/// (canonical paths), then the directories left empty; returns how many files went.
fn remove_unused_layers(dir: &Path, in_use: &BTreeSet<PathBuf>) -> ApiResult<usize> {
    if in_use.is_empty() {
        return Err(ApiError::internal(
            "the worker reported no disk files in use",
        ));
    }
    let mut removed = 0;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ApiError::failed(format!("reading {}: {e}", dir.display())))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let layer_dir =
            name == "store" || name.starts_with("store-") || name.starts_with("failover-");
        if layer_dir && e.path().is_dir() {
            removed += remove_unused_in(&e.path(), in_use)?;
        }
    }
    Ok(removed)
}

fn remove_unused_in(d: &Path, in_use: &BTreeSet<PathBuf>) -> ApiResult<usize> {
    let mut removed = 0;
    let entries = std::fs::read_dir(d)
        .map_err(|e| ApiError::failed(format!("reading {}: {e}", d.display())))?;
    for e in entries.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            removed += remove_unused_in(&p, in_use)?;
            // Only if empty: a directory still holding a used layer stays.
            let _ = std::fs::remove_dir(&p);
            continue;
        }
        let is_layer = p.extension().is_some_and(|x| x == "vhdx" || x == "avhdx");
        let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
        if meta.is_file() && is_layer && !in_use.contains(&canon) {
            std::fs::remove_file(&p)
                .map_err(|e| ApiError::failed(format!("removing {}: {e}", p.display())))?;
            removed += 1;
        }
    }
    Ok(removed)
}
