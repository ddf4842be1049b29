//! Change tracking (Replica): which grains of a served disk changed since the last
//! replication cycle was shipped, kept in a crash-safe file next to the disk, and the
//! capture of a crash-consistent cycle across all disks of a VM.
//!
//! ```text
//!  file: header (4 KiB: magic, version, grain, disk size, generation, flags, CRC32C)
//!        bitmap (1 bit per 64 KiB grain, u64 words little endian, padded to 4 KiB pages)
//! ```
//!
//! Crash safety is write-ahead: the disk service calls [`record`] for every write, trim or
//! zeroing *before* the request reaches the image. The first change of a grain since the
//! last commit sets its bit in the file (`pwrite` of one 4 KiB bitmap page + `fdatasync`)
//! before the data moves; later changes of that grain cost nothing. Bits only go from 0 to
//! 1 between commits, so a torn page write can lose only the bit being set, whose write has
//! not happened yet. [`ChangeTracker::commit`] clears the bits of a shipped cycle by writing
//! a new file (temp, fsync, rename, directory fsync). After a crash (worker or host) the
//! file therefore holds a superset of the grains that differ from the replica: tracking
//! resumes without a resync. When the file is missing, damaged, of another version or of
//! another disk size, [`ChangeTracker::open`] starts a fresh one flagged
//! [`ChangeTracker::resync_required`]: the replica side must then compare checksums.
//!
//! A failure to persist a bit never fails the guest's write: the tracker is flagged for a
//! resync instead (in memory and, when possible, in the file).
//!
//! Capture ([`capture`]): grains are swapped out of the active set under the chain's
//! exclusive I/O lock (no write in flight, so every write that marked a swapped grain has
//! reached the image) and read without it; writes racing with the read mark the new active
//! set and are read again by the next pass. The last pass takes every disk's exclusive
//! lock at once, so the cycle is the state of all disks at that instant (crash-consistent).

use crate::chain::DiskChain;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

/// Unit of change tracking (bytes).
pub const GRAIN: u64 = 64 << 10;
/// Version of the tracking file layout; another version is not trusted.
pub const TRACKING_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"VIREOCBT";
const HEADER_LEN: u64 = 4096;
const PAGE: u64 = 4096;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
const FLAG_RESYNC: u32 = 1;
/// Unlocked capture passes before the final locked one.
const MAX_PASSES: usize = 4;
/// Pending grains small enough for the final (locked) pass.
const FINAL_GRAINS: usize = 256;

/// What went wrong with change tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackingError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading a disk for a capture failed.
    #[error("reading disk {disk} at {off:#x} for a replication cycle")]
    Read {
        /// Disk index.
        disk: usize,
        /// Offset.
        off: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The consumer of a capture failed.
    #[error("storing the captured cycle")]
    Sink(#[source] io::Error),
    /// Bad request (size mismatch, no disks).
    #[error("{0}")]
    InvalidInput(String),
}

impl TrackingError {
    /// The class of this error.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            TrackingError::Io { .. } | TrackingError::Read { .. } | TrackingError::Sink(_) => {
                crate::ErrorKind::Io
            }
            TrackingError::InvalidInput(_) => crate::ErrorKind::InvalidInput,
        }
    }

    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TrackingError + 'a {
        move |source| TrackingError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result of this module.
pub type TrackingResult<T> = std::result::Result<T, TrackingError>;

/// How [`ChangeTracker::open`] found the tracking file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The file was valid: tracking continues from it.
    Resumed {
        /// Last committed cycle.
        generation: u64,
        /// Grains marked changed (to ship in the next cycle).
        dirty_grains: u64,
        /// The file was already flagged for a resync.
        resync_required: bool,
    },
    /// There was no file: a new one was created (generation 0, nothing changed).
    Created,
    /// The file could not be trusted; a new one was created, flagged for a resync.
    Reset {
        /// Why the old file was refused.
        why: String,
    },
}

struct Inner {
    file: File,
    generation: u64,
    flags: u32,
    /// Grains changed since the last cut.
    active: Vec<u64>,
    /// Grains of the cycle being captured or shipped (cut, not committed).
    cut: Vec<u64>,
    /// The bitmap as it is in the file.
    persisted: Vec<u64>,
}

/// The change tracker of one disk (see the module doc).
pub struct ChangeTracker {
    path: PathBuf,
    disk_size: u64,
    grains: u64,
    inner: Mutex<Inner>,
}

fn words(grains: u64) -> usize {
    grains.div_ceil(64) as usize
}

fn padded_words(grains: u64) -> usize {
    words(grains).div_ceil(WORDS_PER_PAGE).max(1) * WORDS_PER_PAGE
}

fn header_bytes(disk_size: u64, generation: u64, flags: u32) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&TRACKING_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(GRAIN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    h[24..32].copy_from_slice(&generation.to_le_bytes());
    h[32..36].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn test_bit(w: &[u64], g: u64) -> bool {
    w.get((g / 64) as usize)
        .is_some_and(|x| x & (1 << (g % 64)) != 0)
}

fn set_bit(w: &mut [u64], g: u64) {
    if let Some(x) = w.get_mut((g / 64) as usize) {
        *x |= 1 << (g % 64);
    }
}

fn count(w: &[u64]) -> u64 {
    w.iter().map(|x| u64::from(x.count_ones())).sum()
}

fn grains_of(w: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &x) in w.iter().enumerate() {
        let mut x = x;
        while x != 0 {
            let b = x.trailing_zeros() as u64;
            out.push(i as u64 * 64 + b);
            x &= x - 1;
        }
    }
    out
}

/// Parses a tracking file; `Err(why)` when it cannot be trusted.
fn parse(bytes: &[u8], disk_size: u64) -> Result<(u64, u32, Vec<u64>), String> {
    if bytes.len() < HEADER_LEN as usize {
        return Err("the file is shorter than its header".into());
    }
    if &bytes[0..8] != MAGIC {
        return Err("not a change tracking file (bad magic)".into());
    }
    if crc32c::crc32c(&bytes[0..40]) != le_u32(&bytes[40..44]) {
        return Err("the header fails its checksum".into());
    }
    let version = le_u32(&bytes[8..12]);
    if version != TRACKING_VERSION {
        return Err(format!(
            "format version {version} (this build reads {TRACKING_VERSION})"
        ));
    }
    if u64::from(le_u32(&bytes[12..16])) != GRAIN {
        return Err("another grain size".into());
    }
    let size = le_u64(&bytes[16..24]);
    if size != disk_size {
        return Err(format!(
            "it tracks a disk of {size} bytes, the disk has {disk_size}"
        ));
    }
    let grains = disk_size.div_ceil(GRAIN);
    let need = HEADER_LEN as usize + padded_words(grains) * 8;
    if bytes.len() != need {
        return Err(format!("{} bytes, expected {need}", bytes.len()));
    }
    let mut w: Vec<u64> = bytes[HEADER_LEN as usize..]
        .chunks_exact(8)
        .map(le_u64)
        .collect();
    w.truncate(words(grains));
    // Bits past the end of the disk would be nonsense: refuse rather than guess.
    if let Some(last) = w.last() {
        let tail = grains % 64;
        if tail != 0 && last >> tail != 0 {
            return Err("bits set past the end of the disk".into());
        }
    }
    Ok((le_u64(&bytes[24..32]), le_u32(&bytes[32..36]), w))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a whole tracking file atomically (temp, fsync, rename, directory fsync) and
/// returns it open for page updates.
fn write_file(
    path: &Path,
    disk_size: u64,
    generation: u64,
    flags: u32,
    bits: &[u64],
) -> TrackingResult<File> {
    let grains = disk_size.div_ceil(GRAIN);
    let mut data = header_bytes(disk_size, generation, flags);
    let mut w = bits.to_vec();
    w.resize(padded_words(grains), 0);
    for x in &w {
        data.extend_from_slice(&x.to_le_bytes());
    }
    let tmp = path.with_extension("cbt.tmp");
    {
        let mut f = File::create(&tmp).map_err(TrackingError::io("creating", &tmp))?;
        f.write_all(&data)
            .map_err(TrackingError::io("writing", &tmp))?;
        f.sync_all().map_err(TrackingError::io("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(TrackingError::io("renaming into", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(TrackingError::io("syncing", dir))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(TrackingError::io("opening", path))
}

impl ChangeTracker {
    /// Opens the tracking file of a disk of `disk_size` bytes at `path`, creating it when
    /// missing and replacing it (flagged for a resync) when it cannot be trusted.
    pub fn open(path: &Path, disk_size: u64) -> TrackingResult<(Arc<ChangeTracker>, Resume)> {
        if disk_size == 0 {
            return Err(TrackingError::InvalidInput(
                "cannot track an empty disk".into(),
            ));
        }
        let grains = disk_size.div_ceil(GRAIN);
        let zero = vec![0u64; words(grains)];
        let (generation, flags, bits, resume) = match std::fs::read(path) {
            Ok(bytes) => match parse(&bytes, disk_size) {
                Ok((g, f, w)) => {
                    let r = Resume::Resumed {
                        generation: g,
                        dirty_grains: count(&w),
                        resync_required: f & FLAG_RESYNC != 0,
                    };
                    (g, f, w, r)
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), "change tracking file refused ({why}); a checksum resync is needed");
                    (0, FLAG_RESYNC, zero.clone(), Resume::Reset { why })
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 0, zero.clone(), Resume::Created),
            Err(e) => return Err(TrackingError::io("reading", path)(e)),
        };
        let file = write_file(path, disk_size, generation, flags, &bits)?;
        let t = ChangeTracker {
            path: path.to_path_buf(),
            disk_size,
            grains,
            inner: Mutex::new(Inner {
                file,
                generation,
                flags,
                active: bits.clone(),
                cut: zero,
                persisted: bits,
            }),
        };
        Ok((Arc::new(t), resume))
    }

    /// Path of the tracking file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the tracked disk.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Last committed cycle.
    pub fn generation(&self) -> u64 {
        lock(&self.inner).generation
    }

    /// Whether tracking cannot be trusted and the replica must be compared by checksums.
    pub fn resync_required(&self) -> bool {
        lock(&self.inner).flags & FLAG_RESYNC != 0
    }

    /// Grains changed since the last cut (not yet part of a cycle).
    pub fn dirty_grains(&self) -> u64 {
        count(&lock(&self.inner).active)
    }

    /// Flags the tracker for a resync (e.g. the disk was changed behind its back).
    pub fn require_resync(&self) {
        let mut g = lock(&self.inner);
        g.flags |= FLAG_RESYNC;
        let h = header_bytes(self.disk_size, g.generation, g.flags);
        if let Err(e) = g.file.write_all_at(&h, 0).and_then(|()| g.file.sync_data()) {
            tracing::warn!(path = %self.path.display(), "flagging change tracking for a resync: {e}");
        }
    }

    /// Marks `[off, off+len)` changed; persists new bits before returning.
    fn mark(&self, off: u64, len: u64) {
        if len == 0 || off >= self.disk_size {
            return;
        }
        let first = off / GRAIN;
        let last = ((off.saturating_add(len) - 1) / GRAIN).min(self.grains - 1);
        let mut g = lock(&self.inner);
        let mut pages: Vec<usize> = Vec::new();
        for gr in first..=last {
            set_bit(&mut g.active, gr);
            if !test_bit(&g.persisted, gr) {
                set_bit(&mut g.persisted, gr);
                let p = (gr / 64) as usize / WORDS_PER_PAGE;
                if pages.last() != Some(&p) {
                    pages.push(p);
                }
            }
        }
        if pages.is_empty() {
            return;
        }
        let r = (|| {
            for &p in &pages {
                let mut buf = vec![0u8; PAGE as usize];
                for (i, slot) in buf.chunks_exact_mut(8).enumerate() {
                    let w = g
                        .persisted
                        .get(p * WORDS_PER_PAGE + i)
                        .copied()
                        .unwrap_or(0);
                    slot.copy_from_slice(&w.to_le_bytes());
                }
                g.file.write_all_at(&buf, HEADER_LEN + p as u64 * PAGE)?;
            }
            g.file.sync_data()
        })();
        if let Err(e) = r {
            tracing::warn!(path = %self.path.display(), "persisting changed blocks failed: {e}; the replica will need a checksum resync");
            g.flags |= FLAG_RESYNC;
            let h = header_bytes(self.disk_size, g.generation, g.flags);
            let _ = g.file.write_all_at(&h, 0).and_then(|()| g.file.sync_data());
        }
    }

    /// Moves the active set into the cut; returns the grains moved.
    fn swap(&self) -> Vec<u64> {
        let mut g = lock(&self.inner);
        let taken = std::mem::replace(&mut g.active, vec![0u64; words(self.grains)]);
        for (c, t) in g.cut.iter_mut().zip(&taken) {
            *c |= *t;
        }
        grains_of(&taken)
    }

    /// The cycle was applied by the replica: forget its grains (in memory and in the file)
    /// and record `generation`. With `resynced`, the resync flag is cleared too.
    pub fn commit(&self, generation: u64, resynced: bool) -> TrackingResult<()> {
        let mut g = lock(&self.inner);
        let flags = if resynced {
            g.flags & !FLAG_RESYNC
        } else {
            g.flags
        };
        let bits = g.active.clone();
        let file = write_file(&self.path, self.disk_size, generation, flags, &bits)?;
        g.file = file;
        g.persisted = bits;
        g.cut.iter_mut().for_each(|w| *w = 0);
        g.generation = generation;
        g.flags = flags;
        Ok(())
    }

    /// Marks every grain changed (initial replication, or a full resync): the whole disk
    /// goes in the next cycles. Persisted before returning.
    pub fn mark_all(&self) -> TrackingResult<()> {
        let mut all = vec![u64::MAX; words(self.grains)];
        let tail = self.grains % 64;
        if let (true, Some(last)) = (tail != 0, all.last_mut()) {
            *last = (1u64 << tail) - 1;
        }
        let mut g = lock(&self.inner);
        let file = write_file(&self.path, self.disk_size, g.generation, g.flags, &all)?;
        g.file = file;
        for (a, x) in g.active.iter_mut().zip(&all) {
            *a |= *x;
        }
        g.persisted = all;
        Ok(())
    }

    /// A checksum resync found `ranges` (offset, length) different from the replica:
    /// marks their grains changed and clears the resync flag, in one atomic rewrite of
    /// the file. Tracking must have been recording since before the compare read the
    /// disk, so the marked set is again a superset of what differs from the replica.
    pub fn mark_resynced(&self, ranges: &[(u64, u64)]) -> TrackingResult<()> {
        let mut g = lock(&self.inner);
        let mut bits = g.persisted.clone();
        let mut active = g.active.clone();
        for &(off, len) in ranges {
            if len == 0 || off >= self.disk_size {
                continue;
            }
            let last = ((off.saturating_add(len) - 1) / GRAIN).min(self.grains - 1);
            for gr in off / GRAIN..=last {
                set_bit(&mut bits, gr);
                set_bit(&mut active, gr);
            }
        }
        let flags = g.flags & !FLAG_RESYNC;
        let file = write_file(&self.path, self.disk_size, g.generation, flags, &bits)?;
        g.file = file;
        g.persisted = bits;
        g.active = active;
        g.flags = flags;
        Ok(())
    }

    /// Moves at most `n` grains (lowest first) of the active set into the cut.
    fn swap_some(&self, n: usize) -> Vec<u64> {
        let mut g = lock(&self.inner);
        let mut out = Vec::new();
        let Inner { active, cut, .. } = &mut *g;
        for (i, (a, c)) in active.iter_mut().zip(cut.iter_mut()).enumerate() {
            while *a != 0 && out.len() < n {
                let b = a.trailing_zeros();
                *a &= !(1u64 << b);
                *c |= 1u64 << b;
                out.push(i as u64 * 64 + u64::from(b));
            }
            if out.len() >= n {
                break;
            }
        }
        out
    }

    /// The cycle was not applied: its grains count as changed again.
    pub fn abort(&self) {
        let mut g = lock(&self.inner);
        let cut = std::mem::replace(&mut g.cut, vec![0u64; words(self.grains)]);
        for (a, c) in g.active.iter_mut().zip(&cut) {
            *a |= *c;
        }
    }
}

/// Trackers attached to served chains (keyed by the chain's allocation; the `Weak` keeps
/// the address from being reused while the entry exists).
type Registry = Vec<(Weak<DiskChain>, Arc<ChangeTracker>)>;

static REGISTRY: RwLock<Registry> = RwLock::new(Vec::new());
static ATTACHED: AtomicUsize = AtomicUsize::new(0);

/// Starts recording the changes of `chain` into `tracker` (replacing a previous tracker).
pub fn attach(chain: &Arc<DiskChain>, tracker: Arc<ChangeTracker>) -> TrackingResult<()> {
    let size = nbd::Export::size(chain.as_ref());
    if size != tracker.disk_size() {
        return Err(TrackingError::InvalidInput(format!(
            "the tracker is for a disk of {} bytes, the disk has {size}",
            tracker.disk_size()
        )));
    }
    let mut r = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    r.retain(|(w, _)| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(chain)));
    r.push((Arc::downgrade(chain), tracker));
    ATTACHED.store(r.len(), Ordering::SeqCst);
    Ok(())
}

/// Stops recording the changes of `chain`; returns its tracker.
pub fn detach(chain: &Arc<DiskChain>) -> Option<Arc<ChangeTracker>> {
    let mut r = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    let pos = r
        .iter()
        .position(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(chain)));
    let out = pos.map(|i| r.remove(i).1);
    r.retain(|(w, _)| w.strong_count() > 0);
    ATTACHED.store(r.len(), Ordering::SeqCst);
    out
}

/// The tracker attached to `chain`.
pub fn tracker_of(chain: &Arc<DiskChain>) -> Option<Arc<ChangeTracker>> {
    lookup(chain.as_ref())
}

fn lookup(chain: &DiskChain) -> Option<Arc<ChangeTracker>> {
    REGISTRY
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|(w, _)| std::ptr::eq(w.as_ptr(), chain))
        .map(|(_, t)| t.clone())
}

/// The disk service's hook: `[off, off+len)` of `chain` is about to change (called under
/// the request's shared I/O lock, before the change reaches the image).
pub(crate) fn record(chain: &DiskChain, off: u64, len: u64) {
    if ATTACHED.load(Ordering::Relaxed) == 0 {
        return;
    }
    if let Some(t) = lookup(chain) {
        t.mark(off, len);
    }
}

/// Receives `(disk, offset, data)` of each captured grain.
pub type CaptureSink<'a> = dyn FnMut(usize, u64, &[u8]) -> io::Result<()> + 'a;

/// A disk taking part in a capture.
#[derive(Clone)]
pub struct TrackedDisk {
    /// The served chain.
    pub chain: Arc<DiskChain>,
    /// Its tracker (attached with [`attach`]).
    pub tracker: Arc<ChangeTracker>,
}

/// Figures of one capture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Distinct grains in the cycle.
    pub grains: u64,
    /// Grains read (a grain rewritten during the capture is read again).
    pub reads: u64,
    /// Passes, the last one locked.
    pub passes: usize,
    /// How long guest I/O waited for the final pass.
    pub pause: Duration,
}

/// Captures a crash-consistent cycle of `disks`: calls `out(disk, off, data)` for every
/// grain changed since the last cut, possibly several times for the same grain (the last
/// call holds the data at the cut, which is the instant the final pass held every disk's
/// I/O lock). On failure, call [`ChangeTracker::abort`] on every tracker.
pub fn capture(disks: &[TrackedDisk], out: &mut CaptureSink<'_>) -> TrackingResult<CaptureStats> {
    if disks.is_empty() {
        return Err(TrackingError::InvalidInput("no disks to capture".into()));
    }
    reclaim_uncommitted(disks);
    let mut stats = CaptureStats::default();
    let mut seen: Vec<Vec<u64>> = disks
        .iter()
        .map(|d| vec![0u64; words(d.tracker.grains)])
        .collect();
    let mut buf = vec![0u8; GRAIN as usize];
    let note = |i: usize, g: u64, seen: &mut Vec<Vec<u64>>| {
        if !test_bit(&seen[i], g) {
            set_bit(&mut seen[i], g);
            1
        } else {
            0
        }
    };
    // Unlocked passes: swap under a brief exclusive lock, read while the guest runs.
    for _ in 0..MAX_PASSES {
        let mut pending: Vec<Vec<u64>> = Vec::new();
        for d in disks {
            let _quiet = d
                .chain
                .layers
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            pending.push(d.tracker.swap());
        }
        stats.passes += 1;
        let total: usize = pending.iter().map(Vec::len).sum();
        for (i, (d, grains)) in disks.iter().zip(&pending).enumerate() {
            for &g in grains {
                let off = g * GRAIN;
                let len = GRAIN.min(d.tracker.disk_size - off) as usize;
                nbd::Export::read_at(d.chain.as_ref(), &mut buf[..len], off).map_err(|source| {
                    TrackingError::Read {
                        disk: i,
                        off,
                        source,
                    }
                })?;
                out(i, off, &buf[..len]).map_err(TrackingError::Sink)?;
                stats.reads += 1;
                stats.grains += note(i, g, &mut seen);
            }
        }
        let left: u64 = disks.iter().map(|d| d.tracker.dirty_grains()).sum();
        if total <= FINAL_GRAINS || left as usize <= FINAL_GRAINS {
            break;
        }
    }
    // Final pass: every disk's I/O stopped at once; this is the cut.
    let t0 = Instant::now();
    let guards: Vec<_> = disks
        .iter()
        .map(|d| {
            d.chain
                .layers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
        })
        .collect();
    for (i, (d, g)) in disks.iter().zip(&guards).enumerate() {
        let grains = d.tracker.swap();
        let Some(top) = g.top.as_ref() else {
            return Err(TrackingError::Read {
                disk: i,
                off: 0,
                source: io::Error::other("the disk has no active chain"),
            });
        };
        for gr in grains {
            let off = gr * GRAIN;
            let len = GRAIN.min(d.tracker.disk_size - off) as usize;
            top.read_at(&mut buf[..len], off)
                .map_err(|source| TrackingError::Read {
                    disk: i,
                    off,
                    source,
                })?;
            out(i, off, &buf[..len]).map_err(TrackingError::Sink)?;
            stats.reads += 1;
            stats.grains += note(i, gr, &mut seen);
        }
    }
    drop(guards);
    stats.passes += 1;
    stats.pause = t0.elapsed();
    Ok(stats)
}

/// Grains changed and not yet cut, over all `disks`.
pub fn dirty_total(disks: &[TrackedDisk]) -> u64 {
    disks.iter().map(|d| d.tracker.dirty_grains()).sum()
}

/// A new cut starts by taking back the grains of an earlier cut that was neither committed
/// nor aborted (its answer lost, vireod killed between the cut and the ship): they go
/// again in this one. Cycles are cut one at a time, so an uncommitted cut is a dead one;
/// shipping its grains again is harmless, dropping them at the next commit would not be.
fn reclaim_uncommitted(disks: &[TrackedDisk]) {
    for d in disks {
        d.tracker.abort();
    }
}

/// Captures at most `max_grains` changed grains (lowest first, disk by disk) without a
/// common cut: a partial cycle, for initial replication and resync, never a recovery
/// point. Grains rewritten meanwhile stay marked and go again. On failure, call
/// [`ChangeTracker::abort`] on every tracker.
pub fn capture_partial(
    disks: &[TrackedDisk],
    max_grains: u64,
    out: &mut CaptureSink<'_>,
) -> TrackingResult<CaptureStats> {
    reclaim_uncommitted(disks);
    let mut stats = CaptureStats::default();
    let mut left = max_grains as usize;
    let mut buf = vec![0u8; GRAIN as usize];
    for (i, d) in disks.iter().enumerate() {
        if left == 0 {
            break;
        }
        let grains = {
            let _quiet = d
                .chain
                .layers
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            d.tracker.swap_some(left)
        };
        left -= grains.len();
        for g in grains {
            let off = g * GRAIN;
            let len = GRAIN.min(d.tracker.disk_size - off) as usize;
            nbd::Export::read_at(d.chain.as_ref(), &mut buf[..len], off).map_err(|source| {
                TrackingError::Read {
                    disk: i,
                    off,
                    source,
                }
            })?;
            out(i, off, &buf[..len]).map_err(TrackingError::Sink)?;
            stats.reads += 1;
            stats.grains += 1;
        }
    }
    stats.passes = 1;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file from another disk size, a bad checksum or garbage is refused and replaced by
    /// a fresh file flagged for a resync; a valid one resumes with its bits.
    #[test]
    fn open_resume_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk0.cbt");
        let size = 10 * GRAIN + 5;
        let (t, r) = ChangeTracker::open(&p, size).unwrap();
        assert_eq!(r, Resume::Created);
        t.mark(0, 1);
        t.mark(3 * GRAIN + 7, GRAIN);
        t.mark(10 * GRAIN, 5);
        drop(t);
        let (t, r) = ChangeTracker::open(&p, size).unwrap();
        assert_eq!(
            r,
            Resume::Resumed {
                generation: 0,
                dirty_grains: 4,
                resync_required: false
            }
        );
        assert_eq!(t.dirty_grains(), 4);
        drop(t);
        let (_, r) = ChangeTracker::open(&p, size + GRAIN).unwrap();
        assert!(
            matches!(r, Resume::Reset { ref why } if why.contains("bytes")),
            "{r:?}"
        );
        let (t, r) = ChangeTracker::open(&p, size + GRAIN).unwrap();
        assert!(matches!(
            r,
            Resume::Resumed {
                resync_required: true,
                dirty_grains: 0,
                ..
            }
        ));
        assert!(t.resync_required());
        drop(t);
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let (_, r) = ChangeTracker::open(&p, size + GRAIN).unwrap();
        assert!(matches!(r, Resume::Reset { ref why } if why.contains("checksum")));
        std::fs::write(&p, b"garbage").unwrap();
        let (_, r) = ChangeTracker::open(&p, size + GRAIN).unwrap();
        assert!(matches!(r, Resume::Reset { .. }));
    }

    /// Commit forgets the cut's grains but keeps those changed since; abort puts the cut
    /// back; the file follows.
    #[test]
    fn commit_and_abort() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.cbt");
        let (t, _) = ChangeTracker::open(&p, 100 * GRAIN).unwrap();
        t.mark(0, GRAIN * 2);
        assert_eq!(t.swap(), vec![0, 1]);
        t.mark(50 * GRAIN, 1);
        t.abort();
        assert_eq!(t.dirty_grains(), 3);
        assert_eq!(t.swap().len(), 3);
        t.mark(99 * GRAIN, 1);
        t.commit(7, false).unwrap();
        assert_eq!(t.generation(), 7);
        drop(t);
        let (t, r) = ChangeTracker::open(&p, 100 * GRAIN).unwrap();
        assert_eq!(
            r,
            Resume::Resumed {
                generation: 7,
                dirty_grains: 1,
                resync_required: false
            }
        );
        assert_eq!(t.swap(), vec![99]);
    }

    /// A checksum resync's ranges are marked (grain-rounded, clipped to the disk) on top
    /// of what was already changed, and the resync flag is cleared, both in the file.
    #[test]
    fn mark_resynced_persists_and_clears_the_flag() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.cbt");
        let size = 40 * GRAIN + 100;
        let (t, _) = ChangeTracker::open(&p, size).unwrap();
        t.require_resync();
        t.mark(2 * GRAIN, 1);
        t.mark_resynced(&[
            (16 * GRAIN, 16 * GRAIN),
            (40 * GRAIN, 1 << 20),
            (size + 1, 5),
        ])
        .unwrap();
        assert!(!t.resync_required());
        assert_eq!(t.dirty_grains(), 1 + 16 + 1);
        drop(t);
        let (t, r) = ChangeTracker::open(&p, size).unwrap();
        assert_eq!(
            r,
            Resume::Resumed {
                generation: 0,
                dirty_grains: 18,
                resync_required: false
            }
        );
        let mut want = vec![2];
        want.extend(16..32);
        want.push(40);
        assert_eq!(t.swap(), want);
    }

    /// mark_all marks every grain (persisted); chunks take the lowest grains first, a
    /// commit keeps the rest in the file, and the last chunk is a full (consistent) capture.
    #[test]
    fn mark_all_and_chunks() {
        let d = tempfile::tempdir().unwrap();
        let size = 10 * GRAIN + 512;
        let c = disk(d.path(), "a.vhdx", size);
        let (t, _) = ChangeTracker::open(&d.path().join("a.cbt"), size).unwrap();
        attach(&c, t.clone()).unwrap();
        t.mark_all().unwrap();
        assert_eq!(t.dirty_grains(), 11);
        let disks = [TrackedDisk {
            chain: c.clone(),
            tracker: t.clone(),
        }];
        let mut got = Vec::new();
        let s = capture_partial(&disks, 4, &mut |_, off, _| {
            got.push(off);
            Ok(())
        })
        .unwrap();
        assert_eq!(s.grains, 4);
        assert_eq!(got, vec![0, GRAIN, 2 * GRAIN, 3 * GRAIN]);
        t.commit(1, false).unwrap();
        drop(t);
        let (t, r) = ChangeTracker::open(&d.path().join("a.cbt"), size).unwrap();
        assert!(
            matches!(
                r,
                Resume::Resumed {
                    dirty_grains: 7,
                    ..
                }
            ),
            "{r:?}"
        );
        attach(&c, t.clone()).unwrap();
        let disks = [TrackedDisk {
            chain: c.clone(),
            tracker: t.clone(),
        }];
        assert_eq!(dirty_total(&disks), 7);
        let s = capture(&disks, &mut |_, _, _| Ok(())).unwrap();
        assert_eq!(s.grains, 7);
        assert_eq!(dirty_total(&disks), 0);
        detach(&c);
    }

    fn disk(dir: &Path, name: &str, size: u64) -> Arc<DiskChain> {
        let p = dir.join(name);
        let v = vhdx::Vhdx::create(
            &p,
            &vhdx::CreateOptions {
                size,
                block_size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        v.close().unwrap();
        Arc::new(DiskChain::open(&p, false).unwrap())
    }

    /// A cut whose cycle was never committed nor aborted (its answer lost) is taken back
    /// by the next cut: its grains are shipped, not dropped by the next commit.
    #[test]
    fn a_lost_cut_goes_again_in_the_next_one() {
        use nbd::Export;
        let d = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let c = disk(d.path(), "a.vhdx", size);
        let (t, _) = ChangeTracker::open(&d.path().join("a.cbt"), size).unwrap();
        attach(&c, t.clone()).unwrap();
        let disks = [TrackedDisk {
            chain: c.clone(),
            tracker: t.clone(),
        }];
        let grains = |partial: bool| {
            let mut got = Vec::new();
            let mut out = |_: usize, off: u64, _: &[u8]| {
                got.push(off / GRAIN);
                Ok(())
            };
            if partial {
                capture_partial(&disks, 100, &mut out).unwrap();
            } else {
                capture(&disks, &mut out).unwrap();
            }
            got.sort_unstable();
            got.dedup();
            got
        };
        for partial in [false, true] {
            c.write_at(&[1u8; 512], 3 * GRAIN, false).unwrap();
            assert_eq!(grains(partial), [3]);
            // The cycle's answer is lost: no commit, no abort. The next write and cut.
            c.write_at(&[2u8; 512], 5 * GRAIN, false).unwrap();
            assert_eq!(grains(partial), [3, 5], "partial: {partial}");
            t.commit(1, false).unwrap();
            assert!(grains(partial).is_empty());
            t.commit(2, false).unwrap();
        }
        assert!(detach(&c).is_some());
    }

    fn slot_value(img: &[u8], slot: u64) -> u64 {
        le_u64(&img[(slot * GRAIN) as usize..])
    }

    /// Cycles captured while a writer runs on two disks, applied to plain copies, always
    /// show a state the disks had at one instant (the writer updates disk A then disk B, so
    /// B never runs ahead of A), and the last cycle after the writer stops makes the copies
    /// equal to the disks: no write is lost.
    #[test]
    fn capture_is_consistent_and_loses_nothing() {
        use nbd::Export;
        use std::sync::atomic::AtomicBool;
        let d = tempfile::tempdir().unwrap();
        let size = 2 << 20;
        let slots = size / GRAIN;
        let chains = [
            disk(d.path(), "a.vhdx", size),
            disk(d.path(), "b.vhdx", size),
        ];
        let disks: Vec<TrackedDisk> = chains
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (t, _) = ChangeTracker::open(&d.path().join(format!("{i}.cbt")), size).unwrap();
                attach(c, t.clone()).unwrap();
                TrackedDisk {
                    chain: c.clone(),
                    tracker: t,
                }
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (a, b, stop) = (chains[0].clone(), chains[1].clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let off = (n.wrapping_mul(7) % slots) * GRAIN;
                    let buf: Vec<u8> = n.to_le_bytes().repeat(512);
                    a.write_at(&buf, off, false).unwrap();
                    b.write_at(&buf, off, false).unwrap();
                }
                n
            })
        };
        let mut copies = vec![vec![0u8; size as usize]; 2];
        for generation in 1..=6u64 {
            std::thread::sleep(Duration::from_millis(20));
            let stats = capture(&disks, &mut |i, off, data| {
                copies[i][off as usize..off as usize + data.len()].copy_from_slice(data);
                Ok(())
            })
            .unwrap();
            assert!(stats.passes >= 2);
            for s in 0..slots {
                let (va, vb) = (slot_value(&copies[0], s), slot_value(&copies[1], s));
                assert!(
                    vb <= va,
                    "cycle {generation} slot {s}: disk B at {vb} ran ahead of A at {va}"
                );
            }
            for t in &disks {
                t.tracker.commit(generation, false).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let n = writer.join().unwrap();
        assert!(n > 10, "the writer made only {n} writes");
        capture(&disks, &mut |i, off, data| {
            copies[i][off as usize..off as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .unwrap();
        for (i, c) in chains.iter().enumerate() {
            let mut img = vec![0u8; size as usize];
            c.read_at(&mut img, 0).unwrap();
            assert!(
                img == copies[i],
                "disk {i} differs from its replicated copy"
            );
            assert!(detach(c).is_some());
        }
    }
}
