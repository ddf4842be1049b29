//! [`DiskChain`]: the export of one VM disk. Reads fall through the VHDX chain, writes go to
//! the leaf, and the active chain can be switched atomically (checkpoint create) or merged
//! live (checkpoint remove) while clients keep doing I/O.
//!
//! Every request holds a shared lock on the active layers for its whole duration; a switch
//! takes the lock exclusively, so new requests wait, in-flight ones drain, and the switch
//! sees a quiet chain. No write can land in a layer that is no longer the leaf.
//!
//! During a live merge of the leaf `L` into its parent `P`, the export writes every request
//! to `L` and to `P` ("mirror"), and the merger copies `L`'s blocks into `P` one at a time
//! under a per-block lock that excludes guest writes to that block. When every block is
//! copied, `P` shows exactly what `L` shows and becomes the leaf.

use crate::error::{to_io, Result, StorageError};
use crate::image::{open_image, Image};
use crate::journal::{Journal, Kind};
use nbd::{BlockSize, Export, ExportFlags, Extent, ZeroMode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

/// Stripes of per-chunk merge locks.
const STRIPES: usize = 256;
/// Unit of the merge lock against guest writes (and of absorb progress).
const MERGE_CHUNK: u64 = 1 << 20;
/// Unit of the merge copy (divides [`MERGE_CHUNK`]): each piece is copied under its chunk's
/// lock and moves the frontier, so a guest write waits for one piece at most.
const MERGE_PIECE: u64 = 256 << 10;
const _: () = assert!(MERGE_CHUNK.is_multiple_of(MERGE_PIECE));

pub(crate) struct Layers {
    /// Where requests go (`None` only while a switch has it taken apart).
    pub(crate) top: Option<Image>,
    /// Merge target that receives every write too.
    pub(crate) mirror: Option<Arc<Vhdx>>,
    /// Told of every change (storage mirror dirty tracking, `crate::mirror`).
    pub(crate) observer: Option<Arc<dyn crate::mirror::WriteObserver>>,
    /// Image of this chain (the leaf or an ancestor, open read-write) taking over its
    /// parent's data while an inner checkpoint is removed ([`DiskChain::begin_absorb`]).
    pub(crate) absorb: Option<Arc<Vhdx>>,
}

/// One disk served over NBD: a VHDX chain opened from its leaf, or a raw image.
pub struct DiskChain {
    pub(crate) layers: RwLock<Layers>,
    size: u64,
    read_only: bool,
    stripes: Box<[RwLock<()>]>,
    /// Requests that changed image metadata and are not journaled or flushed yet.
    unflushed_meta: AtomicU64,
    /// Write journal (set by the disk service; see [`crate::journal`]).
    journal: OnceLock<Journal>,
    /// The absorbing image holds pulled data whose metadata is not flushed yet (guest
    /// writes are journaled meanwhile: they may land in blocks that pull allocated).
    absorb_dirty: std::sync::atomic::AtomicBool,
    /// During a live merge: offset below which the target holds the leaf's data (chunks
    /// copied by [`DiskChain::merge_block`]). Guest writes at or above it go to the leaf only
    /// (the merge copies them later); writes below it go to both. `u64::MAX` (the state a
    /// merge starts in) mirrors every write.
    merge_frontier: AtomicU64,
}

/// A mutating request as [`DiskChain::mutate`] sees it.
struct Req<'a> {
    off: u64,
    len: u64,
    fua: bool,
    kind: Kind,
    /// Payload of a write (empty otherwise).
    data: &'a [u8],
}

/// Whether writing `[off, off+len)` of `v` changes its metadata (the range is not wholly
/// allocated data in this very image). Errors count as a change (flush to be safe).
fn changes_metadata(v: &Vhdx, off: u64, len: u64) -> bool {
    v.block_status(off, len).map_or(true, |es| {
        es.iter().any(|e| e.state != vhdx::ExtentState::Data)
    })
}

fn gone() -> io::Error {
    io::Error::other("the disk is being switched after a failed operation")
}

impl DiskChain {
    /// Opens the image at `leaf` (format detected by [`open_image`]).
    pub fn open(leaf: &Path, read_only: bool) -> Result<DiskChain> {
        Ok(DiskChain::from_image(
            open_image(leaf, read_only)?,
            read_only,
        ))
    }

    /// Opens a chain whose live merge of `top` into its parent `target` was interrupted:
    /// `target` read-write, `top` on top of it, every write mirrored into both.
    pub fn open_merging(top: &Path, target: &Path) -> Result<DiskChain> {
        let t = Arc::new(
            Vhdx::open(target, OpenOptions { read_only: false })
                .map_err(StorageError::image("opening merge target", target))?,
        );
        let l = Vhdx::open_with_parents(
            top,
            OpenOptions { read_only: false },
            std::slice::from_ref(&t),
        )
        .map_err(StorageError::image("opening", top))?;
        let c = DiskChain::from_image(Image::Vhdx(Arc::new(l)), false);
        c.merge_frontier.store(u64::MAX, Ordering::SeqCst);
        c.write().mirror = Some(t);
        Ok(c)
    }

    fn from_image(img: Image, read_only: bool) -> DiskChain {
        DiskChain {
            size: img.size(),
            layers: RwLock::new(Layers {
                top: Some(img),
                mirror: None,
                observer: None,
                absorb: None,
            }),
            read_only,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            unflushed_meta: AtomicU64::new(0),
            journal: OnceLock::new(),
            absorb_dirty: std::sync::atomic::AtomicBool::new(false),
            merge_frontier: AtomicU64::new(u64::MAX),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Layers> {
        self.layers.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The layers shared, or `None` while a switch or merge step holds (or waits for) them.
    fn try_read(&self) -> Option<RwLockReadGuard<'_, Layers>> {
        match self.layers.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, Layers> {
        self.layers.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Paths of the active chain, leaf first.
    pub fn chain_paths(&self) -> Vec<PathBuf> {
        self.read()
            .top
            .as_ref()
            .map(Image::chain_paths)
            .unwrap_or_default()
    }

    /// Path of the leaf.
    pub fn leaf(&self) -> Option<PathBuf> {
        self.read().top.as_ref().map(|i| i.path().to_path_buf())
    }

    /// Whether the leaf is a raw image (no checkpoints possible).
    pub fn is_raw(&self) -> bool {
        matches!(self.read().top, Some(Image::Raw { .. }))
    }

    /// Whether a live merge is running (writes mirrored).
    pub fn is_merging(&self) -> bool {
        self.read().mirror.is_some()
    }

    /// Whether an image of this chain is taking over its parent's data.
    pub fn is_absorbing(&self) -> bool {
        self.read().absorb.is_some()
    }

    /// Block size of the leaf VHDX (merge unit).
    pub fn merge_block_size(&self) -> Option<u64> {
        match &self.read().top {
            Some(Image::Vhdx(v)) => Some(u64::from(v.block_size())),
            _ => None,
        }
    }

    /// Drains requests, flushes and closes the images cleanly (VHDX headers marked clean,
    /// log emptied). Requests arriving afterwards fail.
    pub fn close(&self) -> Result<()> {
        let mut g = self.write();
        let mirror = g.mirror.take();
        let top = g.top.take();
        let absorb = g.absorb.take();
        let mut first_err = None;
        if let Some(Image::Vhdx(v)) = top {
            let path = v.path().to_path_buf();
            match Arc::try_unwrap(v) {
                Ok(v) => {
                    if let Err(e) = v.close() {
                        first_err.get_or_insert(StorageError::Image {
                            op: "closing",
                            path,
                            source: Box::new(e),
                        });
                    }
                }
                Err(v) => {
                    if let Err(e) = v.flush() {
                        first_err.get_or_insert(StorageError::Image {
                            op: "flushing",
                            path,
                            source: Box::new(e),
                        });
                    }
                }
            }
        } else if let Some(t) = top {
            if let Err(e) = t.flush() {
                first_err.get_or_insert(StorageError::Io {
                    op: "flushing",
                    path: t.path().to_path_buf(),
                    source: e,
                });
            }
        }
        if let Some(a) = absorb {
            // After the leaf (which held it as a parent); the leaf itself when they are one.
            let path = a.path().to_path_buf();
            let r = match Arc::try_unwrap(a) {
                Ok(a) => a.close(),
                Err(a) => a.flush(),
            };
            if let Err(e) = r {
                first_err.get_or_insert(StorageError::Image {
                    op: "closing",
                    path,
                    source: Box::new(e),
                });
            }
        }
        if let Some(m) = mirror {
            let path = m.path().to_path_buf();
            let r = match Arc::try_unwrap(m) {
                Ok(m) => m.close(),
                Err(m) => m.flush(),
            };
            if let Err(e) = r {
                first_err.get_or_insert(StorageError::Image {
                    op: "closing",
                    path,
                    source: Box::new(e),
                });
            }
        }
        if first_err.is_none() {
            self.journal_done();
            if let Some(j) = self.journal.get() {
                j.remove();
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Checkpoint create: pauses new requests, drains in-flight ones, flushes, creates
    /// `new_leaf` as a differencing VHDX whose parent is the current leaf, reopens the old
    /// leaf read-only as its parent, calls `commit(new_leaf)` (persist the new state) and
    /// resumes. Any failure (including `commit`'s) leaves the old leaf active. Returns the
    /// old leaf's path (now frozen).
    pub fn switch_to_child(
        &self,
        new_leaf: &Path,
        commit: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let mut g = self.write();
        if g.mirror.is_some() || g.absorb.is_some() {
            return Err(StorageError::Busy("a merge is running on this disk".into()));
        }
        crate::mirror::refuse_while_mirroring(&g)?;
        let old = match g.top.take() {
            Some(Image::Vhdx(v)) => v,
            Some(raw @ Image::Raw { .. }) => {
                let path = raw.path().to_path_buf();
                g.top = Some(raw);
                return Err(StorageError::RawDisk { path });
            }
            None => return Err(StorageError::Busy("the disk has no active chain".into())),
        };
        let old_path = old.path().to_path_buf();
        let reopen = |g: &mut Layers, why: StorageError| -> StorageError {
            match Vhdx::open(&old_path, OpenOptions { read_only: false }) {
                Ok(v) => g.top = Some(Image::Vhdx(Arc::new(v))),
                Err(e) => {
                    tracing::error!(path = %old_path.display(), "reopening the leaf failed: {e}")
                }
            }
            why
        };
        if let Err(e) = old.flush() {
            g.top = Some(Image::Vhdx(old));
            return Err(StorageError::Image {
                op: "flushing",
                path: old_path.clone(),
                source: Box::new(e),
            });
        }
        self.journal_done();
        // Release the exclusive handle so the child can take the parent shared.
        let closed = match Arc::try_unwrap(old) {
            Ok(v) => v.close(),
            Err(a) => {
                g.top = Some(Image::Vhdx(a));
                return Err(StorageError::Busy("the leaf is still in use".into()));
            }
        };
        if let Err(e) = closed {
            return Err(reopen(
                &mut g,
                StorageError::Image {
                    op: "closing",
                    path: old_path.clone(),
                    source: Box::new(e),
                },
            ));
        }
        let opts = CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(old_path.clone()),
            ..CreateOptions::default()
        };
        let child = match Vhdx::create(new_leaf, &opts) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(new_leaf);
                return Err(reopen(
                    &mut g,
                    StorageError::Image {
                        op: "creating",
                        path: new_leaf.to_path_buf(),
                        source: Box::new(e),
                    },
                ));
            }
        };
        if let Err(e) = child.flush() {
            drop(child);
            let _ = std::fs::remove_file(new_leaf);
            return Err(reopen(
                &mut g,
                StorageError::Image {
                    op: "flushing",
                    path: new_leaf.to_path_buf(),
                    source: Box::new(e),
                },
            ));
        }
        if let Err(e) = commit(new_leaf) {
            drop(child);
            let _ = std::fs::remove_file(new_leaf);
            return Err(reopen(&mut g, e));
        }
        g.top = Some(Image::Vhdx(Arc::new(child)));
        tracing::info!(old = %old_path.display(), new = %new_leaf.display(), "switched to a new leaf");
        Ok(old_path)
    }

    /// Starts a live merge of the leaf into its parent: the parent is reopened read-write
    /// and from now on receives every write too. Returns (leaf, parent, blocks to copy).
    pub fn begin_merge(&self) -> Result<(PathBuf, PathBuf, u64)> {
        let mut g = self.write();
        let leaf = take_vhdx_top_for_merge(&mut g)?;
        let leaf_path = leaf.path().to_path_buf();
        let Some(parent_path) = leaf.parent().map(|p| p.path().to_path_buf()) else {
            g.top = Some(Image::Vhdx(leaf));
            return Err(StorageError::Unsupported(format!(
                "{} has no parent to merge into",
                leaf_path.display()
            )));
        };
        let flushed = leaf.flush();
        let leaf = match (flushed, Arc::try_unwrap(leaf)) {
            (Ok(()), Ok(v)) => {
                self.journal_done();
                v
            }
            (_, Err(a)) => {
                g.top = Some(Image::Vhdx(a));
                return Err(StorageError::Busy("the leaf is still in use".into()));
            }
            (Err(e), Ok(v)) => {
                g.top = Some(Image::Vhdx(Arc::new(v)));
                return Err(StorageError::Image {
                    op: "flushing",
                    path: leaf_path,
                    source: Box::new(e),
                });
            }
        };
        if let Err(e) = leaf.close() {
            tracing::warn!("closing {}: {e}", leaf_path.display());
        }
        let opened = Vhdx::open(&parent_path, OpenOptions { read_only: false })
            .map_err(StorageError::image("opening merge target", &parent_path))
            .map(Arc::new)
            .and_then(|t| {
                Vhdx::open_with_parents(
                    &leaf_path,
                    OpenOptions { read_only: false },
                    std::slice::from_ref(&t),
                )
                .map_err(StorageError::image("opening", &leaf_path))
                .map(|l| (t, l))
            });
        match opened {
            Ok((t, l)) => {
                let blocks = l.size().div_ceil(u64::from(l.block_size()));
                g.top = Some(Image::Vhdx(Arc::new(l)));
                self.merge_frontier.store(u64::MAX, Ordering::SeqCst);
                g.mirror = Some(t);
                Ok((leaf_path, parent_path, blocks))
            }
            Err(e) => {
                match Vhdx::open(&leaf_path, OpenOptions { read_only: false }) {
                    Ok(v) => g.top = Some(Image::Vhdx(Arc::new(v))),
                    Err(e2) => tracing::error!("reopening {}: {e2}", leaf_path.display()),
                }
                Err(e)
            }
        }
    }

    /// Copies block `block` of the leaf into the merge target (idempotent). The copy goes in
    /// 256 KiB pieces, each under a lock that excludes guest writes to its 1 MiB chunk only,
    /// so a guest write waits at most for one piece's copy. The copy is not durable until
    /// [`DiskChain::merge_sync`]: record progress only after that.
    pub fn merge_block(&self, block: u64) -> Result<()> {
        let g = self.read();
        let (Some(Image::Vhdx(top)), Some(target)) = (&g.top, &g.mirror) else {
            return Err(StorageError::Unsupported(
                "no merge is running on this disk".into(),
            ));
        };
        let bs = u64::from(top.block_size());
        let start = block.saturating_mul(bs);
        let end = start.saturating_add(bs).min(top.size());
        let tp = target.path();
        let mut wb = Writeback::open(tp);
        let mut buf = Vec::new();
        let mut off = start;
        while off < end {
            let began = Instant::now();
            if off.is_multiple_of(MERGE_CHUNK) {
                if let Some(wb) = wb.as_mut() {
                    wb.step(MERGE_CHUNK);
                }
            }
            let n = MERGE_PIECE.min(end - off);
            let chunk_lock = self.stripes[((off / MERGE_CHUNK) as usize) % STRIPES]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            // The leaf's parent is the target: what the leaf does not hold, the target has.
            for e in top
                .block_status(off, n)
                .map_err(StorageError::image("merging", top.path()))?
            {
                match e.state {
                    vhdx::ExtentState::Data => {
                        buf.resize(e.len as usize, 0);
                        top.read_at(&mut buf, e.off)
                            .map_err(StorageError::image("merging", top.path()))?;
                        target
                            .write_at(&buf, e.off)
                            .map_err(StorageError::image("merging into", tp))?;
                    }
                    vhdx::ExtentState::Zero | vhdx::ExtentState::Unmapped => {
                        target
                            .write_zeroes(e.off, e.len)
                            .map_err(StorageError::image("merging into", tp))?;
                    }
                    vhdx::ExtentState::FromParent => {}
                }
            }
            off += n;
            // Still under this chunk's lock: later guest writes to it go to both layers.
            self.merge_frontier.store(off, Ordering::SeqCst);
            drop(chunk_lock);
            rest_after_piece(began.elapsed());
        }
        Ok(())
    }

    /// Sets where a (resumed) merge starts copying: the target holds the leaf's data below
    /// `off` (copied and synced before), so only writes below it need to be mirrored. Call
    /// before the first [`DiskChain::merge_block`], which then copies upwards from `off`.
    pub fn set_merge_frontier(&self, off: u64) {
        let _g = self.read();
        self.merge_frontier.store(off, Ordering::SeqCst);
    }

    /// Makes everything [`DiskChain::merge_block`] copied so far durable in the target. The
    /// bulk of the data is synced first through a separate descriptor, holding no lock that
    /// guest writes need; the target's own flush (metadata commit, under its lock) then has
    /// little left to write, so guest writes allocating in the target wait only briefly.
    pub fn merge_sync(&self) -> Result<()> {
        let g = self.read();
        let Some(target) = &g.mirror else {
            return Err(StorageError::Unsupported(
                "no merge is running on this disk".into(),
            ));
        };
        let tp = target.path();
        std::fs::File::open(tp)
            .and_then(|f| f.sync_data())
            .map_err(StorageError::io("syncing", tp))?;
        target.flush().map_err(StorageError::image("flushing", tp))
    }

    /// Ends a live merge: drains requests, flushes, makes the target the leaf and calls
    /// `commit(target)` (persist) before requests resume. Returns the obsolete leaf's path
    /// (the caller deletes it after committing).
    pub fn finish_merge(&self, commit: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let mut g = self.write();
        let Some(target) = g.mirror.clone() else {
            return Err(StorageError::Unsupported(
                "no merge is running on this disk".into(),
            ));
        };
        let top_path = g
            .top
            .as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default();
        if let Some(t) = &g.top {
            t.flush().map_err(|e| StorageError::Io {
                op: "flushing",
                path: top_path.clone(),
                source: e,
            })?;
        }
        target
            .flush()
            .map_err(StorageError::image("flushing", target.path()))?;
        self.journal_done();
        commit(target.path())?;
        g.top = Some(Image::Vhdx(target));
        g.mirror = None;
        tracing::info!(merged = %top_path.display(), "live merge finished");
        Ok(top_path)
    }

    /// Starts the live removal of the inner layer `parent` for this chain: `child` (the leaf,
    /// or an image between the leaf and `parent`, whose parent is `parent`) is made the
    /// chain's read-write "absorbing" image, which [`DiskChain::absorb_chunk`] fills with
    /// `parent`'s data while clients keep doing I/O. Returns `false` and changes nothing
    /// when `child`'s parent is no longer `parent` (an earlier run finished re-pointing it).
    pub fn begin_absorb(&self, child: &Path, parent: &Path) -> Result<bool> {
        let mut g = self.write();
        let top = take_vhdx_top_for_merge(&mut g)?;
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let (want, want_parent) = (canon(child), canon(parent));
        let mut found = None;
        let mut cur = Some(&top);
        while let Some(v) = cur {
            if canon(v.path()) == want {
                found = Some(v.clone());
                break;
            }
            cur = v.parent();
        }
        let refuse = |g: &mut Layers, top: Arc<Vhdx>, e: StorageError| {
            g.top = Some(Image::Vhdx(top));
            Err(e)
        };
        let Some(k) = found else {
            return refuse(
                &mut g,
                top,
                StorageError::InvalidInput(format!(
                    "{} is not in the running chain of this disk",
                    child.display()
                )),
            );
        };
        if k.parent().map(|p| canon(p.path())) != Some(want_parent) {
            g.top = Some(Image::Vhdx(top));
            return Ok(false);
        }
        if k.parent().and_then(|p| p.parent()).is_none() {
            return refuse(
                &mut g,
                top,
                StorageError::Unsupported(format!(
                    "{} has no parent to re-point {} at",
                    parent.display(),
                    child.display()
                )),
            );
        }
        if Arc::ptr_eq(&k, &top) {
            g.absorb = Some(k);
            g.top = Some(Image::Vhdx(top));
            return Ok(true);
        }
        drop(k);
        // An inner image: reopen the leaf on top of a read-write handle of it.
        let leaf_path = top.path().to_path_buf();
        if let Err(e) = top.flush() {
            return refuse(
                &mut g,
                top,
                StorageError::Image {
                    op: "flushing",
                    path: leaf_path,
                    source: Box::new(e),
                },
            );
        }
        self.journal_done();
        match Arc::try_unwrap(top) {
            Ok(v) => {
                if let Err(e) = v.close() {
                    tracing::warn!("closing {}: {e}", leaf_path.display());
                }
            }
            Err(a) => {
                return refuse(
                    &mut g,
                    a,
                    StorageError::Busy("the leaf is still in use".into()),
                )
            }
        }
        let opened = Vhdx::open(child, OpenOptions { read_only: false })
            .map_err(StorageError::image("opening", child))
            .map(Arc::new)
            .and_then(|k| {
                Vhdx::open_with_parents(
                    &leaf_path,
                    OpenOptions { read_only: false },
                    std::slice::from_ref(&k),
                )
                .map_err(StorageError::image("opening", &leaf_path))
                .map(|l| (k, l))
            });
        match opened {
            Ok((k, l)) => {
                g.top = Some(Image::Vhdx(Arc::new(l)));
                g.absorb = Some(k);
                Ok(true)
            }
            Err(e) => {
                match Vhdx::open(&leaf_path, OpenOptions { read_only: false }) {
                    Ok(v) => g.top = Some(Image::Vhdx(Arc::new(v))),
                    Err(e2) => tracing::error!("reopening {}: {e2}", leaf_path.display()),
                }
                Err(e)
            }
        }
    }

    /// Number of [`DiskChain::absorb_chunk`] units of this disk.
    pub fn absorb_chunks(&self) -> u64 {
        self.size.div_ceil(MERGE_CHUNK)
    }

    /// Copies the part of chunk `idx` (1 MiB units) that the absorbing image takes from the
    /// layer being removed into it, under the lock that keeps guest writes off that chunk.
    /// Idempotent; what clients read does not change. Returns the bytes copied.
    pub fn absorb_chunk(&self, idx: u64) -> Result<u64> {
        let g = self.read();
        let Some(k) = &g.absorb else {
            return Err(StorageError::Unsupported(
                "no merge is running on this disk".into(),
            ));
        };
        let off = idx.saturating_mul(MERGE_CHUNK);
        if off >= k.size() {
            return Ok(0);
        }
        let n = MERGE_CHUNK.min(k.size() - off);
        let _c = self.stripes[(idx as usize) % STRIPES]
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // From now until the next absorb_flush, an acknowledged guest write may sit in a
        // block whose allocation is only in memory: have it journaled.
        if !self.absorb_dirty.swap(true, Ordering::SeqCst) {
            self.unflushed_meta.fetch_add(1, Ordering::SeqCst);
        }
        k.pull_from_parent(off, n)
            .map_err(StorageError::image("merging into", k.path()))
    }

    /// Makes what [`DiskChain::absorb_chunk`] copied durable (and empties the journal).
    pub fn absorb_flush(&self) -> Result<()> {
        let g = self.read();
        let Some(k) = &g.absorb else {
            return Ok(());
        };
        k.flush()
            .map_err(StorageError::image("flushing", k.path()))?;
        self.flush_layers(&g)
            .map_err(StorageError::io("flushing", k.path()))?;
        if self.absorb_dirty.swap(false, Ordering::SeqCst) {
            self.unflushed_meta.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Ends the absorbing started by [`DiskChain::begin_absorb`]: drains requests, flushes,
    /// and with `reparent` re-points the absorbing image at the removed layer's parent (one
    /// atomic metadata commit); then reopens the chain from the leaf, which from then on
    /// reads without the removed layer. Without `reparent` (cancel) the chain is only
    /// reopened as it was.
    pub fn end_absorb(&self, reparent: bool) -> Result<()> {
        let mut g = self.write();
        let Some(k) = g.absorb.take() else {
            return Ok(());
        };
        let Some(Image::Vhdx(top)) = g.top.take() else {
            return Err(StorageError::Busy("the disk has no active chain".into()));
        };
        let leaf_path = top.path().to_path_buf();
        let r = (|| {
            top.flush()
                .map_err(StorageError::image("flushing", &leaf_path))?;
            k.flush()
                .map_err(StorageError::image("flushing", k.path()))?;
            self.journal_done();
            if reparent {
                let grand = k
                    .parent()
                    .and_then(|p| p.parent())
                    .cloned()
                    .ok_or_else(|| {
                        StorageError::Unsupported(format!(
                            "{} has no grandparent to re-point at",
                            k.path().display()
                        ))
                    })?;
                k.set_parent(&grand)
                    .map_err(StorageError::image("re-pointing the parent of", k.path()))?;
            }
            Ok(())
        })();
        if self.absorb_dirty.swap(false, Ordering::SeqCst) {
            self.unflushed_meta.fetch_sub(1, Ordering::SeqCst);
        }
        drop(k);
        match Arc::try_unwrap(top) {
            Ok(v) => {
                if let Err(e) = v.close() {
                    tracing::warn!("closing {}: {e}", leaf_path.display());
                }
            }
            Err(a) => {
                // Cannot happen while the write lock is held; keep serving rather than lose it.
                g.top = Some(Image::Vhdx(a));
                return r.and(Err(StorageError::Busy("the leaf is still in use".into())));
            }
        }
        match Vhdx::open(&leaf_path, OpenOptions { read_only: false }) {
            Ok(v) => g.top = Some(Image::Vhdx(Arc::new(v))),
            Err(e) => {
                tracing::error!("reopening {}: {e}", leaf_path.display());
                return r.and(Err(StorageError::Image {
                    op: "reopening",
                    path: leaf_path,
                    source: Box::new(e),
                }));
            }
        }
        tracing::info!(leaf = %leaf_path.display(), reparent, "absorbing ended");
        r
    }

    /// Stripe guards of the merge chunks `[off, off+len)` touches while merging.
    fn stripe_guards(&self, mirror: bool, off: u64, len: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        if !mirror || len == 0 {
            return Vec::new();
        }
        let first = off / MERGE_CHUNK;
        let last = (off + len - 1) / MERGE_CHUNK;
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64))
            .map(|c| (c as usize) % STRIPES)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| {
                self.stripes[i]
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
            })
            .collect()
    }

    /// Applies a write, trim or zeroing to the leaf (and the merge target), and makes sure
    /// that once it is acknowledged it survives a kill -9 of this process. VHDX metadata (a
    /// new block's BAT entry, sector bitmap bits) lives in memory until a flush, and QEMU
    /// keeps running when the worker dies, so a request that changes metadata — or comes
    /// after one that is not flushed yet, and may rely on its allocation — is appended to the
    /// write journal before it is acknowledged (or, without a journal, flushed at once).
    fn mutate(
        &self,
        Req {
            off,
            len,
            fua,
            kind,
            data,
        }: Req<'_>,
        op: impl Fn(&Image) -> io::Result<()>,
        mirror_op: impl Fn(&Vhdx) -> vhdx::Result<()>,
    ) -> io::Result<()> {
        let g = self.read();
        self.mutate_locked(
            &g,
            Req {
                off,
                len,
                fua,
                kind,
                data,
            },
            op,
            mirror_op,
        )
    }

    /// [`DiskChain::mutate`] with the layers already held.
    fn mutate_locked(
        &self,
        g: &Layers,
        Req {
            off,
            len,
            fua,
            kind,
            data,
        }: Req<'_>,
        op: impl Fn(&Image) -> io::Result<()>,
        mirror_op: impl Fn(&Vhdx) -> vhdx::Result<()>,
    ) -> io::Result<()> {
        let top = g.top.as_ref().ok_or_else(gone)?;
        let _s = self.stripe_guards(g.mirror.is_some() || g.absorb.is_some(), off, len);
        // Under the chunk locks, so the merge cannot pass these chunks meanwhile: a range
        // wholly above the frontier is copied by the merge later and goes to the leaf only.
        let mirror = g
            .mirror
            .as_ref()
            .filter(|_| off < self.merge_frontier.load(Ordering::SeqCst));
        let meta = match top {
            Image::Raw { .. } => false,
            Image::Vhdx(v) => {
                kind != Kind::Write
                    || changes_metadata(v, off, len)
                    || mirror.is_some_and(|m| changes_metadata(m, off, len))
            }
        };
        if meta {
            self.unflushed_meta.fetch_add(1, Ordering::SeqCst);
        }
        let r = (|| {
            crate::tracking::record(self, off, len);
            op(top)?;
            if let Some(o) = &g.observer {
                o.changed(off, len);
            }
            if let Some(m) = mirror {
                mirror_op(m).map_err(to_io)?;
            }
            let pending = meta || self.unflushed_meta.load(Ordering::SeqCst) > 0;
            let mut flush = fua;
            match self.journal.get() {
                Some(j) if pending || !j.is_empty() => match j.append(kind, off, len, data) {
                    Ok(size) => flush |= size > crate::journal::SOFT_LIMIT,
                    Err(e) => {
                        tracing::warn!("appending to the write journal: {e}; flushing instead");
                        flush = true;
                    }
                },
                Some(_) => {}
                None => flush |= pending,
            }
            if flush {
                self.flush_layers(g)?;
            }
            Ok(())
        })();
        if meta {
            self.unflushed_meta.fetch_sub(1, Ordering::SeqCst);
        }
        r
    }

    /// Flushes the leaf and the merge target, then empties the journal.
    fn flush_layers(&self, g: &Layers) -> io::Result<()> {
        let f = || {
            g.top.as_ref().ok_or_else(gone)?.flush()?;
            if let Some(m) = &g.mirror {
                m.flush().map_err(to_io)?;
            }
            Ok(())
        };
        match self.journal.get() {
            Some(j) => j.flush_with(f),
            None => f(),
        }
    }

    /// Attaches the write journal at `path`: requests it holds (acknowledged before a kill
    /// -9 and not flushed) are replayed into the chain, the chain is flushed and the journal
    /// emptied. Call once, before serving. Returns how many requests were replayed.
    pub fn attach_journal(&self, path: &Path) -> Result<usize> {
        let (j, entries) =
            Journal::open(path, self.size).map_err(StorageError::io("opening", path))?;
        let n = entries.len();
        let g = self.read();
        for e in &entries {
            let top = g.top.as_ref().ok_or_else(gone);
            let in_range = matches!(e.off.checked_add(e.len), Some(end) if end <= self.size);
            let r = if !in_range {
                Err(io::Error::other("entry beyond the end of the disk"))
            } else {
                top.and_then(|t| match e.kind {
                    Kind::Write => t.write_at(&e.data, e.off),
                    Kind::Trim => t.trim(e.off, e.len),
                    Kind::Zero => t.write_zeroes(e.off, e.len, ZeroMode::default()),
                })
                .and_then(|()| match &g.mirror {
                    Some(m) => match e.kind {
                        Kind::Write => m.write_at(&e.data, e.off),
                        Kind::Trim | Kind::Zero => m.write_zeroes(e.off, e.len),
                    }
                    .map_err(to_io),
                    None => Ok(()),
                })
            };
            r.map_err(StorageError::io("replaying the write journal", path))?;
        }
        j.flush_with(|| {
            g.top.as_ref().ok_or_else(gone)?.flush()?;
            if let Some(m) = &g.mirror {
                m.flush().map_err(to_io)?;
            }
            Ok(())
        })
        .map_err(StorageError::io("flushing after replaying", path))?;
        drop(g);
        if n > 0 {
            tracing::info!(path = %path.display(), requests = n, "replayed the write journal");
        }
        let _ = self.journal.set(j);
        Ok(n)
    }

    /// Empties the journal once the images hold everything (the caller flushed them).
    fn journal_done(&self) {
        if let Some(j) = self.journal.get() {
            if let Err(e) = j.flush_with(|| Ok(())) {
                tracing::warn!("emptying the write journal: {e}");
            }
        }
    }
}

impl Export for DiskChain {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags {
            read_only: self.read_only,
            can_trim: true,
            can_fast_zero: false,
            can_multi_conn: true,
            rotational: false,
        }
    }

    fn block_size(&self) -> BlockSize {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }

    fn description(&self) -> Option<String> {
        self.leaf().map(|p| p.display().to_string())
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read().top.as_ref().ok_or_else(gone)?.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        self.mutate(
            Req {
                off,
                len: buf.len() as u64,
                fua,
                kind: Kind::Write,
                data: buf,
            },
            |t| t.write_at(buf, off),
            |m| m.write_at(buf, off),
        )
    }

    fn flush(&self) -> io::Result<()> {
        let g = self.read();
        self.flush_layers(&g)
    }

    /// The connection's own task reads when no switch or merge step holds the layers.
    fn try_read_at(&self, buf: &mut [u8], off: u64) -> Option<io::Result<()>> {
        let g = self.try_read()?;
        Some(
            g.top
                .as_ref()
                .ok_or_else(gone)
                .and_then(|t| t.read_at(buf, off)),
        )
    }

    /// The connection's own task writes only what needs no waiting: data overwriting
    /// allocated data of the leaf, with no merge running, nothing to journal and no flush
    /// pending. Everything else (allocations, journaled writes) takes the blocking path.
    fn try_write_at(&self, buf: &[u8], off: u64) -> Option<io::Result<()>> {
        if self.read_only {
            return None;
        }
        let g = self.try_read()?;
        if g.mirror.is_some()
            || g.absorb.is_some()
            || self.unflushed_meta.load(Ordering::SeqCst) > 0
        {
            return None;
        }
        if let Some(j) = self.journal.get() {
            if !j.try_is_empty()? {
                return None;
            }
        }
        let len = buf.len() as u64;
        match g.top.as_ref()? {
            Image::Vhdx(v) if changes_metadata(v, off, len) => return None,
            _ => {}
        }
        Some(self.mutate_locked(
            &g,
            Req {
                off,
                len,
                fua: false,
                kind: Kind::Write,
                data: buf,
            },
            |t| t.write_at(buf, off),
            |m| m.write_at(buf, off),
        ))
    }

    fn trim(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.mutate(
            Req {
                off,
                len,
                fua,
                kind: Kind::Trim,
                data: &[],
            },
            |t| t.trim(off, len),
            |m| m.write_zeroes(off, len),
        )
    }

    fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        if mode.fast {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        self.mutate(
            Req {
                off,
                len,
                fua: mode.fua,
                kind: Kind::Zero,
                data: &[],
            },
            |t| t.write_zeroes(off, len, mode),
            |m| m.write_zeroes(off, len),
        )
    }

    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.read()
            .top
            .as_ref()
            .ok_or_else(gone)?
            .block_status(off, len)
    }
}

/// Lets the guest have the CPU and the disk between two merge pieces: the merger sleeps as
/// long as the piece took (its writeback pacing included), so it runs at most half the time.
///
/// A busy merger is preempted now and then; preempted while writing the target it holds
/// the target's inode lock, and a guest write below the frontier (which goes to the target
/// too) waits until the scheduler runs the merger again — milliseconds on a loaded host.
/// Having slept, the merger starts each piece on a fresh time slice and with the guest's
/// threads idle, so it is rarely preempted inside one; and it no longer competes with the
/// guest's I/O threads for a CPU all the time. The rate stays above the sequential write
/// rate (docs/benchmarks.md).
fn rest_after_piece(busy: Duration) {
    if busy.is_zero() {
        std::thread::yield_now();
    } else {
        std::thread::sleep(busy);
    }
}

/// Unwritten merge data allowed in the page cache before the merger waits for it.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// Paces the merge's writes to the target file: writeback starts as data is copied, and
/// the merger waits for it every [`WRITEBACK_WINDOW`], so the target never holds much dirty
/// data. Otherwise a later sync has hundreds of MiB to write, and on ext4 its journal commit
/// (data=ordered) stalls every writer of the file system for that long, the guest included.
/// `sync_file_range` writes data only and commits no journal, so it stalls nobody but the
/// merger. Best effort: without it a merge is only less smooth.
struct Writeback {
    file: std::fs::File,
    since_wait: u64,
}

impl Writeback {
    fn open(path: &Path) -> Option<Writeback> {
        std::fs::File::open(path)
            .map(|file| Writeback {
                file,
                since_wait: 0,
            })
            .map_err(|e| tracing::debug!("pacing merge writeback of {}: {e}", path.display()))
            .ok()
    }

    /// Called before each chunk: starts writeback of what was copied so far, and every
    /// window waits for it to reach the disk.
    fn step(&mut self, copied: u64) {
        use std::os::fd::AsRawFd;
        self.since_wait += copied;
        let mut flags = libc::SYNC_FILE_RANGE_WRITE;
        if self.since_wait >= WRITEBACK_WINDOW {
            self.since_wait = 0;
            flags |= libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        }
        // SAFETY: sync_file_range on a descriptor this struct owns; it reads no memory of ours.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, flags) };
        if r != 0 {
            tracing::debug!("sync_file_range: {}", std::io::Error::last_os_error());
        }
    }
}

/// Takes the chain's VHDX top image out for a merge or an inner-layer removal, refusing
/// (and leaving the chain as it was) while another merge or a mirror runs, or when the
/// top is a raw disk.
fn take_vhdx_top_for_merge(g: &mut Layers) -> Result<Arc<Vhdx>> {
    if g.mirror.is_some() || g.absorb.is_some() {
        return Err(StorageError::Busy(
            "a merge is already running on this disk".into(),
        ));
    }
    crate::mirror::refuse_while_mirroring(g)?;
    match g.top.take() {
        Some(Image::Vhdx(v)) => Ok(v),
        Some(raw @ Image::Raw { .. }) => {
            let path = raw.path().to_path_buf();
            g.top = Some(raw);
            Err(StorageError::RawDisk { path })
        }
        None => Err(StorageError::Busy("the disk has no active chain".into())),
    }
}
