//! In-memory sparse export, for tests and scratch disks.

use std::io;
use std::sync::{PoisonError, RwLock};

use super::{Export, ExportFlags, Extent, ZeroMode};

const CHUNK: u64 = 64 << 10;

/// A sparse in-memory export: memory is used only for 64 KiB chunks that
/// were written; untouched and trimmed chunks are reported as holes.
pub struct MemExport {
    size: u64,
    read_only: bool,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl MemExport {
    /// A writable, all-zero export of `size` bytes.
    pub fn new(size: u64) -> MemExport {
        let n = size.div_ceil(CHUNK) as usize;
        MemExport {
            size,
            read_only: false,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
        }
    }

    /// An export with the given contents (its size is `data.len()`).
    pub fn from_bytes(data: &[u8], read_only: bool) -> MemExport {
        let mut m = MemExport::new(data.len() as u64);
        // Cannot fail: the range is inside the export.
        for (i, part) in data.chunks(CHUNK as usize).enumerate() {
            if part.iter().any(|b| *b != 0) {
                let mut c = vec![0u8; CHUNK as usize].into_boxed_slice();
                c[..part.len()].copy_from_slice(part);
                m.chunks[i] = RwLock::new(Some(c));
            }
        }
        m.read_only = read_only;
        m
    }

    /// Marks the export read-only.
    pub fn read_only(mut self) -> MemExport {
        self.read_only = true;
        self
    }

    /// Bytes of memory held by allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| c.read().unwrap_or_else(PoisonError::into_inner).is_some())
            .count() as u64
            * CHUNK
    }

    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Calls `f(chunk index, offset in chunk, range in caller's buffer)` for
    /// each chunk piece of `[off, off+len)`.
    fn pieces(off: u64, len: u64, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let idx = (pos / CHUNK) as usize;
            let in_chunk = (pos % CHUNK) as usize;
            let n = (CHUNK - pos % CHUNK).min(end - pos) as usize;
            let b = (pos - off) as usize;
            f(idx, in_chunk, b..b + n);
            pos += n as u64;
        }
    }

    fn zero_range(&self, off: u64, len: u64, dealloc: bool) {
        Self::pieces(off, len, |idx, in_chunk, r| {
            let mut c = self.chunks[idx]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if dealloc && r.len() as u64 == CHUNK {
                *c = None;
            } else if let Some(data) = c.as_mut() {
                data[in_chunk..in_chunk + r.len()].fill(0);
            } else if !dealloc {
                *c = Some(vec![0u8; CHUNK as usize].into_boxed_slice());
            }
        });
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags {
            read_only: self.read_only,
            can_trim: true,
            can_fast_zero: true,
            can_multi_conn: true,
            rotational: false,
        }
    }

    fn description(&self) -> Option<String> {
        Some("in-memory export".into())
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(off, buf.len() as u64)?;
        Self::pieces(off, buf.len() as u64, |idx, in_chunk, r| {
            let c = self.chunks[idx]
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match c.as_ref() {
                Some(data) => buf[r.clone()].copy_from_slice(&data[in_chunk..in_chunk + r.len()]),
                None => buf[r].fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64, _fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check(off, buf.len() as u64)?;
        Self::pieces(off, buf.len() as u64, |idx, in_chunk, r| {
            let mut c = self.chunks[idx]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let data = c.get_or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            data[in_chunk..in_chunk + r.len()].copy_from_slice(&buf[r]);
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, off: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check(off, len)?;
        self.zero_range(off, len, true);
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        self.check(off, len)?;
        self.zero_range(off, len, mode.may_trim);
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(off, len)?;
        let mut out: Vec<Extent> = Vec::new();
        Self::pieces(off, len, |idx, _in_chunk, r| {
            let allocated = self.chunks[idx]
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some();
            let e_off = off + r.start as u64;
            let e = if allocated {
                Extent::data(e_off, r.len() as u64)
            } else {
                Extent::hole(e_off, r.len() as u64)
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
                _ => out.push(e),
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_write_read_trim() {
        let m = MemExport::new(1 << 20);
        m.write_at(&[7u8; 100], 65_500, false).unwrap();
        let mut b = vec![0u8; 200];
        m.read_at(&mut b, 65_450).unwrap();
        assert!(b[..50].iter().all(|x| *x == 0));
        assert!(b[50..150].iter().all(|x| *x == 7));
        assert_eq!(m.allocated_bytes(), 2 * CHUNK);
        let ext = m.block_status(0, 1 << 20).unwrap();
        assert_eq!(ext[0], Extent::data(0, 2 * CHUNK));
        assert_eq!(ext[1], Extent::hole(2 * CHUNK, (1 << 20) - 2 * CHUNK));
        m.trim(0, 2 * CHUNK, false).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
        assert!(m.read_at(&mut b, (1 << 20) - 10).is_err());
    }
}
