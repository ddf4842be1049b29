//! The open image handle, [`Vhdx`]: positional, concurrent reads and writes.
//!
//! Concurrency: the BAT lives in an array of `AtomicU64`, sector bitmaps in arrays
//! of `AtomicU64`. Reads and writes to allocated blocks take no lock. Allocation,
//! unmap, resize and flush take one small mutex (`State`). Metadata changes (BAT
//! pages, sector bitmap pages, the metadata region) are kept in memory and made
//! durable by [`Vhdx::flush`] through the log, after the data they refer to is
//! durable; so a crash loses at most writes not yet acknowledged by a flush, and
//! never exposes stale data of another block.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::bat::{entry_offset, entry_state, make_entry, state, BatError, Geometry};
use crate::bitmap::{SectorBitmap, BITMAP_BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::file;
use crate::guid::Guid;
use crate::header::{self, Header, HeaderError, HEADER_OFFSETS, HEADER_SIZE};
use crate::locator::ParentLocator;
use crate::log::{self, LogError, Op};
use crate::metadata::{self, DiskMetadata};
use crate::region::{overlaps, RegionTable, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};

const MIB: u64 = 1 << 20;
/// Deepest differencing chain accepted.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Kind of virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// All blocks allocated at creation.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// Blocks allocated on first write; unallocated sectors read from a parent.
    Differencing,
}

impl DiskType {
    /// Lower-case name ("fixed", "dynamic", "differencing").
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open read-only (shared lock) instead of read-write (exclusive lock).
    pub read_only: bool,
}

/// State of a range reported by [`Vhdx::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Stored in this image.
    Data,
    /// Reads as zeros (ZERO or UNDEFINED block).
    Zero,
    /// Not stored and reads as zeros (NOT_PRESENT without parent, or UNMAPPED).
    Unmapped,
    /// Not stored here: the parent supplies it.
    FromParent,
}

/// A range of the virtual disk with one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the virtual disk.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
    /// State.
    pub state: ExtentState,
}

/// One image of a chain, as reported by [`Vhdx::chain`].
#[derive(Debug, Clone)]
pub struct ChainEntry {
    /// Path the image was opened from.
    pub path: PathBuf,
    /// Kind.
    pub disk_type: DiskType,
    /// Virtual size.
    pub virtual_size: u64,
    /// DataWriteGuid.
    pub data_write_guid: Guid,
}

/// A BAT entry found invalid by a lenient open (used by check/repair).
#[derive(Debug, Clone)]
pub(crate) struct BatProblem {
    pub index: u64,
    pub offset: u64,
    pub why: &'static str,
}

pub(crate) struct State {
    pub header: Header,
    pub slot: usize,
    pub next_alloc: u64,
    pub dirty_bat: BTreeSet<u64>,
    pub log_seq: u64,
    pub log_active: bool,
    pub md: DiskMetadata,
    pub file_bumped: bool,
    pub data_bumped: bool,
}

/// An open VHDX image. `Send + Sync`: share it with `Arc` between I/O threads.
pub struct Vhdx {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) read_only: bool,
    pub(crate) geo: Geometry,
    pub(crate) size: AtomicU64,
    pub(crate) physical: u32,
    pub(crate) disk_type: DiskType,
    pub(crate) regions: RegionTable,
    pub(crate) log_offset: u64,
    pub(crate) log_length: u64,
    pub(crate) bat: Box<[AtomicU64]>,
    pub(crate) bitmaps: Box<[OnceLock<SectorBitmap>]>,
    pub(crate) parent: Option<Arc<Vhdx>>,
    pub(crate) locator: Option<ParentLocator>,
    pub(crate) st: Mutex<State>,
    pub(crate) data_bumped: AtomicBool,
    pub(crate) overlay: Vec<Op>,
    pub(crate) bat_problems: Vec<BatProblem>,
    pub(crate) log_replayed: bool,
    pub(crate) closed: AtomicBool,
    pub(crate) creator: String,
    pub(crate) stop_after_log: AtomicBool,
    pub(crate) abandoned: AtomicBool,
}

pub(crate) struct OpenCtx<'a> {
    pub read_only: bool,
    pub lenient: bool,
    pub preopened: &'a [Arc<Vhdx>],
    pub visited: Vec<PathBuf>,
    /// Skip DataWriteGuid checks (only to discover a chain's paths).
    pub unchecked: bool,
}

impl Vhdx {
    /// Opens an image and its parents (read-only). Replays a non-empty log when
    /// opened read-write; a read-only open of such a file applies the log in memory.
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Vhdx> {
        let mut ctx = OpenCtx {
            read_only: opts.read_only,
            lenient: false,
            preopened: &[],
            visited: Vec::new(),
            unchecked: false,
        };
        Vhdx::open_ctx(path.as_ref(), &mut ctx)
    }

    /// Opens `path` using already open handles for parents whose path matches
    /// (merge opens the target read-write and the child on top of it).
    pub fn open_with_parents(
        path: impl AsRef<Path>,
        opts: OpenOptions,
        parents: &[Arc<Vhdx>],
    ) -> Result<Vhdx> {
        let mut ctx = OpenCtx {
            read_only: opts.read_only,
            lenient: false,
            preopened: parents,
            visited: Vec::new(),
            unchecked: false,
        };
        Vhdx::open_ctx(path.as_ref(), &mut ctx)
    }

    pub(crate) fn open_ctx(path: &Path, ctx: &mut OpenCtx<'_>) -> Result<Vhdx> {
        let canon = path.canonicalize().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                Error::io("resolving", path, e)
            }
        })?;
        if ctx.visited.contains(&canon) || ctx.visited.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ParentLoop {
                child: ctx
                    .visited
                    .first()
                    .cloned()
                    .unwrap_or_else(|| path.to_path_buf()),
                at: path.to_path_buf(),
                max: MAX_CHAIN_DEPTH,
            });
        }
        ctx.visited.push(canon.clone());
        let r = Vhdx::open_validated(path, ctx);
        if r.is_err() {
            ctx.visited.retain(|v| v != &canon);
        }
        r
    }

    fn open_validated(path: &Path, ctx: &mut OpenCtx<'_>) -> Result<Vhdx> {
        let read_only = ctx.read_only;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io("opening", path, e))?;
        if !file::lock(&file, !read_only).map_err(|e| Error::io("locking", path, e))? {
            return Err(Error::Busy {
                path: path.to_path_buf(),
            });
        }
        let file_len = file
            .metadata()
            .map_err(|e| Error::io("reading size of", path, e))?
            .len();
        let hdr_err = |source| Error::Header {
            path: path.to_path_buf(),
            source,
        };

        // File identifier and headers.
        let mut id = vec![0u8; 8 + 512];
        file::read_at_or_zero(&file, &mut id, 0).map_err(|e| Error::io("reading", path, e))?;
        let creator = header::parse_file_identifier(&id).map_err(hdr_err)?;
        let mut hs = [None, None];
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; HEADER_SIZE];
            file::read_at_or_zero(&file, &mut b, *off)
                .map_err(|e| Error::io("reading header of", path, e))?;
            hs[i] = Header::parse(&b);
        }
        let (slot, hdr) = header::select(hs).map_err(hdr_err)?;
        hdr.validate().map_err(hdr_err)?;
        let log_offset = hdr.log_offset;
        let log_length = u64::from(hdr.log_length);
        if log_offset
            .checked_add(log_length)
            .map_or(true, |end| end > file_len)
        {
            return Err(hdr_err(HeaderError::LogLayout {
                offset: log_offset,
                length: hdr.log_length,
            }));
        }
        let log_err = |source| Error::Log {
            path: path.to_path_buf(),
            source,
        };

        // Log: find what must be replayed, but apply nothing until the rest validates.
        let mut overlay: Vec<Op> = Vec::new();
        let mut replay_last = 0u64;
        if !hdr.log_guid.is_zero() {
            if log_length > log::MAX_LOG_LEN {
                return Err(log_err(LogError::TooLarge(log_length)));
            }
            let mut lb = vec![0u8; log_length as usize];
            file::read_at_or_zero(&file, &mut lb, log_offset)
                .map_err(|e| Error::io("reading log of", path, e))?;
            let entries = log::find_active(&lb, hdr.log_guid);
            for e in &entries {
                if e.flushed_file_offset > file_len {
                    return Err(log_err(LogError::Truncated {
                        flushed: e.flushed_file_offset,
                        actual: file_len,
                    }));
                }
                let limit = file_len.max(
                    e.last_file_offset
                        .min(file_len.saturating_mul(2) + 256 * MIB),
                );
                replay_last = replay_last.max(e.last_file_offset.min(limit));
                for op in &e.ops {
                    let (o, l) = match op {
                        Op::Data { offset, .. } => (*offset, log::SECTOR as u64),
                        Op::Zero { offset, len } => (*offset, *len),
                    };
                    let bad = o < REGION_TABLE_OFFSETS[0]
                        || o.checked_add(l).map_or(true, |end| end > limit)
                        || overlaps(o, o + l, log_offset, log_offset + log_length);
                    if bad {
                        return Err(log_err(LogError::Target { offset: o, len: l }));
                    }
                }
                overlay.extend(e.ops.iter().cloned());
            }
        }
        let rd = |buf: &mut [u8], off: u64| -> Result<()> {
            file::read_at_or_zero(&file, buf, off)
                .map_err(|e| Error::io("reading metadata of", path, e))?;
            apply_overlay(&overlay, buf, off);
            Ok(())
        };
        let eff_len = file_len.max(replay_last);

        // Region table.
        let mut r1 = vec![0u8; REGION_TABLE_SIZE];
        let mut r2 = vec![0u8; REGION_TABLE_SIZE];
        rd(&mut r1, REGION_TABLE_OFFSETS[0])?;
        rd(&mut r2, REGION_TABLE_OFFSETS[1])?;
        let regions = RegionTable::parse([&r1, &r2], eff_len, (log_offset, log_length)).map_err(
            |source| Error::Region {
                path: path.to_path_buf(),
                source,
            },
        )?;

        // Metadata.
        let md_err = |source| Error::Metadata {
            path: path.to_path_buf(),
            source,
        };
        let mut tb = vec![0u8; metadata::TABLE_SIZE];
        rd(&mut tb, regions.metadata.offset)?;
        let entries = metadata::parse_table(&tb, regions.metadata.length).map_err(md_err)?;
        let mut io_fail = None;
        let md = DiskMetadata::from_entries(
            &entries,
            |e| {
                let mut b = vec![0u8; e.length as usize];
                file::read_at_or_zero(
                    &file,
                    &mut b,
                    regions.metadata.offset + u64::from(e.offset),
                )?;
                apply_overlay(
                    &overlay,
                    &mut b,
                    regions.metadata.offset + u64::from(e.offset),
                );
                Ok(b)
            },
            |e| io_fail = Some(e),
        );
        if let Some(e) = io_fail {
            return Err(Error::io("reading metadata of", path, e));
        }
        let md = md.map_err(md_err)?;
        let locator = match (&md.has_parent, &md.parent_locator) {
            (true, Some(raw)) => {
                Some(ParentLocator::parse(raw).map_err(|source| Error::Locator {
                    path: path.to_path_buf(),
                    source,
                })?)
            }
            _ => None,
        };
        let geo = Geometry::new(md.block_size, md.logical_sector_size, md.has_parent);
        let disk_type = if md.has_parent {
            DiskType::Differencing
        } else if md.leave_blocks_allocated {
            DiskType::Fixed
        } else {
            DiskType::Dynamic
        };

        // BAT.
        let bat_err = |source| Error::Bat {
            path: path.to_path_buf(),
            source,
        };
        let needed = geo.total_entries(md.virtual_size);
        let capacity_region = u64::from(regions.bat.length) / 8;
        if needed > capacity_region {
            return Err(bat_err(BatError::Capacity {
                capacity: capacity_region,
                needed,
            }));
        }
        let max_useful = Geometry {
            has_parent: true,
            ..geo
        }
        .total_entries(metadata::MAX_VIRTUAL_SIZE);
        let capacity = capacity_region.min(max_useful).max(needed);
        let mut raw = vec![0u8; (needed * 8) as usize];
        rd(&mut raw, regions.bat.offset)?;
        let bat: Box<[AtomicU64]> = (0..capacity)
            .map(|i| {
                let i = i as usize;
                AtomicU64::new(if i < needed as usize {
                    header::le64(&raw, i * 8)
                } else {
                    0
                })
            })
            .collect();
        drop(raw);
        let mut problems = Vec::new();
        validate_bat(
            &bat,
            needed,
            &geo,
            &regions,
            (log_offset, log_length),
            eff_len,
            &mut problems,
        );
        if let Some(p) = problems.first() {
            if !ctx.lenient {
                return Err(bat_err(BatError::Offset {
                    index: p.index,
                    offset: p.offset,
                    why: p.why,
                }));
            }
        }
        let chunks = capacity / (geo.chunk_ratio + 1) + 1;
        let bitmaps: Box<[OnceLock<SectorBitmap>]> = if md.has_parent {
            (0..chunks).map(|_| OnceLock::new()).collect()
        } else {
            Box::new([])
        };

        // Parent (before anything is written: a broken chain changes nothing).
        let parent = match &locator {
            Some(l) => Some(open_parent(path, l, &md, ctx)?),
            None => None,
        };

        // Everything validated: replay for read-write opens.
        let mut header = hdr;
        let mut slot = slot;
        let mut log_replayed = false;
        if !overlay.is_empty() || !hdr.log_guid.is_zero() {
            if read_only {
                if overlay.is_empty() {
                    // Nothing valid to replay: the log is empty in all but name.
                } else {
                    tracing::info!(path = %path.display(), "applying the log in memory (read-only open)");
                }
            } else {
                for op in &overlay {
                    match op {
                        Op::Data { offset, data } => file::write_at(&file, data, *offset),
                        Op::Zero { offset, len } => file::write_zeros(&file, *offset, *len),
                    }
                    .map_err(|e| Error::io("replaying log of", path, e))?;
                }
                if replay_last > file_len {
                    file.set_len(replay_last.div_ceil(MIB) * MIB)
                        .map_err(|e| Error::io("extending", path, e))?;
                }
                file.sync_all()
                    .map_err(|e| Error::io("flushing", path, e))?;
                // Mark the log empty.
                let mut h = header;
                h.log_guid = Guid::ZERO;
                write_header_pair(&file, path, &mut h, &mut slot)?;
                header = h;
                log_replayed = !overlay.is_empty();
                if log_replayed {
                    tracing::info!(path = %path.display(), "replayed the metadata log");
                }
                overlay.clear();
            }
        }

        let file_len = file
            .metadata()
            .map_err(|e| Error::io("reading size of", path, e))?
            .len();
        let mut next_alloc = file_len.div_ceil(MIB) * MIB;
        for r in [regions.bat, regions.metadata] {
            next_alloc = next_alloc.max(r.end());
        }
        next_alloc = next_alloc.max(log_offset + log_length);
        for (i, e) in bat.iter().enumerate().take(needed as usize) {
            let e = e.load(Ordering::Relaxed);
            let st = entry_state(e);
            let len = if geo.is_bitmap_index(i as u64) {
                BITMAP_BLOCK_SIZE as u64
            } else {
                geo.block_size
            };
            if entry_offset(e) != 0
                && (st == state::FULLY_PRESENT || st == state::PARTIALLY_PRESENT)
            {
                next_alloc = next_alloc.max(entry_offset(e) + len);
            }
        }
        let mut dirty_bat = BTreeSet::new();
        if ctx.lenient && !read_only {
            for p in &problems {
                dirty_bat.insert(p.index * 8 / 4096);
            }
        }
        let data_bumped = AtomicBool::new(false);
        Ok(Vhdx {
            path: path.to_path_buf(),
            file,
            read_only,
            geo,
            size: AtomicU64::new(md.virtual_size),
            physical: md.physical_sector_size,
            disk_type,
            regions,
            log_offset,
            log_length,
            bat,
            bitmaps,
            parent,
            locator,
            st: Mutex::new(State {
                header,
                slot,
                next_alloc,
                dirty_bat,
                log_seq: 0,
                log_active: false,
                md,
                file_bumped: false,
                data_bumped: false,
            }),
            data_bumped,
            overlay,
            bat_problems: problems,
            log_replayed,
            closed: AtomicBool::new(false),
            creator,
            stop_after_log: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
        })
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Logical sector size (512 or 4096).
    pub fn logical_sector_size(&self) -> u32 {
        self.geo.sector_size as u32
    }

    /// Physical sector size (512 or 4096).
    pub fn physical_sector_size(&self) -> u32 {
        self.physical
    }

    /// Payload block size.
    pub fn block_size(&self) -> u32 {
        self.geo.block_size as u32
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.disk_type
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a read-only handle.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The parent image of a differencing disk.
    pub fn parent(&self) -> Option<&Arc<Vhdx>> {
        self.parent.as_ref()
    }

    /// The parent locator of a differencing disk.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.locator.as_ref()
    }

    /// Current DataWriteGuid (changes on the first content change of a session).
    pub fn data_write_guid(&self) -> Guid {
        self.lock_state().header.data_write_guid
    }

    /// Virtual disk id (page 83 data).
    pub fn virtual_disk_id(&self) -> Guid {
        self.lock_state().md.page83
    }

    /// Creator string of the file identifier.
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// True when this open replayed a non-empty log.
    pub fn log_replayed(&self) -> bool {
        self.log_replayed
    }

    /// This image and its ancestors, child first.
    pub fn chain(&self) -> Vec<ChainEntry> {
        let mut out = Vec::new();
        let mut cur = Some(self);
        while let Some(v) = cur {
            out.push(ChainEntry {
                path: v.path.clone(),
                disk_type: v.disk_type,
                virtual_size: v.size(),
                data_write_guid: v.data_write_guid(),
            });
            cur = v.parent.as_deref();
        }
        out
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn ioerr(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(op, &self.path, e)
    }

    pub(crate) fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        if off.checked_add(len).map_or(true, |e| e > size) {
            return Err(Error::InvalidInput(format!(
                "range {off:#x}+{len:#x} is beyond the end of the {size}-byte disk {}",
                self.path.display()
            )));
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::InvalidInput(format!(
                "{} is closed",
                self.path.display()
            )));
        }
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at virtual offset `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.read_inner(buf, off)
    }

    /// Reads without the size check; bytes past the end of this image read as zeros.
    pub(crate) fn read_inner(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let bs = self.geo.block_size;
        let size = self.size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let blk = pos / bs;
            let in_blk = pos % bs;
            let n = ((bs - in_blk) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if pos >= size {
                out.fill(0);
                done += n;
                continue;
            }
            let e = self.entry(self.geo.payload_index(blk));
            match entry_state(e) {
                state::FULLY_PRESENT => {
                    file::read_at_or_zero(&self.file, out, entry_offset(e) + in_blk)
                        .map_err(|er| self.ioerr("reading data of", er))?;
                }
                state::PARTIALLY_PRESENT => self.read_partial(blk, e, in_blk, out)?,
                state::NOT_PRESENT => self.read_parent(out, pos)?,
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn read_parent(&self, out: &mut [u8], pos: u64) -> Result<()> {
        match &self.parent {
            Some(p) => p.read_inner(out, pos),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    fn read_partial(&self, blk: u64, e: u64, in_blk: u64, out: &mut [u8]) -> Result<()> {
        let ss = self.geo.sector_size;
        let bm = self.bitmap(blk / self.geo.chunk_ratio)?;
        let base = (blk % self.geo.chunk_ratio) * self.geo.sectors_per_block();
        let mut done = 0usize;
        while done < out.len() {
            let p = in_blk + done as u64;
            let s = p / ss;
            let last = (in_blk + out.len() as u64).div_ceil(ss);
            let (present, run) = bm.run(base + s, last - s);
            let end = ((s + run) * ss).min(in_blk + out.len() as u64);
            let n = (end - p) as usize;
            let o = &mut out[done..done + n];
            if present {
                file::read_at_or_zero(&self.file, o, entry_offset(e) + p)
                    .map_err(|er| self.ioerr("reading data of", er))?;
            } else {
                self.read_parent(o, blk * self.geo.block_size + p)?;
            }
            done += n;
        }
        Ok(())
    }

    pub(crate) fn entry(&self, i: u64) -> u64 {
        self.bat
            .get(i as usize)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    pub(crate) fn set_entry(&self, st: &mut State, i: u64, v: u64) {
        if let Some(a) = self.bat.get(i as usize) {
            a.store(v, Ordering::Release);
            st.dirty_bat.insert(i * 8 / 4096);
        }
    }

    /// The sector bitmap of a chunk, loaded on first use.
    pub(crate) fn bitmap(&self, chunk: u64) -> Result<&SectorBitmap> {
        let cell = self.bitmaps.get(chunk as usize).ok_or_else(|| {
            Error::InvalidInput(format!("chunk {chunk} beyond the sector bitmap table"))
        })?;
        if let Some(b) = cell.get() {
            return Ok(b);
        }
        let _g = self.lock_state();
        if let Some(b) = cell.get() {
            return Ok(b);
        }
        let e = self.entry(self.geo.bitmap_index(chunk));
        let bm = if entry_state(e) == state::SB_PRESENT {
            let mut b = vec![0u8; BITMAP_BLOCK_SIZE];
            file::read_at_or_zero(&self.file, &mut b, entry_offset(e))
                .map_err(|er| self.ioerr("reading sector bitmap of", er))?;
            apply_overlay(&self.overlay, &mut b, entry_offset(e));
            SectorBitmap::from_bytes(Some(&b))
        } else {
            SectorBitmap::from_bytes(None)
        };
        let _ = cell.set(bm);
        cell.get()
            .ok_or_else(|| Error::InvalidInput("sector bitmap not loaded".into()))
    }

    /// Writes `buf` at virtual offset `off`.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        self.bump_guids(true)?;
        self.write_inner(buf, off)
    }

    /// Write path shared by user writes and internal copies (merge into child),
    /// which must not change the DataWriteGuid.
    pub(crate) fn write_inner(&self, buf: &[u8], off: u64) -> Result<()> {
        let ss = self.geo.sector_size;
        if self.parent.is_some() && (off % ss != 0 || buf.len() as u64 % ss != 0) {
            // Sector bitmaps track whole sectors: read-modify-write the edges.
            let start = off / ss * ss;
            let end = (off + buf.len() as u64).div_ceil(ss) * ss;
            let mut tmp = vec![0u8; (end - start) as usize];
            self.read_inner(&mut tmp, start)?;
            tmp[(off - start) as usize..(off - start) as usize + buf.len()].copy_from_slice(buf);
            return self.write_aligned(&tmp, start);
        }
        self.write_aligned(buf, off)
    }

    fn write_aligned(&self, buf: &[u8], off: u64) -> Result<()> {
        let bs = self.geo.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let blk = pos / bs;
            let in_blk = pos % bs;
            let n = ((bs - in_blk) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            let idx = self.geo.payload_index(blk);
            let e = self.entry(idx);
            match entry_state(e) {
                state::FULLY_PRESENT => self.pwrite(data, entry_offset(e) + in_blk)?,
                state::PARTIALLY_PRESENT => {
                    self.pwrite(data, entry_offset(e) + in_blk)?;
                    self.mark_present(blk, in_blk, n as u64)?;
                }
                _ => self.allocate_and_write(blk, in_blk, data)?,
            }
            done += n;
        }
        Ok(())
    }

    fn pwrite(&self, data: &[u8], at: u64) -> Result<()> {
        file::write_at(&self.file, data, at).map_err(|e| self.ioerr("writing data of", e))
    }

    fn mark_present(&self, blk: u64, in_blk: u64, len: u64) -> Result<()> {
        let ss = self.geo.sector_size;
        let bm = self.bitmap(blk / self.geo.chunk_ratio)?;
        let base = (blk % self.geo.chunk_ratio) * self.geo.sectors_per_block();
        bm.set_range(base + in_blk / ss, len.div_ceil(ss), true);
        Ok(())
    }

    /// Reserves `len` bytes at the end of the file.
    pub(crate) fn alloc_space(&self, st: &mut State, len: u64) -> Result<u64> {
        let at = st.next_alloc;
        st.next_alloc += len;
        let cur = self
            .file
            .metadata()
            .map_err(|e| self.ioerr("reading size of", e))?
            .len();
        if cur < st.next_alloc {
            self.file
                .set_len(st.next_alloc)
                .map_err(|e| self.ioerr("extending", e))?;
        }
        Ok(at)
    }

    fn allocate_and_write(&self, blk: u64, in_blk: u64, data: &[u8]) -> Result<()> {
        if self.parent.is_some() {
            // Load the chunk's bitmap before taking the state lock (loading locks it).
            self.bitmap(blk / self.geo.chunk_ratio)?;
        }
        let mut st = self.lock_state();
        let idx = self.geo.payload_index(blk);
        let e = self.entry(idx);
        match entry_state(e) {
            state::FULLY_PRESENT | state::PARTIALLY_PRESENT => {
                drop(st);
                return self.write_aligned_one(blk, in_blk, data);
            }
            _ => {}
        }
        let bs = self.geo.block_size;
        let from_parent = self.parent.is_some() && entry_state(e) == state::NOT_PRESENT;
        let reuse = entry_offset(e);
        let at = if reuse != 0 && entry_state(e) != state::NOT_PRESENT {
            // A zeroed or unmapped block keeps its space (validated at open): reuse
            // it, making sure the parts not written now read as zeros.
            file::punch_hole(&self.file, reuse, bs)
                .map_err(|er| self.ioerr("zeroing block of", er))?;
            reuse
        } else {
            self.alloc_space(&mut st, bs)?
        };
        let full = in_blk == 0 && data.len() as u64 == bs;
        if from_parent && !full {
            // Make sure the chunk's sector bitmap block exists before any bit is set.
            let chunk = blk / self.geo.chunk_ratio;
            let bidx = self.geo.bitmap_index(chunk);
            let be = self.entry(bidx);
            if entry_state(be) != state::SB_PRESENT {
                let boff = self.alloc_space(&mut st, BITMAP_BLOCK_SIZE as u64)?;
                self.set_entry(&mut st, bidx, make_entry(state::SB_PRESENT, boff));
            }
            self.pwrite(data, at + in_blk)?;
            self.mark_present(blk, in_blk, data.len() as u64)?;
            self.set_entry(&mut st, idx, make_entry(state::PARTIALLY_PRESENT, at));
        } else {
            self.pwrite(data, at + in_blk)?;
            self.set_entry(&mut st, idx, make_entry(state::FULLY_PRESENT, at));
        }
        Ok(())
    }

    fn write_aligned_one(&self, blk: u64, in_blk: u64, data: &[u8]) -> Result<()> {
        self.write_aligned(data, blk * self.geo.block_size + in_blk)
    }

    /// Changes FileWriteGuid (any modification) and DataWriteGuid (content change)
    /// once per session, before the first such change reaches the file.
    pub(crate) fn bump_guids(&self, data: bool) -> Result<()> {
        if self.data_bumped.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = self.lock_state();
        if (st.data_bumped || !data) && st.file_bumped {
            return Ok(());
        }
        let mut h = st.header;
        h.file_write_guid = Guid::new_random();
        if data {
            h.data_write_guid = Guid::new_random();
        }
        let mut slot = st.slot;
        write_header_pair(&self.file, &self.path, &mut h, &mut slot)?;
        st.header = h;
        st.slot = slot;
        st.file_bumped = true;
        if data {
            st.data_bumped = true;
            self.data_bumped.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Makes every completed write durable: data first, then changed metadata
    /// through the log.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.lock_state();
        self.flush_locked(&mut st, Vec::new())
    }

    /// Flush with extra metadata pages (file offset, 4 KiB) to commit atomically
    /// after the BAT and bitmap pages.
    pub(crate) fn flush_locked(&self, st: &mut State, extra: Vec<(u64, Vec<u8>)>) -> Result<()> {
        let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
        for (chunk, cell) in self.bitmaps.iter().enumerate() {
            let Some(bm) = cell.get() else { continue };
            let dirty = bm.take_dirty();
            if dirty.is_empty() {
                continue;
            }
            let be = self.entry(self.geo.bitmap_index(chunk as u64));
            if entry_state(be) != state::SB_PRESENT {
                continue;
            }
            for p in dirty {
                pages.push((entry_offset(be) + p as u64 * 4096, bm.page_bytes(p)));
            }
        }
        let dirty_bat = std::mem::take(&mut st.dirty_bat);
        for p in &dirty_bat {
            let mut b = Vec::with_capacity(4096);
            for i in p * 512..(p + 1) * 512 {
                b.extend_from_slice(&self.entry(i).to_le_bytes());
            }
            let off = self.regions.bat.offset + p * 4096;
            if off + 4096 <= self.regions.bat.end() {
                pages.push((off, b));
            }
        }
        pages.extend(extra);
        self.file
            .sync_data()
            .map_err(|e| self.ioerr("flushing", e))?;
        if pages.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.commit_pages(st, &pages) {
            // Keep the BAT pages dirty so a later flush retries them.
            st.dirty_bat.extend(dirty_bat);
            return Err(e);
        }
        Ok(())
    }

    /// Writes pages through the log: entry, flush, apply, flush.
    pub(crate) fn commit_pages(&self, st: &mut State, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        if !st.file_bumped {
            let mut h = st.header;
            h.file_write_guid = Guid::new_random();
            let mut slot = st.slot;
            write_header_pair(&self.file, &self.path, &mut h, &mut slot)?;
            st.header = h;
            st.slot = slot;
            st.file_bumped = true;
        }
        if !st.log_active {
            let mut h = st.header;
            h.log_guid = Guid::new_random();
            let mut slot = st.slot;
            write_header_pair(&self.file, &self.path, &mut h, &mut slot)?;
            st.header = h;
            st.slot = slot;
            st.log_active = true;
            st.log_seq = 1;
        }
        let per = log::max_pages(self.log_length).max(1);
        for batch in pages.chunks(per) {
            let flen = self
                .file
                .metadata()
                .map_err(|e| self.ioerr("reading size of", e))?
                .len();
            let refs: Vec<(u64, &[u8])> = batch.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            let entry = log::build_entry(
                st.log_seq,
                st.header.log_guid,
                0,
                flen / MIB * MIB,
                st.next_alloc.max(flen).div_ceil(MIB) * MIB,
                &refs,
            );
            st.log_seq += 1;
            file::write_at(&self.file, &entry, self.log_offset)
                .map_err(|e| self.ioerr("writing log of", e))?;
            self.file
                .sync_data()
                .map_err(|e| self.ioerr("flushing log of", e))?;
            if self.stop_after_log.load(Ordering::Acquire) {
                // Test hook: simulate a crash between the log write and its application.
                return Ok(());
            }
            for (o, d) in batch {
                file::write_at(&self.file, d, *o)
                    .map_err(|e| self.ioerr("writing metadata of", e))?;
            }
            self.file
                .sync_data()
                .map_err(|e| self.ioerr("flushing metadata of", e))?;
        }
        Ok(())
    }

    /// Flushes and marks the log empty. Dropping the handle does the same but
    /// cannot report errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    /// Like [`Vhdx::close`] on a shared reference; later writes fail.
    pub(crate) fn close_ref(&self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.read_only || self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut st = self.lock_state();
        self.flush_locked(&mut st, Vec::new())?;
        if st.log_active {
            let mut h = st.header;
            h.log_guid = Guid::ZERO;
            let mut slot = st.slot;
            write_header_pair(&self.file, &self.path, &mut h, &mut slot)?;
            st.header = h;
            st.slot = slot;
            st.log_active = false;
        }
        Ok(())
    }

    /// Reports the state of `[off, off+len)`, merging neighbouring ranges of the
    /// same state.
    pub fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(off, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |off: u64, len: u64, state: ExtentState| {
            if let Some(l) = out.last_mut() {
                if l.state == state && l.off + l.len == off {
                    l.len += len;
                    return;
                }
            }
            out.push(Extent { off, len, state });
        };
        let bs = self.geo.block_size;
        let ss = self.geo.sector_size;
        let absent = if self.parent.is_some() {
            ExtentState::FromParent
        } else {
            ExtentState::Unmapped
        };
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let blk = pos / bs;
            let in_blk = pos % bs;
            let n = (bs - in_blk).min(end - pos);
            let e = self.entry(self.geo.payload_index(blk));
            match entry_state(e) {
                state::FULLY_PRESENT => push(pos, n, ExtentState::Data),
                state::PARTIALLY_PRESENT => {
                    let bm = self.bitmap(blk / self.geo.chunk_ratio)?;
                    let base = (blk % self.geo.chunk_ratio) * self.geo.sectors_per_block();
                    let mut p = in_blk;
                    while p < in_blk + n {
                        let s = p / ss;
                        let last = (in_blk + n).div_ceil(ss);
                        let (present, run) = bm.run(base + s, last - s);
                        let e2 = ((s + run) * ss).min(in_blk + n);
                        push(
                            blk * bs + p,
                            e2 - p,
                            if present { ExtentState::Data } else { absent },
                        );
                        p = e2;
                    }
                }
                state::NOT_PRESENT => push(pos, n, absent),
                state::UNMAPPED => push(pos, n, ExtentState::Unmapped),
                _ => push(pos, n, ExtentState::Zero),
            }
            pos += n;
        }
        Ok(out)
    }

    /// Makes `[off, off+len)` read as zeros, dropping whole blocks (state ZERO).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.discard(off, len, false)
    }

    /// Discards `[off, off+len)`: whole blocks become UNMAPPED (ZERO in a
    /// differencing disk, so the parent does not show through) and their space is
    /// returned to the host file system; partial ranges read as zeros afterwards.
    pub fn unmap(&self, off: u64, len: u64) -> Result<()> {
        self.discard(off, len, true)
    }

    fn discard(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.bump_guids(true)?;
        let bs = self.geo.block_size;
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let blk = pos / bs;
            let in_blk = pos % bs;
            let n = (bs - in_blk).min(end - pos);
            let whole = in_blk == 0 && (n == bs || pos + n == self.size());
            self.discard_block(blk, in_blk, n, whole, unmap)?;
            pos += n;
        }
        Ok(())
    }

    pub(crate) fn discard_block(
        &self,
        blk: u64,
        in_blk: u64,
        n: u64,
        whole: bool,
        unmap: bool,
    ) -> Result<()> {
        let bs = self.geo.block_size;
        let idx = self.geo.payload_index(blk);
        let mut st = self.lock_state();
        let e = self.entry(idx);
        let s = entry_state(e);
        let allocated = s == state::FULLY_PRESENT || s == state::PARTIALLY_PRESENT;
        if whole && self.disk_type != DiskType::Fixed {
            let new_state = if unmap && self.parent.is_none() {
                state::UNMAPPED
            } else {
                state::ZERO
            };
            if allocated {
                file::punch_hole(&self.file, entry_offset(e), bs)
                    .map_err(|er| self.ioerr("discarding in", er))?;
            }
            self.set_entry(&mut st, idx, make_entry(new_state, entry_offset(e)));
            return Ok(());
        }
        match s {
            state::FULLY_PRESENT => {
                drop(st);
                // Punch whole file-system pages, write zeros at the unaligned edges.
                let at = entry_offset(e) + in_blk;
                let a0 = at.div_ceil(4096) * 4096;
                let a1 = (at + n) / 4096 * 4096;
                if a1 > a0 {
                    file::write_zeros(&self.file, at, a0 - at)
                        .map_err(|er| self.ioerr("zeroing in", er))?;
                    file::punch_hole(&self.file, a0, a1 - a0)
                        .map_err(|er| self.ioerr("discarding in", er))?;
                    file::write_zeros(&self.file, a1, at + n - a1)
                        .map_err(|er| self.ioerr("zeroing in", er))?;
                } else {
                    file::write_zeros(&self.file, at, n)
                        .map_err(|er| self.ioerr("zeroing in", er))?;
                }
                Ok(())
            }
            state::NOT_PRESENT if self.parent.is_none() => Ok(()),
            state::ZERO | state::UNMAPPED | state::UNDEFINED => Ok(()),
            _ => {
                drop(st);
                let z = vec![0u8; n as usize];
                self.write_inner(&z, blk * bs + in_blk)
            }
        }
    }

    /// Bytes of the host file.
    pub fn file_size(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| self.ioerr("reading size of", e))?
            .len())
    }

    /// Bytes of virtual disk stored in this image (allocated payload blocks).
    pub fn allocated_bytes(&self) -> u64 {
        let blocks = self.geo.payload_blocks(self.size());
        let mut n = 0;
        for b in 0..blocks {
            let s = entry_state(self.entry(self.geo.payload_index(b)));
            if s == state::FULLY_PRESENT || s == state::PARTIALLY_PRESENT {
                n += 1;
            }
        }
        n * self.geo.block_size
    }

    /// Bytes the host file occupies on disk.
    pub fn disk_usage(&self) -> Result<u64> {
        file::allocated_bytes(&self.file).map_err(|e| self.ioerr("reading size of", e))
    }

    /// Changes the virtual size. Growing works while I/O continues; shrinking
    /// requires that no allocated block lies wholly beyond the new end.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let ss = self.geo.sector_size;
        if new_size == 0 || new_size % ss != 0 || new_size > metadata::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidInput(format!(
                "new size {new_size} must be a non-zero multiple of the {ss}-byte sector size and at most 64 TiB"
            )));
        }
        let needed = self.geo.total_entries(new_size);
        let cap = (u64::from(self.regions.bat.length) / 8).min(self.bat.len() as u64);
        if needed > cap {
            return Err(Error::Unsupported(format!(
                "growing to {new_size} bytes needs {needed} BAT entries but the BAT region of {} holds {cap}; \
                 convert to a new image instead",
                self.path.display()
            )));
        }
        self.bump_guids(true)?;
        let old = self.size();
        let bs = self.geo.block_size;
        if new_size < old {
            let first_gone = new_size.div_ceil(bs);
            for b in first_gone..self.geo.payload_blocks(old) {
                let s = entry_state(self.entry(self.geo.payload_index(b)));
                if s == state::FULLY_PRESENT || s == state::PARTIALLY_PRESENT {
                    return Err(Error::InvalidInput(format!(
                        "cannot shrink {} to {new_size} bytes: block {b} beyond the new end holds data \
                         (run compact or discard it first)",
                        self.path.display()
                    )));
                }
            }
            // New I/O beyond the end fails from now on.
            self.size.store(new_size, Ordering::Release);
            // Zero the cut part of the last block so a later grow reads zeros.
            if new_size % bs != 0 {
                let cut = new_size % bs;
                self.discard_block(new_size / bs, cut, bs - cut, false, false)?;
            }
            let mut st = self.lock_state();
            for b in first_gone..self.geo.payload_blocks(old) {
                self.set_entry(&mut st, self.geo.payload_index(b), 0);
            }
            st.md.virtual_size = new_size;
            let pages = self.metadata_pages(&st.md);
            self.flush_locked(&mut st, pages)?;
        } else if new_size > old {
            let mut st = self.lock_state();
            if self.parent.is_some() {
                // The area beyond the old end must not show the parent.
                let first_new = old.div_ceil(bs);
                for b in first_new..self.geo.payload_blocks(new_size) {
                    self.set_entry(
                        &mut st,
                        self.geo.payload_index(b),
                        make_entry(state::ZERO, 0),
                    );
                }
            }
            st.md.virtual_size = new_size;
            let pages = self.metadata_pages(&st.md);
            self.flush_locked(&mut st, pages)?;
            self.size.store(new_size, Ordering::Release);
        }
        Ok(())
    }

    /// The metadata region rewritten from `md`, as log pages.
    pub(crate) fn metadata_pages(&self, md: &DiskMetadata) -> Vec<(u64, Vec<u8>)> {
        let b = md.to_bytes();
        b.chunks(4096)
            .enumerate()
            .map(|(i, c)| (self.regions.metadata.offset + i as u64 * 4096, c.to_vec()))
            .collect()
    }

    /// Test hook: from now on, metadata commits write the log entry and stop,
    /// as if the process died before applying it.
    #[doc(hidden)]
    pub fn testing_stop_after_log(&self) {
        self.stop_after_log.store(true, Ordering::Release);
    }

    /// Test hook: closes the file without flushing or clearing the log, as a
    /// killed process would.
    #[doc(hidden)]
    pub fn testing_abandon(self) {
        self.abandoned.store(true, Ordering::Release);
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.close_inner() {
            tracing::error!(path = %self.path.display(), error = %e, "closing VHDX image failed");
        }
    }
}

/// Applies un-replayed log operations to a buffer read from the file at `off`.
pub(crate) fn apply_overlay(ops: &[Op], buf: &mut [u8], off: u64) {
    let end = off + buf.len() as u64;
    for op in ops {
        match op {
            Op::Data { offset, data } => {
                let (o0, o1) = (*offset, offset + data.len() as u64);
                if o0 < end && off < o1 {
                    let s = o0.max(off);
                    let e = o1.min(end);
                    buf[(s - off) as usize..(e - off) as usize]
                        .copy_from_slice(&data[(s - o0) as usize..(e - o0) as usize]);
                }
            }
            Op::Zero { offset, len } => {
                let (o0, o1) = (*offset, offset.saturating_add(*len));
                if o0 < end && off < o1 {
                    let s = o0.max(off);
                    let e = o1.min(end);
                    buf[(s - off) as usize..(e - off) as usize].fill(0);
                }
            }
        }
    }
}

/// Writes a header update to both slots (non-current first), flushing each.
pub(crate) fn write_header_pair(
    f: &File,
    path: &Path,
    h: &mut Header,
    slot: &mut usize,
) -> Result<()> {
    for _ in 0..2 {
        h.sequence += 1;
        let target = 1 - *slot;
        file::write_at(f, &h.to_bytes(), HEADER_OFFSETS[target])
            .map_err(|e| Error::io("writing header of", path, e))?;
        f.sync_data()
            .map_err(|e| Error::io("flushing header of", path, e))?;
        *slot = target;
    }
    Ok(())
}

/// Validates BAT entries, recording problems and neutralising bad entries in memory.
fn validate_bat(
    bat: &[AtomicU64],
    needed: u64,
    geo: &Geometry,
    regions: &RegionTable,
    log: (u64, u64),
    file_len: u64,
    problems: &mut Vec<BatProblem>,
) {
    let meta = [
        (0, header::HEADER_SECTION_END),
        (log.0, log.0 + log.1),
        (regions.metadata.offset, regions.metadata.end()),
        (regions.bat.offset, regions.bat.end()),
    ];
    let mut extents: Vec<(u64, u64, u64, bool)> = Vec::new(); // (start, end, index, in use)
    for i in 0..needed {
        let e = bat[i as usize].load(Ordering::Relaxed);
        let s = entry_state(e);
        let off = entry_offset(e);
        let is_bm = geo.is_bitmap_index(i);
        let len = if is_bm {
            BITMAP_BLOCK_SIZE as u64
        } else {
            geo.block_size
        };
        let (valid_state, in_use) = if is_bm {
            (
                s == 0 || s == state::SB_PRESENT,
                s == state::SB_PRESENT && geo.has_parent,
            )
        } else {
            match s {
                state::NOT_PRESENT | state::UNDEFINED | state::ZERO | state::UNMAPPED => {
                    (true, false)
                }
                state::FULLY_PRESENT => (true, true),
                state::PARTIALLY_PRESENT => (geo.has_parent, true),
                _ => (false, false),
            }
        };
        if !valid_state {
            problems.push(BatProblem {
                index: i,
                offset: off,
                why: "in an invalid state",
            });
            bat[i as usize].store(0, Ordering::Relaxed);
            continue;
        }
        if is_bm && !geo.has_parent {
            continue;
        }
        if off == 0 {
            if in_use {
                problems.push(BatProblem {
                    index: i,
                    offset: off,
                    why: "zero for an allocated block",
                });
                bat[i as usize].store(0, Ordering::Relaxed);
            }
            continue;
        }
        let bad = if off.checked_add(len).map_or(true, |end| end > file_len) {
            Some("beyond the end of the file")
        } else if meta.iter().any(|(a, b)| overlaps(off, off + len, *a, *b)) {
            Some("inside a metadata region")
        } else {
            None
        };
        match (bad, in_use) {
            (Some(why), true) => {
                problems.push(BatProblem {
                    index: i,
                    offset: off,
                    why,
                });
                bat[i as usize].store(0, Ordering::Relaxed);
            }
            // A zeroed block's remembered space is only reused when valid.
            (Some(_), false) => bat[i as usize].store(make_entry(s, 0), Ordering::Relaxed),
            (None, _) => extents.push((off, off + len, i, in_use)),
        }
    }
    extents.sort_unstable();
    let mut last_end = 0u64;
    for &(a, b, i, in_use) in &extents {
        if a < last_end {
            let e = bat[i as usize].load(Ordering::Relaxed);
            if in_use {
                problems.push(BatProblem {
                    index: i,
                    offset: a,
                    why: "overlapping another block",
                });
                bat[i as usize].store(0, Ordering::Relaxed);
            } else {
                bat[i as usize].store(make_entry(entry_state(e), 0), Ordering::Relaxed);
            }
            continue;
        }
        last_end = b;
    }
}

fn open_parent(
    child: &Path,
    l: &ParentLocator,
    md: &DiskMetadata,
    ctx: &mut OpenCtx<'_>,
) -> Result<Arc<Vhdx>> {
    let linkage = l.linkage().map_err(|source| Error::Locator {
        path: child.to_path_buf(),
        source,
    })?;
    let linkage2 = l.linkage2();
    let cands = l.candidates(child);
    let mut first_err: Option<Error> = None;
    let mut tried = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let depth = ctx.visited.len();
    for c in cands {
        tried.push(c.display().to_string());
        if !c.exists() {
            continue;
        }
        let canon = c.canonicalize().unwrap_or_else(|_| c.clone());
        if seen.contains(&canon) {
            continue;
        }
        seen.push(canon.clone());
        ctx.visited.truncate(depth);
        let parent = if let Some(p) = ctx
            .preopened
            .iter()
            .find(|p| p.path.canonicalize().ok().as_ref() == Some(&canon))
        {
            if ctx.visited.contains(&canon) {
                return Err(Error::ParentLoop {
                    child: child.to_path_buf(),
                    at: c.clone(),
                    max: MAX_CHAIN_DEPTH,
                });
            }
            // The caller vouches for a preopened parent (a resumed merge has
            // already changed its DataWriteGuid).
            return Ok(p.clone());
        } else {
            let saved = (ctx.read_only, ctx.lenient);
            ctx.read_only = true;
            ctx.lenient = false;
            let r = Vhdx::open_ctx(&c, ctx);
            (ctx.read_only, ctx.lenient) = saved;
            match r {
                Ok(p) => Arc::new(p),
                Err(e @ Error::ParentLoop { .. }) => return Err(e),
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
        };
        let actual = parent.data_write_guid();
        if !ctx.unchecked && actual != linkage && Some(actual) != linkage2 {
            first_err.get_or_insert(Error::ParentChanged {
                child: child.to_path_buf(),
                parent: c.clone(),
                actual,
                expected: linkage.to_string(),
            });
            continue;
        }
        if parent.logical_sector_size() != md.logical_sector_size {
            return Err(Error::Unsupported(format!(
                "parent {} has {}-byte sectors but {} has {}",
                c.display(),
                parent.logical_sector_size(),
                child.display(),
                md.logical_sector_size
            )));
        }
        return Ok(parent);
    }
    Err(first_err.unwrap_or(Error::ParentNotFound {
        child: child.to_path_buf(),
        tried: tried.join(", "),
    }))
}

// Compile-time check that the handle can be shared between threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vhdx>();
};
