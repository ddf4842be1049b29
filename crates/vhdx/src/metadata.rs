//! Metadata region (MS-VHDX 2.6): table plus the known items (file parameters,
//! virtual disk size, page 83 data, logical/physical sector size, parent locator).

use crate::guid::{self, Guid};
use crate::header::{le32, le64};

/// Size of the metadata table at the start of the region.
pub const TABLE_SIZE: usize = 64 * 1024;
const SIGNATURE: &[u8; 8] = b"metadata";
const MAX_ENTRIES: usize = 2047;
/// Largest virtual disk size the format allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Smallest and largest block sizes.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest metadata item accepted (a parent locator is a few KiB).
const MAX_ITEM_LEN: u32 = 1 << 20;

const FLAG_USER: u32 = 1;
const FLAG_VIRTUAL_DISK: u32 = 2;
const FLAG_REQUIRED: u32 = 4;

/// Metadata errors.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// Missing "metadata" signature or too many entries.
    #[error("metadata table has a bad signature or entry count")]
    Table,
    /// An item lies outside the region, inside the table, or is too large.
    #[error("metadata item {guid} at {offset:#x} length {length:#x} does not fit the region")]
    ItemLayout {
        /// Item.
        guid: Guid,
        /// Offset in the region.
        offset: u32,
        /// Length.
        length: u32,
    },
    /// A required item this implementation does not know.
    #[error("unknown required metadata item {0}")]
    UnknownRequired(Guid),
    /// A required item is missing or has the wrong length.
    #[error("metadata item {0} is missing or malformed")]
    Missing(&'static str),
    /// A field has a value the format forbids.
    #[error("{field} has invalid value {value}")]
    Value {
        /// Field.
        field: &'static str,
        /// Value found.
        value: u64,
    },
}

/// A metadata table entry.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Item id.
    pub guid: Guid,
    /// Offset of the item from the start of the region.
    pub offset: u32,
    /// Item length.
    pub length: u32,
    /// Flags: IsUser, IsVirtualDisk, IsRequired.
    pub flags: u32,
}

/// Parses the 64 KiB table.
pub fn parse_table(buf: &[u8], region_len: u32) -> Result<Vec<Entry>, MetadataError> {
    if buf.len() < TABLE_SIZE || &buf[..8] != SIGNATURE {
        return Err(MetadataError::Table);
    }
    let count = u16::from_le_bytes([buf[10], buf[11]]) as usize;
    if count > MAX_ENTRIES {
        return Err(MetadataError::Table);
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = &buf[32 + 32 * i..64 + 32 * i];
        let entry = Entry {
            guid: Guid::from_slice(&e[..16]),
            offset: le32(e, 16),
            length: le32(e, 20),
            flags: le32(e, 24),
        };
        let end = u64::from(entry.offset) + u64::from(entry.length);
        if entry.length > 0
            && ((entry.offset as usize) < TABLE_SIZE
                || end > u64::from(region_len)
                || entry.length > MAX_ITEM_LEN)
        {
            return Err(MetadataError::ItemLayout {
                guid: entry.guid,
                offset: entry.offset,
                length: entry.length,
            });
        }
        out.push(entry);
    }
    Ok(out)
}

/// The parsed metadata of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMetadata {
    /// Payload block size.
    pub block_size: u32,
    /// LeaveBlocksAllocated (fixed disks).
    pub leave_blocks_allocated: bool,
    /// HasParent (differencing disks).
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
    /// Page 83 data: the virtual disk id.
    pub page83: Guid,
    /// Raw parent locator item (differencing disks).
    pub parent_locator: Option<Vec<u8>>,
}

impl DiskMetadata {
    /// Builds from table entries; `read_item` returns an item's bytes.
    pub fn from_entries(
        entries: &[Entry],
        mut read_item: impl FnMut(&Entry) -> std::io::Result<Vec<u8>>,
        mut io_err: impl FnMut(std::io::Error),
    ) -> Result<DiskMetadata, MetadataError> {
        let mut items: std::collections::HashMap<Guid, Vec<u8>> = Default::default();
        for e in entries {
            let known = [
                guid::FILE_PARAMETERS,
                guid::VIRTUAL_DISK_SIZE,
                guid::PAGE83_DATA,
                guid::LOGICAL_SECTOR_SIZE,
                guid::PHYSICAL_SECTOR_SIZE,
                guid::PARENT_LOCATOR,
            ];
            if !known.contains(&e.guid) {
                if e.flags & FLAG_REQUIRED != 0 {
                    return Err(MetadataError::UnknownRequired(e.guid));
                }
                continue;
            }
            match read_item(e) {
                Ok(b) => {
                    items.insert(e.guid, b);
                }
                Err(err) => {
                    io_err(err);
                    return Err(MetadataError::Missing("(unreadable item)"));
                }
            }
        }
        let get = |g: &Guid, len: usize, name: &'static str| -> Result<&[u8], MetadataError> {
            match items.get(g) {
                Some(b) if b.len() >= len => Ok(&b[..]),
                _ => Err(MetadataError::Missing(name)),
            }
        };
        let fp = get(&guid::FILE_PARAMETERS, 8, "file parameters")?;
        let block_size = le32(fp, 0);
        let flags = le32(fp, 4);
        let virtual_size = le64(get(&guid::VIRTUAL_DISK_SIZE, 8, "virtual disk size")?, 0);
        let logical = le32(
            get(&guid::LOGICAL_SECTOR_SIZE, 4, "logical sector size")?,
            0,
        );
        let physical = le32(
            get(&guid::PHYSICAL_SECTOR_SIZE, 4, "physical sector size")?,
            0,
        );
        let page83 = match items.get(&guid::PAGE83_DATA) {
            Some(b) if b.len() >= 16 => Guid::from_slice(b),
            _ => Guid::ZERO,
        };
        let has_parent = flags & 2 != 0;
        let parent_locator = items.get(&guid::PARENT_LOCATOR).cloned();
        let md = DiskMetadata {
            block_size,
            leave_blocks_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            logical_sector_size: logical,
            physical_sector_size: physical,
            page83,
            parent_locator,
        };
        md.validate()?;
        if md.has_parent && md.parent_locator.is_none() {
            return Err(MetadataError::Missing("parent locator"));
        }
        Ok(md)
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<(), MetadataError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(MetadataError::Value {
                field: "block size",
                value: bs.into(),
            });
        }
        if self.logical_sector_size != 512 && self.logical_sector_size != 4096 {
            return Err(MetadataError::Value {
                field: "logical sector size",
                value: self.logical_sector_size.into(),
            });
        }
        if self.physical_sector_size != 512 && self.physical_sector_size != 4096 {
            return Err(MetadataError::Value {
                field: "physical sector size",
                value: self.physical_sector_size.into(),
            });
        }
        if self.virtual_size == 0
            || self.virtual_size > MAX_VIRTUAL_SIZE
            || self.virtual_size % u64::from(self.logical_sector_size) != 0
        {
            return Err(MetadataError::Value {
                field: "virtual disk size",
                value: self.virtual_size,
            });
        }
        Ok(())
    }

    /// Serializes the used part of a metadata region (table plus items), a
    /// multiple of 4 KiB.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut items: Vec<(Guid, u32, Vec<u8>)> = vec![
            (
                guid::FILE_PARAMETERS,
                FLAG_REQUIRED,
                [
                    self.block_size.to_le_bytes(),
                    (u32::from(self.leave_blocks_allocated) | (u32::from(self.has_parent) << 1))
                        .to_le_bytes(),
                ]
                .concat(),
            ),
            (
                guid::VIRTUAL_DISK_SIZE,
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
                self.virtual_size.to_le_bytes().to_vec(),
            ),
            (
                guid::PAGE83_DATA,
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
                self.page83.0.to_vec(),
            ),
            (
                guid::LOGICAL_SECTOR_SIZE,
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
                self.logical_sector_size.to_le_bytes().to_vec(),
            ),
            (
                guid::PHYSICAL_SECTOR_SIZE,
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
                self.physical_sector_size.to_le_bytes().to_vec(),
            ),
        ];
        if let (true, Some(l)) = (self.has_parent, &self.parent_locator) {
            items.push((guid::PARENT_LOCATOR, FLAG_REQUIRED, l.clone()));
        }
        let _ = FLAG_USER;
        let mut out = vec![0u8; TABLE_SIZE];
        out[..8].copy_from_slice(SIGNATURE);
        out[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        for (i, (g, flags, data)) in items.iter().enumerate() {
            let off = out.len() as u32;
            out.extend_from_slice(data);
            let e = &mut out[32 + 32 * i..64 + 32 * i];
            e[..16].copy_from_slice(&g.0);
            e[16..20].copy_from_slice(&off.to_le_bytes());
            e[20..24].copy_from_slice(&(data.len() as u32).to_le_bytes());
            e[24..28].copy_from_slice(&flags.to_le_bytes());
        }
        let padded = out.len().div_ceil(4096) * 4096;
        out.resize(padded, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Result<DiskMetadata, MetadataError> {
        let t = parse_table(b, 1 << 20)?;
        DiskMetadata::from_entries(
            &t,
            |e| Ok(b[e.offset as usize..(e.offset + e.length) as usize].to_vec()),
            |_| {},
        )
    }

    /// Metadata round-trips; bad values are rejected.
    #[test]
    fn roundtrip_and_values() {
        let md = DiskMetadata {
            block_size: 32 << 20,
            leave_blocks_allocated: false,
            has_parent: false,
            virtual_size: 64 << 30,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            page83: Guid::new_random(),
            parent_locator: None,
        };
        assert_eq!(parse(&md.to_bytes()).unwrap(), md);
        for bad in [
            DiskMetadata {
                block_size: 3 << 20,
                ..md.clone()
            },
            DiskMetadata {
                logical_sector_size: 1024,
                ..md.clone()
            },
            DiskMetadata {
                virtual_size: MAX_VIRTUAL_SIZE + 4096,
                ..md.clone()
            },
            DiskMetadata {
                virtual_size: 513,
                ..md.clone()
            },
        ] {
            assert!(matches!(
                parse(&bad.to_bytes()),
                Err(MetadataError::Value { .. })
            ));
        }
    }
}
