//! Removing a layer from the middle of a chain: a differencing image takes over
//! what its parent holds ([`Vhdx::pull_from_parent`]) and is then re-pointed at
//! its grandparent ([`Vhdx::set_parent`]), after which the parent is no longer
//! needed by it. [`absorb_parent`] does both for a closed image.
//!
//! Crash safety: the pull only writes what the child already shows (so the view
//! never changes and every step is idempotent), and the new parent locator is
//! committed through the metadata log together with the BAT and sector bitmap
//! pages of the pulled data, after that data is durable. A crash before the
//! commit leaves the old parent in place (and the pulled data harmless); a crash
//! after it leaves the new one. The DataWriteGuid does not change, since the
//! contents do not: the child's own children stay linked to it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::image::{ExtentState, OpenOptions, Vhdx};
use crate::locator::ParentLocator;
use crate::ops::Progress;

/// Unit of [`absorb_parent`]'s copy.
const PULL_CHUNK: u64 = 4 << 20;

impl Vhdx {
    /// Copies into this differencing image every part of `[off, off+len)` that it
    /// takes from its parent and that the parent itself holds (data or zeros),
    /// leaving what the parent takes from further up alone. What this image
    /// shows does not change, nor does its DataWriteGuid. Idempotent. Returns the
    /// bytes written.
    ///
    /// The caller keeps other writers off the range while it runs (a concurrent
    /// write to the same sectors could be overwritten with the parent's older data).
    pub fn pull_from_parent(&self, off: u64, len: u64) -> Result<u64> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let Some(parent) = self.parent.as_ref() else {
            return Err(Error::Unsupported(format!(
                "{} has no parent to pull from",
                self.path.display()
            )));
        };
        self.bump_guids(false)?;
        let psize = parent.size();
        let mut written = 0u64;
        let mut buf = Vec::new();
        for e in self.block_status(off, len)? {
            if e.state != ExtentState::FromParent {
                continue;
            }
            let end = e.off + e.len;
            // Beyond the parent's end the child reads zeros: keep it so.
            let in_parent_end = end.min(psize).max(e.off);
            if in_parent_end < end {
                self.zero_range(in_parent_end, end - in_parent_end)?;
                written += end - in_parent_end;
            }
            if in_parent_end == e.off {
                continue;
            }
            for p in parent.block_status(e.off, in_parent_end - e.off)? {
                match p.state {
                    ExtentState::FromParent => {}
                    ExtentState::Data => {
                        buf.resize(p.len as usize, 0);
                        parent.read_at(&mut buf, p.off)?;
                        self.write_inner(&buf, p.off)?;
                        written += p.len;
                    }
                    ExtentState::Zero | ExtentState::Unmapped => {
                        self.zero_range(p.off, p.len)?;
                        written += p.len;
                    }
                }
            }
        }
        Ok(written)
    }

    /// Makes a range that this image takes from its parent read as zeros,
    /// whole blocks as ZERO entries, without changing the DataWriteGuid.
    fn zero_range(&self, off: u64, len: u64) -> Result<()> {
        let bs = self.geo.block_size;
        let size = self.size();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let blk = pos / bs;
            let in_blk = pos % bs;
            let n = (bs - in_blk).min(end - pos);
            let whole = in_blk == 0 && (n == bs || pos + n == size);
            self.discard_block(blk, in_blk, n, whole, false)?;
            pos += n;
        }
        Ok(())
    }

    /// Re-points this differencing image at `parent`: a new parent locator (paths
    /// relative to this image and absolute) linked to `parent`'s DataWriteGuid,
    /// committed through the metadata log with any pending BAT and bitmap changes,
    /// after flushing data. The handle keeps reading through the parent it was
    /// opened with; the new one is used from the next open.
    ///
    /// The caller makes sure the new parent shows what this image takes from its
    /// current parent (typically after [`Vhdx::pull_from_parent`] over the whole
    /// disk, when `parent` is the grandparent).
    pub fn set_parent(&self, parent: &Vhdx) -> Result<()> {
        self.check_writable()?;
        if self.parent.is_none() {
            return Err(Error::Unsupported(format!(
                "{} is not a differencing image",
                self.path.display()
            )));
        }
        if parent.logical_sector_size() != self.logical_sector_size() {
            return Err(Error::InvalidInput(format!(
                "{} has {}-byte sectors, {} has {}-byte sectors",
                parent.path().display(),
                parent.logical_sector_size(),
                self.path.display(),
                self.logical_sector_size()
            )));
        }
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a == b,
        };
        if same(parent.path(), &self.path) {
            return Err(Error::InvalidInput(format!(
                "{} cannot be its own parent",
                self.path.display()
            )));
        }
        // A parent whose chain contains this image would make a loop.
        let mut up = parent.parent();
        while let Some(p) = up {
            if same(p.path(), &self.path) {
                return Err(Error::InvalidInput(format!(
                    "{} descends from {}: that would make a loop",
                    parent.path().display(),
                    self.path.display()
                )));
            }
            up = p.parent();
        }
        let locator =
            ParentLocator::for_parent(&self.path, parent.path(), parent.data_write_guid());
        self.bump_guids(false)?;
        let mut st = self.lock_state();
        let mut md = st.md.clone();
        md.parent_locator = Some(locator.to_bytes());
        let pages = self.metadata_pages(&md);
        let bytes = pages.len() as u64 * 4096;
        if bytes > u64::from(self.regions.metadata.length) {
            return Err(Error::InvalidInput(format!(
                "the parent locator for {} does not fit the metadata region of {}",
                parent.path().display(),
                self.path.display()
            )));
        }
        self.flush_locked(&mut st, pages)?;
        st.md = md;
        tracing::info!(child = %self.path.display(), parent = %parent.path().display(), "re-pointed parent locator");
        Ok(())
    }

    /// Path of the parent as the file now records it (after [`Vhdx::set_parent`],
    /// the new one's relative-or-absolute path, resolved from this image).
    pub fn recorded_parent(&self) -> Option<PathBuf> {
        let st = self.lock_state();
        let raw = st.md.parent_locator.as_ref()?;
        let l = ParentLocator::parse(raw).ok()?;
        l.candidates(&self.path).into_iter().find(|c| c.exists())
    }
}

/// Removes the parent of the differencing image `child` from its chain: `child`
/// takes over what the parent holds and is re-pointed at the grandparent. Returns
/// `false` without changing anything when `child`'s parent is no longer
/// `expected_parent` (an earlier run finished), so running it again after an
/// interruption is safe. The parent file itself is left for the caller to delete
/// once no other image uses it.
pub fn absorb_parent(
    child: &Path,
    expected_parent: &Path,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<bool> {
    let v = Vhdx::open(child, OpenOptions { read_only: false })?;
    let Some(parent) = v.parent().cloned() else {
        return Err(Error::Unsupported(format!(
            "{} has no parent",
            child.display()
        )));
    };
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    if canon(parent.path()) != canon(expected_parent) {
        return Ok(false);
    }
    let Some(grand) = parent.parent().cloned() else {
        return Err(Error::Unsupported(format!(
            "{} has no parent to re-point {} at",
            parent.path().display(),
            child.display()
        )));
    };
    let size = v.size();
    let mut off = 0;
    while off < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let n = PULL_CHUNK.min(size - off);
        v.pull_from_parent(off, n)?;
        off += n;
        progress(off, size);
    }
    v.set_parent(&grand)?;
    v.close()?;
    Ok(true)
}
