//! Consolidating the running chains ([`MergeKind::Consolidate`]): after a Replica failover a
//! VM runs on a differencing leaf over a deep stack of recovery-point layers. For each disk,
//! while the leaf's parent `X` has a parent itself, the leaf takes over `X`'s data (only
//! what it does not hold itself, so what it shows never changes) and is re-pointed at `X`'s
//! parent in one metadata-log commit, live, 1 MiB at a time under the lock that keeps guest
//! writes off that MiB ([`crate::DiskChain::begin_absorb`]), or offline with
//! [`vhdx::absorb_parent`] when the VM is off. In the end each leaf sits on the bottom image.
//!
//! The absorbed layers are reported ([`crate::MergeJob::absorbed`]) and never deleted:
//! they may be a replica store's recovery points or shared by another chain.
//!
//! The consolidation stops at the first parent that is a checkpoint image of this VM: that
//! image and everything under it are what the checkpoint restores (and its children's
//! images sit on them), so they stay referenced either way; absorbing them would only copy
//! shared data into the leaf. Removing a checkpoint is what merges its layer away.
//!
//! Crash safety: the work to do is derived from the chains on disk, not from the job: a
//! leaf already re-pointed past `X` no longer has `X` as its parent and the next layer is
//! taken; a half-filled leaf is filled again from the last recorded chunk (filling is
//! idempotent). Guest writes acknowledged meanwhile are in the write journal.

use crate::absorb::{fill_child, lock, same, update, Ctx};
use crate::error::{Result, StorageError};
use crate::image::open_image;
use crate::state::{DiskState, MergeJob, MergeKind, MergeState};
use std::path::{Path, PathBuf};

/// A new consolidation job.
pub(crate) fn new_job() -> MergeJob {
    MergeJob::new(MergeKind::Consolidate, String::new())
}

/// `p` without `..` detours and links: parents are found through relative locators
/// (`failover/../store/p4.avhdx`), and the caller compares the report with its own paths.
fn clean(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn is_checkpoint_image(st: &DiskState, p: &Path) -> bool {
    st.checkpoints
        .iter()
        .any(|c| c.images.iter().any(|img| same(img, p)))
}

/// Every disk's chain, leaf first: the running ones, or read from the files when off.
/// Must be called without the state lock held: a chain switch saves the state while it
/// holds the chain's lock.
pub(crate) fn chains_now(ctx: &Ctx<'_>, leaves: &[PathBuf]) -> Result<Vec<Vec<PathBuf>>> {
    leaves
        .iter()
        .enumerate()
        .map(|(i, leaf)| match ctx.chains.get(i) {
            Some(ch) => Ok(ch.chain_paths()),
            None => Ok(open_image(leaf, true)?.chain_paths()),
        })
        .collect()
}

/// The layers a leaf still has to absorb (`chain` leaf first), the leaf's parent first:
/// every parent that has a parent itself, up to the first checkpoint image. None for a
/// read-only disk or a leaf that is a checkpoint image (it must not change).
fn pending(st: &DiskState, chain: &[PathBuf], read_only: bool) -> Vec<PathBuf> {
    let Some((leaf, below)) = chain.split_first() else {
        return Vec::new();
    };
    if read_only || is_checkpoint_image(st, leaf) || below.len() < 2 {
        return Vec::new();
    }
    below[..below.len() - 1]
        .iter()
        .take_while(|p| !is_checkpoint_image(st, p))
        .cloned()
        .collect()
}

/// [`pending`] of every disk (index = disk index); `read_only[i]`: disk `i` is left alone.
pub(crate) fn plan(
    st: &DiskState,
    chains: &[Vec<PathBuf>],
    read_only: &[bool],
) -> Vec<Vec<PathBuf>> {
    chains
        .iter()
        .enumerate()
        .map(|(i, c)| pending(st, c, read_only.get(i).copied().unwrap_or(false)))
        .collect()
}

/// Records the job's current layer as absorbed once it has left its disk's chain (also
/// after a crash between the re-pointing and the job's update).
fn note_absorbed(
    ctx: &Ctx<'_>,
    st: &mut DiskState,
    id: &str,
    chains: &[Vec<PathBuf>],
) -> Result<()> {
    let Some(j) = st.jobs.iter_mut().find(|j| j.id == id) else {
        return Err(StorageError::NotFound(format!("no job {id}")));
    };
    let top = j.top.clone();
    if top.as_os_str().is_empty() || j.absorbed.iter().any(|a| same(a, &top)) {
        return Ok(());
    }
    let in_chain = chains
        .get(j.disk)
        .is_some_and(|c| c.iter().any(|p| same(p, &top)));
    if in_chain {
        return Ok(());
    }
    j.absorbed.push(clean(&top));
    st.save(ctx.vm_dir)
}

/// Runs (or resumes) consolidation job `id` until it is done, cancelled or the service
/// closes. `read_only[i]`: disk `i` is served read-only (left alone).
pub(crate) fn run(ctx: &Ctx<'_>, id: &str, read_only: &[bool]) -> Result<()> {
    loop {
        let leaves = lock(ctx.state).leaves.clone();
        let chains = chains_now(ctx, &leaves)?;
        let (job, item) = {
            let mut st = lock(ctx.state);
            note_absorbed(ctx, &mut st, id, &chains)?;
            let job = st
                .jobs
                .iter()
                .find(|j| j.id == id)
                .cloned()
                .ok_or_else(|| StorageError::NotFound(format!("no job {id}")))?;
            let MergeState::Copying { .. } = job.state else {
                return Ok(());
            };
            // Only this job changes the chains while it runs: the snapshot is current.
            let first = |(i, p): (usize, Vec<PathBuf>)| {
                let leaf = chains.get(i)?.first()?.clone();
                Some((i, leaf, p.into_iter().next()?))
            };
            let item = plan(&st, &chains, read_only)
                .into_iter()
                .enumerate()
                .find_map(first);
            if item.is_none() {
                if let Some(j) = st.jobs.iter_mut().find(|j| j.id == id) {
                    j.state = MergeState::Done;
                }
                st.save(ctx.vm_dir)?;
                tracing::info!(job = %id, absorbed = job.absorbed.len(), "chains consolidated");
                return Ok(());
            }
            (job, item)
        };
        let Some((disk, k, x)) = item else {
            return Ok(());
        };
        let resume_at = match job.state {
            MergeState::Copying { next_block }
                if job.disk == disk && job.target == k && job.top == x =>
            {
                next_block
            }
            _ => 0,
        };
        let live = ctx.chains.get(disk);
        let Some(total) = fill_child(ctx, id, disk, live, &x, &k, resume_at)? else {
            return Ok(());
        };
        update(ctx, id, |j| {
            if !j.absorbed.iter().any(|a| same(a, &x)) {
                j.absorbed.push(clean(&x));
            }
            j.state = MergeState::Copying { next_block: total };
        })?;
        tracing::info!(job = %id, disk, leaf = %k.display(), absorbed = %x.display(), "layer absorbed");
    }
}
