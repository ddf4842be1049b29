//! File type identifier and the two VHDX headers (MS-VHDX 2.2).
//!
//! The identifier sits at offset 0; headers at 64 KiB and 128 KiB, each 4 KiB
//! covered by CRC-32C. The valid header with the larger sequence number is current.
//! Updates write the non-current slot and flush, twice, so both copies end up equal
//! in content and a torn write never loses the current header.

use crate::guid::Guid;

/// Offset of the file type identifier.
pub const FILE_ID_OFFSET: u64 = 0;
/// Offsets of header 1 and header 2.
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
/// Bytes covered by a header checksum.
pub const HEADER_SIZE: usize = 4096;
/// Signature of the file type identifier.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Offset of the first byte after the header section (region tables and reserved space).
pub const HEADER_SECTION_END: u64 = 1024 * 1024;

/// Header errors.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The file does not start with `vhdxfile`.
    #[error("not a VHDX file (no 'vhdxfile' signature at offset 0)")]
    NotVhdx,
    /// Neither header has a valid signature and checksum.
    #[error("neither header has a valid signature and CRC-32C")]
    NoValidHeader,
    /// The header version is not 1.
    #[error("unsupported header version {0}")]
    Version(u16),
    /// The log version is not 0.
    #[error("unsupported log version {0}")]
    LogVersion(u16),
    /// The log location is not aligned or is inside the header section.
    #[error("log region offset {offset:#x} length {length:#x} is not 1 MiB aligned or overlaps the header section")]
    LogLayout {
        /// LogOffset.
        offset: u64,
        /// LogLength.
        length: u32,
    },
}

/// One VHDX header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// SequenceNumber: the larger valid one is current.
    pub sequence: u64,
    /// Changed on the first modification of the file after open.
    pub file_write_guid: Guid,
    /// Changed on the first change of the virtual disk's content after open.
    pub data_write_guid: Guid,
    /// Non-zero while the log may hold entries to replay.
    pub log_guid: Guid,
    /// LogVersion (0).
    pub log_version: u16,
    /// Version (1).
    pub version: u16,
    /// Length of the log region.
    pub log_length: u32,
    /// Offset of the log region.
    pub log_offset: u64,
}

impl Header {
    /// Parses and checks signature and checksum; returns `None` for an invalid slot.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        if buf.len() < HEADER_SIZE || &buf[0..4] != HEADER_SIGNATURE {
            return None;
        }
        let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if crc_with_zeroed_field(&buf[..HEADER_SIZE], 4) != stored {
            return None;
        }
        Some(Header {
            sequence: le64(buf, 8),
            file_write_guid: Guid::from_slice(&buf[16..32]),
            data_write_guid: Guid::from_slice(&buf[32..48]),
            log_guid: Guid::from_slice(&buf[48..64]),
            log_version: u16::from_le_bytes([buf[64], buf[65]]),
            version: u16::from_le_bytes([buf[66], buf[67]]),
            log_length: u32::from_le_bytes([buf[68], buf[69], buf[70], buf[71]]),
            log_offset: le64(buf, 72),
        })
    }

    /// Checks the fields a reader depends on.
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.version != 1 {
            return Err(HeaderError::Version(self.version));
        }
        if self.log_version != 0 {
            return Err(HeaderError::LogVersion(self.log_version));
        }
        const MIB: u64 = 1024 * 1024;
        if self.log_offset % MIB != 0
            || self.log_offset < HEADER_SECTION_END
            || u64::from(self.log_length) % MIB != 0
            || self.log_length == 0
        {
            return Err(HeaderError::LogLayout {
                offset: self.log_offset,
                length: self.log_length,
            });
        }
        Ok(())
    }

    /// Serializes into a 4 KiB block with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Picks the current header: the valid one with the larger sequence number.
/// Returns its slot index (0 or 1).
pub fn select(h: [Option<Header>; 2]) -> Result<(usize, Header), HeaderError> {
    match h {
        [Some(a), Some(b)] => Ok(if b.sequence > a.sequence {
            (1, b)
        } else {
            (0, a)
        }),
        [Some(a), None] => Ok((0, a)),
        [None, Some(b)] => Ok((1, b)),
        [None, None] => Err(HeaderError::NoValidHeader),
    }
}

/// Builds the 64 KiB file type identifier.
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    b
}

/// Checks the identifier signature and returns the creator string.
pub fn parse_file_identifier(buf: &[u8]) -> Result<String, HeaderError> {
    if buf.len() < 8 + 512 || &buf[..8] != FILE_SIGNATURE {
        return Err(HeaderError::NotVhdx);
    }
    let units: Vec<u16> = buf[8..8 + 512]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

/// CRC-32C of `buf` with the 4-byte field at `field` taken as zero.
pub(crate) fn crc_with_zeroed_field(buf: &[u8], field: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..field]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[field + 4..])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A serialized header parses back; a flipped bit invalidates it; selection
    /// prefers the higher sequence number.
    #[test]
    fn header_roundtrip_and_select() {
        let h = Header {
            sequence: 7,
            file_write_guid: Guid::new_random(),
            data_write_guid: Guid::new_random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b), Some(h));
        h.validate().unwrap();
        b[100] ^= 1;
        assert_eq!(Header::parse(&b), None);
        let h2 = Header { sequence: 8, ..h };
        assert_eq!(select([Some(h), Some(h2)]).unwrap().0, 1);
        assert!(select([None, None]).is_err());
        assert_eq!(
            parse_file_identifier(&file_identifier("vireo")).unwrap(),
            "vireo"
        );
    }
}
