//! The [`Export`] trait: what the server serves. It knows nothing of image
//! formats; the disk service implements it over VHDX chains, this crate
//! provides [`MemExport`] and [`FileExport`].
//!
//! Methods are synchronous and positional and take `&self`: the server calls
//! them from a bounded set of blocking threads per connection, so several
//! requests of one client run at once and may complete out of order. An
//! implementation must therefore be safe to call concurrently. Small reads
//! and writes are first offered to [`Export::try_read_at`] /
//! [`Export::try_write_at`] on the connection's own task (no thread hop);
//! an export that would have to wait declines and gets the blocking path.

use std::io;

mod file;
mod mem;

pub use file::FileExport;
pub use mem::MemExport;

/// One run of bytes with the same allocation state, as reported by
/// [`Export::block_status`] (the `base:allocation` metadata context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset of the first byte.
    pub offset: u64,
    /// Length in bytes (non-zero).
    pub len: u64,
    /// Not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown content.
    pub fn data(offset: u64, len: u64) -> Extent {
        Extent {
            offset,
            len,
            hole: false,
            zero: false,
        }
    }
    /// Unallocated and reading as zeroes (a sparse hole, an unallocated BAT entry).
    pub fn hole(offset: u64, len: u64) -> Extent {
        Extent {
            offset,
            len,
            hole: true,
            zero: true,
        }
    }
    /// Allocated but known to read as zeroes.
    pub fn zero(offset: u64, len: u64) -> Extent {
        Extent {
            offset,
            len,
            hole: false,
            zero: true,
        }
    }
    /// Offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Abilities of an export, turned into NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportFlags {
    /// Refuse writes, trims and zeroing with `EPERM`.
    pub read_only: bool,
    /// [`Export::trim`] really discards (advertises `NBD_FLAG_SEND_TRIM`).
    pub can_trim: bool,
    /// [`Export::write_zeroes`] honours `fast` (advertises `NBD_FLAG_SEND_FAST_ZERO`).
    pub can_fast_zero: bool,
    /// Flush and FUA on one connection are visible on all connections
    /// (advertises `NBD_FLAG_CAN_MULTI_CONN`).
    pub can_multi_conn: bool,
    /// The medium is rotational (advertises `NBD_FLAG_ROTATIONAL`).
    pub rotational: bool,
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (power of two, 1..=65536).
    pub minimum: u32,
    /// Preferred block size (power of two, at least `minimum`).
    pub preferred: u32,
    /// Maximum payload of one READ or WRITE; the server clamps it to its
    /// own limit.
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// How [`Export::write_zeroes`] may zero a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The range may be deallocated (the client did not send `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// The client asked for a fast zero: if zeroing would be no faster than
    /// writing zeroes, fail at once with [`io::ErrorKind::Unsupported`].
    pub fast: bool,
    /// Persist before returning (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// A block device served over NBD. All offsets are bytes; the server has
/// already checked every range against [`Export::size`].
pub trait Export: Send + Sync + 'static {
    /// Size in bytes, fixed while a client is connected.
    fn size(&self) -> u64;

    /// Abilities; the defaults advertise a writable export without trim.
    fn flags(&self) -> ExportFlags {
        ExportFlags::default()
    }

    /// Block size constraints.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// Human-readable description (`NBD_INFO_DESCRIPTION`).
    fn description(&self) -> Option<String> {
        None
    }

    /// Fills `buf` from `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;

    /// Writes `buf` at `off`; with `fua`, the data is persistent on return.
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()>;

    /// Makes every completed write persistent.
    fn flush(&self) -> io::Result<()>;

    /// Like [`Export::read_at`], but called on the connection's own task for small
    /// requests: it must not wait for a lock or for slow work (return `None` instead and
    /// the server runs [`Export::read_at`] on a blocking thread). Page-cache I/O is fine.
    /// The default always declines.
    fn try_read_at(&self, buf: &mut [u8], off: u64) -> Option<io::Result<()>> {
        let _ = (buf, off);
        None
    }

    /// Like [`Export::write_at`] (never with FUA), under the same rules as
    /// [`Export::try_read_at`]. The default always declines.
    fn try_write_at(&self, buf: &[u8], off: u64) -> Option<io::Result<()>> {
        let _ = (buf, off);
        None
    }

    /// Discards a range (contents afterwards are unspecified). Only called
    /// when [`ExportFlags::can_trim`] is set.
    fn trim(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        let _ = (off, len, fua);
        Ok(())
    }

    /// Makes a range read as zeroes. The default writes zero buffers, and
    /// refuses a fast zero with [`io::ErrorKind::Unsupported`].
    fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        if mode.fast {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        write_zero_buffers(self, off, len)?;
        if mode.fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Allocation status of `[off, off+len)`: contiguous extents starting at
    /// `off`. It may cover less than `len` (the client asks again for the
    /// rest) and extents beyond the range are clipped. The default reports
    /// everything as allocated data.
    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent::data(off, len)])
    }

    /// Hint to prefetch a range (`NBD_CMD_CACHE`); the default does nothing.
    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }
}

/// Writes zeroes over a range with [`Export::write_at`], 1 MiB at a time.
pub fn write_zero_buffers<E: Export + ?Sized>(export: &E, off: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = off;
    let end = off.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        export.write_at(&zeroes[..n], pos, false)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod model_tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Write(u64, u16, u8),
        Trim(u64, u32),
        Zero(u64, u32, bool),
    }

    const SIZE: u64 = 512 << 10;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..SIZE, 1u16..20000, 1u8..=255).prop_map(|(o, l, b)| Step::Write(o, l, b)),
            (0..SIZE, 1u32..200_000).prop_map(|(o, l)| Step::Trim(o, l)),
            (0..SIZE, 1u32..200_000, any::<bool>()).prop_map(|(o, l, t)| Step::Zero(o, l, t)),
        ]
    }

    fn check(e: &dyn Export, steps: &[Step]) -> Result<(), TestCaseError> {
        let mut model = vec![0u8; SIZE as usize];
        for s in steps {
            match *s {
                Step::Write(o, l, b) => {
                    let l = u64::from(l).min(SIZE - o);
                    e.write_at(&vec![b; l as usize], o, false).unwrap();
                    model[o as usize..(o + l) as usize].fill(b);
                }
                Step::Trim(o, l) | Step::Zero(o, l, _) => {
                    let l = u64::from(l).min(SIZE - o);
                    match s {
                        Step::Trim(..) => e.trim(o, l, false).unwrap(),
                        Step::Zero(_, _, t) => e
                            .write_zeroes(
                                o,
                                l,
                                ZeroMode {
                                    may_trim: *t,
                                    fast: false,
                                    fua: true,
                                },
                            )
                            .unwrap(),
                        Step::Write(..) => unreachable!(),
                    }
                    model[o as usize..(o + l) as usize].fill(0);
                }
            }
        }
        let mut back = vec![0u8; SIZE as usize];
        e.read_at(&mut back, 0).unwrap();
        prop_assert!(back == model, "export contents differ from the model");
        // Block status covers the export contiguously and never calls data a hole.
        let ext = e.block_status(0, SIZE).unwrap();
        let mut pos = 0;
        for x in &ext {
            prop_assert_eq!(x.offset, pos);
            if x.zero {
                prop_assert!(model[x.offset as usize..x.end() as usize]
                    .iter()
                    .all(|b| *b == 0));
            }
            pos = x.end();
        }
        prop_assert_eq!(pos, SIZE);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Random writes, trims and zeroes on MemExport match a plain buffer.
        #[test]
        fn mem_export_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
            check(&MemExport::new(SIZE), &steps)?;
        }

        /// The same on FileExport over a sparse temp file.
        #[test]
        fn file_export_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
            let f = tempfile::tempfile().unwrap();
            f.set_len(SIZE).unwrap();
            check(&FileExport::from_file(f, false).unwrap(), &steps)?;
        }
    }
}
