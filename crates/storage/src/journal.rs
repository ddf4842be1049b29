//! The write journal of a served disk: what makes an acknowledged write survive a kill -9
//! of the worker without an fsync per write.
//!
//! A VHDX keeps the metadata of a new allocation (BAT entry, sector bitmap bits) in memory
//! until the next flush. QEMU and the guest keep running when the worker dies, so a write
//! acknowledged before that flush would silently vanish with the process. Instead, every
//! write, trim and zeroing acknowledged since the last flush that changed metadata (or came
//! after one) is appended to this journal first — a plain `pwrite` into the page cache,
//! which outlives the process. A flush of the disk makes the images durable and then empties
//! the journal (truncate + fsync, so a stale entry can never be replayed over newer data).
//! A restarted worker replays the valid prefix of the journal into the same chain, flushes,
//! and empties it.
//!
//! Entry: `magic u32 | kind u8 | 0u8 x3 | seq u64 | off u64 | len u64 | sum u64 | data`
//! (data only for writes; `sum` is FNV-1a over the header fields and the data, so a torn
//! tail entry — never acknowledged — is recognised and ignored).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

const MAGIC: u32 = 0x5647_4a31; // "VGJ1"
const HEADER: usize = 40;
/// Past this size the disk is flushed (and the journal emptied) after the current write.
pub(crate) const SOFT_LIMIT: u64 = 64 << 20;

/// Kind of a journaled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Write = 0,
    Trim = 1,
    Zero = 2,
}

/// One journaled request, read back for replay.
#[derive(Debug)]
pub(crate) struct Entry {
    pub kind: Kind,
    pub off: u64,
    pub len: u64,
    pub data: Vec<u8>,
}

struct State {
    len: u64,
    seq: u64,
}

/// An open journal file.
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    st: Mutex<State>,
}

fn fnv(h: &mut u64, b: &[u8]) {
    for x in b {
        *h ^= u64::from(*x);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

fn sum(kind: u8, seq: u64, off: u64, len: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, &[kind]);
    fnv(&mut h, &seq.to_le_bytes());
    fnv(&mut h, &off.to_le_bytes());
    fnv(&mut h, &len.to_le_bytes());
    fnv(&mut h, data);
    h
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Journal {
    /// Opens (creating) the journal at `path` and returns the valid entries it holds, in
    /// order. Entries whose data would exceed `max_len` are treated as the torn end.
    pub(crate) fn open(path: &Path, max_len: u64) -> io::Result<(Journal, Vec<Entry>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let size = file.metadata()?.len();
        let mut entries = Vec::new();
        let mut pos = 0u64;
        let mut seq = 0u64;
        let mut h = [0u8; HEADER];
        while pos + HEADER as u64 <= size {
            file.read_exact_at(&mut h, pos)?;
            let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let kind = match h[4] {
                0 => Kind::Write,
                1 => Kind::Trim,
                2 => Kind::Zero,
                _ => break,
            };
            let (eseq, off, len, s) = (le64(&h, 8), le64(&h, 16), le64(&h, 24), le64(&h, 32));
            if magic != MAGIC || eseq != seq || len > max_len {
                break;
            }
            let dlen = if kind == Kind::Write { len } else { 0 };
            if pos + HEADER as u64 + dlen > size {
                break;
            }
            let mut data = vec![0u8; dlen as usize];
            file.read_exact_at(&mut data, pos + HEADER as u64)?;
            if sum(h[4], eseq, off, len, &data) != s {
                break;
            }
            entries.push(Entry {
                kind,
                off,
                len,
                data,
            });
            pos += HEADER as u64 + dlen;
            seq += 1;
        }
        let j = Journal {
            file,
            path: path.to_path_buf(),
            st: Mutex::new(State { len: size, seq: 0 }),
        };
        Ok((j, entries))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether nothing was journaled since the last reset.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().len == 0
    }

    /// Whether nothing was journaled since the last reset; `None` instead of waiting while
    /// the journal is busy (being appended to or flushed).
    pub(crate) fn try_is_empty(&self) -> Option<bool> {
        match self.st.try_lock() {
            Ok(st) => Some(st.len == 0),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner().len == 0),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Appends one request; returns the journal's size afterwards.
    pub(crate) fn append(&self, kind: Kind, off: u64, len: u64, data: &[u8]) -> io::Result<u64> {
        let mut st = self.lock();
        let mut b = Vec::with_capacity(HEADER + data.len());
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[kind as u8, 0, 0, 0]);
        b.extend_from_slice(&st.seq.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&sum(kind as u8, st.seq, off, len, data).to_le_bytes());
        b.extend_from_slice(data);
        self.file.write_all_at(&b, st.len)?;
        st.len += b.len() as u64;
        st.seq += 1;
        Ok(st.len)
    }

    /// Runs `flush` (which must make every journaled request durable in the images) with
    /// appends held off, then empties the journal durably.
    pub(crate) fn flush_with(&self, flush: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut st = self.lock();
        flush()?;
        if st.len > 0 {
            self.file.set_len(0)?;
            self.file.sync_data()?;
            st.len = 0;
            st.seq = 0;
        }
        Ok(())
    }

    /// Removes the journal file (clean close: everything is in the images).
    pub(crate) fn remove(&self) {
        let st = self.lock();
        if st.len == 0 {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
