//! Sector bitmaps (MS-VHDX 2.5.1): one bit per logical sector of a chunk, set when
//! the sector is present in this (differencing) image rather than in its parent.
//!
//! In memory a bitmap is an array of `AtomicU64` so writers on different blocks
//! set bits without a lock; a per-4 KiB-page dirty flag tells `flush` which pages
//! to log.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes in a sector bitmap block.
pub const BITMAP_BLOCK_SIZE: usize = 1 << 20;
const WORDS: usize = BITMAP_BLOCK_SIZE / 8;
const PAGE: usize = 4096;
const PAGES: usize = BITMAP_BLOCK_SIZE / PAGE;

/// One chunk's sector bitmap.
pub struct SectorBitmap {
    words: Box<[AtomicU64]>,
    dirty: Box<[AtomicBool]>,
}

impl SectorBitmap {
    /// A bitmap from its on-disk bytes (`BITMAP_BLOCK_SIZE` long), or all clear.
    pub fn from_bytes(b: Option<&[u8]>) -> SectorBitmap {
        let words: Box<[AtomicU64]> = match b {
            Some(b) => b
                .chunks_exact(8)
                .take(WORDS)
                .map(|c| AtomicU64::new(crate::header::le64(c, 0)))
                .collect(),
            None => (0..WORDS).map(|_| AtomicU64::new(0)).collect(),
        };
        SectorBitmap {
            words,
            dirty: (0..PAGES).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Is sector `s` (index within the chunk) present?
    pub fn test(&self, s: u64) -> bool {
        let w = self.words[(s / 64) as usize].load(Ordering::Acquire);
        w & (1 << (s % 64)) != 0
    }

    /// Length of the run of sectors starting at `s` (at most `max`) with the same bit.
    pub fn run(&self, s: u64, max: u64) -> (bool, u64) {
        let v = self.test(s);
        let mut n = 1;
        while n < max {
            let i = s + n;
            // Whole-word fast path.
            if i % 64 == 0 && n + 64 <= max {
                let w = self.words[(i / 64) as usize].load(Ordering::Acquire);
                if (v && w == u64::MAX) || (!v && w == 0) {
                    n += 64;
                    continue;
                }
            }
            if self.test(i) != v {
                break;
            }
            n += 1;
        }
        (v, n)
    }

    /// Sets or clears `count` bits from `s` and marks their pages dirty.
    /// Returns true when any bit changed.
    pub fn set_range(&self, s: u64, count: u64, value: bool) -> bool {
        let mut changed = false;
        let mut i = s;
        let end = s + count;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let n = (64 - lo).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            let old = if value {
                self.words[w].fetch_or(mask, Ordering::AcqRel)
            } else {
                self.words[w].fetch_and(!mask, Ordering::AcqRel)
            };
            let new = if value { old | mask } else { old & !mask };
            if old != new {
                changed = true;
                self.dirty[w * 8 / PAGE].store(true, Ordering::Release);
            }
            i += n;
        }
        changed
    }

    /// True when all `count` bits from `s` are set.
    pub fn all_set(&self, s: u64, count: u64) -> bool {
        let (v, n) = self.run(s, count);
        v && n == count
    }

    /// Takes the dirty pages: their indexes, clearing the flags.
    pub fn take_dirty(&self) -> Vec<usize> {
        (0..PAGES)
            .filter(|&p| self.dirty[p].swap(false, Ordering::AcqRel))
            .collect()
    }

    /// Marks every page dirty (a bitmap written for the first time).
    pub fn mark_all_dirty(&self) {
        for d in self.dirty.iter() {
            d.store(true, Ordering::Release);
        }
    }

    /// Bytes of page `p`.
    pub fn page_bytes(&self, p: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(PAGE);
        for w in &self.words[p * PAGE / 8..(p + 1) * PAGE / 8] {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits set across word boundaries read back, runs are measured, dirty pages tracked.
    #[test]
    fn bits_runs_dirty() {
        let b = SectorBitmap::from_bytes(None);
        assert!(b.set_range(60, 70, true));
        assert!(!b.set_range(60, 70, true));
        assert!(!b.test(59) && b.test(60) && b.test(129) && !b.test(130));
        assert_eq!(b.run(0, 1000), (false, 60));
        assert_eq!(b.run(60, 1000), (true, 70));
        assert_eq!(b.take_dirty(), vec![0]);
        assert!(b.take_dirty().is_empty());
        let page = b.page_bytes(0);
        assert_eq!(page[7] >> 4, 0xF); // sectors 60..63 live in byte 7, bits 4..7
        let c = SectorBitmap::from_bytes(Some(&[page, vec![0; BITMAP_BLOCK_SIZE - PAGE]].concat()));
        assert!(c.all_set(60, 70));
    }
}
