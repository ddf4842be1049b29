//! Region table (MS-VHDX 2.3): where the BAT and the metadata region live.
//!
//! Two copies of 64 KiB at 192 KiB and 256 KiB, each covered by CRC-32C.

use crate::guid::{self, Guid};
use crate::header::{crc_with_zeroed_field, le32, le64};

/// Offsets of the two region tables.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
/// Size of a region table.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
const SIGNATURE: &[u8; 4] = b"regi";
const MAX_ENTRIES: u32 = 2047;

/// Region table errors.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Neither copy has a valid signature, checksum and entry count.
    #[error("neither region table copy is valid")]
    NoValidTable,
    /// A required region this implementation does not know.
    #[error("unknown required region {0}")]
    UnknownRequired(Guid),
    /// A region is missing.
    #[error("the {0} region is missing")]
    Missing(&'static str),
    /// A region appears twice.
    #[error("region {0} appears more than once")]
    Duplicate(Guid),
    /// A region is misaligned, empty, outside the file or overlaps another structure.
    #[error("region {guid} at {offset:#x} length {length:#x} is misaligned, empty, beyond the end of the file or overlaps another region")]
    Layout {
        /// Region.
        guid: Guid,
        /// FileOffset.
        offset: u64,
        /// Length.
        length: u32,
    },
}

/// One region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Offset in the file (1 MiB aligned).
    pub offset: u64,
    /// Length in bytes (multiple of 1 MiB).
    pub length: u32,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }
}

/// The known regions of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionTable {
    /// The block allocation table.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
}

impl RegionTable {
    /// Parses one copy; `None` when its signature, checksum or count is bad.
    pub fn parse_raw(buf: &[u8]) -> Option<Vec<(Guid, Region, bool)>> {
        if buf.len() < REGION_TABLE_SIZE || &buf[..4] != SIGNATURE {
            return None;
        }
        if crc_with_zeroed_field(&buf[..REGION_TABLE_SIZE], 4) != le32(buf, 4) {
            return None;
        }
        let count = le32(buf, 8);
        if count > MAX_ENTRIES {
            return None;
        }
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = &buf[16 + 32 * i..48 + 32 * i];
            let g = Guid::from_slice(&e[..16]);
            let r = Region {
                offset: le64(e, 16),
                length: le32(e, 24),
            };
            out.push((g, r, le32(e, 28) & 1 == 1));
        }
        Some(out)
    }

    /// Parses the first valid copy and checks the layout against `file_len` and
    /// the log region (offset, length).
    pub fn parse(
        copies: [&[u8]; 2],
        file_len: u64,
        log: (u64, u64),
    ) -> Result<RegionTable, RegionError> {
        let entries = copies
            .iter()
            .find_map(|c| RegionTable::parse_raw(c))
            .ok_or(RegionError::NoValidTable)?;
        let (mut bat, mut meta) = (None, None);
        for (g, r, required) in entries {
            let slot = if g == guid::BAT_REGION {
                &mut bat
            } else if g == guid::METADATA_REGION {
                &mut meta
            } else if required {
                return Err(RegionError::UnknownRequired(g));
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(RegionError::Duplicate(g));
            }
            const MIB: u64 = 1 << 20;
            let bad = r.offset % MIB != 0
                || u64::from(r.length) % MIB != 0
                || r.length == 0
                || r.offset < crate::header::HEADER_SECTION_END
                || r.end() > file_len
                || overlaps(r.offset, r.end(), log.0, log.0 + log.1);
            if bad {
                return Err(RegionError::Layout {
                    guid: g,
                    offset: r.offset,
                    length: r.length,
                });
            }
            *slot = Some(r);
        }
        let bat = bat.ok_or(RegionError::Missing("BAT"))?;
        let metadata = meta.ok_or(RegionError::Missing("metadata"))?;
        if overlaps(bat.offset, bat.end(), metadata.offset, metadata.end()) {
            return Err(RegionError::Layout {
                guid: guid::BAT_REGION,
                offset: bat.offset,
                length: bat.length,
            });
        }
        Ok(RegionTable { bat, metadata })
    }

    /// Serializes one 64 KiB copy.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(SIGNATURE);
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (g, r)) in [
            (guid::BAT_REGION, self.bat),
            (guid::METADATA_REGION, self.metadata),
        ]
        .iter()
        .enumerate()
        {
            let e = &mut b[16 + 32 * i..48 + 32 * i];
            e[..16].copy_from_slice(&g.0);
            e[16..24].copy_from_slice(&r.offset.to_le_bytes());
            e[24..28].copy_from_slice(&r.length.to_le_bytes());
            e[28..32].copy_from_slice(&1u32.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// True when `[a0, a1)` and `[b0, b1)` intersect.
pub(crate) fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table round-trips and layout errors are caught.
    #[test]
    fn roundtrip_and_layout() {
        let t = RegionTable {
            bat: Region {
                offset: 3 << 20,
                length: 1 << 20,
            },
            metadata: Region {
                offset: 2 << 20,
                length: 1 << 20,
            },
        };
        let b = t.to_bytes();
        assert_eq!(
            RegionTable::parse([&b, &b], 4 << 20, (1 << 20, 1 << 20)).unwrap(),
            t
        );
        assert!(matches!(
            RegionTable::parse([&b, &b], 3 << 20, (1 << 20, 1 << 20)),
            Err(RegionError::Layout { .. })
        ));
        assert!(matches!(
            RegionTable::parse([&b, &b], 8 << 20, (2 << 20, 1 << 20)),
            Err(RegionError::Layout { .. })
        ));
        let zero = vec![0u8; REGION_TABLE_SIZE];
        assert!(matches!(
            RegionTable::parse([&zero, &zero], 8 << 20, (1 << 20, 1 << 20)),
            Err(RegionError::NoValidTable)
        ));
    }
}
