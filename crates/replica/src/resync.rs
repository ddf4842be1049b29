//! Checksum resync: when the primary's change tracking cannot say what differs from the
//! replica (a tracker file that could not be trusted after a crash, or an old primary
//! whose disks diverged after an unplanned failover), both sides compare a SHA-256 of
//! every [`SUM_BLOCK`] of every disk and only the blocks whose sums differ are shipped.
//!
//! ```text
//!  replica:  sums of its latest point (or the base it seeds) -> "VRPSUM01" file
//!  primary:  change tracking attached FIRST, then sums of its live disks, compared;
//!            differing blocks marked in the trackers (persisted, resync flag cleared)
//!  then:     ordinary cycles ship the marked grains (and whatever the guest wrote since
//!            tracking was attached)
//! ```
//!
//! Why this is exact: tracking is recording before the primary reads a block for its sum.
//! A block whose sum matched and that the guest writes afterwards (or while it was read)
//! is marked by tracking; a block that is never written again equals the replica's. So
//! the marked set is a superset of what differs at the next cut, and the replica's point
//! after that cycle is byte-identical to the primary's disks at the cut.
//!
//! Sums file (little endian):
//! ```text
//!  "VRPSUM01" | block u64 | disks u32 | per disk: size u64 | sha256 (32 bytes) per block
//!  crc32c of every byte before it u32
//! ```

use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};
use storage::tracking::TrackedDisk;

/// Unit of the checksum compare (bytes).
pub const SUM_BLOCK: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"VRPSUM01";
/// Largest disk count in a sums file.
const MAX_DISKS: u32 = 256;

/// What went wrong in a resync.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResyncError {
    /// Reading a disk or an image failed.
    #[error("reading {what} at {off:#x}")]
    Read {
        /// The disk or image.
        what: String,
        /// Offset.
        off: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening an image failed.
    #[error("opening {path}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<vhdx::Error>,
    },
    /// The sums are damaged or do not describe these disks.
    #[error("checksum resync: {0}")]
    Invalid(String),
    /// Persisting the differing blocks in a tracker failed.
    #[error("marking the differing blocks")]
    Tracking(#[source] storage::tracking::TrackingError),
}

impl ResyncError {
    /// The class of this error.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            ResyncError::Invalid(_) => crate::ErrorKind::InvalidInput,
            _ => crate::ErrorKind::Io,
        }
    }
}

/// The sums of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSums {
    /// Disk size in bytes.
    pub size: u64,
    /// SHA-256 of each block (the last one may be short).
    pub sums: Vec<[u8; 32]>,
}

/// The sums of every disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    /// Block size.
    pub block: u64,
    /// Per disk, in disk order.
    pub disks: Vec<DiskSums>,
}

/// Figures of a compare.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncStats {
    /// Blocks compared (all disks).
    pub blocks: u64,
    /// Blocks whose sums differ (marked for the next cycles).
    pub differing_blocks: u64,
    /// Bytes those blocks hold.
    pub differing_bytes: u64,
    /// Bytes read on this side to compute the sums.
    pub bytes_read: u64,
}

/// Sums of a disk of `size` bytes read by `read(off, buf)`.
pub fn sums_of(
    size: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    what: &str,
) -> Result<DiskSums, ResyncError> {
    let mut sums = Vec::with_capacity(size.div_ceil(SUM_BLOCK) as usize);
    let mut buf = vec![0u8; SUM_BLOCK as usize];
    let mut off = 0;
    while off < size {
        let n = SUM_BLOCK.min(size - off) as usize;
        read(off, &mut buf[..n]).map_err(|source| ResyncError::Read {
            what: what.to_string(),
            off,
            source,
        })?;
        sums.push(Sha256::digest(&buf[..n]).into());
        off += n as u64;
    }
    Ok(DiskSums { size, sums })
}

/// Sums of VHDX images (each opened read-only with its parents): the replica's point.
pub fn sums_of_images(paths: &[PathBuf]) -> Result<Sums, ResyncError> {
    let mut disks = Vec::new();
    for p in paths {
        let v = vhdx::Vhdx::open(p, vhdx::OpenOptions { read_only: true }).map_err(|e| {
            ResyncError::Image {
                path: p.clone(),
                source: Box::new(e),
            }
        })?;
        let what = p.display().to_string();
        disks.push(sums_of(
            v.size(),
            |off, buf| v.read_at(buf, off).map_err(io::Error::other),
            &what,
        )?);
    }
    Ok(Sums {
        block: SUM_BLOCK,
        disks,
    })
}

impl Sums {
    /// The sums file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.block.to_le_bytes());
        b.extend_from_slice(&(self.disks.len() as u32).to_le_bytes());
        for d in &self.disks {
            b.extend_from_slice(&d.size.to_le_bytes());
            for s in &d.sums {
                b.extend_from_slice(s);
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a sums file (magic, block size, counts, checksum).
    pub fn decode(b: &[u8]) -> Result<Sums, ResyncError> {
        let bad = |s: &str| ResyncError::Invalid(format!("sums: {s}"));
        if b.len() < 24 || &b[..8] != MAGIC {
            return Err(bad("not a Vireo sums file"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let mut c = [0u8; 4];
        c.copy_from_slice(crc);
        if crc32c::crc32c(body) != u32::from_le_bytes(c) {
            return Err(bad("the file fails its checksum"));
        }
        let u64_at = |o: usize| -> Option<u64> {
            body.get(o..o + 8).map(|s| {
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                u64::from_le_bytes(a)
            })
        };
        let block = u64_at(8).ok_or_else(|| bad("truncated"))?;
        if block != SUM_BLOCK {
            return Err(bad(&format!(
                "block size {block}, this build compares {SUM_BLOCK}"
            )));
        }
        let mut n = [0u8; 4];
        n.copy_from_slice(&body[16..20]);
        let ndisks = u32::from_le_bytes(n);
        if ndisks > MAX_DISKS {
            return Err(bad(&format!("{ndisks} disks")));
        }
        let mut o = 20usize;
        let mut disks = Vec::new();
        for _ in 0..ndisks {
            let size = u64_at(o).ok_or_else(|| bad("truncated"))?;
            o += 8;
            let count = size.div_ceil(block);
            let len = count
                .checked_mul(32)
                .and_then(|l| usize::try_from(l).ok())
                .ok_or_else(|| bad("disk too large"))?;
            let s = body
                .get(o..o.saturating_add(len))
                .ok_or_else(|| bad("truncated"))?;
            o += len;
            let sums = s
                .chunks_exact(32)
                .map(|c| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(c);
                    a
                })
                .collect();
            disks.push(DiskSums { size, sums });
        }
        if o != body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Sums { block, disks })
    }

    /// The byte ranges of each disk whose sums differ from `other`'s (same disk count and
    /// sizes required).
    pub fn differing(&self, other: &Sums) -> Result<Vec<Vec<(u64, u64)>>, ResyncError> {
        let sizes = |s: &Sums| s.disks.iter().map(|d| d.size).collect::<Vec<_>>();
        if self.block != other.block || sizes(self) != sizes(other) {
            return Err(ResyncError::Invalid(format!(
                "the disks differ: {:?} here, {:?} there",
                sizes(self),
                sizes(other)
            )));
        }
        Ok(self
            .disks
            .iter()
            .zip(&other.disks)
            .map(|(a, b)| {
                let mut ranges: Vec<(u64, u64)> = Vec::new();
                for (i, (x, y)) in a.sums.iter().zip(&b.sums).enumerate() {
                    if x == y {
                        continue;
                    }
                    let off = i as u64 * self.block;
                    let len = self.block.min(a.size - off);
                    match ranges.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += len,
                        _ => ranges.push((off, len)),
                    }
                }
                ranges
            })
            .collect())
    }
}

/// Primary side: computes the sums of the tracked (live) disks, compares them with the
/// replica's `remote` sums and marks the differing blocks in the trackers, clearing their
/// resync flag (see the module doc: tracking must be attached before this is called).
pub fn mark_differences(disks: &[TrackedDisk], remote: &Sums) -> Result<ResyncStats, ResyncError> {
    use nbd::Export;
    let mut local = Sums {
        block: SUM_BLOCK,
        disks: Vec::new(),
    };
    let mut st = ResyncStats::default();
    for (i, d) in disks.iter().enumerate() {
        let size = d.chain.size();
        local.disks.push(sums_of(
            size,
            |off, buf| d.chain.read_at(buf, off),
            &format!("disk {i}"),
        )?);
        st.bytes_read += size;
    }
    let diff = local.differing(remote)?;
    for (d, ranges) in disks.iter().zip(&diff) {
        d.tracker
            .mark_resynced(ranges)
            .map_err(ResyncError::Tracking)?;
        st.differing_blocks += ranges
            .iter()
            .map(|(_, l)| l.div_ceil(SUM_BLOCK))
            .sum::<u64>();
        st.differing_bytes += ranges.iter().map(|(_, l)| l).sum::<u64>();
    }
    st.blocks = local.disks.iter().map(|d| d.sums.len() as u64).sum();
    tracing::info!(
        blocks = st.blocks,
        differing = st.differing_blocks,
        "checksum resync: differing blocks marked"
    );
    Ok(st)
}

/// Writes `sums` to `path` (temp file, fsync, rename).
pub fn save_sums(path: &Path, sums: &Sums) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, sums.encode())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(data: &[u8]) -> Sums {
        Sums {
            block: SUM_BLOCK,
            disks: vec![sums_of(
                data.len() as u64,
                |o, b| {
                    b.copy_from_slice(&data[o as usize..o as usize + b.len()]);
                    Ok(())
                },
                "t",
            )
            .unwrap()],
        }
    }

    /// Encode/decode round trip; any damage or truncation is refused; differing ranges
    /// are merged and the short last block counts its own length.
    #[test]
    fn sums_round_trip_and_diff() {
        let a = vec![1u8; (3 * SUM_BLOCK + 100) as usize];
        let mut b = a.clone();
        b[10] = 2;
        b[(SUM_BLOCK + 5) as usize] = 2;
        b[(3 * SUM_BLOCK + 50) as usize] = 2;
        let (sa, sb) = (sums(&a), sums(&b));
        let enc = sa.encode();
        assert_eq!(Sums::decode(&enc).unwrap(), sa);
        for cut in 0..enc.len() {
            assert!(Sums::decode(&enc[..cut]).is_err(), "truncated at {cut}");
        }
        for i in (0..enc.len()).step_by(7) {
            let mut d = enc.clone();
            d[i] ^= 0x10;
            assert!(Sums::decode(&d).is_err(), "damage at {i}");
        }
        let diff = sa.differing(&sb).unwrap();
        assert_eq!(diff, vec![vec![(0, 2 * SUM_BLOCK), (3 * SUM_BLOCK, 100)]]);
        let other = sums(&a[..SUM_BLOCK as usize]);
        assert!(sa.differing(&other).is_err());
    }
}
