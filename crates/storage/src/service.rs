//! [`DiskService`]: one NBD export per VM disk on `<run_dir>/disk<i>.nbd.sock`, the
//! checkpoint operations that switch chains under running I/O, and the live merge job.

use crate::chain::DiskChain;
use crate::error::{Result, StorageError};
use crate::state::{
    now_unix, Checkpoint, CheckpointKind, DiskState, MergeJob, MergeKind, MergeState,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often a live merge records its progress (each time after syncing the target).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One disk as configured.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Image given in the VM's configuration (the base when no checkpoint exists).
    pub path: PathBuf,
    /// Serve read-only.
    pub read_only: bool,
}

/// The disk service of one VM.
pub struct DiskService {
    vm_dir: PathBuf,
    chains: Vec<Arc<DiskChain>>,
    servers: Vec<nbd::Server>,
    state: Mutex<DiskState>,
    /// Serializes checkpoint operations.
    op: Mutex<()>,
    cancel: AtomicBool,
    merging: AtomicBool,
    closing: AtomicBool,
}

/// Socket of disk `i` in `run_dir`.
pub fn socket_path(run_dir: &Path, i: usize) -> PathBuf {
    run_dir.join(format!("disk{i}.nbd.sock"))
}

/// Write journal of disk `i` in the VM directory (requests acknowledged since the last
/// flush, replayed by a worker restarted after a kill -9).
pub fn journal_path(vm_dir: &Path, i: usize) -> PathBuf {
    vm_dir.join(format!("disk{i}.journal"))
}

/// Export name of disk `i`.
pub fn export_name(i: usize) -> String {
    format!("disk{i}")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DiskService {
    /// Opens every disk's current chain (from `vm_dir/disks.json`, or the configured paths),
    /// resuming an interrupted merge, and serves disk `i` as export `disk<i>` on
    /// [`socket_path`]. Sockets are bound before this returns, so QEMU can connect at once;
    /// a stale socket of a killed worker is taken over. Must run inside a tokio runtime.
    pub fn start(vm_dir: &Path, run_dir: &Path, disks: &[DiskConfig]) -> Result<Arc<DiskService>> {
        let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
        let state = DiskState::load_or_new(vm_dir, &paths)?;
        crate::absorb::collect_garbage(&state);
        let resume = state.active_merge().cloned();
        let mut chains = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let chain = match &resume {
                Some(j) if j.disk == i && j.kind == MergeKind::IntoParent => {
                    DiskChain::open_merging(&j.top, &j.target)?
                }
                _ => DiskChain::open(&state.leaves[i], d.read_only)?,
            };
            if !d.read_only {
                chain.attach_journal(&journal_path(vm_dir, i))?;
            }
            chains.push(Arc::new(chain));
        }
        let mut servers = Vec::new();
        for (i, c) in chains.iter().enumerate() {
            let server =
                nbd::Server::new(nbd::ServerConfig::default()).map_err(StorageError::Nbd)?;
            server
                .add_export(export_name(i), c.clone())
                .map_err(StorageError::Nbd)?;
            let sock = socket_path(run_dir, i);
            let listener = nbd::bind_unix(&sock).map_err(StorageError::Nbd)?;
            let s = server.clone();
            tokio::spawn(async move {
                if let Err(e) = s.serve_unix(listener).await {
                    tracing::error!(disk = i, "NBD server ended: {e}");
                }
            });
            servers.push(server);
        }
        let svc = Arc::new(DiskService {
            vm_dir: vm_dir.to_path_buf(),
            chains,
            servers,
            state: Mutex::new(state),
            op: Mutex::new(()),
            cancel: AtomicBool::new(false),
            merging: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        if let Some(j) = resume {
            if matches!(j.state, MergeState::Copying { .. }) {
                tracing::info!(job = %j.id, "resuming the interrupted merge");
                svc.clone().spawn_merge(j.id);
            }
        }
        Ok(svc)
    }

    /// The chain of disk `i`.
    pub fn chain(&self, i: usize) -> Option<Arc<DiskChain>> {
        self.chains.get(i).cloned()
    }

    /// Number of disks.
    pub fn disks(&self) -> usize {
        self.chains.len()
    }

    /// A copy of the persisted state.
    pub fn state(&self) -> DiskState {
        lock(&self.state).clone()
    }

    /// Applies `f` to the persisted state and saves it (storage migration records moved
    /// files through it, `crate::mirror`).
    pub(crate) fn update_state(&self, f: impl FnOnce(&mut DiskState)) -> Result<()> {
        let mut st = lock(&self.state);
        f(&mut st);
        st.save(&self.vm_dir)
    }

    /// Stops serving (connections drain and close).
    pub fn shutdown(&self) {
        for s in &self.servers {
            s.shutdown();
        }
    }

    /// Stops serving and closes every image cleanly (the worker calls it when the VM ends).
    pub fn close(&self) -> Result<()> {
        self.closing.store(true, Ordering::SeqCst);
        self.shutdown();
        let _op = lock(&self.op);
        let mut r = Ok(());
        for c in &self.chains {
            if let Err(e) = c.close() {
                tracing::warn!("closing a disk: {e}");
                r = Err(e);
            }
        }
        r
    }

    /// Creates a checkpoint: every writable disk switches to a new differencing leaf whose
    /// parent is the old one (which becomes the checkpoint's frozen image). Blocking; the
    /// caller quiesces the guest first when it wants consistency.
    pub fn create_checkpoint(
        &self,
        name: Option<String>,
        kind: CheckpointKind,
        memory_state: Option<PathBuf>,
    ) -> Result<Checkpoint> {
        let _op = lock(&self.op);
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        {
            let st = lock(&self.state);
            if let Some(j) = st.active_merge() {
                return Err(busy_with(j));
            }
            let name = name.as_deref().unwrap_or("");
            if !name.is_empty() && st.find(name).is_some() {
                return Err(StorageError::InvalidInput(format!(
                    "a checkpoint named {name:?} exists"
                )));
            }
        }
        if let Some(c) = self.chains.iter().find(|c| c.is_raw()) {
            return Err(StorageError::RawDisk {
                path: c.leaf().unwrap_or_default(),
            });
        }
        let mut images = Vec::new();
        for (i, c) in self.chains.iter().enumerate() {
            let flags = nbd::Export::flags(c.as_ref());
            let leaf = c.leaf().unwrap_or_default();
            if flags.read_only {
                images.push(leaf);
                continue;
            }
            let new = leaf_name(&leaf, &id);
            let old = c.switch_to_child(&new, |p| {
                let mut st = lock(&self.state);
                st.leaves[i] = p.to_path_buf();
                st.save(&self.vm_dir)
            })?;
            images.push(old);
        }
        let mut st = lock(&self.state);
        let cp = Checkpoint {
            name: name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("checkpoint-{}", st.checkpoints.len() + 1)),
            id,
            parent: st.current.clone(),
            kind,
            created: now_unix(),
            images,
            memory_state,
        };
        st.checkpoints.push(cp.clone());
        st.current = Some(cp.id.clone());
        st.save(&self.vm_dir)?;
        Ok(cp)
    }

    /// Renames a checkpoint.
    pub fn rename_checkpoint(&self, name: &str, new_name: &str) -> Result<Checkpoint> {
        let _op = lock(&self.op);
        let mut st = lock(&self.state);
        rename(&mut st, name, new_name)?;
        st.save(&self.vm_dir)?;
        st.find(new_name)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(new_name.into()))
    }

    /// Removes a checkpoint. A checkpoint nothing descends from loses its files at once
    /// (`Ok(None)`); the checkpoint the VM runs on is merged live into the running disk by a
    /// background job (`Ok(Some(job))`). Others are refused.
    pub fn remove_checkpoint(self: &Arc<Self>, name: &str) -> Result<Option<MergeJob>> {
        let _op = lock(&self.op);
        let mut st = lock(&self.state);
        if let Some(j) = st.active_merge() {
            return Err(busy_with(j));
        }
        match plan_remove(&st, name)? {
            Removal::DeleteFiles(cp, files) => {
                st.checkpoints.retain(|c| c.id != cp);
                st.save(&self.vm_dir)?;
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
                Ok(None)
            }
            Removal::LiveMerge(cp) => {
                let c = st
                    .find(&cp)
                    .cloned()
                    .ok_or_else(|| StorageError::NotFound(cp.clone()))?;
                let disk = first_merge_disk(&st, &c, 0).ok_or_else(|| {
                    StorageError::Unsupported("no disk of this checkpoint needs merging".into())
                })?;
                let job = MergeJob {
                    disk,
                    top: st.leaves[disk].clone(),
                    target: c.images[disk].clone(),
                    ..MergeJob::new(MergeKind::IntoParent, c.id.clone())
                };
                self.launch_job(st, job)
            }
            Removal::Absorb(cp) => {
                let c = st
                    .find(&cp)
                    .cloned()
                    .ok_or_else(|| StorageError::NotFound(cp.clone()))?;
                let job = crate::absorb::new_job(&c);
                self.launch_job(st, job)
            }
        }
    }

    /// Consolidates every writable disk's running chain: a background job
    /// ([`MergeKind::Consolidate`]) has the leaf absorb its parents one after another, live
    /// while the guest does I/O, until it sits directly on the bottom image (the one without
    /// a parent) or on the first checkpoint image of this VM (kept: the checkpoint restores
    /// it and what is under it). The absorbed layers are listed in the job's
    /// [`MergeJob::absorbed`] and left in place. Progress, [`DiskService::cancel_job`],
    /// [`DiskService::resume_job`] and resuming after a restart work as for the other merge
    /// jobs; checkpoint creation and removal are refused while it runs.
    ///
    /// `Ok(None)`: nothing to do, every chain is already consolidated. Refused (busy) while
    /// another merge job is unfinished or a disk is being mirrored (storage migration).
    pub fn consolidate(self: &Arc<Self>) -> Result<Option<MergeJob>> {
        let _op = lock(&self.op);
        if let Some(j) = lock(&self.state).active_merge() {
            return Err(busy_with(j));
        }
        // Chain locks are taken outside the state lock, never inside it (a chain switch
        // saves the state while it holds its chain's lock).
        for (i, c) in self.chains.iter().enumerate() {
            let mirroring = crate::mirror::refuse_while_mirroring(
                &c.layers.read().unwrap_or_else(PoisonError::into_inner),
            )
            .is_err();
            if mirroring {
                return Err(StorageError::Busy(format!(
                    "disk {i} is being mirrored (storage migration); wait for it or cancel it before consolidating"
                )));
            }
            if c.is_merging() || c.is_absorbing() {
                return Err(StorageError::Busy(format!(
                    "a merge is running on disk {i}; wait for it before consolidating"
                )));
            }
        }
        let plan = self.consolidation_pending()?;
        let st = lock(&self.state);
        if let Some(j) = st.active_merge() {
            return Err(busy_with(j));
        }
        if plan.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        self.launch_job(st, crate::consolidate::new_job())
    }

    /// Records `job` in the state (with the state lock `st` the caller took for its checks)
    /// and runs it in the background.
    fn launch_job(
        self: &Arc<Self>,
        mut st: MutexGuard<'_, DiskState>,
        job: MergeJob,
    ) -> Result<Option<MergeJob>> {
        st.jobs.push(job.clone());
        st.save(&self.vm_dir)?;
        drop(st);
        self.cancel.store(false, Ordering::SeqCst);
        self.clone().spawn_merge(job.id.clone());
        Ok(Some(job))
    }

    /// The layers each disk's leaf would absorb in a consolidation, the leaf's parent first
    /// (index = disk index; empty: nothing to do for that disk).
    pub fn consolidation_pending(&self) -> Result<Vec<Vec<PathBuf>>> {
        let st = self.state();
        let (no, closing) = (AtomicBool::new(false), AtomicBool::new(false));
        let ctx = crate::absorb::Ctx {
            vm_dir: &self.vm_dir,
            state: &self.state,
            chains: &self.chains,
            cancel: &no,
            closing: &closing,
        };
        let chains = crate::consolidate::chains_now(&ctx, &st.leaves)?;
        Ok(crate::consolidate::plan(
            &st,
            &chains,
            &self.read_only_disks(),
        ))
    }

    fn read_only_disks(&self) -> Vec<bool> {
        self.chains
            .iter()
            .map(|c| nbd::Export::flags(c.as_ref()).read_only)
            .collect()
    }

    /// Asks a running merge job to stop after its current block. The checkpoint stays,
    /// marked as being removed; `resume_job` continues it.
    pub fn cancel_job(&self, id: &str) -> Result<MergeJob> {
        let st = lock(&self.state);
        let j = st
            .jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or_else(|| StorageError::NotFound(format!("no job {id}")))?;
        if !matches!(j.state, MergeState::Copying { .. }) {
            return Err(StorageError::InvalidInput(format!(
                "job {id} is not running"
            )));
        }
        self.cancel.store(true, Ordering::SeqCst);
        Ok(j.clone())
    }

    /// Continues a cancelled merge job.
    pub fn resume_job(self: &Arc<Self>, id: &str) -> Result<MergeJob> {
        let mut st = lock(&self.state);
        let j = st
            .jobs
            .iter_mut()
            .find(|j| j.id == id)
            .ok_or_else(|| StorageError::NotFound(format!("no job {id}")))?;
        let MergeState::Cancelled { next_block } = j.state else {
            return Err(StorageError::InvalidInput(format!(
                "job {id} is not cancelled"
            )));
        };
        j.state = MergeState::Copying { next_block };
        let out = j.clone();
        st.save(&self.vm_dir)?;
        drop(st);
        self.cancel.store(false, Ordering::SeqCst);
        self.clone().spawn_merge(id.to_string());
        Ok(out)
    }

    fn spawn_merge(self: Arc<Self>, id: String) {
        if self.merging.swap(true, Ordering::SeqCst) {
            return;
        }
        std::thread::Builder::new()
            .name("vireo-merge".into())
            .spawn(move || {
                let r = self.run_merge(&id);
                self.merging.store(false, Ordering::SeqCst);
                if self.closing.load(Ordering::SeqCst) {
                    // The VM ended: the job stays persisted as copying and resumes on the next start.
                    return;
                }
                if let Err(e) = r {
                    tracing::error!(job = %id, "merge failed: {e}");
                    let mut st = lock(&self.state);
                    if let Some(j) = st.jobs.iter_mut().find(|j| j.id == id) {
                        if matches!(j.state, MergeState::Copying { .. }) {
                            j.state = MergeState::Failed {
                                reason: format!("{e}"),
                            };
                        }
                    }
                    let _ = st.save(&self.vm_dir);
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("starting the merge thread: {e}"));
    }

    fn update_job(&self, id: &str, f: impl FnOnce(&mut MergeJob)) -> Result<MergeJob> {
        let mut st = lock(&self.state);
        let j = st
            .jobs
            .iter_mut()
            .find(|j| j.id == id)
            .ok_or_else(|| StorageError::NotFound(id.into()))?;
        f(j);
        let out = j.clone();
        st.save(&self.vm_dir)?;
        Ok(out)
    }

    /// The merge loop: for each disk of the checkpoint, mirror writes, copy every block
    /// (persisting progress after each), then make the target the leaf.
    fn run_merge(&self, id: &str) -> Result<()> {
        let kind = self.update_job(id, |_| {})?.kind;
        if kind != MergeKind::IntoParent {
            let ctx = crate::absorb::Ctx {
                vm_dir: &self.vm_dir,
                state: &self.state,
                chains: &self.chains,
                cancel: &self.cancel,
                closing: &self.closing,
            };
            if kind == MergeKind::Consolidate {
                return crate::consolidate::run(&ctx, id, &self.read_only_disks());
            }
            return crate::absorb::run(&ctx, id);
        }
        loop {
            let job = self.update_job(id, |_| {})?;
            let MergeState::Copying { mut next_block } = job.state else {
                return Ok(());
            };
            let chain = self
                .chain(job.disk)
                .ok_or_else(|| StorageError::NotFound(format!("disk {}", job.disk)))?;
            if !chain.is_merging() {
                chain.begin_merge()?;
            }
            let bs = chain.merge_block_size().unwrap_or(1).max(1);
            let total = nbd::Export::size(chain.as_ref()).div_ceil(bs);
            // Blocks below next_block are in the target (synced before they were recorded).
            chain.set_merge_frontier(next_block.saturating_mul(bs));
            self.update_job(id, |j| j.total_blocks = total)?;
            // Progress is recorded at most every PROGRESS_EVERY, each time after the
            // target is synced: a crash resumes from the last record and copies the blocks
            // after it again (copying is idempotent; the leaf still holds everything).
            let mut recorded = Instant::now();
            while next_block < total {
                if self.closing.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if self.cancel.load(Ordering::SeqCst) {
                    chain.merge_sync()?;
                    self.update_job(id, |j| j.state = MergeState::Cancelled { next_block })?;
                    tracing::info!(job = %id, next_block, "merge cancelled");
                    return Ok(());
                }
                chain.merge_block(next_block)?;
                next_block += 1;
                if next_block < total && recorded.elapsed() >= PROGRESS_EVERY {
                    chain.merge_sync()?;
                    self.update_job(id, |j| j.state = MergeState::Copying { next_block })?;
                    recorded = Instant::now();
                }
            }
            // Sync now, while guest I/O flows, so finish_merge (which holds it) is short.
            chain.merge_sync()?;
            let cp_id = job.checkpoint.clone();
            let disk = job.disk;
            let top = chain.finish_merge(|target| {
                let mut st = lock(&self.state);
                st.leaves[disk] = target.to_path_buf();
                let cp = st.find(&cp_id).cloned();
                let next = cp.as_ref().and_then(|c| first_merge_disk(&st, c, disk + 1));
                let next_top = next.map(|n| st.leaves[n].clone()).unwrap_or_default();
                let j = st
                    .jobs
                    .iter_mut()
                    .find(|j| j.id == id)
                    .ok_or_else(|| StorageError::NotFound(id.into()))?;
                // Deleted right after this commit; recorded so that the next start deletes
                // it if a crash comes in between.
                if !j.obsolete.contains(&j.top) {
                    let merged = j.top.clone();
                    j.obsolete.push(merged);
                }
                match (next, cp) {
                    (Some(n), Some(c)) => {
                        j.disk = n;
                        j.top = next_top;
                        j.target = c.images[n].clone();
                        j.total_blocks = 0;
                        j.state = MergeState::Copying { next_block: 0 };
                    }
                    (_, cp) => {
                        j.state = MergeState::Done;
                        let parent = cp.and_then(|c| c.parent);
                        st.checkpoints.retain(|c| c.id != cp_id);
                        st.current = parent;
                    }
                }
                st.save(&self.vm_dir)
            })?;
            if let Err(e) = std::fs::remove_file(&top) {
                tracing::warn!("removing merged {}: {e}", top.display());
            }
            if matches!(self.update_job(id, |_| {})?.state, MergeState::Done) {
                tracing::info!(job = %id, "checkpoint removed by live merge");
                return Ok(());
            }
        }
    }
}

/// The refusal while merge job `j` is unfinished.
fn busy_with(j: &MergeJob) -> StorageError {
    let what = match j.kind {
        MergeKind::Consolidate => "the disks' chains are being consolidated",
        MergeKind::IntoParent | MergeKind::IntoChildren => "a checkpoint is being removed",
    };
    let todo = match j.state {
        MergeState::Cancelled { .. } => "it was cancelled: resume it and let it finish first",
        _ => "wait for it or cancel it",
    };
    StorageError::Busy(format!("{what} (merge job {}); {todo}", j.id))
}

/// First disk at or after `from` whose leaf sits directly on the checkpoint's image.
fn first_merge_disk(st: &DiskState, c: &Checkpoint, from: usize) -> Option<usize> {
    (from..st.leaves.len()).find(|&i| c.images.get(i).is_some_and(|img| *img != st.leaves[i]))
}

enum Removal {
    DeleteFiles(String, Vec<PathBuf>),
    LiveMerge(String),
    /// An inner checkpoint: its children take over its layer ([`crate::absorb`]).
    Absorb(String),
}

fn plan_remove(st: &DiskState, name: &str) -> Result<Removal> {
    let c = st
        .find(name)
        .ok_or_else(|| StorageError::NotFound(format!("no checkpoint named {name:?}")))?;
    let has_children = !st.children(Some(&c.id)).is_empty();
    let is_current = st.current.as_deref() == Some(c.id.as_str());
    match (has_children, is_current) {
        (false, false) => {
            // Nothing descends from its images: drop the layers it added.
            let parent_images: Vec<PathBuf> = c
                .parent
                .as_deref()
                .and_then(|p| st.find(p))
                .map(|p| p.images.clone())
                .unwrap_or_default();
            let files = c
                .images
                .iter()
                .filter(|f| !st.leaves.contains(f) && !parent_images.contains(f))
                .filter(|f| {
                    !st.checkpoints
                        .iter()
                        .any(|o| o.id != c.id && o.images.contains(f))
                })
                .cloned()
                .collect();
            Ok(Removal::DeleteFiles(c.id.clone(), files))
        }
        (false, true) => Ok(Removal::LiveMerge(c.id.clone())),
        (true, _) => Ok(Removal::Absorb(c.id.clone())),
    }
}

fn rename(st: &mut DiskState, name: &str, new_name: &str) -> Result<()> {
    if new_name.is_empty() || new_name.len() > 128 {
        return Err(StorageError::InvalidInput(
            "a checkpoint name has 1 to 128 characters".into(),
        ));
    }
    if st.find(new_name).is_some() {
        return Err(StorageError::InvalidInput(format!(
            "a checkpoint named {new_name:?} exists"
        )));
    }
    let c = st
        .checkpoints
        .iter_mut()
        .find(|c| c.name == name || c.id == name)
        .ok_or_else(|| StorageError::NotFound(format!("no checkpoint named {name:?}")))?;
    c.name = new_name.to_string();
    Ok(())
}

/// Name of a new leaf for checkpoint `id` next to `leaf` (so relative parent paths work).
fn leaf_name(leaf: &Path, id: &str) -> PathBuf {
    let stem = leaf.file_stem().and_then(|s| s.to_str()).unwrap_or("disk");
    let base = stem.split("~cp-").next().unwrap_or(stem);
    leaf.with_file_name(format!("{base}~cp-{id}.avhdx"))
}

/// Offline operations on a stopped VM's disk state (no worker running).
pub mod offline {
    use super::*;

    /// Reverts a stopped VM to checkpoint `name`: each disk gets a new empty leaf on the
    /// checkpoint's image; the discarded running layer is deleted unless a checkpoint uses
    /// it. Returns the checkpoint (its `memory_state`, if any, is what to resume from).
    pub fn apply(vm_dir: &Path, name: &str) -> Result<Checkpoint> {
        let mut st = DiskState::load(vm_dir)?
            .ok_or_else(|| StorageError::NotFound("this VM has no checkpoints".into()))?;
        if st.active_merge().is_some() {
            return Err(StorageError::Busy(
                "a merge job is unfinished; start the VM to let it finish".into(),
            ));
        }
        let c = st
            .find(name)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(format!("no checkpoint named {name:?}")))?;
        let mut old = Vec::new();
        for (i, img) in c.images.iter().enumerate() {
            if i >= st.leaves.len() || st.leaves[i] == *img {
                continue;
            }
            let new = leaf_name(img, &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let opts = vhdx::CreateOptions {
                disk_type: vhdx::DiskType::Differencing,
                parent: Some(img.clone()),
                ..Default::default()
            };
            let v =
                vhdx::Vhdx::create(&new, &opts).map_err(StorageError::image("creating", &new))?;
            v.close().map_err(StorageError::image("closing", &new))?;
            old.push(std::mem::replace(&mut st.leaves[i], new));
        }
        // The journals hold the discarded running state's last writes.
        for i in 0..st.leaves.len() {
            let j = journal_path(vm_dir, i);
            match std::fs::remove_file(&j) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StorageError::Io {
                        op: "removing",
                        path: j,
                        source: e,
                    })
                }
            }
        }
        st.current = Some(c.id.clone());
        st.save(vm_dir)?;
        for f in old {
            if !st.checkpoints.iter().any(|c| c.images.contains(&f)) {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(c)
    }

    /// Renames a checkpoint of a stopped VM.
    pub fn rename_checkpoint(vm_dir: &Path, name: &str, new_name: &str) -> Result<Checkpoint> {
        let mut st = DiskState::load(vm_dir)?
            .ok_or_else(|| StorageError::NotFound("this VM has no checkpoints".into()))?;
        rename(&mut st, name, new_name)?;
        st.save(vm_dir)?;
        st.find(new_name)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(new_name.into()))
    }

    /// Removes a checkpoint of a stopped VM: one nothing descends from by deleting its
    /// files, an inner one by merging its layer into its children's images (synchronously,
    /// as a persisted job that a later start resumes if this is interrupted). The
    /// checkpoint the VM runs on without children is removed by starting the VM and
    /// removing it then (live merge).
    pub fn remove(vm_dir: &Path, name: &str) -> Result<()> {
        let mut st = DiskState::load(vm_dir)?
            .ok_or_else(|| StorageError::NotFound("this VM has no checkpoints".into()))?;
        if let Some(j) = st
            .active_merge()
            .filter(|j| j.kind == MergeKind::Consolidate)
        {
            return Err(busy_with(j));
        }
        match plan_remove(&st, name)? {
            Removal::DeleteFiles(cp, files) => {
                st.checkpoints.retain(|c| c.id != cp);
                st.save(vm_dir)?;
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
                Ok(())
            }
            Removal::LiveMerge(_) => Err(StorageError::Unsupported(
                "the VM runs on this checkpoint: start the VM and remove it then (live merge)"
                    .into(),
            )),
            Removal::Absorb(cp) => {
                let c = st
                    .find(&cp)
                    .cloned()
                    .ok_or_else(|| StorageError::NotFound(cp.clone()))?;
                let job = crate::absorb::new_job(&c);
                let id = job.id.clone();
                st.jobs.push(job);
                st.save(vm_dir)?;
                let state = Mutex::new(st);
                let (no, closing) = (AtomicBool::new(false), AtomicBool::new(false));
                let ctx = crate::absorb::Ctx {
                    vm_dir,
                    state: &state,
                    chains: &[],
                    cancel: &no,
                    closing: &closing,
                };
                let r = crate::absorb::run(&ctx, &id);
                if let Err(e) = &r {
                    let mut st = lock(&state);
                    if let Some(j) = st.jobs.iter_mut().find(|j| j.id == id) {
                        j.state = MergeState::Failed {
                            reason: e.to_string(),
                        };
                    }
                    let _ = st.save(vm_dir);
                }
                r
            }
        }
    }

    /// Consolidates a stopped VM's chains like [`DiskService::consolidate`], synchronously,
    /// with [`vhdx::absorb_parent`] on the closed files. The job is persisted first: if this
    /// is interrupted, calling it again (or starting the VM) resumes it. `disks` as
    /// configured (read-only ones are left alone). `Ok(None)`: nothing to do; otherwise the
    /// finished job, whose [`MergeJob::absorbed`] lists the layers no chain uses any more.
    pub fn consolidate(vm_dir: &Path, disks: &[DiskConfig]) -> Result<Option<MergeJob>> {
        let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
        let mut st = DiskState::load_or_new(vm_dir, &paths)?;
        // Disks not configured any more are left alone.
        let ro: Vec<bool> = (0..st.leaves.len())
            .map(|i| disks.get(i).is_none_or(|d| d.read_only))
            .collect();
        let (no, closing) = (AtomicBool::new(false), AtomicBool::new(false));
        let id = match st.active_merge().cloned() {
            Some(j) if j.kind == MergeKind::Consolidate => {
                if let Some(a) = st.jobs.iter_mut().find(|a| a.id == j.id) {
                    if let MergeState::Cancelled { next_block } = a.state {
                        a.state = MergeState::Copying { next_block };
                    }
                }
                st.save(vm_dir)?;
                j.id
            }
            Some(j) => return Err(busy_with(&j)),
            None => {
                let probe = Mutex::new(DiskState::new(Vec::new()));
                let ctx = crate::absorb::Ctx {
                    vm_dir,
                    state: &probe,
                    chains: &[],
                    cancel: &no,
                    closing: &closing,
                };
                let chains = crate::consolidate::chains_now(&ctx, &st.leaves)?;
                if crate::consolidate::plan(&st, &chains, &ro)
                    .iter()
                    .all(Vec::is_empty)
                {
                    return Ok(None);
                }
                let job = crate::consolidate::new_job();
                st.jobs.push(job.clone());
                st.save(vm_dir)?;
                job.id
            }
        };
        let state = Mutex::new(st);
        let ctx = crate::absorb::Ctx {
            vm_dir,
            state: &state,
            chains: &[],
            cancel: &no,
            closing: &closing,
        };
        let r = crate::consolidate::run(&ctx, &id, &ro);
        let mut st = lock(&state);
        if let Err(e) = &r {
            if let Some(j) = st.jobs.iter_mut().find(|j| j.id == id) {
                j.state = MergeState::Failed {
                    reason: e.to_string(),
                };
            }
            let _ = st.save(vm_dir);
        }
        r?;
        Ok(st.jobs.iter().find(|j| j.id == id).cloned())
    }

    /// Writes each disk of a checkpoint as a standalone dynamic VHDX `dir/disk<i>.vhdx`.
    pub fn export(st: &DiskState, name: &str, dir: &Path) -> Result<Vec<PathBuf>> {
        let c = st
            .find(name)
            .ok_or_else(|| StorageError::NotFound(format!("no checkpoint named {name:?}")))?;
        std::fs::create_dir_all(dir).map_err(StorageError::io("creating", dir))?;
        let mut out = Vec::new();
        for (i, img) in c.images.iter().enumerate() {
            let dst = dir.join(format!("disk{i}.vhdx"));
            let opts = vhdx::ConvertOptions {
                format: Some(vhdx::ImageFormat::Vhdx),
                vhdx: Default::default(),
            };
            vhdx::convert(img, &dst, &opts, &|_, _| {}, &AtomicBool::new(false))
                .map_err(StorageError::image("exporting", img))?;
            out.push(dst);
        }
        Ok(out)
    }
}
