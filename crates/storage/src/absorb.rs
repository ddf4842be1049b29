//! Removing an inner checkpoint ([`MergeKind::IntoChildren`]): the checkpoint's image `X`
//! (for each disk) is needed by every image whose parent it is — its child checkpoints'
//! images, and the running leaf when the VM runs on the checkpoint. Each such child takes
//! over `X`'s data (only what it does not hold itself, so what it shows never changes) and
//! is re-pointed at `X`'s parent in one metadata-log commit; then the checkpoint leaves the
//! tree and `X` is deleted. A child in the running chain is filled live, 1 MiB at a time
//! under the lock that keeps guest writes off that MiB ([`DiskChain::begin_absorb`]); the
//! others are closed files filled offline ([`vhdx::absorb_parent`]).
//!
//! Crash safety: `X` stays until the commit that removes the checkpoint, and every step is
//! idempotent. A kill -9 at any point restarts the job: a child already re-pointed is
//! recognised (its parent is no longer `X`) and skipped, a half-filled child is filled again
//! from the last flushed chunk. Guest writes acknowledged meanwhile are in the write journal.
//!
//! A checkpoint image without a parent (the first checkpoint's base disk) has nothing to be
//! re-pointed at: it stays, as the shared base of its descendants, and only the checkpoint
//! record goes.

use crate::chain::DiskChain;
use crate::error::{Result, StorageError};
use crate::state::{Checkpoint, DiskState, MergeJob, MergeKind, MergeState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Chunks copied between two flushes (and progress records) of a live fill.
const FLUSH_EVERY: u64 = 16;

/// What a job runs with: the persisted state, and the running chains (none offline).
pub(crate) struct Ctx<'a> {
    pub vm_dir: &'a Path,
    pub state: &'a Mutex<DiskState>,
    pub chains: &'a [Arc<DiskChain>],
    pub cancel: &'a AtomicBool,
    pub closing: &'a AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn same(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A new job removing the inner checkpoint `c`.
pub(crate) fn new_job(c: &Checkpoint) -> MergeJob {
    MergeJob::new(MergeKind::IntoChildren, c.id.clone())
}

/// Whether disk `i`'s image of `c` is a layer of its own with a parent to re-point its
/// children at (not a read-only disk's shared image, not the base).
fn removable_layer(st: &DiskState, c: &Checkpoint, i: usize) -> Result<bool> {
    let Some(x) = c.images.get(i) else {
        return Ok(false);
    };
    if st.leaves.get(i) == Some(x)
        || st
            .checkpoints
            .iter()
            .any(|o| o.id != c.id && o.images.get(i) == Some(x))
    {
        return Ok(false);
    }
    if !matches!(vhdx::detect_format(x), Ok(vhdx::ImageFormat::Vhdx)) {
        return Ok(false);
    }
    let v = vhdx::Vhdx::open(x, vhdx::OpenOptions { read_only: true })
        .map_err(StorageError::image("opening", x))?;
    Ok(v.parent().is_some())
}

/// Images of disk `i` whose parent is `c`'s image.
fn children_layers(st: &DiskState, c: &Checkpoint, i: usize) -> Vec<PathBuf> {
    let x = &c.images[i];
    let mut out: Vec<PathBuf> = Vec::new();
    let mut add = |p: &PathBuf| {
        if p != x && !out.contains(p) {
            out.push(p.clone());
        }
    };
    for ch in st.children(Some(&c.id)) {
        if let Some(p) = ch.images.get(i) {
            add(p);
        }
    }
    if st.current.as_deref() == Some(c.id.as_str()) {
        if let Some(p) = st.leaves.get(i) {
            add(p);
        }
    }
    out
}

/// The next (disk, removed image, child) to do.
fn next_item(
    st: &DiskState,
    c: &Checkpoint,
    finished: &[PathBuf],
) -> Result<Option<(usize, PathBuf, PathBuf)>> {
    for i in 0..st.leaves.len() {
        if !removable_layer(st, c, i)? {
            continue;
        }
        if let Some(k) = children_layers(st, c, i)
            .into_iter()
            .find(|k| !finished.contains(k))
        {
            return Ok(Some((i, c.images[i].clone(), k)));
        }
    }
    Ok(None)
}

pub(crate) fn update(ctx: &Ctx<'_>, id: &str, f: impl FnOnce(&mut MergeJob)) -> Result<MergeJob> {
    let mut st = lock(ctx.state);
    let j = st
        .jobs
        .iter_mut()
        .find(|j| j.id == id)
        .ok_or_else(|| StorageError::NotFound(format!("no job {id}")))?;
    f(j);
    let out = j.clone();
    st.save(ctx.vm_dir)?;
    Ok(out)
}

/// Runs (or resumes) job `id` until it is done, cancelled or the service closes.
pub(crate) fn run(ctx: &Ctx<'_>, id: &str) -> Result<()> {
    loop {
        let (job, c, item) = {
            let st = lock(ctx.state);
            let job = st
                .jobs
                .iter()
                .find(|j| j.id == id)
                .cloned()
                .ok_or_else(|| StorageError::NotFound(format!("no job {id}")))?;
            let MergeState::Copying { .. } = job.state else {
                return Ok(());
            };
            let c = st.find(&job.checkpoint).cloned().ok_or_else(|| {
                StorageError::NotFound(format!("checkpoint {} of job {id}", job.checkpoint))
            })?;
            let item = next_item(&st, &c, &job.finished)?;
            (job, c, item)
        };
        let Some((disk, x, k)) = item else {
            return commit(ctx, id, &c);
        };
        let resume_at = match job.state {
            MergeState::Copying { next_block } if job.target == k && job.top == x => next_block,
            _ => 0,
        };
        let live = ctx
            .chains
            .get(disk)
            .filter(|ch| ch.chain_paths().iter().any(|p| same(p, &k)));
        let Some(total) = fill_child(ctx, id, disk, live, &x, &k, resume_at)? else {
            return Ok(());
        };
        update(ctx, id, |j| {
            j.finished.push(k.clone());
            j.state = MergeState::Copying { next_block: total };
        })?;
        tracing::info!(job = %id, child = %k.display(), removed = %x.display(), "child re-pointed");
    }
}

pub(crate) fn vhdx_size(p: &Path) -> Result<u64> {
    vhdx::Vhdx::open(p, vhdx::OpenOptions { read_only: true })
        .map(|v| v.size())
        .map_err(StorageError::image("opening", p))
}

/// Fills `k` (in the running chain) with `x`'s data and re-points it. `Ok(false)`: stopped
/// (cancelled, or the service is closing) before the end.
/// Records in job `id` that `k` (an image of disk `disk`) takes over `x`'s data from block
/// `resume_at`, and fills it: live through `live` (the running chain holding `k`) or
/// offline. Returns the job's block count when the fill finished, `None` when it stopped
/// (cancelled, or the service closing).
pub(crate) fn fill_child(
    ctx: &Ctx<'_>,
    id: &str,
    disk: usize,
    live: Option<&Arc<DiskChain>>,
    x: &Path,
    k: &Path,
    resume_at: u64,
) -> Result<Option<u64>> {
    let total = match live {
        Some(ch) => ch.absorb_chunks(),
        None => vhdx_size(k)?.div_ceil(1 << 20),
    };
    update(ctx, id, |j| {
        j.disk = disk;
        j.top = x.to_path_buf();
        j.target = k.to_path_buf();
        j.total_blocks = total;
        j.state = MergeState::Copying {
            next_block: resume_at,
        };
    })?;
    let done = match live {
        Some(ch) => fill_live(ctx, id, ch, x, k, resume_at)?,
        None => fill_offline(ctx, id, x, k)?,
    };
    Ok(done.then_some(total))
}

pub(crate) fn fill_live(
    ctx: &Ctx<'_>,
    id: &str,
    ch: &DiskChain,
    x: &Path,
    k: &Path,
    from: u64,
) -> Result<bool> {
    if !ch.is_absorbing() && !ch.begin_absorb(k, x)? {
        return Ok(true);
    }
    let total = ch.absorb_chunks();
    let mut i = from.min(total);
    let mut unflushed = 0;
    while i < total {
        if ctx.closing.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if ctx.cancel.load(Ordering::SeqCst) {
            ch.end_absorb(false)?;
            update(ctx, id, |j| {
                j.state = MergeState::Cancelled { next_block: i }
            })?;
            tracing::info!(job = %id, next_block = i, "merge cancelled");
            return Ok(false);
        }
        ch.absorb_chunk(i)?;
        i += 1;
        unflushed += 1;
        if unflushed == FLUSH_EVERY || i == total {
            unflushed = 0;
            ch.absorb_flush()?;
            update(ctx, id, |j| j.state = MergeState::Copying { next_block: i })?;
        }
    }
    ch.end_absorb(true)?;
    Ok(true)
}

/// Fills the closed image `k` with `x`'s data and re-points it.
pub(crate) fn fill_offline(ctx: &Ctx<'_>, id: &str, x: &Path, k: &Path) -> Result<bool> {
    let last = std::sync::atomic::AtomicU64::new(0);
    let progress = |done: u64, _total: u64| {
        let mib = done >> 20;
        if mib >= last.load(Ordering::Relaxed) + 64 {
            last.store(mib, Ordering::Relaxed);
            let _ = update(ctx, id, |j| {
                j.state = MergeState::Copying { next_block: mib }
            });
        }
    };
    match vhdx::absorb_parent(k, x, &progress, ctx.cancel) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == vhdx::ErrorKind::Cancelled => {
            let n = last.load(Ordering::Relaxed);
            update(ctx, id, |j| {
                j.state = MergeState::Cancelled { next_block: n }
            })?;
            Ok(false)
        }
        Err(e) => Err(StorageError::image("merging into", k)(e)),
    }
}

/// Every child re-pointed: the checkpoint leaves the tree (its children hang from its
/// parent), then its images and memory state are deleted.
fn commit(ctx: &Ctx<'_>, id: &str, c: &Checkpoint) -> Result<()> {
    let mut st = lock(ctx.state);
    let mut delete = Vec::new();
    for i in 0..c.images.len() {
        if removable_layer(&st, c, i)? {
            delete.push(c.images[i].clone());
        }
    }
    st.checkpoints.retain(|o| o.id != c.id);
    for o in st.checkpoints.iter_mut() {
        if o.parent.as_deref() == Some(c.id.as_str()) {
            o.parent = c.parent.clone();
        }
    }
    if st.current.as_deref() == Some(c.id.as_str()) {
        st.current = c.parent.clone();
    }
    let memory_used = |m: &PathBuf| {
        st.checkpoints
            .iter()
            .any(|o| o.memory_state.as_ref() == Some(m))
    };
    if let Some(m) = c.memory_state.as_ref().filter(|m| !memory_used(m)) {
        delete.push(m.clone());
    }
    if let Some(j) = st.jobs.iter_mut().find(|j| j.id == id) {
        j.state = MergeState::Done;
        j.obsolete = delete.clone();
    }
    st.save(ctx.vm_dir)?;
    drop(st);
    for f in delete {
        if let Err(e) = std::fs::remove_file(&f) {
            tracing::warn!("removing {}: {e}", f.display());
        }
    }
    tracing::info!(job = %id, checkpoint = %c.name, "inner checkpoint removed");
    Ok(())
}

/// Deletes the obsolete files of finished jobs that a crash left behind (never a file the
/// state still uses).
pub(crate) fn collect_garbage(st: &DiskState) {
    for j in &st.jobs {
        // A consolidation's absorbed layers are never the service's to delete.
        if j.state != MergeState::Done || j.kind == MergeKind::Consolidate {
            continue;
        }
        for f in &j.obsolete {
            let used = st.leaves.contains(f)
                || st
                    .checkpoints
                    .iter()
                    .any(|c| c.images.contains(f) || c.memory_state.as_ref() == Some(f));
            if !used && f.exists() {
                match std::fs::remove_file(f) {
                    Ok(()) => tracing::info!("removed {} left by job {}", f.display(), j.id),
                    Err(e) => tracing::warn!("removing {}: {e}", f.display()),
                }
            }
        }
    }
}
