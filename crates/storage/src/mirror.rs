//! Storage mirror: copies a served disk's whole chain to a [`MirrorSink`] while the guest
//! keeps writing, then completes atomically (storage live migration, shared-nothing
//! migration).
//!
//! ```text
//!  start ──> Frozen (parents copied file by file, double-buffered: one read per byte,
//!            CRC32C of the bytes read checked against the CRC of the bytes the sink got)
//!        ──> Active (the leaf's allocated ranges, from its BAT; holes skipped)
//!        ──> dirty passes (every guest change since is re-copied) ── converged ──┐
//!  A local destination ([`DirSink`]) overlaps the first two: the frozen files are copied
//!  in the kernel (`copy_file_range`, each chunk read back from both files and compared)
//!  on a second thread while the active layer, created over the *source's* parent, gets
//!  its first pass; at commit the new leaf is re-pointed at its copied parent.
//!                                                                                 │
//!  complete(): exclusive I/O lock (requests drain, new ones wait) ─> final dirty pass
//!     ─> flush ─> verify (CRC32C of every MiB either active layer holds, source vs
//!        sink, both computed at once; elsewhere both read their identical frozen files)
//!     ─> commit (images closed clean) ─> [switch the export to the new leaf] ─> resume
//!  cancel() / any failure: the sink removes what it created; the source is untouched.
//! ```
//!
//! Writes are never lost: the export marks a grain dirty *after* the write reached the
//! source ([`WriteObserver`]); the copier clears a grain *before* reading it. A write racing
//! with a copy therefore leaves its grain dirty and the next pass copies it again; the final
//! pass runs with I/O stopped, so nothing is dirty at commit.
//!
//! Sinks: [`DirSink`] (a local directory) and [`StreamSink`] (a framed byte stream over any
//! `AsyncRead + AsyncWrite`, e.g. mutual TLS) whose receiving end is [`receive_chain`].

mod dir;
mod stream;

use dir::start_writeback;
pub use dir::DirSink;
pub use stream::{receive_chain, StreamSink, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::chain::{DiskChain, Layers};
use crate::error::StorageError;
use crate::image::{open_image, Image};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Unit of dirty tracking.
pub const DIRTY_GRAIN: u64 = 64 << 10;
/// Largest range copied at once, and unit of the verification checksums.
pub const COPY_CHUNK: u64 = 1 << 20;
/// Buffer for copying frozen layer files.
const FILE_CHUNK: usize = 16 << 20;
/// Longest run of dirty grains the active-layer copy takes at once.
const RUN_BYTES: u64 = 8 << 20;
/// errno of a full file system.
const ENOSPC: i32 = 28;

/// Told of every change made to an export (guest write, trim, zeroing) after it reached
/// the source image.
pub trait WriteObserver: Send + Sync {
    /// `[off, off+len)` of the virtual disk changed.
    fn changed(&self, off: u64, len: u64);
}

/// Refuses chain switches (checkpoint create, live merge) while a mirror runs.
pub(crate) fn refuse_while_mirroring(g: &Layers) -> crate::Result<()> {
    if g.observer.is_some() {
        return Err(StorageError::Busy(
            "the disk is being mirrored (storage migration); wait for it or cancel it".into(),
        ));
    }
    Ok(())
}

/// Class of a [`MirrorError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MirrorErrorKind {
    /// The destination file system is full.
    DiskFull,
    /// The destination already holds a file of the chain, or the request is malformed.
    InvalidInput,
    /// The disk cannot be mirrored now (merge running, already mirrored, closed).
    Busy,
    /// The destination does not match the source after the copy.
    Verify,
    /// The stream broke or the peer spoke an unknown protocol.
    Protocol,
    /// Cancelled.
    Cancelled,
    /// A file or image operation failed.
    Io,
}

/// What went wrong while mirroring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The destination is full.
    #[error("not enough space at the destination ({what})")]
    DiskFull {
        /// Where it happened.
        what: String,
    },
    /// Bad request or destination not empty.
    #[error("{0}")]
    InvalidInput(String),
    /// The disk cannot be mirrored now.
    #[error("{0}")]
    Busy(String),
    /// The destination differs from the source.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Stream or peer failure.
    #[error("mirror stream: {0}")]
    Protocol(String),
    /// Cancelled by the caller.
    #[error("mirror cancelled")]
    Cancelled,
    /// The peer reported an error.
    #[error("destination: {msg}")]
    Peer {
        /// Its class.
        kind: MirrorErrorKind,
        /// Its message.
        msg: String,
    },
    /// A disk service operation failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl MirrorError {
    /// The class of this error.
    pub fn kind(&self) -> MirrorErrorKind {
        match self {
            MirrorError::DiskFull { .. } => MirrorErrorKind::DiskFull,
            MirrorError::InvalidInput(_) => MirrorErrorKind::InvalidInput,
            MirrorError::Busy(_) => MirrorErrorKind::Busy,
            MirrorError::Verify(_) => MirrorErrorKind::Verify,
            MirrorError::Protocol(_) => MirrorErrorKind::Protocol,
            MirrorError::Cancelled => MirrorErrorKind::Cancelled,
            MirrorError::Peer { kind, .. } => *kind,
            MirrorError::Storage(e) => match e.kind() {
                crate::ErrorKind::Busy | crate::ErrorKind::Unsupported => MirrorErrorKind::Busy,
                crate::ErrorKind::InvalidInput => MirrorErrorKind::InvalidInput,
                _ if chain_has_enospc(e) => MirrorErrorKind::DiskFull,
                _ => MirrorErrorKind::Io,
            },
            MirrorError::Io { .. } => MirrorErrorKind::Io,
        }
    }

    /// The error with its causes, one line.
    pub fn full_message(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    }

    /// Wraps a destination failure, turning ENOSPC anywhere in its causes into
    /// [`MirrorError::DiskFull`].
    pub(crate) fn dest(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        if chain_has_enospc(&e) {
            return MirrorError::DiskFull { what };
        }
        MirrorError::Io {
            op: "writing",
            path: PathBuf::from(what),
            source: std::io::Error::other(e),
        }
    }
}

fn chain_has_enospc(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(ENOSPC) || io.kind() == std::io::ErrorKind::StorageFull {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// Result of this module.
pub type MirrorResult<T> = std::result::Result<T, MirrorError>;

/// Format of the active layer at the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum LayerFormat {
    /// A VHDX with these parameters.
    Vhdx {
        /// `fixed`, `dynamic` or `differencing`.
        disk_type: String,
        /// Block size in bytes.
        block_size: u32,
        /// Logical sector size.
        logical_sector_size: u32,
        /// Physical sector size.
        physical_sector_size: u32,
    },
    /// A raw image.
    Raw,
}

/// A read-only layer, copied file by file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenLayer {
    /// File name (no directory) at the destination.
    pub name: String,
    /// File length in bytes.
    pub len: u64,
}

/// The active (written) layer, recreated at the destination and filled block by block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveLayer {
    /// File name at the destination.
    pub name: String,
    /// Format.
    #[serde(flatten)]
    pub format: LayerFormat,
    /// File name of its parent (a frozen layer), for differencing VHDX.
    pub parent: Option<String>,
}

/// What a sink is asked to build: frozen files first, then the active layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPlan {
    /// Virtual size of the disk.
    pub size: u64,
    /// Read-only layers (checkpoint parents and other checkpoint images), any order.
    pub frozen: Vec<FrozenLayer>,
    /// The layer the guest writes.
    pub active: ActiveLayer,
}

impl ChainPlan {
    /// Checks names (plain file names, unique) and sizes.
    pub fn validate(&self) -> MirrorResult<()> {
        let mut names: Vec<&str> = self.frozen.iter().map(|f| f.name.as_str()).collect();
        names.push(&self.active.name);
        for n in &names {
            if n.is_empty()
                || n.len() > 255
                || *n == "."
                || *n == ".."
                || n.contains('/')
                || n.contains('\0')
            {
                return Err(MirrorError::InvalidInput(format!(
                    "bad layer file name {n:?}"
                )));
            }
        }
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != names.len() {
            return Err(MirrorError::InvalidInput(
                "two layers of the chain have the same file name".into(),
            ));
        }
        if let Some(p) = &self.active.parent {
            if !self.frozen.iter().any(|f| &f.name == p) {
                return Err(MirrorError::InvalidInput(format!(
                    "the active layer's parent {p:?} is not among the frozen layers"
                )));
            }
        }
        if self.size == 0 || self.size > 64 << 40 {
            return Err(MirrorError::InvalidInput(format!(
                "bad virtual size {}",
                self.size
            )));
        }
        Ok(())
    }
}

/// Where a mirror writes. Calls come in this order: `begin`, `file_data`/`file_end` per
/// frozen layer, `activate`, then any number of `write`/`zero`/`flush`/`checksums`, and
/// finally `commit` or `abort`.
pub trait MirrorSink: Send {
    /// Prepares the destination (refuses existing files).
    fn begin(&mut self, plan: &ChainPlan) -> MirrorResult<()>;
    /// Bytes of frozen layer `layer` at file offset `off` (sequential).
    fn file_data(&mut self, layer: usize, off: u64, data: &[u8]) -> MirrorResult<()>;
    /// A local destination: creates the active layer at once, reading its parent from
    /// `source_parent` (the source chain's copy of that frozen layer, byte-identical to
    /// what the destination's will hold) until `commit` re-points it at the destination's,
    /// and returns the destination files of the frozen layers (plan order) for the caller
    /// to fill in the kernel on another thread while the active layer is copied; each is
    /// then closed with `file_end`. `None` (the default, a stream): frozen layers go through
    /// `file_data`/`file_copy`, then `activate`.
    fn open_local(
        &mut self,
        _source_parent: Option<&Path>,
    ) -> MirrorResult<Option<Vec<std::fs::File>>> {
        Ok(None)
    }
    /// Frozen layer `layer` is complete: `len` bytes whose CRC32C is `crc`.
    fn file_end(&mut self, layer: usize, len: u64, crc: u32) -> MirrorResult<()>;
    /// Creates the active layer (its parent is complete).
    fn activate(&mut self) -> MirrorResult<()>;
    /// Writes virtual-disk data to the active layer.
    fn write(&mut self, off: u64, data: &[u8]) -> MirrorResult<()>;
    /// Makes a virtual-disk range read as zeroes.
    fn zero(&mut self, off: u64, len: u64) -> MirrorResult<()>;
    /// Makes everything written durable (and, for a stream, acknowledged).
    fn flush(&mut self) -> MirrorResult<()>;
    /// CRC32C of each [`COPY_CHUNK`] of the destination's virtual disk.
    fn checksums(&mut self) -> MirrorResult<Vec<u32>>;
    /// CRC32C of the destination's virtual disk at the [`COPY_CHUNK`] indices `chunks`
    /// (sorted; the chunks the source's active layer holds) and at every other chunk the
    /// destination's active layer holds: `(index, crc)` sorted by index. Outside these
    /// chunks both chains read their (verified, identical) frozen layers or zeroes. The
    /// default checksums every chunk.
    fn held_checksums(&mut self, _chunks: &[u64]) -> MirrorResult<Vec<(u64, u32)>> {
        Ok(self
            .checksums()?
            .into_iter()
            .enumerate()
            .map(|(i, c)| (i as u64, c))
            .collect())
    }
    /// Closes the images cleanly; returns the destination files, active leaf first.
    fn commit(&mut self) -> MirrorResult<Vec<PathBuf>>;
    /// Removes everything the sink created. Never fails (logs).
    fn abort(&mut self);
}

/// Tuning of a mirror.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Converged when at most this many bytes are dirty after a pass.
    pub converge_bytes: u64,
    /// Copy rate limit in bytes per second (`None`: unlimited).
    pub max_bytes_per_sec: Option<u64>,
    /// Extra read-only files to carry along (checkpoint images of other branches).
    pub extra_frozen: Vec<PathBuf>,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            converge_bytes: 16 << 20,
            max_bytes_per_sec: None,
            extra_frozen: Vec::new(),
        }
    }
}

/// Phase of a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorPhase {
    /// Copying read-only layers.
    Frozen,
    /// Copying the active layer and re-copying dirty ranges.
    Active,
    /// I/O stopped: final pass, verification, commit.
    Completing,
    /// Completed.
    Done,
    /// Failed (see the error of `complete`/`cancel`).
    Failed,
    /// Cancelled.
    Cancelled,
}

/// Progress of a mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorProgress {
    /// Phase.
    pub phase: MirrorPhase,
    /// Bytes sent to the sink so far (files and active data, zero ranges not counted).
    pub bytes_copied: u64,
    /// Bytes still to send: frozen bytes left plus the dirty ranges.
    pub bytes_remaining: u64,
    /// Rate at which the guest dirties the disk, bytes per second (last second).
    pub dirty_bytes_per_sec: u64,
    /// Dirty passes over the active layer done.
    pub passes: u64,
    /// Whether the last pass left at most `converge_bytes` dirty.
    pub converged: bool,
    /// Failure, when the phase is `failed`.
    pub error: Option<String>,
}

/// What a completed mirror produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorOutcome {
    /// Destination files, active leaf first (as returned by the sink).
    pub files: Vec<PathBuf>,
    /// Source files, leaf first, then the other frozen ones.
    pub source_files: Vec<PathBuf>,
    /// CRC32C over the `(MiB index, CRC32C)` pairs compared at the switchover (the MiBs
    /// either active layer holds; same at both ends).
    pub checksum: u32,
    /// Bytes sent in all.
    pub bytes_copied: u64,
    /// Bytes copied with I/O stopped (final pass).
    pub final_pass_bytes: u64,
    /// How long guest I/O was held for the final pass, verification and switch.
    pub io_pause: Duration,
}

/// Dirty grains of the virtual disk, marked by the export, cleared by the copier.
struct Dirty {
    words: Vec<AtomicU64>,
    grains: u64,
    dirtied: AtomicU64,
}

impl Dirty {
    fn new(size: u64) -> Dirty {
        let grains = size.div_ceil(DIRTY_GRAIN);
        Dirty {
            words: (0..grains.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            grains,
            dirtied: AtomicU64::new(0),
        }
    }

    fn mark(&self, off: u64, len: u64) {
        if len == 0 || self.grains == 0 {
            return;
        }
        let first = off / DIRTY_GRAIN;
        let last = ((off.saturating_add(len) - 1) / DIRTY_GRAIN).min(self.grains - 1);
        for g in first..=last {
            self.words[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::SeqCst);
        }
    }

    fn is_set(&self, g: u64) -> bool {
        self.words[(g / 64) as usize].load(Ordering::SeqCst) & (1 << (g % 64)) != 0
    }

    fn clear(&self, g: u64) {
        self.words[(g / 64) as usize].fetch_and(!(1 << (g % 64)), Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// Next run of dirty grains at or after `from` (at most `RUN_BYTES` long), cleared.
    fn take_run(&self, from: u64) -> Option<(u64, u64)> {
        let mut g = from;
        while g < self.grains {
            let w = self.words[(g / 64) as usize].load(Ordering::SeqCst) >> (g % 64);
            if w == 0 {
                g = (g / 64 + 1) * 64;
                continue;
            }
            g += u64::from(w.trailing_zeros());
            break;
        }
        if g >= self.grains {
            return None;
        }
        let max = RUN_BYTES / DIRTY_GRAIN;
        let start = g;
        while g < self.grains && g - start < max && self.is_set(g) {
            self.clear(g);
            g += 1;
        }
        Some((start, g))
    }
}

impl WriteObserver for Dirty {
    fn changed(&self, off: u64, len: u64) {
        self.mark(off, len);
        self.dirtied.fetch_add(len, Ordering::Relaxed);
    }
}

struct Shared {
    chain: Arc<DiskChain>,
    dirty: Arc<Dirty>,
    size: u64,
    opts: MirrorOptions,
    stop: AtomicBool,
    cancel: AtomicBool,
    copied: AtomicU64,
    frozen_left: AtomicU64,
    passes: AtomicU64,
    converged: AtomicBool,
    phase: Mutex<(MirrorPhase, Option<String>)>,
    rate: Mutex<(Instant, u64, u64)>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn set_phase(&self, p: MirrorPhase, err: Option<String>) {
        *lock(&self.phase) = (p, err);
    }

    fn checkpoint(&self) -> MirrorResult<()> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MirrorError::Cancelled);
        }
        Ok(())
    }

    /// `n` bytes of a frozen layer reached the sink: progress, then the bandwidth limit.
    fn frozen_sent(&self, n: u64) {
        self.copied.fetch_add(n, Ordering::Relaxed);
        let _ = self
            .frozen_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        self.throttle();
    }

    fn throttle(&self) {
        if let Some(limit) = self.opts.max_bytes_per_sec.filter(|l| *l > 0) {
            let due =
                Duration::from_secs_f64(self.copied.load(Ordering::Relaxed) as f64 / limit as f64);
            let el = self.started.elapsed();
            if due > el {
                std::thread::sleep((due - el).min(Duration::from_millis(200)));
            }
        }
    }

    fn remove_observer(&self) {
        let mut g = self
            .chain
            .layers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        g.observer = None;
    }
}

/// Data read from the source for one range, applied to the sink outside the I/O lock.
enum Op {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Reads `[off, off+len)` of the active layer itself (not its parents).
fn read_ops(img: &Image, off: u64, len: u64) -> MirrorResult<Vec<Op>> {
    let mut out = Vec::new();
    match img {
        Image::Vhdx(v) => {
            for e in v
                .block_status(off, len)
                .map_err(StorageError::image("reading", v.path()))?
            {
                match e.state {
                    vhdx::ExtentState::Data => {
                        let mut buf = vec![0u8; e.len as usize];
                        v.read_at(&mut buf, e.off)
                            .map_err(StorageError::image("reading", v.path()))?;
                        out.push(Op::Data(e.off, buf));
                    }
                    vhdx::ExtentState::Zero | vhdx::ExtentState::Unmapped => {
                        out.push(Op::Zero(e.off, e.len))
                    }
                    vhdx::ExtentState::FromParent => {}
                }
            }
        }
        Image::Raw { path, .. } => {
            for e in img
                .block_status(off, len)
                .map_err(StorageError::io("reading", path))?
            {
                if e.zero {
                    out.push(Op::Zero(e.offset, e.len));
                } else {
                    let mut buf = vec![0u8; e.len as usize];
                    img.read_at(&mut buf, e.offset)
                        .map_err(StorageError::io("reading", path))?;
                    out.push(Op::Data(e.offset, buf));
                }
            }
        }
    }
    Ok(out)
}

fn apply(sink: &mut dyn MirrorSink, ops: Vec<Op>, copied: &AtomicU64) -> MirrorResult<u64> {
    let mut n = 0;
    for op in ops {
        match op {
            Op::Data(off, buf) => {
                sink.write(off, &buf)?;
                n += buf.len() as u64;
            }
            Op::Zero(off, len) => sink.zero(off, len)?,
        }
    }
    copied.fetch_add(n, Ordering::Relaxed);
    Ok(n)
}

/// CRC32C of chunk `idx` ([`COPY_CHUNK`]) of an image's virtual disk (holes read as zeroes).
fn chunk_crc(img: &Image, size: u64, idx: u64, buf: &mut [u8]) -> std::io::Result<u32> {
    let off = idx * COPY_CHUNK;
    if off >= size {
        return Err(std::io::Error::other(format!(
            "chunk {idx} lies beyond the disk"
        )));
    }
    let n = COPY_CHUNK.min(size - off);
    let mut crc = 0u32;
    let mut at = off;
    while at < off + n {
        let ext = img.block_status(at, off + n - at)?;
        let before = at;
        for e in ext {
            let end = e.offset.saturating_add(e.len);
            if e.offset > at || at >= off + n {
                break;
            }
            if end <= at {
                continue;
            }
            let len = (end - at).min(off + n - at) as usize;
            let b = &mut buf[..len];
            if e.zero {
                b.fill(0);
            } else {
                img.read_at(b, at)?;
            }
            crc = crc32c::crc32c_append(crc, b);
            at += len as u64;
        }
        if at == before {
            return Err(std::io::Error::other("block status made no progress"));
        }
    }
    Ok(crc)
}

/// CRC32C of each [`COPY_CHUNK`] of an image's virtual disk (holes read as zeroes).
pub(crate) fn image_checksums(img: &Image, size: u64) -> std::io::Result<Vec<u32>> {
    let all: Vec<u64> = (0..size.div_ceil(COPY_CHUNK)).collect();
    chunk_checksums(img, size, &all)
}

/// CRC32C of the chunks `chunks` ([`COPY_CHUNK`] indices) of an image's virtual disk.
pub(crate) fn chunk_checksums(img: &Image, size: u64, chunks: &[u64]) -> std::io::Result<Vec<u32>> {
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    chunks
        .iter()
        .map(|&i| chunk_crc(img, size, i, &mut buf))
        .collect()
}

/// Indices of the [`COPY_CHUNK`]s that the active layer `img` itself holds, sorted: where
/// it reads otherwise than through its parent (a differencing VHDX) or otherwise than as
/// zeroes (a layer without parent). Everywhere else two chains whose parents are
/// byte-identical files read the same.
pub(crate) fn held_chunks(img: &Image, size: u64) -> MirrorResult<Vec<u64>> {
    let mut out: Vec<u64> = Vec::new();
    for_each_held(img, size, |off, len| {
        if len == 0 || off >= size {
            return;
        }
        let first = off / COPY_CHUNK;
        let last = (off.saturating_add(len).min(size) - 1) / COPY_CHUNK;
        let start = match out.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        out.extend(start..=last);
    })?;
    Ok(out)
}

/// Calls `f(offset, len)` for every range the layer `img` itself holds: data, and for a
/// differencing VHDX also its zeroed or unmapped blocks (they hide the parent's data).
/// Ranges read through the parent, or as zeroes of a layer without parent, are skipped.
fn for_each_held(img: &Image, size: u64, mut f: impl FnMut(u64, u64)) -> MirrorResult<()> {
    const WINDOW: u64 = 1 << 30;
    let mut off = 0;
    while off < size {
        let n = WINDOW.min(size - off);
        let mut covered = off;
        match img {
            Image::Vhdx(v) => {
                let diff = v.parent().is_some();
                for e in v
                    .block_status(off, n)
                    .map_err(StorageError::image("reading", v.path()))?
                {
                    let held = match e.state {
                        vhdx::ExtentState::Data => true,
                        vhdx::ExtentState::Zero | vhdx::ExtentState::Unmapped => diff,
                        vhdx::ExtentState::FromParent => false,
                    };
                    if held {
                        f(e.off, e.len);
                    }
                    covered = covered.max(e.off.saturating_add(e.len));
                }
            }
            Image::Raw { path, .. } => {
                for e in img
                    .block_status(off, n)
                    .map_err(StorageError::io("reading", path))?
                {
                    if !e.zero {
                        f(e.offset, e.len);
                    }
                    covered = covered.max(e.offset.saturating_add(e.len));
                }
            }
        }
        if covered <= off {
            return Err(MirrorError::Io {
                op: "reading the allocation of",
                path: img.path().to_path_buf(),
                source: std::io::Error::other("block status made no progress"),
            });
        }
        off = covered.min(off + n);
    }
    Ok(())
}

/// Merges two sorted, deduplicated index lists.
pub(crate) fn merge_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (_, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => break,
        };
        out.push(next);
    }
    out
}

/// Combined checksum of a per-chunk list.
pub fn combine_checksums(sums: &[u32]) -> u32 {
    let bytes: Vec<u8> = sums.iter().flat_map(|c| c.to_le_bytes()).collect();
    crc32c::crc32c(&bytes)
}

/// What the mirror thread gives back: the sink and how the copy ended.
type ThreadEnd = (Box<dyn MirrorSink>, MirrorResult<()>);

/// A running mirror of one disk chain. Dropping it cancels it.
pub struct DiskMirror {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<ThreadEnd>>,
    source_files: Vec<PathBuf>,
}

impl DiskMirror {
    /// Starts mirroring `chain` into `sink` on a background thread. Refused while a live
    /// merge runs or another mirror runs on the chain; checkpoint creation and merges are
    /// refused (busy) until the mirror completes or is cancelled.
    pub fn start(
        chain: Arc<DiskChain>,
        mut sink: Box<dyn MirrorSink>,
        opts: MirrorOptions,
    ) -> MirrorResult<DiskMirror> {
        let size = nbd::Export::size(chain.as_ref());
        let dirty = Arc::new(Dirty::new(size));
        let (plan, frozen_paths) = {
            let mut g = chain.layers.write().unwrap_or_else(PoisonError::into_inner);
            if g.mirror.is_some() {
                return Err(MirrorError::Busy(
                    "a live merge runs on this disk; wait for it (or resume and finish a cancelled one) first".into(),
                ));
            }
            if g.observer.is_some() {
                return Err(MirrorError::Busy(
                    "this disk is already being mirrored".into(),
                ));
            }
            let top = g
                .top
                .as_ref()
                .ok_or_else(|| MirrorError::Busy("the disk is closed".into()))?;
            let (plan, frozen_paths) = plan_for(top, size, &opts.extra_frozen)?;
            mark_allocated(top, size, &dirty)?;
            g.observer = Some(dirty.clone());
            (plan, frozen_paths)
        };
        let leaf = chain.leaf().unwrap_or_default();
        let mut source_files = vec![leaf];
        source_files.extend(frozen_paths.iter().cloned());
        if let Err(e) = sink.begin(&plan) {
            let mut g = chain.layers.write().unwrap_or_else(PoisonError::into_inner);
            g.observer = None;
            drop(g);
            sink.abort();
            return Err(e);
        }
        let frozen_total: u64 = plan.frozen.iter().map(|f| f.len).sum();
        let parent_idx = plan
            .active
            .parent
            .as_ref()
            .and_then(|n| plan.frozen.iter().position(|f| &f.name == n));
        let shared = Arc::new(Shared {
            chain,
            dirty,
            size,
            opts,
            stop: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            copied: AtomicU64::new(0),
            frozen_left: AtomicU64::new(frozen_total),
            passes: AtomicU64::new(0),
            converged: AtomicBool::new(false),
            phase: Mutex::new((MirrorPhase::Frozen, None)),
            rate: Mutex::new((Instant::now(), 0, 0)),
            started: Instant::now(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vireo-mirror".into())
            .spawn(move || {
                let r = run(&s, sink.as_mut(), &frozen_paths, parent_idx);
                if let Err(e) = &r {
                    let cancelled = matches!(e, MirrorError::Cancelled);
                    if !cancelled {
                        tracing::warn!("mirror failed: {}", e.full_message());
                    }
                    sink.abort();
                    s.remove_observer();
                    s.set_phase(
                        if cancelled {
                            MirrorPhase::Cancelled
                        } else {
                            MirrorPhase::Failed
                        },
                        Some(e.full_message()),
                    );
                }
                (sink, r)
            })
            .map_err(|e| MirrorError::Io {
                op: "starting the mirror thread",
                path: PathBuf::new(),
                source: e,
            })?;
        Ok(DiskMirror {
            shared,
            thread: Some(thread),
            source_files,
        })
    }

    /// Progress now.
    pub fn progress(&self) -> MirrorProgress {
        let s = &self.shared;
        let dirtied = s.dirty.dirtied.load(Ordering::Relaxed);
        let rate = {
            let mut r = lock(&s.rate);
            let el = r.0.elapsed();
            if el >= Duration::from_secs(1) {
                r.2 = ((dirtied - r.1) as f64 / el.as_secs_f64()) as u64;
                r.0 = Instant::now();
                r.1 = dirtied;
            }
            r.2
        };
        let (phase, error) = lock(&s.phase).clone();
        MirrorProgress {
            phase,
            bytes_copied: s.copied.load(Ordering::Relaxed),
            bytes_remaining: s.frozen_left.load(Ordering::Relaxed)
                + (s.dirty.count() * DIRTY_GRAIN).min(s.size),
            dirty_bytes_per_sec: rate,
            passes: s.passes.load(Ordering::Relaxed),
            converged: s.converged.load(Ordering::SeqCst),
            error,
        }
    }

    /// Whether the mirror thread has stopped on its own (failed).
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(t) => t.is_finished(),
            None => true,
        }
    }

    /// Waits until converged (or failed, or `timeout`); returns the progress then.
    pub fn wait_converged(&self, timeout: Duration) -> MirrorProgress {
        let end = Instant::now() + timeout;
        loop {
            let p = self.progress();
            if p.converged || self.is_finished() || Instant::now() >= end {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Source files (leaf first, then every frozen layer carried).
    pub fn source_files(&self) -> &[PathBuf] {
        &self.source_files
    }

    fn join(&mut self) -> MirrorResult<Box<dyn MirrorSink>> {
        let t = self
            .thread
            .take()
            .ok_or_else(|| MirrorError::Busy("the mirror already ended".into()))?;
        match t.join() {
            Ok((sink, Ok(()))) => Ok(sink),
            Ok((_, Err(e))) => Err(e),
            Err(_) => {
                self.shared.remove_observer();
                Err(MirrorError::Protocol("the mirror thread panicked".into()))
            }
        }
    }

    /// Completes the mirror with guest I/O held (the caller normally paused the guest
    /// first): final dirty pass, flush, verification by checksum, commit. The source keeps
    /// serving, unchanged; mirroring stops. On failure the sink's files are removed.
    pub fn complete(self) -> MirrorResult<MirrorOutcome> {
        self.finish(None::<(bool, fn(&MirrorOutcome) -> crate::Result<()>)>)
    }

    /// Like [`DiskMirror::complete`] for a local [`DirSink`], and then, before I/O resumes,
    /// switches the export to the new leaf and calls `commit` (persist the new paths). If
    /// `commit` fails the export stays on the source and the new files are removed.
    pub fn complete_and_switch(
        self,
        read_only: bool,
        commit: impl FnOnce(&MirrorOutcome) -> crate::Result<()>,
    ) -> MirrorResult<MirrorOutcome> {
        self.finish(Some((read_only, commit)))
    }

    fn finish(
        mut self,
        switch: Option<(bool, impl FnOnce(&MirrorOutcome) -> crate::Result<()>)>,
    ) -> MirrorResult<MirrorOutcome> {
        let s = self.shared.clone();
        s.stop.store(true, Ordering::SeqCst);
        let mut sink = self.join()?;
        s.set_phase(MirrorPhase::Completing, None);
        let r = finish_locked(&s, sink.as_mut(), &self.source_files, switch);
        match r {
            Ok((out, old)) => {
                if let Some(old) = old {
                    close_image(old);
                }
                s.set_phase(MirrorPhase::Done, None);
                tracing::info!(
                    bytes = out.bytes_copied,
                    final_pass = out.final_pass_bytes,
                    pause_ms = out.io_pause.as_millis() as u64,
                    "mirror completed"
                );
                Ok(out)
            }
            Err(e) => {
                sink.abort();
                s.remove_observer();
                s.set_phase(MirrorPhase::Failed, Some(e.full_message()));
                Err(e)
            }
        }
    }

    /// Stops the mirror, removes what the sink created; the source is untouched.
    pub fn cancel(mut self) -> MirrorResult<()> {
        self.cancel_inner()
    }

    fn cancel_inner(&mut self) -> MirrorResult<()> {
        if self.thread.is_none() {
            return Ok(());
        }
        self.shared.cancel.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
        match self.join() {
            Ok(mut sink) => {
                sink.abort();
                self.shared.remove_observer();
            }
            Err(MirrorError::Cancelled) => {}
            Err(e) => tracing::debug!("mirror ended before cancel: {e}"),
        }
        self.shared.set_phase(MirrorPhase::Cancelled, None);
        Ok(())
    }
}

impl Drop for DiskMirror {
    fn drop(&mut self) {
        let _ = self.cancel_inner();
    }
}

fn close_image(img: Image) {
    if let Image::Vhdx(v) = img {
        let p = v.path().to_path_buf();
        if let Ok(v) = Arc::try_unwrap(v) {
            if let Err(e) = v.close() {
                tracing::warn!("closing the old leaf {}: {e}", p.display());
            }
        }
    }
}

type Switched = (MirrorOutcome, Option<Image>);

fn finish_locked(
    s: &Shared,
    sink: &mut dyn MirrorSink,
    source_files: &[PathBuf],
    switch: Option<(bool, impl FnOnce(&MirrorOutcome) -> crate::Result<()>)>,
) -> MirrorResult<Switched> {
    let mut g = s
        .chain
        .layers
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let t0 = Instant::now();
    let top = g
        .top
        .as_ref()
        .ok_or_else(|| MirrorError::Busy("the disk was closed".into()))?;
    let before = s.copied.load(Ordering::Relaxed);
    let mut from = 0;
    while let Some((a, b)) = s.dirty.take_run(from) {
        let off = a * DIRTY_GRAIN;
        let len = (b * DIRTY_GRAIN).min(s.size) - off;
        apply(sink, read_ops(top, off, len)?, &s.copied)?;
        from = b;
    }
    let final_pass_bytes = s.copied.load(Ordering::Relaxed) - before;
    let t_pass = t0.elapsed();
    sink.flush()?;
    let t_flush = t0.elapsed();
    let checksum = verify_held(top, s.size, sink)?;
    let t_verify = t0.elapsed();
    let files = sink.commit()?;
    let t_commit = t0.elapsed();
    let mut out = MirrorOutcome {
        files,
        source_files: source_files.to_vec(),
        checksum,
        bytes_copied: s.copied.load(Ordering::Relaxed),
        final_pass_bytes,
        io_pause: Duration::ZERO,
    };
    let mut old = None;
    if let Some((read_only, commit)) = switch {
        let leaf = out
            .files
            .first()
            .cloned()
            .ok_or_else(|| MirrorError::Protocol("the sink returned no files".into()))?;
        let new = open_image(&leaf, read_only)?;
        if new.size() != s.size {
            return Err(MirrorError::Verify("the new leaf has another size".into()));
        }
        // The new chain must not reach back into the source files.
        let chain = new.chain_paths();
        if let Some(p) = chain.iter().find(|p| source_files.contains(p)) {
            return Err(MirrorError::Verify(format!(
                "the new chain still refers to {}",
                p.display()
            )));
        }
        commit(&out)?;
        old = g.top.replace(new);
        tracing::info!(leaf = %leaf.display(), "export switched to the mirrored chain");
    }
    g.observer = None;
    out.io_pause = t0.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        final_pass_ms = ms(t_pass),
        flush_ms = ms(t_flush - t_pass),
        verify_ms = ms(t_verify - t_flush),
        commit_ms = ms(t_commit - t_verify),
        switch_ms = ms(out.io_pause - t_commit),
        final_pass_bytes,
        "mirror switchover phases (guest I/O held)"
    );
    Ok((out, old))
}

/// Verifies the destination against `top` where either active layer holds data: the
/// source's checksums are computed on a second thread while the sink computes its own (on
/// the other host, for a stream). Returns the CRC32C over the `(index, crc)` pairs compared.
fn verify_held(top: &Image, size: u64, sink: &mut dyn MirrorSink) -> MirrorResult<u32> {
    let held = held_chunks(top, size)?;
    let io = |e| MirrorError::Io {
        op: "checksumming",
        path: top.path().to_path_buf(),
        source: e,
    };
    let (src, dst) = std::thread::scope(|sc| {
        let h = sc.spawn(|| chunk_checksums(top, size, &held));
        let dst = sink.held_checksums(&held);
        (h.join(), dst)
    });
    let src = src
        .map_err(|_| MirrorError::Protocol("the checksum thread panicked".into()))?
        .map_err(io)?;
    let dst = dst?;
    let chunks = size.div_ceil(COPY_CHUNK);
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut si = 0;
    let mut prev = None;
    let mut all = crc32c::crc32c(&[]);
    for &(idx, d) in &dst {
        if idx >= chunks || prev.is_some_and(|p| idx <= p) {
            return Err(MirrorError::Verify(format!(
                "the destination returned a checksum for chunk {idx} out of order or beyond the disk"
            )));
        }
        prev = Some(idx);
        let c = if held.get(si) == Some(&idx) {
            si += 1;
            src[si - 1]
        } else if held.get(si).is_some_and(|&h| h < idx) {
            break;
        } else {
            // Held only at the destination: what does the source read there?
            chunk_crc(top, size, idx, &mut buf).map_err(io)?
        };
        if c != d {
            return Err(MirrorError::Verify(format!(
                "the MiB at offset {} differs",
                idx * COPY_CHUNK
            )));
        }
        all = crc32c::crc32c_append(all, &idx.to_le_bytes());
        all = crc32c::crc32c_append(all, &c.to_le_bytes());
    }
    if si != held.len() {
        return Err(MirrorError::Verify(format!(
            "the destination did not checksum the MiB at offset {}",
            held[si] * COPY_CHUNK
        )));
    }
    tracing::debug!(
        source_held = held.len(),
        compared = dst.len(),
        "destination verified"
    );
    Ok(all)
}

/// Builds the plan of the chain under `top`; returns it and the frozen files' paths (plan order).
fn plan_for(top: &Image, size: u64, extra: &[PathBuf]) -> MirrorResult<(ChainPlan, Vec<PathBuf>)> {
    let name = |p: &Path| -> MirrorResult<String> {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| MirrorError::InvalidInput(format!("bad file name {}", p.display())))
    };
    let chain = top.chain_paths();
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| MirrorError::Busy("the disk is closed".into()))?;
    let mut frozen_paths: Vec<PathBuf> = chain[1..].to_vec();
    for e in extra {
        if !frozen_paths.contains(e) && *e != leaf {
            frozen_paths.push(e.clone());
        }
    }
    let (format, parent) = match top {
        Image::Vhdx(v) => (
            LayerFormat::Vhdx {
                disk_type: v.disk_type().as_str().to_string(),
                block_size: v.block_size(),
                logical_sector_size: v.logical_sector_size(),
                physical_sector_size: v.physical_sector_size(),
            },
            v.parent().map(|p| name(p.path())).transpose()?,
        ),
        Image::Raw { .. } => (LayerFormat::Raw, None),
    };
    let mut frozen = Vec::new();
    for p in &frozen_paths {
        let len = std::fs::metadata(p)
            .map_err(|e| MirrorError::Io {
                op: "reading",
                path: p.clone(),
                source: e,
            })?
            .len();
        frozen.push(FrozenLayer {
            name: name(p)?,
            len,
        });
    }
    let plan = ChainPlan {
        size,
        frozen,
        active: ActiveLayer {
            name: name(&leaf)?,
            format,
            parent,
        },
    };
    plan.validate()?;
    Ok((plan, frozen_paths))
}

/// Marks what the active layer itself holds (its BAT) as dirty: the first pass copies it.
fn mark_allocated(top: &Image, size: u64, dirty: &Dirty) -> MirrorResult<()> {
    for_each_held(top, size, |off, len| dirty.mark(off, len))
}

fn run(
    s: &Shared,
    sink: &mut dyn MirrorSink,
    frozen: &[PathBuf],
    parent: Option<usize>,
) -> MirrorResult<()> {
    // Under a bandwidth limit, small chunks keep the rate (and the progress) smooth.
    let chunk = match s.opts.max_bytes_per_sec {
        Some(l) => (l / 8).clamp(256 << 10, FILE_CHUNK as u64) as usize,
        None => FILE_CHUNK,
    };
    let source_parent = parent.and_then(|i| frozen.get(i)).map(PathBuf::as_path);
    match sink.open_local(source_parent)? {
        // A local destination: the frozen layers are copied in the kernel on another
        // thread while this one copies the active layer (its first pass), so the two
        // overlap instead of following each other.
        Some(targets) => {
            let ends = copy_frozen_beside_first_pass(s, sink, frozen, &targets, chunk)?;
            for (i, (len, crc)) in ends.into_iter().enumerate() {
                sink.file_end(i, len, crc)?;
            }
        }
        None => {
            for (i, p) in frozen.iter().enumerate() {
                copy_frozen(s, sink, i, p, chunk)?;
            }
            sink.activate()?;
        }
    }
    s.frozen_left.store(0, Ordering::Relaxed);
    s.set_phase(MirrorPhase::Active, None);
    // Active layer: dirty passes until told to stop.
    loop {
        let copied = dirty_pass(s, sink)?;
        s.passes.fetch_add(1, Ordering::Relaxed);
        sink.flush()?;
        let left = s.dirty.count() * DIRTY_GRAIN;
        s.converged
            .store(left <= s.opts.converge_bytes, Ordering::SeqCst);
        s.checkpoint()?;
        if s.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if copied == 0 {
            // Idle: wait for new writes, but answer a stop at once (the switchover waits
            // for this thread).
            for _ in 0..10 {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// One pass over the dirty runs of the active layer (read under the shared chain lock,
/// written to the sink outside it); stops early when the mirror is told to stop. Returns
/// the bytes copied.
fn dirty_pass(s: &Shared, sink: &mut dyn MirrorSink) -> MirrorResult<u64> {
    let mut from = 0;
    let mut copied = 0;
    while let Some((a, b)) = s.dirty.take_run(from) {
        s.checkpoint()?;
        let off = a * DIRTY_GRAIN;
        let len = (b * DIRTY_GRAIN).min(s.size) - off;
        let ops = {
            let g = s
                .chain
                .layers
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let top = g
                .top
                .as_ref()
                .ok_or_else(|| MirrorError::Busy("the disk was closed".into()))?;
            read_ops(top, off, len)
        };
        let ops = match ops {
            Ok(o) => o,
            Err(e) => {
                s.dirty.mark(off, len);
                return Err(e);
            }
        };
        copied += apply(sink, ops, &s.copied)?;
        from = b;
        s.throttle();
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    Ok(copied)
}

/// Copies the frozen layers `frozen` into `targets` (the local sink's files) in the
/// kernel on a second thread while this thread makes the first pass over the active
/// layer into the sink. Returns each layer's length and the CRC32C of the source bytes
/// copied, for `file_end`. A failure on either side stops the other.
fn copy_frozen_beside_first_pass(
    s: &Shared,
    sink: &mut dyn MirrorSink,
    frozen: &[PathBuf],
    targets: &[std::fs::File],
    chunk: usize,
) -> MirrorResult<Vec<(u64, u32)>> {
    if targets.len() != frozen.len() {
        return Err(MirrorError::Protocol(format!(
            "the destination opened {} frozen layers, the chain has {}",
            targets.len(),
            frozen.len()
        )));
    }
    let abort = AtomicBool::new(false);
    let (ends, first) = std::thread::scope(|sc| {
        let copier = std::thread::Builder::new()
            .name("vireo-mirror-frozen".into())
            .spawn_scoped(sc, || {
                let r = frozen
                    .iter()
                    .zip(targets)
                    .map(|(p, t)| copy_frozen_file(s, p, t, chunk, &abort))
                    .collect::<MirrorResult<Vec<_>>>();
                if r.is_err() {
                    abort.store(true, Ordering::SeqCst);
                }
                r
            });
        let first = match &copier {
            Ok(_) => dirty_pass(s, sink),
            Err(_) => Ok(0),
        };
        if first.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        let ends = match copier {
            Ok(h) => h.join().unwrap_or_else(|_| {
                Err(MirrorError::Protocol(
                    "the frozen-layer copier panicked".into(),
                ))
            }),
            Err(e) => Err(MirrorError::Io {
                op: "starting the frozen-layer copier",
                path: PathBuf::new(),
                source: e,
            }),
        };
        (ends, first)
    });
    // The first error is the cause; the other side only stopped because of it.
    match (ends, first) {
        (Err(e), _) if !abort_only(&e) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
        (Ok(ends), Ok(_)) => Ok(ends),
    }
}

fn abort_only(e: &MirrorError) -> bool {
    matches!(e, MirrorError::Protocol(m) if m == ABORTED)
}

/// What the frozen-layer copier returns when the other side failed first.
const ABORTED: &str = "stopped: the active-layer copy failed";

/// Copies frozen file `p` into `target` chunk by chunk in the kernel (`copy_file_range`),
/// with progress, cancel and the bandwidth limit per chunk. A checker thread reads each
/// chunk back from both files (from the page cache the copy left them in) and compares
/// their CRC32C while the next chunk is copied. Returns (length, CRC32C of the source).
fn copy_frozen_file(
    s: &Shared,
    p: &Path,
    target: &std::fs::File,
    chunk: usize,
    abort: &AtomicBool,
) -> MirrorResult<(u64, u32)> {
    let io = |op| file_err(op, p);
    let f = open_sequential(p).map_err(io("opening"))?;
    let len = f.metadata().map_err(io("reading"))?.len();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, usize)>(2);
    std::thread::scope(|sc| {
        let f = &f;
        let checker = sc.spawn(move || -> MirrorResult<u32> {
            let mut src = vec![0u8; chunk];
            let mut dst = vec![0u8; chunk];
            let mut crc = 0u32;
            for (off, n) in rx {
                let a = read_full(f, &mut src[..n], off).map_err(io("reading"))?;
                let b =
                    read_full(target, &mut dst[..n], off).map_err(io("verifying the copy of"))?;
                let (sc, dc) = (crc32c::crc32c(&src[..a]), crc32c::crc32c(&dst[..b]));
                if a != n || b != n || sc != dc {
                    return Err(MirrorError::Verify(format!(
                        "the copy of {} differs from it at offset {off}",
                        p.display()
                    )));
                }
                crc = crc32c::crc32c_append(crc, &src[..a]);
            }
            Ok(crc)
        });
        let copied = (|| -> MirrorResult<()> {
            let mut off = 0u64;
            while off < len {
                s.checkpoint()?;
                if abort.load(Ordering::SeqCst) {
                    return Err(MirrorError::Protocol(ABORTED.into()));
                }
                let n = (len - off).min(chunk as u64);
                let got = copy_range(f, target, off, n)
                    .map_err(|e| MirrorError::dest(format!("copying {}", p.display()), e))?;
                if got != n {
                    return Err(MirrorError::Protocol(format!(
                        "{} shrank while being copied ({got} of {n} bytes at {off})",
                        p.display()
                    )));
                }
                start_writeback(target, off, n);
                if tx.send((off, n as usize)).is_err() {
                    // The checker stopped on an error: it is returned below.
                    break;
                }
                s.frozen_sent(n);
                off += n;
            }
            Ok(())
        })();
        drop(tx);
        let crc = checker
            .join()
            .unwrap_or_else(|_| Err(MirrorError::Protocol("the copy checker panicked".into())));
        copied?;
        Ok((len, crc?))
    })
}

/// Copies `[off, off+len)` of `src` to the same offsets of `dst` in the kernel
/// (`copy_file_range`), falling back to reads and writes where the kernel cannot (another
/// file system type, old kernels). Returns the bytes copied (less only at `src`'s end).
fn copy_range(
    src: &std::fs::File,
    dst: &std::fs::File,
    off: u64,
    len: u64,
) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut done = 0u64;
    while done < len {
        let mut from = (off + done) as libc::loff_t;
        let mut to = from;
        // SAFETY: both descriptors are open for the call; the offsets are ours.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut from,
                dst.as_raw_fd(),
                &mut to,
                (len - done) as usize,
                0,
            )
        };
        match r {
            0 => break,
            n if n > 0 => done += n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_range_by_reads(src, dst, off + done, len - done)
                            .map(|n| done + n)
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(done)
}

fn copy_range_by_reads(
    src: &std::fs::File,
    dst: &std::fs::File,
    off: u64,
    len: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; (len.min(FILE_CHUNK as u64)) as usize];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = read_full(src, &mut buf[..want], off + done)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(done)
}

/// Maps an I/O error of `op` on file `p`.
fn file_err<'a>(op: &'static str, p: &'a Path) -> impl Fn(std::io::Error) -> MirrorError + 'a {
    move |e| MirrorError::Io {
        op,
        path: p.to_path_buf(),
        source: e,
    }
}

/// Opens a frozen layer for one sequential read (read-ahead sized for it).
fn open_sequential(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p)?;
    // SAFETY: advice on a descriptor we own; no memory is passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    Ok(f)
}

/// Reads a frozen file into `buf` at `off` until `buf` is full or the file ends.
fn read_full(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies frozen layer `i` (file `p`) to the sink, double-buffered: a reader thread reads
/// chunk N+1 and computes its CRC32C while this thread hands chunk N to the sink (the same
/// buffer: each byte is read once). The sink checks the CRC of the bytes it received.
fn copy_frozen(
    s: &Shared,
    sink: &mut dyn MirrorSink,
    i: usize,
    p: &Path,
    chunk: usize,
) -> MirrorResult<()> {
    use std::sync::mpsc::sync_channel;
    let io = |op| file_err(op, p);
    let f = open_sequential(p).map_err(io("opening"))?;
    type Filled = std::io::Result<(u64, Vec<u8>, usize)>;
    let (full_tx, full_rx) = sync_channel::<Filled>(1);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        // The channel has room for both buffers.
        let _ = free_tx.send(vec![0u8; chunk]);
    }
    let (sent, read) = std::thread::scope(|sc| {
        let f = &f;
        let reader = sc.spawn(move || -> (u64, u32) {
            let mut off = 0u64;
            let mut crc = 0u32;
            while let Ok(mut buf) = free_rx.recv() {
                let r = read_full(f, &mut buf, off);
                let n = match &r {
                    Ok(n) => *n,
                    Err(_) => 0,
                };
                if let Err(e) = r {
                    let _ = full_tx.send(Err(e));
                    break;
                }
                if n == 0 {
                    break;
                }
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                if full_tx.send(Ok((off, buf, n))).is_err() {
                    break;
                }
                off += n as u64;
            }
            (off, crc)
        });
        let sent = (|| -> MirrorResult<()> {
            let full_rx = full_rx;
            let free_tx = free_tx;
            for msg in full_rx.iter() {
                s.checkpoint()?;
                let (off, buf, n) = msg.map_err(io("reading"))?;
                sink.file_data(i, off, &buf[..n])?;
                s.frozen_sent(n as u64);
                let _ = free_tx.send(buf);
            }
            Ok(())
        })();
        (sent, reader.join())
    });
    sent?;
    let (len, crc) =
        read.map_err(|_| MirrorError::Protocol("the frozen-layer reader panicked".into()))?;
    sink.file_end(i, len, crc)
}

impl crate::DiskService {
    /// Starts mirroring disk `disk`'s whole chain into `sink`; the images of this disk's
    /// other checkpoints (branches the chain does not pass through) are carried as frozen
    /// layers too. Refused while a merge job is unfinished.
    pub fn mirror_disk(
        &self,
        disk: usize,
        sink: Box<dyn MirrorSink>,
        mut opts: MirrorOptions,
    ) -> MirrorResult<DiskMirror> {
        let chain = self
            .chain(disk)
            .ok_or_else(|| MirrorError::InvalidInput(format!("the VM has no disk {disk}")))?;
        let st = self.state();
        if st.active_merge().is_some() {
            return Err(MirrorError::Busy(
                "a checkpoint merge job is unfinished; let it finish (or resume it) first".into(),
            ));
        }
        for c in &st.checkpoints {
            if let Some(img) = c.images.get(disk) {
                if !opts.extra_frozen.contains(img) {
                    opts.extra_frozen.push(img.clone());
                }
            }
        }
        DiskMirror::start(chain, sink, opts)
    }

    /// Storage migration of disk `disk`: completes `m` (a mirror into a [`DirSink`]),
    /// switches the export to the new leaf and records the new paths of the leaf and of
    /// every checkpoint image in `disks.json`, all before guest I/O resumes. The old files
    /// are left for the caller to remove ([`MirrorOutcome::source_files`]).
    pub fn complete_move(&self, disk: usize, m: DiskMirror) -> MirrorResult<MirrorOutcome> {
        let chain = self
            .chain(disk)
            .ok_or_else(|| MirrorError::InvalidInput(format!("the VM has no disk {disk}")))?;
        let read_only = nbd::Export::flags(chain.as_ref()).read_only;
        m.complete_and_switch(read_only, |out| {
            if out.files.len() != out.source_files.len() {
                return Err(StorageError::InvalidInput(
                    "the mirror returned another number of files than it read".into(),
                ));
            }
            let map = |p: &PathBuf| -> PathBuf {
                out.source_files
                    .iter()
                    .position(|s| s == p)
                    .map_or_else(|| p.clone(), |i| out.files[i].clone())
            };
            self.update_state(|st| {
                if let Some(l) = st.leaves.get_mut(disk) {
                    *l = map(l);
                }
                for c in &mut st.checkpoints {
                    if let Some(img) = c.images.get_mut(disk) {
                        *img = map(img);
                    }
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_are_bounded_and_cleared() {
        let d = Dirty::new(40 << 20);
        d.mark(0, 1);
        d.mark(3 << 20, 2 * RUN_BYTES + (1 << 20));
        assert_eq!(d.take_run(0), Some((0, 1)));
        let (a, b) = d.take_run(1).unwrap();
        assert_eq!(a, (3 << 20) / DIRTY_GRAIN);
        assert_eq!(b - a, RUN_BYTES / DIRTY_GRAIN);
        let mut n = 1;
        let mut from = b;
        while let Some((_, b)) = d.take_run(from) {
            n += 1;
            from = b;
        }
        assert_eq!(n, 3);
        assert_eq!(d.count(), 0);
        d.mark((40 << 20) - 1, 100);
        assert_eq!(d.count(), 1);
    }

    #[test]
    fn plan_refuses_bad_names() {
        let mut p = ChainPlan {
            size: 1 << 20,
            frozen: vec![FrozenLayer {
                name: "../x".into(),
                len: 1,
            }],
            active: ActiveLayer {
                name: "a.vhdx".into(),
                format: LayerFormat::Raw,
                parent: None,
            },
        };
        assert_eq!(
            p.validate().unwrap_err().kind(),
            MirrorErrorKind::InvalidInput
        );
        p.frozen[0].name = "a.vhdx".into();
        assert!(p.validate().is_err());
        p.frozen[0].name = "b.vhdx".into();
        p.validate().unwrap();
    }
}
