//! Checkpoints and merge jobs: forwarded to the VM's worker while it runs (the disk service
//! there owns the chains); done here on the persisted state while the VM is off.

use super::Manager;
use crate::error::{ApiError, ApiResult};
use api::checkpoint::{
    CheckpointInfo, CheckpointTree, ExportCheckpoint, JobInfo, NewCheckpoint, RemoveCheckpoint,
    RenameCheckpoint,
};
use storage::wire::{checkpoint_info, tree};
use storage::{DiskState, StorageError};
use uuid::Uuid;

fn storage_err(e: StorageError) -> ApiError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    match e.kind() {
        storage::ErrorKind::NotFound => ApiError::not_found(msg),
        storage::ErrorKind::InvalidInput => ApiError::invalid(msg),
        storage::ErrorKind::Busy | storage::ErrorKind::Unsupported => ApiError::wrong_state(msg),
        _ => ApiError::failed(msg),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
        .map_err(storage_err)
}

impl Manager {
    fn cp_state(&self, uuid: &Uuid) -> ApiResult<DiskState> {
        let spec = self.spec(uuid)?;
        let disks: Vec<_> = spec.disks.iter().map(|d| d.path.clone()).collect();
        DiskState::load_or_new(&self.store.vm_dir(uuid), &disks).map_err(storage_err)
    }

    /// The checkpoint tree of a VM.
    pub async fn checkpoints(&self, name: &str) -> ApiResult<CheckpointTree> {
        let (uuid, _) = self.find(name)?;
        Ok(tree(&self.cp_state(&uuid)?))
    }

    /// Creates a checkpoint of a running VM.
    pub async fn checkpoint_new(
        &self,
        name: &str,
        req: NewCheckpoint,
    ) -> ApiResult<CheckpointInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let client = self.running_worker(name, &uuid).await.map_err(|_| {
            ApiError::wrong_state(format!("VM {name} is not running: checkpoints are taken of a running VM (start it with `vireo vm start {name}`)"))
        })?;
        Ok(client
            .with_timeout(std::time::Duration::from_secs(600))
            .post("/checkpoints", &req)
            .await?)
    }

    /// Reverts a VM to a checkpoint (Hyper-V's apply). A running VM is turned off first; then
    /// a standard checkpoint's memory state becomes the VM's saved state, and a VM that was
    /// running is started again from it (it resumes where the checkpoint was). A production
    /// checkpoint leaves the VM off. A checkpoint that does not exist, or an unfinished merge,
    /// is refused before anything is turned off.
    pub async fn checkpoint_apply(&self, name: &str, cp: &str) -> ApiResult<CheckpointInfo> {
        let (uuid, op) = self.find(name)?;
        let g = op.lock().await;
        let dir = self.store.vm_dir(&uuid);
        let st = DiskState::load(&dir)
            .map_err(storage_err)?
            .ok_or_else(|| ApiError::not_found(format!("VM {name} has no checkpoints")))?;
        if st.find(cp).is_none() {
            return Err(ApiError::not_found(format!(
                "VM {name} has no checkpoint named {cp:?} (see `vireo checkpoint list {name}`)"
            )));
        }
        let was_running = self.qemu_pid(&uuid).is_some();
        if was_running {
            // The worker owns the chains while it runs: ask it whether a merge is going on.
            let client = self.running_worker(name, &uuid).await?;
            let tree: CheckpointTree = client.get("/checkpoints").await?;
            if tree
                .jobs
                .iter()
                .any(|j| j.state == "copying" || j.state == "cancelled")
            {
                return Err(ApiError::wrong_state(format!(
                    "VM {name} has an unfinished merge job (see `vireo job list`): wait for it or let it finish before applying"
                )));
            }
            self.force_off(&uuid).await;
            if self.qemu_pid(&uuid).is_some() || self.worker_pid(&uuid).is_some() {
                return Err(ApiError::failed(format!(
                    "VM {name} could not be turned off to apply the checkpoint"
                )));
            }
            self.cache_status(&uuid, None);
        }
        let cp = cp.to_string();
        let c = blocking(move || storage::offline::apply(&dir, &cp)).await?;
        let saved = self.saved_state_path(&uuid);
        let _ = std::fs::remove_file(&saved);
        if let Some(m) = &c.memory_state {
            std::fs::copy(m, &saved).map_err(|e| {
                ApiError::failed(format!(
                    "copying the checkpoint's memory state {}: {e}",
                    m.display()
                ))
            })?;
        }
        self.set_message(&uuid, Some(format!("checkpoint {} applied", c.name)));
        drop(g);
        if was_running && c.memory_state.is_some() {
            self.start(name).await?;
        }
        Ok(checkpoint_info(&c))
    }

    /// Removes a checkpoint (live merge job when the VM runs on it).
    pub async fn checkpoint_remove(&self, name: &str, cp: &str) -> ApiResult<RemoveCheckpoint> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        self.refuse_raw(&uuid)?;
        if self.qemu_pid(&uuid).is_some() {
            let client = self.running_worker(name, &uuid).await?;
            return Ok(client
                .post(&format!("/checkpoints/{cp}/remove"), &())
                .await?);
        }
        let dir = self.store.vm_dir(&uuid);
        let cp = cp.to_string();
        blocking(move || storage::offline::remove(&dir, &cp)).await?;
        Ok(RemoveCheckpoint { job: None })
    }

    /// Renames a checkpoint.
    pub async fn checkpoint_rename(
        &self,
        name: &str,
        cp: &str,
        req: RenameCheckpoint,
    ) -> ApiResult<CheckpointInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        if self.qemu_pid(&uuid).is_some() {
            let client = self.running_worker(name, &uuid).await?;
            return Ok(client
                .post(&format!("/checkpoints/{cp}/rename"), &req)
                .await?);
        }
        let dir = self.store.vm_dir(&uuid);
        let cp = cp.to_string();
        blocking(move || storage::offline::rename_checkpoint(&dir, &cp, &req.name))
            .await
            .map(|c| checkpoint_info(&c))
    }

    /// Writes a checkpoint's disks as standalone VHDX files into a directory.
    pub async fn checkpoint_export(
        &self,
        name: &str,
        cp: &str,
        req: ExportCheckpoint,
    ) -> ApiResult<Vec<std::path::PathBuf>> {
        let (uuid, _) = self.find(name)?;
        if !req.dir.is_absolute() {
            return Err(ApiError::invalid(
                "the export directory must be an absolute path",
            ));
        }
        let st = self.cp_state(&uuid)?;
        let cp = cp.to_string();
        blocking(move || storage::offline::export(&st, &cp, &req.dir)).await
    }

    fn refuse_raw(&self, uuid: &Uuid) -> ApiResult<()> {
        let st = self.cp_state(uuid)?;
        for p in &st.leaves {
            if matches!(vhdx::detect_format(p), Ok(vhdx::ImageFormat::Raw)) {
                return Err(storage_err(StorageError::RawDisk { path: p.clone() }));
            }
        }
        Ok(())
    }

    /// Every job of every VM.
    pub async fn jobs(&self) -> ApiResult<Vec<(String, JobInfo)>> {
        let vms: Vec<(Uuid, String)> = super::lock(&self.vms)
            .iter()
            .map(|(u, e)| (*u, e.spec.name.clone()))
            .collect();
        let mut out = Vec::new();
        for (u, n) in vms {
            if let Ok(Some(st)) = DiskState::load(&self.store.vm_dir(&u)) {
                out.extend(tree(&st).jobs.into_iter().map(|j| (n.clone(), j)));
            }
            out.extend(self.storage_move_job(&u).map(|j| (n.clone(), j)));
        }
        Ok(out)
    }

    /// Cancels (or, with `resume`, continues) a merge job.
    pub async fn job_cancel(&self, id: &str, resume: bool) -> ApiResult<JobInfo> {
        if let Some(r) = self.storage_move_cancel(id, resume).await {
            return r;
        }
        let (vm, _) = self
            .jobs()
            .await?
            .into_iter()
            .find(|(_, j)| j.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
        let (uuid, _) = self.find(&vm)?;
        let client = self.running_worker(&vm, &uuid).await.map_err(|_| {
            ApiError::wrong_state(format!(
                "VM {vm} is not running: its merge job continues when it starts"
            ))
        })?;
        let verb = if resume { "resume" } else { "cancel" };
        Ok(client.post(&format!("/jobs/{id}/{verb}"), &()).await?)
    }
}
