//! Long operations: merge (child into ancestor, and a whole chain into the
//! child), compact, and conversion between raw, VHDX and (through `qemu-img`)
//! qcow2.
//!
//! Each takes a progress callback `(done, total)` and a cancel flag checked
//! between blocks. Merges work block by block ([`merge_block`]) and every step is
//! idempotent, so a merge interrupted by a crash is finished by running it again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::bat::{entry_offset, entry_state, make_entry, state};
use crate::bitmap::BITMAP_BLOCK_SIZE;
use crate::check::used_metadata_end;
use crate::create::CreateOptions;
use crate::error::{Error, Result};
use crate::file;
use crate::image::{DiskType, ExtentState, OpenCtx, OpenOptions, Vhdx};

/// Progress callback: `(done, total)` in bytes or blocks.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

const COPY_CHUNK: usize = 4 << 20;

/// Image file formats known to [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// MS-VHDX.
    Vhdx,
    /// QEMU qcow2 (through `qemu-img`).
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl ImageFormat {
    /// Name as `qemu-img` spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// Detects the format of an existing file from its magic bytes.
pub fn detect_format(path: &Path) -> Result<ImageFormat> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut m = [0u8; 8];
    let n = f.read(&mut m).map_err(|e| Error::io("reading", path, e))?;
    Ok(if n == 8 && &m == crate::header::FILE_SIGNATURE {
        ImageFormat::Vhdx
    } else if n >= 4 && m[..4] == *b"QFI\xfb" {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

fn cancelled(c: &AtomicBool) -> Result<()> {
    if c.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// Ranges of `[off, off+len)` that layers above `target` own: `(off, len, zero)`.
fn owned_ranges(
    layer: &Vhdx,
    target: &Vhdx,
    off: u64,
    len: u64,
    out: &mut Vec<(u64, u64, bool)>,
) -> Result<()> {
    if std::ptr::eq(layer, target) || len == 0 {
        return Ok(());
    }
    let end = (off + len).min(layer.size());
    if off >= end {
        return Ok(());
    }
    for e in layer.block_status(off, end - off)? {
        match e.state {
            ExtentState::Data => out.push((e.off, e.len, false)),
            ExtentState::Zero | ExtentState::Unmapped => out.push((e.off, e.len, true)),
            ExtentState::FromParent => {
                if let Some(p) = layer.parent() {
                    owned_ranges(p, target, e.off, e.len, out)?;
                }
            }
        }
    }
    Ok(())
}

/// Copies block `block` (in units of `top`'s block size) of what `top` shows
/// above `target` into `target`. Idempotent.
pub fn merge_block(top: &Vhdx, target: &Vhdx, block: u64) -> Result<()> {
    let bs = u64::from(top.block_size());
    let off = block * bs;
    if off >= top.size() {
        return Ok(());
    }
    let len = bs.min(top.size() - off);
    let mut ranges = Vec::new();
    owned_ranges(top, target, off, len, &mut ranges)?;
    let mut buf = Vec::new();
    for (o, l, zero) in ranges {
        if zero {
            target.write_zeroes(o, l)?;
        } else {
            buf.resize(l as usize, 0);
            top.read_at(&mut buf, o)?;
            target.write_at(&buf, o)?;
        }
    }
    Ok(())
}

/// Merges the differencing disk `child` (and any images between it and the
/// target) into `into` — by default its parent. Afterwards `into` shows what
/// `child` showed; `child` and the images between are obsolete (and so is any
/// other child of `into`). Running it again after an interruption finishes it.
pub fn merge(
    child: &Path,
    into: Option<&Path>,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    // Find the target path from the chain, read-only.
    let target_path = {
        let probe = open_chain_unchecked(child, &[])?;
        let chain = probe.chain();
        if chain.len() < 2 {
            return Err(Error::InvalidInput(format!(
                "{} has no parent to merge into",
                child.display()
            )));
        }
        match into {
            None => chain[1].path.clone(),
            Some(p) => {
                let want = p.canonicalize().map_err(|e| Error::io("resolving", p, e))?;
                chain[1..]
                    .iter()
                    .find(|c| c.path.canonicalize().ok().as_ref() == Some(&want))
                    .map(|c| c.path.clone())
                    .ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "{} is not an ancestor of {}",
                            p.display(),
                            child.display()
                        ))
                    })?
            }
        }
    };
    let target = Arc::new(Vhdx::open(&target_path, OpenOptions { read_only: false })?);
    let top = open_chain_unchecked(child, std::slice::from_ref(&target))?;
    if top.size() > target.size() {
        target.resize(top.size())?;
    }
    let blocks = top.size().div_ceil(u64::from(top.block_size()));
    for b in 0..blocks {
        cancelled(cancel)?;
        merge_block(&top, &target, b)?;
        progress(b + 1, blocks);
    }
    target.flush()?;
    drop(top);
    let t = Arc::try_unwrap(target)
        .map_err(|_| Error::InvalidInput("merge target still shared".into()))?;
    t.close()?;
    Ok(target_path)
}

/// Opens a chain read-only, using `preopened` handles for matching parents
/// without checking their DataWriteGuid (a resumed merge has already changed it).
fn open_chain_unchecked(path: &Path, preopened: &[Arc<Vhdx>]) -> Result<Vhdx> {
    let mut ctx = OpenCtx {
        read_only: true,
        lenient: false,
        preopened,
        visited: Vec::new(),
        unchecked: preopened.is_empty(),
    };
    Vhdx::open_ctx(path, &mut ctx)
}

/// Merges the whole parent chain into the differencing disk `child`, which
/// becomes a standalone dynamic disk showing the same data (the base can then be
/// deleted). Idempotent per block; its DataWriteGuid does not change because
/// its contents do not.
pub fn merge_into_child(child: &Path, progress: Progress<'_>, cancel: &AtomicBool) -> Result<()> {
    let v = Vhdx::open(child, OpenOptions { read_only: false })?;
    if v.parent().is_none() {
        return Err(Error::InvalidInput(format!(
            "{} has no parent",
            child.display()
        )));
    }
    v.bump_guids(false)?;
    let geo = v.geo;
    let bs = geo.block_size;
    let blocks = geo.payload_blocks(v.size());
    let mut buf = vec![0u8; bs as usize];
    for b in 0..blocks {
        cancelled(cancel)?;
        let off = b * bs;
        let len = bs.min(v.size() - off);
        let idx = geo.payload_index(b);
        let s = entry_state(v.entry(idx));
        if s == state::NOT_PRESENT || s == state::PARTIALLY_PRESENT {
            let data = &mut buf[..len as usize];
            v.read_at(data, off)?;
            if s == state::PARTIALLY_PRESENT || data.iter().any(|&x| x != 0) {
                // Write only what the parent supplies (idempotent: the view is unchanged).
                for e in v.block_status(off, len)? {
                    if e.state == ExtentState::FromParent {
                        let a = (e.off - off) as usize;
                        v.write_inner(&data[a..a + e.len as usize], e.off)?;
                    }
                }
            }
            if s == state::PARTIALLY_PRESENT
                || entry_state(v.entry(idx)) == state::PARTIALLY_PRESENT
            {
                let mut st = v.lock_state();
                let e = v.entry(idx);
                v.set_entry(
                    &mut st,
                    idx,
                    make_entry(state::FULLY_PRESENT, entry_offset(e)),
                );
            }
        }
        progress(b + 1, blocks);
    }
    // Drop the parent: the sector bitmap entries go away with it.
    let mut st = v.lock_state();
    for c in 0..geo.chunks(v.size()) {
        v.set_entry(&mut st, geo.bitmap_index(c), 0);
    }
    st.md.has_parent = false;
    st.md.parent_locator = None;
    let pages = v.metadata_pages(&st.md);
    v.flush_locked(&mut st, pages)?;
    drop(st);
    v.close()
}

/// Result of [`compact`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CompactSummary {
    /// File size before.
    pub before: u64,
    /// File size after.
    pub after: u64,
    /// Blocks found all-zero and released.
    pub zero_blocks: u64,
    /// Blocks moved towards the start of the file.
    pub moved_blocks: u64,
}

/// Reclaims space: all-zero blocks are released (dynamic: NOT_PRESENT,
/// differencing: ZERO), zeroed and unmapped blocks forget their space, blocks are
/// moved into the holes and the file is truncated. Crash-safe: a block is copied
/// and flushed before the BAT points at the copy, and space is only reused once
/// no durable BAT entry refers to it.
pub fn compact(path: &Path, progress: Progress<'_>, cancel: &AtomicBool) -> Result<CompactSummary> {
    let v = Vhdx::open(path, OpenOptions { read_only: false })?;
    let mut sum = CompactSummary {
        before: v.file_size()?,
        ..Default::default()
    };
    if v.disk_type() == DiskType::Fixed {
        v.close()?;
        sum.after = sum.before;
        return Ok(sum);
    }
    v.bump_guids(false)?;
    let geo = v.geo;
    let bs = geo.block_size;
    let blocks = geo.payload_blocks(v.size());
    let mut buf = vec![0u8; COPY_CHUNK.min(bs as usize)];
    // Pass 1: release zero blocks.
    for b in 0..blocks {
        cancelled(cancel)?;
        let idx = geo.payload_index(b);
        let e = v.entry(idx);
        match entry_state(e) {
            state::FULLY_PRESENT => {
                let mut zero = true;
                let mut o = 0;
                while o < bs && zero {
                    let n = (bs - o).min(buf.len() as u64) as usize;
                    file::read_at_or_zero(&v.file, &mut buf[..n], entry_offset(e) + o)
                        .map_err(|er| v.ioerr("reading", er))?;
                    zero = buf[..n].iter().all(|&x| x == 0);
                    o += n as u64;
                }
                if zero {
                    let ns = if v.parent().is_some() {
                        state::ZERO
                    } else {
                        state::NOT_PRESENT
                    };
                    let mut st = v.lock_state();
                    v.set_entry(&mut st, idx, make_entry(ns, 0));
                    sum.zero_blocks += 1;
                }
            }
            state::ZERO | state::UNMAPPED | state::UNDEFINED if entry_offset(e) != 0 => {
                let mut st = v.lock_state();
                v.set_entry(&mut st, idx, make_entry(entry_state(e), 0));
            }
            _ => {}
        }
        progress(b + 1, blocks * 2);
    }
    v.flush()?;
    // Pass 2: move blocks down into holes, in rounds.
    let start = used_metadata_end(&v).div_ceil(1 << 20) << 20;
    loop {
        cancelled(cancel)?;
        let mut used: Vec<(u64, u64, u64)> = Vec::new(); // (offset, len, bat index)
        for i in 0..geo.total_entries(v.size()) {
            let e = v.entry(i);
            let s = entry_state(e);
            if geo.is_bitmap_index(i) {
                if geo.has_parent && s == state::SB_PRESENT {
                    used.push((entry_offset(e), BITMAP_BLOCK_SIZE as u64, i));
                }
            } else if s == state::FULLY_PRESENT || s == state::PARTIALLY_PRESENT {
                used.push((entry_offset(e), bs, i));
            }
        }
        used.sort_unstable();
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut cur = start;
        for &(o, l, _) in &used {
            if o > cur {
                holes.push((cur, o));
            }
            cur = cur.max(o + l);
        }
        let mut moves = Vec::new();
        for &(o, l, i) in used.iter().rev() {
            if let Some(h) = holes.iter_mut().find(|h| h.1 - h.0 >= l && h.0 + l <= o) {
                moves.push((o, h.0, l, i));
                h.0 += l;
            }
        }
        if moves.is_empty() {
            let end = used
                .iter()
                .map(|&(o, l, _)| o + l)
                .max()
                .unwrap_or(start)
                .max(start);
            v.close_and_truncate(end)?;
            sum.after = end;
            return Ok(sum);
        }
        for &(from, to, l, i) in &moves {
            cancelled(cancel)?;
            file::punch_hole(&v.file, to, l).map_err(|e| v.ioerr("preparing", e))?;
            let mut o = 0;
            while o < l {
                let n = (l - o).min(buf.len() as u64) as usize;
                file::read_at_or_zero(&v.file, &mut buf[..n], from + o)
                    .map_err(|e| v.ioerr("reading", e))?;
                if buf[..n].iter().any(|&x| x != 0) {
                    file::write_at(&v.file, &buf[..n], to + o)
                        .map_err(|e| v.ioerr("writing", e))?;
                }
                o += n as u64;
            }
            let mut st = v.lock_state();
            let e = v.entry(i);
            v.set_entry(&mut st, i, make_entry(entry_state(e), to));
            sum.moved_blocks += 1;
        }
        // Data first, then the BAT through the log (flush does both in order).
        v.flush()?;
        let _ = BITMAP_BLOCK_SIZE;
    }
}

/// Options of [`convert`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Output format; `None` guesses from the destination's extension.
    pub format: Option<ImageFormat>,
    /// VHDX output parameters (type, block size, sector sizes). `size` is ignored.
    pub vhdx: CreateOptions,
}

/// Reads a source image: VHDX natively, raw directly.
enum Source {
    Vhdx(Box<Vhdx>),
    Raw(std::fs::File, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Vhdx(v) => v.size(),
            Source::Raw(_, n) => *n,
        }
    }
    fn read(&self, buf: &mut [u8], off: u64, path: &Path) -> Result<()> {
        match self {
            Source::Vhdx(v) => v.read_at(buf, off),
            Source::Raw(f, _) => {
                file::read_at_or_zero(f, buf, off).map_err(|e| Error::io("reading", path, e))
            }
        }
    }
    /// Ranges that may hold data (the rest reads as zeros).
    fn data_ranges(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        match self {
            Source::Vhdx(v) => {
                let mut out = Vec::new();
                let mut layer = Some(v.as_ref());
                let mut todo = vec![(off, len)];
                while let (Some(l), false) = (layer, todo.is_empty()) {
                    let mut next = Vec::new();
                    for (o, n) in todo {
                        let end = (o + n).min(l.size());
                        if o >= end {
                            continue;
                        }
                        for e in l.block_status(o, end - o)? {
                            match e.state {
                                ExtentState::Data => out.push((e.off, e.len)),
                                ExtentState::FromParent => next.push((e.off, e.len)),
                                _ => {}
                            }
                        }
                    }
                    todo = next;
                    layer = l.parent().map(|p| p.as_ref());
                }
                out.sort_unstable();
                Ok(out)
            }
            Source::Raw(..) => Ok(vec![(off, len)]),
        }
    }
}

/// Converts `src` to `dst` (which must not exist). VHDX and raw are handled
/// natively; qcow2 goes through `qemu-img` and a temporary raw file next to `dst`.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
    cancel: &AtomicBool,
) -> Result<()> {
    let in_fmt = detect_format(src)?;
    let out_fmt = opts
        .format
        .unwrap_or_else(|| match dst.extension().and_then(|e| e.to_str()) {
            Some("vhdx") => ImageFormat::Vhdx,
            Some("qcow2") => ImageFormat::Qcow2,
            _ => ImageFormat::Raw,
        });
    if dst.exists() {
        return Err(Error::InvalidInput(format!(
            "{} already exists",
            dst.display()
        )));
    }
    if in_fmt == ImageFormat::Qcow2 || out_fmt == ImageFormat::Qcow2 {
        let tmp = dst.with_extension("vireo-convert.raw");
        let _ = std::fs::remove_file(&tmp);
        let r = (|| {
            if in_fmt == ImageFormat::Qcow2 {
                qemu_img(&[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    path_str(src)?,
                    path_str(&tmp)?,
                ])?;
                convert(
                    &tmp,
                    dst,
                    &ConvertOptions {
                        format: Some(out_fmt),
                        ..opts.clone()
                    },
                    progress,
                    cancel,
                )
            } else {
                convert(
                    src,
                    &tmp,
                    &ConvertOptions {
                        format: Some(ImageFormat::Raw),
                        ..opts.clone()
                    },
                    progress,
                    cancel,
                )?;
                qemu_img(&[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    path_str(&tmp)?,
                    path_str(dst)?,
                ])
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        return r;
    }
    let source = match in_fmt {
        ImageFormat::Vhdx => {
            Source::Vhdx(Box::new(Vhdx::open(src, OpenOptions { read_only: true })?))
        }
        _ => {
            let f = std::fs::File::open(src).map_err(|e| Error::io("opening", src, e))?;
            let n = f
                .metadata()
                .map_err(|e| Error::io("reading size of", src, e))?
                .len();
            Source::Raw(f, n)
        }
    };
    let size = source.size();
    let r = (|| -> Result<()> {
        match out_fmt {
            ImageFormat::Vhdx => {
                let mut co = opts.vhdx.clone();
                co.size = size;
                if co.disk_type == DiskType::Differencing {
                    return Err(Error::InvalidInput(
                        "convert cannot create a differencing disk".into(),
                    ));
                }
                let out = crate::create::create(dst, &co, &|_, _| {})?;
                copy(&source, src, size, progress, cancel, |buf, off| {
                    out.write_at(buf, off)
                })?;
                out.close()
            }
            _ => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dst)
                    .map_err(|e| Error::io("creating", dst, e))?;
                f.set_len(size).map_err(|e| Error::io("sizing", dst, e))?;
                copy(&source, src, size, progress, cancel, |buf, off| {
                    file::write_at(&f, buf, off).map_err(|e| Error::io("writing", dst, e))
                })?;
                f.sync_all().map_err(|e| Error::io("flushing", dst, e))
            }
        }
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

fn copy(
    s: &Source,
    src: &Path,
    size: u64,
    progress: Progress<'_>,
    cancel: &AtomicBool,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut off = 0;
    while off < size {
        cancelled(cancel)?;
        let n = (size - off).min(COPY_CHUNK as u64);
        for (o, l) in s.data_ranges(off, n)? {
            let b = &mut buf[..l as usize];
            s.read(b, o, src)?;
            // Skip all-zero sectors so the output stays sparse.
            let mut i = 0usize;
            while i < b.len() {
                let j = (i + 4096).min(b.len());
                if b[i..j].iter().any(|&x| x != 0) {
                    let mut k = j;
                    while k < b.len() && b[k..(k + 4096).min(b.len())].iter().any(|&x| x != 0) {
                        k = (k + 4096).min(b.len());
                    }
                    write(&b[i..k], o + i as u64)?;
                    i = k;
                } else {
                    i = j;
                }
            }
        }
        off += n;
        progress(off, size);
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::InvalidInput(format!("{} is not UTF-8", p.display())))
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img").args(args).output().map_err(|e| {
        Error::Tool(format!(
            "cannot run qemu-img ({e}); install qemu-utils (scripts/setup.sh)"
        ))
    })?;
    if !out.status.success() {
        return Err(Error::Tool(format!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
