//! Block allocation table (MS-VHDX 2.5): one 64-bit entry per payload block,
//! with a sector bitmap entry after every `chunk_ratio` payload entries.

/// Payload block states.
pub mod state {
    /// Not allocated: reads from the parent (differencing) or as zeros.
    pub const NOT_PRESENT: u8 = 0;
    /// Contents undefined: read as zeros.
    pub const UNDEFINED: u8 = 1;
    /// Reads as zeros.
    pub const ZERO: u8 = 2;
    /// Unmapped by a trim: reads as zeros.
    pub const UNMAPPED: u8 = 3;
    /// Allocated, all sectors present.
    pub const FULLY_PRESENT: u8 = 6;
    /// Allocated, the sector bitmap says which sectors are present (differencing only).
    pub const PARTIALLY_PRESENT: u8 = 7;
    /// Sector bitmap block present.
    pub const SB_PRESENT: u8 = 6;
}

/// BAT errors.
#[derive(Debug, thiserror::Error)]
pub enum BatError {
    /// The BAT region is smaller than the entries the disk needs.
    #[error("BAT region holds {capacity} entries but the disk needs {needed}")]
    Capacity {
        /// Entries that fit in the region.
        capacity: u64,
        /// Entries needed.
        needed: u64,
    },
    /// An entry has a state that is not valid for its kind.
    #[error("BAT entry {index} has invalid state {state}")]
    State {
        /// Entry index.
        index: u64,
        /// State found.
        state: u8,
    },
    /// An entry points outside the file or into metadata or another block.
    #[error("BAT entry {index} points to {offset:#x}, which is {why}")]
    Offset {
        /// Entry index.
        index: u64,
        /// File offset.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// Layout arithmetic of a BAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub sector_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Differencing disk: bitmap entries are present for every chunk.
    pub has_parent: bool,
}

impl Geometry {
    /// Geometry for a block size, logical sector size and disk kind.
    pub fn new(block_size: u32, sector_size: u32, has_parent: bool) -> Geometry {
        let chunk_ratio = ((1u64 << 23) * u64::from(sector_size)) / u64::from(block_size);
        Geometry {
            block_size: block_size.into(),
            sector_size: sector_size.into(),
            chunk_ratio,
            has_parent,
        }
    }

    /// Payload blocks for a virtual size.
    pub fn payload_blocks(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.block_size)
    }

    /// Sector bitmap blocks (chunks) for a virtual size.
    pub fn chunks(&self, virtual_size: u64) -> u64 {
        self.payload_blocks(virtual_size).div_ceil(self.chunk_ratio)
    }

    /// BAT entries for a virtual size (MS-VHDX 2.5).
    pub fn total_entries(&self, virtual_size: u64) -> u64 {
        let p = self.payload_blocks(virtual_size);
        if self.has_parent {
            self.chunks(virtual_size) * (self.chunk_ratio + 1)
        } else {
            p + p.saturating_sub(1) / self.chunk_ratio
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap entry of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.sector_size
    }

    /// True when BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }
}

/// State bits of an entry.
pub fn entry_state(e: u64) -> u8 {
    (e & 7) as u8
}

/// File offset of an entry (FileOffsetMB in bytes).
pub fn entry_offset(e: u64) -> u64 {
    (e >> 20) << 20
}

/// Builds an entry; `offset` must be 1 MiB aligned.
pub fn make_entry(state: u8, offset: u64) -> u64 {
    debug_assert_eq!(offset % (1 << 20), 0);
    (offset & !((1u64 << 20) - 1)) | u64::from(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entry counts and interleaving follow MS-VHDX 2.5.
    #[test]
    fn geometry() {
        let g = Geometry::new(32 << 20, 512, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.total_entries(64 << 30), 2048 + 15);
        assert_eq!(g.payload_index(128), 129);
        let d = Geometry::new(32 << 20, 512, true);
        assert_eq!(d.total_entries(64 << 30), 16 * 129);
        assert_eq!(d.bitmap_index(0), 128);
        assert!(d.is_bitmap_index(128));
        let g4 = Geometry::new(1 << 20, 4096, false);
        assert_eq!(g4.chunk_ratio, 32768);
        let e = make_entry(state::FULLY_PRESENT, 5 << 20);
        assert_eq!((entry_state(e), entry_offset(e)), (6, 5 << 20));
    }
}
