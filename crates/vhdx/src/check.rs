//! Consistency check and repair (like `qemu-img check [-r all]`).
//!
//! Checks the headers, region table, metadata, parent chain (all refused with an
//! error when broken), the log (replayed on repair), every BAT entry (state, file
//! offset inside the file, no overlap with metadata or another block) and leaked
//! space. Repair replays the log, drops invalid BAT entries (their blocks then read
//! as zeros or from the parent) and truncates unreferenced space at the end of the
//! file.

use std::path::Path;

use crate::bat::{entry_offset, entry_state, state};
use crate::bitmap::BITMAP_BLOCK_SIZE;
use crate::error::Result;
use crate::image::{OpenCtx, Vhdx};

/// Result of [`check`].
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Problems found and not repaired.
    pub errors: Vec<String>,
    /// Problems repaired.
    pub repaired: Vec<String>,
    /// Bytes of the file no structure refers to.
    pub leaked_bytes: u64,
    /// The log held entries that were (or, read-only, would be) replayed.
    pub log_replay_needed: bool,
    /// Payload blocks allocated / total.
    pub allocated_blocks: u64,
    /// Payload blocks of the virtual disk.
    pub total_blocks: u64,
    /// Images in the chain (1 for a non-differencing disk).
    pub chain_length: usize,
}

impl CheckReport {
    /// True when no unrepaired error remains.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks the image at `path`; with `repair`, fixes what can be fixed.
/// Errors that make the image unusable (bad headers, region table, metadata,
/// broken chain) are returned as `Err`.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let mut ctx = OpenCtx {
        read_only: !repair,
        lenient: true,
        preopened: &[],
        visited: Vec::new(),
        unchecked: false,
    };
    let v = Vhdx::open_ctx(path, &mut ctx)?;
    let mut r = CheckReport {
        chain_length: v.chain().len(),
        ..Default::default()
    };
    if repair {
        if v.log_replayed {
            r.log_replay_needed = true;
            r.repaired.push("replayed the metadata log".into());
        }
    } else if !v.overlay.is_empty() {
        r.log_replay_needed = true;
        r.errors
            .push("the metadata log has entries to replay".into());
    }
    for p in &v.bat_problems {
        let msg = format!(
            "BAT entry {} points to {:#x}, which is {}",
            p.index, p.offset, p.why
        );
        if repair {
            r.repaired.push(format!("{msg}: entry cleared"));
        } else {
            r.errors.push(msg);
        }
    }
    let geo = v.geo;
    let size = v.size();
    r.total_blocks = geo.payload_blocks(size);
    let mut used_end = used_metadata_end(&v);
    let mut used = 0u64;
    let needed = geo.total_entries(size);
    for i in 0..needed {
        let e = v.entry(i);
        let s = entry_state(e);
        let (present, len) = if geo.is_bitmap_index(i) {
            (
                geo.has_parent && s == state::SB_PRESENT,
                BITMAP_BLOCK_SIZE as u64,
            )
        } else {
            (
                s == state::FULLY_PRESENT || s == state::PARTIALLY_PRESENT,
                geo.block_size,
            )
        };
        if present {
            used += len;
            used_end = used_end.max(entry_offset(e) + len);
            if !geo.is_bitmap_index(i) {
                r.allocated_blocks += 1;
            }
        }
        if s == state::PARTIALLY_PRESENT {
            let chunk = (i / (geo.chunk_ratio + 1)) as usize;
            let be = v.entry(geo.bitmap_index(chunk as u64));
            if entry_state(be) != state::SB_PRESENT {
                r.errors.push(format!(
                    "BAT entry {i} is partially present but its chunk has no sector bitmap"
                ));
            }
        }
    }
    let file_len = v.file_size()?;
    let meta_used = used_metadata_end(&v);
    let payload_area = file_len.saturating_sub(meta_used);
    r.leaked_bytes = payload_area.saturating_sub(used);
    if repair {
        v.flush()?;
        let end = used_end.div_ceil(1 << 20) << 20;
        if end < file_len {
            v.close_and_truncate(end)?;
            r.repaired.push(format!(
                "truncated {} unreferenced bytes at the end of the file",
                file_len - end
            ));
            r.leaked_bytes = r.leaked_bytes.saturating_sub(file_len - end);
        } else {
            v.close()?;
        }
    }
    Ok(r)
}

/// End of the last fixed structure (headers, log, metadata, BAT).
pub(crate) fn used_metadata_end(v: &Vhdx) -> u64 {
    (v.log_offset + v.log_length)
        .max(v.regions.bat.end())
        .max(v.regions.metadata.end())
}

impl Vhdx {
    /// Closes cleanly (flush, empty log) and truncates the file to `len`.
    pub(crate) fn close_and_truncate(&self, len: u64) -> Result<()> {
        self.close_ref()?;
        self.file
            .set_len(len)
            .map_err(|e| self.ioerr("truncating", e))?;
        self.file
            .sync_all()
            .map_err(|e| self.ioerr("flushing", e))?;
        Ok(())
    }
}
