//! The replication cycle: the changed grains of every disk of a VM cut at one instant,
//! compressed with LZ4 (lz4_flex: pure Rust, no C toolchain, ~GB/s per core, so continuous
//! mode is bounded by the network rather than the CPU; zstd compresses better but costs
//! several times the CPU per byte).
//!
//! ```text
//!  "VRPCYC01" | header_len u32 | header (JSON, CycleHeader)
//!  record*:   tag u8 (1 = data, 2 = zeros) | disk u32 | off u64 | len u32
//!             data only: clen u32 | crc32c(plain) u32 | LZ4 block (clen bytes)
//!  end:       tag 0xFF | records u64 | crc32c of every byte before this field u32
//! ```
//! All integers little endian. [`read_cycle`] validates everything (bounds, sizes,
//! checksums, the end record) before returning a single block, so a truncated or damaged
//! cycle is refused whole and nothing of it is applied.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

const MAGIC: &[u8; 8] = b"VRPCYC01";
const TAG_DATA: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_END: u8 = 0xFF;
/// Largest block in a cycle.
pub const MAX_BLOCK: u32 = 4 << 20;
/// Largest header accepted.
const MAX_HEADER: u32 = 1 << 20;
/// Most records accepted in one cycle.
const MAX_RECORDS: u64 = 1 << 26;

/// What a cycle is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CycleHeader {
    /// The replicated VM (uuid or name).
    pub vm: String,
    /// Sequence number; a replica applies cycle `n` only on point `n - 1`.
    pub seq: u64,
    /// Unix milliseconds of the cut.
    pub cut_unix_ms: u64,
    /// Size of each disk in bytes (index = disk index).
    pub disk_sizes: Vec<u64>,
    /// A partial cycle (initial replication in chunks): no common cut, applied in place
    /// into the base, not a recovery point.
    #[serde(default)]
    pub partial: bool,
    /// Cut with the guest's file systems frozen through its agent (application-consistent).
    /// Left out when false, so replicas that predate it accept crash-consistent cycles.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub app_consistent: bool,
}

/// One changed range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Disk index.
    pub disk: u32,
    /// Offset in the disk.
    pub off: u64,
    /// The data; `None` when the range is all zeros.
    pub data: Option<Vec<u8>>,
    /// Length (of `data` when present).
    pub len: u32,
}

/// Why a cycle was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CycleError {
    /// Reading or writing the stream failed.
    #[error("cycle stream")]
    Io(#[source] io::Error),
    /// The bytes are not a valid cycle.
    #[error("invalid replication cycle: {0}")]
    Invalid(String),
}

impl From<io::Error> for CycleError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            CycleError::Invalid("the cycle is truncated".into())
        } else {
            CycleError::Io(e)
        }
    }
}

fn bad(s: impl Into<String>) -> CycleError {
    CycleError::Invalid(s.into())
}

/// Writes a cycle, computing the running checksum.
pub struct CycleWriter<W: Write> {
    w: W,
    crc: u32,
    records: u64,
    disk_sizes: Vec<u64>,
    /// Bytes written so far.
    pub bytes: u64,
    /// Plain bytes of data blocks.
    pub plain_bytes: u64,
}

impl<W: Write> CycleWriter<W> {
    /// Starts a cycle with `header`.
    pub fn new(w: W, header: &CycleHeader) -> Result<Self, CycleError> {
        let h = serde_json::to_vec(header).map_err(|e| bad(e.to_string()))?;
        let mut cw = CycleWriter {
            w,
            crc: 0,
            records: 0,
            disk_sizes: header.disk_sizes.clone(),
            bytes: 0,
            plain_bytes: 0,
        };
        cw.put(MAGIC)?;
        cw.put(&(h.len() as u32).to_le_bytes())?;
        cw.put(&h)?;
        Ok(cw)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CycleError> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        self.w.write_all(b).map_err(CycleError::Io)
    }

    /// Adds `data` of disk `disk` at `off` (all-zero data is sent as a zero record).
    pub fn add(&mut self, disk: u32, off: u64, data: &[u8]) -> Result<(), CycleError> {
        let size = self
            .disk_sizes
            .get(disk as usize)
            .copied()
            .ok_or_else(|| bad(format!("no disk {disk}")))?;
        if data.is_empty() || data.len() > MAX_BLOCK as usize {
            return Err(bad(format!("block of {} bytes", data.len())));
        }
        if !matches!(off.checked_add(data.len() as u64), Some(e) if e <= size) {
            return Err(bad(format!(
                "block at {off:#x} past the end of disk {disk}"
            )));
        }
        let zero = is_zero(data);
        self.put(&[if zero { TAG_ZERO } else { TAG_DATA }])?;
        self.put(&disk.to_le_bytes())?;
        self.put(&off.to_le_bytes())?;
        self.put(&(data.len() as u32).to_le_bytes())?;
        if !zero {
            let c = lz4_flex::block::compress(data);
            self.put(&(c.len() as u32).to_le_bytes())?;
            self.put(&crc32c::crc32c(data).to_le_bytes())?;
            self.put(&c)?;
            self.plain_bytes += data.len() as u64;
        }
        self.records += 1;
        Ok(())
    }

    /// Writes the end record and returns the inner writer.
    pub fn finish(mut self) -> Result<W, CycleError> {
        self.put(&[TAG_END])?;
        let n = self.records.to_le_bytes();
        self.put(&n)?;
        let crc = self.crc.to_le_bytes();
        self.w.write_all(&crc).map_err(CycleError::Io)?;
        self.bytes += 4;
        self.w.flush().map_err(CycleError::Io)?;
        Ok(self.w)
    }
}

/// Whether `data` is all zeros: compared with a zero buffer (memcmp, vectorised), several
/// times faster than a byte loop; initial replication of a sparse disk is mostly this.
fn is_zero(data: &[u8]) -> bool {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

struct Crc<R> {
    r: R,
    crc: u32,
}

impl<R: Read> Crc<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>, CycleError> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        self.crc = crc32c::crc32c_append(self.crc, &b);
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, CycleError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CycleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, CycleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Reads a cycle record by record, validating as it goes: each record's bounds, size,
/// decompression and checksum before it is returned, the end record's count and the
/// checksum of the whole cycle at [`CycleReader::next_block`]'s `None`. A caller that
/// acts on blocks before the end must be able to forget them when a later error comes
/// (the replica writes partial cycles in place, and complete ones into layers that become
/// a point only after the end validated).
pub struct CycleReader<R: Read> {
    c: Crc<R>,
    header: CycleHeader,
    records: u64,
    done: bool,
}

impl<R: Read> CycleReader<R> {
    /// Reads and checks the magic and the header.
    pub fn new(r: R) -> Result<Self, CycleError> {
        let mut c = Crc { r, crc: 0 };
        if c.take(8)? != MAGIC {
            return Err(bad("not a Vireo replication cycle (bad magic)"));
        }
        let hl = c.u32()?;
        if hl > MAX_HEADER {
            return Err(bad(format!("header of {hl} bytes")));
        }
        let header: CycleHeader = serde_json::from_slice(&c.take(hl as usize)?)
            .map_err(|e| bad(format!("header: {e}")))?;
        Ok(CycleReader {
            c,
            header,
            records: 0,
            done: false,
        })
    }

    /// The cycle's header.
    pub fn header(&self) -> &CycleHeader {
        &self.header
    }

    /// The next validated block, or `None` once the end record and the cycle's checksum
    /// have been checked (only then is the cycle known to be whole).
    pub fn next_block(&mut self) -> Result<Option<Block>, CycleError> {
        if self.done {
            return Ok(None);
        }
        let c = &mut self.c;
        let tag = c.u8()?;
        if tag == TAG_END {
            let n = c.u64()?;
            let want = c.crc;
            let mut b = [0u8; 4];
            c.r.read_exact(&mut b)?;
            if n != self.records {
                return Err(bad(format!(
                    "end record counts {n} records, found {}",
                    self.records
                )));
            }
            if u32::from_le_bytes(b) != want {
                return Err(bad("the cycle fails its checksum"));
            }
            self.done = true;
            return Ok(None);
        }
        if tag != TAG_DATA && tag != TAG_ZERO {
            return Err(bad(format!("unknown record tag {tag:#x}")));
        }
        if self.records >= MAX_RECORDS {
            return Err(bad("too many records"));
        }
        let disk = c.u32()?;
        let off = c.u64()?;
        let len = c.u32()?;
        let size = self
            .header
            .disk_sizes
            .get(disk as usize)
            .copied()
            .ok_or_else(|| {
                bad(format!(
                    "record for disk {disk}, the VM has {}",
                    self.header.disk_sizes.len()
                ))
            })?;
        if len == 0 || len > MAX_BLOCK {
            return Err(bad(format!("record of {len} bytes")));
        }
        if !matches!(off.checked_add(u64::from(len)), Some(e) if e <= size) {
            return Err(bad(format!(
                "record at {off:#x} (+{len}) past the end of disk {disk}"
            )));
        }
        let data = if tag == TAG_DATA {
            let clen = c.u32()?;
            if clen as usize > lz4_flex::block::get_maximum_output_size(len as usize) {
                return Err(bad(format!("compressed length {clen} for {len} bytes")));
            }
            let crc = c.u32()?;
            let comp = c.take(clen as usize)?;
            let plain = lz4_flex::block::decompress(&comp, len as usize)
                .map_err(|e| bad(format!("record at {off:#x}: {e}")))?;
            if plain.len() != len as usize || crc32c::crc32c(&plain) != crc {
                return Err(bad(format!(
                    "record at {off:#x} of disk {disk} fails its checksum"
                )));
            }
            Some(plain)
        } else {
            None
        };
        self.records += 1;
        Ok(Some(Block {
            disk,
            off,
            data,
            len,
        }))
    }
}

/// Reads and fully validates a cycle. Nothing is returned unless every record is well
/// formed, inside its disk, decompresses to its stated length and checksum, and the end
/// record's count and checksum match.
pub fn read_cycle(r: impl Read) -> Result<(CycleHeader, Vec<Block>), CycleError> {
    let mut cr = CycleReader::new(r)?;
    let mut blocks = Vec::new();
    while let Some(b) = cr.next_block()? {
        blocks.push(b);
    }
    Ok((cr.header, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let h = CycleHeader {
            vm: "vm1".into(),
            seq: 3,
            cut_unix_ms: 1,
            disk_sizes: vec![1 << 20, 2 << 20],
            partial: false,
            app_consistent: false,
        };
        let mut w = CycleWriter::new(Vec::new(), &h).unwrap();
        w.add(0, 0, &[7u8; 65536]).unwrap();
        w.add(1, 65536, &[0u8; 65536]).unwrap();
        w.add(1, (2 << 20) - 10, b"0123456789").unwrap();
        assert!(w.add(2, 0, b"x").is_err());
        assert!(w.add(0, 1 << 20, b"x").is_err());
        w.finish().unwrap()
    }

    /// A cycle reads back as written; zero ranges carry no payload; LZ4 shrinks repeats.
    #[test]
    fn round_trip() {
        let b = sample();
        assert!(b.len() < 2000, "{} bytes", b.len());
        let (h, blocks) = read_cycle(&b[..]).unwrap();
        assert_eq!(h.seq, 3);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0].data.as_deref(), Some(&[7u8; 65536][..]));
        assert_eq!(blocks[1].data, None);
        assert_eq!(blocks[1].len, 65536);
        assert_eq!(blocks[2].data.as_deref(), Some(&b"0123456789"[..]));
    }

    /// Every truncation and every single-byte corruption is refused.
    #[test]
    fn damaged_cycles_are_refused() {
        let b = sample();
        for cut in 0..b.len() {
            assert!(
                read_cycle(&b[..cut]).is_err(),
                "truncated at {cut} accepted"
            );
        }
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x41;
            assert!(read_cycle(&d[..]).is_err(), "corruption at {i} accepted");
        }
        let e = read_cycle(&b"hello world, not a cycle"[..]).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
