//! Storage live migration (`vireo vm move-storage`): forwarded to the VM's worker, whose
//! disk service mirrors, verifies and switches each disk's chain. The job record the worker
//! keeps in the VM directory is what `vireo job list/show/cancel` reads; once it says
//! `done`, the VM configuration's disk paths are rewritten to the new files (idempotent,
//! also done by a `job list` after a daemon restart).

use super::Manager;
use crate::error::{ApiError, ApiResult};
use api::checkpoint::JobInfo;
use api::storage_move::{MoveJob, MoveState, MoveStorage, JOB_FILE};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// A move job in the common job form (`done`/`total` in MiB).
fn job_info(j: &MoveJob) -> JobInfo {
    let total = j.bytes_total.max(j.bytes_copied + j.bytes_remaining);
    JobInfo {
        id: j.id.clone(),
        kind: "move-storage".into(),
        checkpoint: String::new(),
        state: j.state.as_str().into(),
        done: if j.state == MoveState::Done {
            total.div_ceil(MIB)
        } else {
            j.bytes_copied / MIB
        },
        total: total.div_ceil(MIB),
        disk: j.disk,
        error: j.error.clone(),
    }
}

impl Manager {
    /// Starts moving a running VM's disks (whole chains) to `req.path`.
    pub async fn move_storage(
        self: &Arc<Self>,
        name: &str,
        req: MoveStorage,
    ) -> ApiResult<MoveJob> {
        if !req.path.is_absolute() {
            return Err(ApiError::invalid(format!(
                "the destination {} must be an absolute path",
                req.path.display()
            )));
        }
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let client = self.running_worker(name, &uuid).await.map_err(|_| {
            ApiError::wrong_state(format!(
                "VM {name} is not running: storage live migration moves a running VM's disks (start it with `vireo vm start {name}`)"
            ))
        })?;
        let job: MoveJob = client.post("/storage-move", &req).await?;
        let m = self.clone();
        tokio::spawn(async move { m.watch_move(uuid).await });
        Ok(job)
    }

    /// Follows a move until it ends, then records the new paths in the VM configuration.
    async fn watch_move(self: Arc<Self>, uuid: Uuid) {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            match self.read_move(&uuid) {
                Some(j) if j.state.is_final() => {
                    self.apply_moved(&uuid, j);
                    return;
                }
                Some(_) if self.qemu_pid(&uuid).is_some() => {}
                _ => return,
            }
        }
    }

    fn read_move(&self, uuid: &Uuid) -> Option<MoveJob> {
        let b = std::fs::read(self.store.vm_dir(uuid).join(JOB_FILE)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Rewrites the configured disk paths the job moved (once).
    fn apply_moved(&self, uuid: &Uuid, mut j: MoveJob) -> MoveJob {
        if j.config_updated || j.moved.is_empty() {
            return j;
        }
        let Ok(mut spec) = self.spec(uuid) else {
            return j;
        };
        for m in &j.moved {
            if let Some(d) = spec.disks.get_mut(m.disk) {
                if d.path == m.from {
                    d.path = m.to.clone();
                }
            }
        }
        if let Err(e) = self.store.save(&spec) {
            tracing::warn!("recording the moved disk paths: {e}");
            return j;
        }
        if let Some(e) = super::lock(&self.vms).get_mut(uuid) {
            e.spec = spec;
        }
        if j.state.is_final() {
            j.config_updated = true;
            let path = self.store.vm_dir(uuid).join(JOB_FILE);
            if let Ok(b) = serde_json::to_vec_pretty(&j) {
                if let Err(e) = crate::store::write_atomic(&path, &b) {
                    tracing::warn!("{}: {e}", path.display());
                }
            }
        }
        tracing::info!(job = %j.id, files = j.moved.len(), "VM configuration follows the moved disks");
        j
    }

    /// The storage move job of a VM, in the common job form (for `vireo job list`).
    pub(crate) fn storage_move_job(&self, uuid: &Uuid) -> Option<JobInfo> {
        let mut j = self.read_move(uuid)?;
        if j.state.is_final() {
            j = self.apply_moved(uuid, j);
        } else if self.qemu_pid(uuid).is_none() {
            j.state = MoveState::Failed;
            j.error =
                Some("the VM stopped during the move; the disks are where disks.json says".into());
        }
        Some(job_info(&j))
    }

    /// Cancels a running storage move (`None` when `id` is no storage move of any VM).
    pub(crate) async fn storage_move_cancel(
        &self,
        id: &str,
        resume: bool,
    ) -> Option<ApiResult<JobInfo>> {
        let vms: Vec<(Uuid, String)> = super::lock(&self.vms)
            .iter()
            .map(|(u, e)| (*u, e.spec.name.clone()))
            .collect();
        let (uuid, name) = vms
            .into_iter()
            .find(|(u, _)| self.read_move(u).is_some_and(|j| j.id == id))?;
        if resume {
            return Some(Err(ApiError::wrong_state(format!(
                "storage move {id} cannot be resumed: run `vireo vm move-storage {name} --path DIR` again"
            ))));
        }
        Some(
            async {
                let client = self.running_worker(&name, &uuid).await?;
                let j: MoveJob = client.post("/storage-move/cancel", &()).await?;
                Ok(job_info(&j))
            }
            .await,
        )
    }
}
