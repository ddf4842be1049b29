//! Metadata log (MS-VHDX 2.4): write-ahead entries for every metadata page
//! change, and replay of the active sequence on open.
//!
//! Writing: each batch of changed 4 KiB metadata pages becomes one entry written at
//! the start of the log (tail = its own offset), flushed, then applied in place and
//! flushed again. Because every entry starts at log offset 0 and is applied before
//! the next one is written, a torn entry never leaves an older, already-superseded
//! entry that replay could pick up. The header's LogGuid is set before the first
//! entry of a session and cleared on clean close, as other implementations expect.
//!
//! Reading: the whole log is scanned in 4 KiB steps for valid entries (signature,
//! length, LogGuid, CRC-32C, descriptor and data sector sequence numbers); runs of
//! consecutive entries form sequences; the sequence with the highest sequence
//! number is replayed (as QEMU and Hyper-V do), including entries that wrap around
//! the end of the log.

use std::collections::BTreeMap;

use crate::guid::Guid;
use crate::header::{crc_with_zeroed_field, le32, le64};

/// Size of a log sector.
pub const SECTOR: usize = 4096;
const ENTRY_SIG: &[u8; 4] = b"loge";
const DESC_SIG: &[u8; 4] = b"desc";
const ZERO_SIG: &[u8; 4] = b"zero";
const DATA_SIG: &[u8; 4] = b"data";
/// Largest log this implementation reads into memory.
pub const MAX_LOG_LEN: u64 = 256 << 20;

/// Log errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log must be replayed but the image is open read-only.
    #[error("the log has entries to replay; open the image read-write or run `vireo disk check --repair`")]
    NeedsReplay,
    /// The log says the file was longer than it is.
    #[error("the log records a file size of {flushed:#x} bytes but the file has {actual:#x}: the file was truncated")]
    Truncated {
        /// FlushedFileOffset.
        flushed: u64,
        /// File length.
        actual: u64,
    },
    /// A replay target is outside the area the log may write.
    #[error("log entry writes {offset:#x}+{len:#x}, outside the area a log may change")]
    Target {
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The log region is larger than supported.
    #[error("log of {0} bytes is larger than supported")]
    TooLarge(u64),
    /// Writing or reading the log failed.
    #[error("log I/O")]
    Io(#[source] std::io::Error),
}

/// One change recorded by an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a 4 KiB sector.
    Data {
        /// File offset.
        offset: u64,
        /// 4096 bytes.
        data: Vec<u8>,
    },
    /// Write zeros.
    Zero {
        /// File offset.
        offset: u64,
        /// Length (multiple of 4 KiB).
        len: u64,
    },
}

/// A parsed, valid log entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// SequenceNumber.
    pub seq: u64,
    /// Tail.
    pub tail: u32,
    /// Entry length in bytes.
    pub length: u32,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
    /// Changes in order.
    pub ops: Vec<Op>,
}

fn desc_sectors(count: usize) -> usize {
    (count + 2).div_ceil(128)
}

/// Largest number of 4 KiB pages one entry can carry in a log of `log_len` bytes.
pub fn max_pages(log_len: u64) -> usize {
    let sectors = (log_len as usize / SECTOR).saturating_sub(1);
    let mut n = sectors.saturating_sub(1);
    while n > 0 && n + desc_sectors(n) > sectors {
        n -= 1;
    }
    n
}

/// Builds one entry carrying `pages` (file offset, 4096 bytes each).
pub fn build_entry(
    seq: u64,
    guid: Guid,
    tail: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    pages: &[(u64, &[u8])],
) -> Vec<u8> {
    let ds = desc_sectors(pages.len());
    let total = (ds + pages.len()) * SECTOR;
    let mut b = vec![0u8; total];
    b[0..4].copy_from_slice(ENTRY_SIG);
    b[8..12].copy_from_slice(&(total as u32).to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&(pages.len() as u32).to_le_bytes());
    b[32..48].copy_from_slice(&guid.0);
    b[48..56].copy_from_slice(&flushed_file_offset.to_le_bytes());
    b[56..64].copy_from_slice(&last_file_offset.to_le_bytes());
    for (i, (off, data)) in pages.iter().enumerate() {
        let d = &mut b[64 + 32 * i..96 + 32 * i];
        d[0..4].copy_from_slice(DESC_SIG);
        d[4..8].copy_from_slice(&data[4092..4096]);
        d[8..16].copy_from_slice(&data[0..8]);
        d[16..24].copy_from_slice(&off.to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
        let s = &mut b[(ds + i) * SECTOR..(ds + i + 1) * SECTOR];
        s[0..4].copy_from_slice(DATA_SIG);
        s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        s[8..4092].copy_from_slice(&data[8..4092]);
        s[4092..4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads `len` bytes of the circular log starting at `off`.
fn circular(log: &[u8], off: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut o = off;
    while out.len() < len {
        let n = (log.len() - o).min(len - out.len());
        out.extend_from_slice(&log[o..o + n]);
        o = (o + n) % log.len();
    }
    out
}

/// Parses and fully validates the entry at `off` of the log bytes.
pub fn parse_entry(log: &[u8], off: usize, guid: Guid) -> Option<Entry> {
    if log.len() < SECTOR || off % SECTOR != 0 || off >= log.len() {
        return None;
    }
    let h = &log[off..off + 64];
    if &h[0..4] != ENTRY_SIG {
        return None;
    }
    let length = le32(h, 8) as usize;
    let seq = le64(h, 16);
    let count = le32(h, 24) as usize;
    if length == 0
        || length % SECTOR != 0
        || length > log.len()
        || seq == 0
        || Guid::from_slice(&h[32..48]) != guid
    {
        return None;
    }
    let ds = desc_sectors(count);
    if count > length / 32 || ds * SECTOR > length {
        return None;
    }
    let e = circular(log, off, length);
    if crc_with_zeroed_field(&e, 4) != le32(&e, 4) {
        return None;
    }
    let mut ops = Vec::with_capacity(count);
    let mut data_idx = ds;
    for i in 0..count {
        let d = &e[64 + 32 * i..96 + 32 * i];
        let offset = le64(d, 16);
        if le64(d, 24) != seq || offset % SECTOR as u64 != 0 {
            return None;
        }
        if &d[0..4] == ZERO_SIG {
            let len = le64(d, 8);
            if len % SECTOR as u64 != 0 {
                return None;
            }
            ops.push(Op::Zero { offset, len });
        } else if &d[0..4] == DESC_SIG {
            if (data_idx + 1) * SECTOR > length {
                return None;
            }
            let s = &e[data_idx * SECTOR..(data_idx + 1) * SECTOR];
            let sseq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
            if &s[0..4] != DATA_SIG || sseq != seq {
                return None;
            }
            let mut data = Vec::with_capacity(SECTOR);
            data.extend_from_slice(&d[8..16]);
            data.extend_from_slice(&s[8..4092]);
            data.extend_from_slice(&d[4..8]);
            ops.push(Op::Data { offset, data });
            data_idx += 1;
        } else {
            return None;
        }
    }
    Some(Entry {
        seq,
        tail: le32(h, 12),
        length: length as u32,
        flushed_file_offset: le64(h, 48),
        last_file_offset: le64(h, 56),
        ops,
    })
}

/// Finds the active sequence: the run of consecutive valid entries whose last
/// entry has the highest sequence number. Empty when there is nothing to replay.
pub fn find_active(log: &[u8], guid: Guid) -> Vec<Entry> {
    if guid.is_zero() || log.len() < SECTOR {
        return Vec::new();
    }
    let sectors = log.len() / SECTOR;
    let mut parsed: BTreeMap<usize, Option<Entry>> = BTreeMap::new();
    let get = |o: usize, parsed: &mut BTreeMap<usize, Option<Entry>>| -> Option<Entry> {
        parsed
            .entry(o)
            .or_insert_with(|| parse_entry(log, o, guid))
            .clone()
    };
    let mut best: Vec<Entry> = Vec::new();
    for s in 0..sectors {
        let Some(first) = get(s * SECTOR, &mut parsed) else {
            continue;
        };
        let mut seqv = vec![first];
        let mut o = s * SECTOR;
        let mut used = 0usize;
        loop {
            let last = &seqv[seqv.len() - 1];
            used += last.length as usize;
            o = (o + last.length as usize) % log.len();
            if used >= log.len() {
                break;
            }
            match get(o, &mut parsed) {
                Some(n) if n.seq == last.seq.wrapping_add(1) => seqv.push(n),
                _ => break,
            }
        }
        let head = seqv[seqv.len() - 1].seq;
        let better = match best.last() {
            None => true,
            Some(b) => head > b.seq || (head == b.seq && seqv.len() > best.len()),
        };
        if better {
            best = seqv;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry round-trips, wraps around the end of the log, and the highest
    /// sequence wins; a flipped bit invalidates an entry.
    #[test]
    fn entries_and_search() {
        let g = Guid::new_random();
        let page_a = vec![0xAAu8; SECTOR];
        let page_b: Vec<u8> = (0..SECTOR).map(|i| i as u8).collect();
        let e1 = build_entry(5, g, 0, 8 << 20, 8 << 20, &[(3 << 20, &page_a)]);
        let e2 = build_entry(
            6,
            g,
            0,
            8 << 20,
            9 << 20,
            &[(3 << 20, &page_b), (4 << 20, &page_a)],
        );
        let mut log = vec![0u8; 1 << 20];
        log[64 << 10..(64 << 10) + e1.len()].copy_from_slice(&e1);
        // e2 wraps: starts two sectors before the end.
        let start = log.len() - 2 * SECTOR;
        for (i, b) in e2.iter().enumerate() {
            let n = log.len();
            log[(start + i) % n] = *b;
        }
        let p = parse_entry(&log, start, g).unwrap();
        assert_eq!(
            p.ops[0],
            Op::Data {
                offset: 3 << 20,
                data: page_b.clone()
            }
        );
        assert_eq!(p.last_file_offset, 9 << 20);
        let act = find_active(&log, g);
        assert_eq!(act.len(), 1);
        assert_eq!(act[0].seq, 6);
        assert!(find_active(&log, Guid::new_random()).is_empty());
        log[start + 100] ^= 1;
        let act = find_active(&log, g);
        assert_eq!(act[0].seq, 5);
        assert!(max_pages(1 << 20) >= 250);
    }
}
