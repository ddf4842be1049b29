//! The primary side: cutting a cycle of a VM's tracked disks into a file, which the daemon
//! ships ([`crate::send_cycle`]) and, once the replica has applied it, commits on the
//! trackers ([`commit`]) or, on any failure, puts back ([`abort`]).
//!
//! While more than `max_grains` grains are changed (initial replication: every grain is
//! marked with `ChangeTracker::mark_all`), cycles are *partial*: the lowest changed grains,
//! read without a common cut, written by the replica into its base. Because the tracker
//! file keeps every grain not yet acknowledged, an interrupted initial replication resumes
//! where it stopped, not from the start. The first cycle that takes every changed grain is
//! a crash-consistent cut and the replica's first recovery point.

use crate::cycle::{CycleError, CycleHeader, CycleWriter};
use std::io::BufWriter;
use std::path::Path;
use std::time::Duration;
use storage::tracking::{self, TrackedDisk, TrackingError};

/// What went wrong while cutting a cycle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CutError {
    /// Capturing the disks failed.
    #[error("capturing the disks")]
    Capture(#[source] TrackingError),
    /// Writing the cycle failed.
    #[error("writing the cycle")]
    Cycle(#[source] CycleError),
    /// The cycle file.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Figures of one cut.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CutStats {
    /// Sequence number.
    pub seq: u64,
    /// Partial (initial replication) cycle: not a recovery point.
    pub partial: bool,
    /// Distinct grains in the cycle.
    pub grains: u64,
    /// Bytes of the cycle file (what goes on the wire).
    pub bytes: u64,
    /// Plain bytes of the data records (before compression).
    pub plain_bytes: u64,
    /// Unix milliseconds of the cut.
    pub cut_unix_ms: u64,
    /// Guest I/O pause of the final pass, microseconds.
    pub pause_us: u64,
    /// Grains still changed after this cycle (left for the next ones).
    pub remaining_grains: u64,
    /// Cut with the guest's file systems frozen (application-consistent).
    #[serde(default)]
    pub app_consistent: bool,
    /// Why an application-consistent cut was asked for and not made (the cut is then
    /// crash-consistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistent_error: Option<String>,
    /// How long the guest's file systems stayed frozen, milliseconds.
    #[serde(default)]
    pub frozen_ms: u64,
    /// Written straight into the asked path as it was cut ([`cut_streaming`]).
    #[serde(default)]
    pub streamed: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Cuts cycle `seq` of `vm` from `disks` into `path` (temp file, then rename): partial
/// when more than `max_grains` grains are changed, crash-consistent otherwise. On failure
/// the trackers are put back ([`abort`]) and no file is left.
pub fn cut_to_file(
    disks: &[TrackedDisk],
    vm: &str,
    seq: u64,
    max_grains: u64,
    path: &Path,
) -> Result<CutStats, CutError> {
    cut_to_file_marked(disks, vm, seq, max_grains, path, false)
}

/// [`cut_to_file`] of a cut made while the guest's file systems were frozen: a complete
/// (not partial) cycle is marked application-consistent (`app_consistent`), and its
/// recovery point says so.
pub fn cut_to_file_marked(
    disks: &[TrackedDisk],
    vm: &str,
    seq: u64,
    max_grains: u64,
    path: &Path,
    app_consistent: bool,
) -> Result<CutStats, CutError> {
    cut_inner(disks, vm, seq, max_grains, path, app_consistent, false)
}

/// [`cut_to_file_marked`] written straight into `path` as the grains are read (no
/// temporary file), so the daemon can ship the cycle while it grows: the file is a whole
/// cycle only once this returns (its end record and checksum come last, and the replica
/// refuses a cycle without them). On failure the trackers are put back and the file is
/// removed.
pub fn cut_streaming(
    disks: &[TrackedDisk],
    vm: &str,
    seq: u64,
    max_grains: u64,
    path: &Path,
    app_consistent: bool,
) -> Result<CutStats, CutError> {
    cut_inner(disks, vm, seq, max_grains, path, app_consistent, true)
}

/// Bytes the cut buffers before they reach the file (what a streaming reader waits for).
const CUT_BUFFER: usize = 1 << 20;

fn cut_inner(
    disks: &[TrackedDisk],
    vm: &str,
    seq: u64,
    max_grains: u64,
    path: &Path,
    app_consistent: bool,
    direct: bool,
) -> Result<CutStats, CutError> {
    let partial = tracking::dirty_total(disks) > max_grains;
    let header = CycleHeader {
        vm: vm.to_string(),
        seq,
        cut_unix_ms: now_ms(),
        disk_sizes: disks.iter().map(|d| d.tracker.disk_size()).collect(),
        partial,
        app_consistent: app_consistent && !partial,
    };
    let tmp = if direct {
        path.to_path_buf()
    } else {
        path.with_extension("tmp")
    };
    let r = (|| {
        let f = std::fs::File::create(&tmp).map_err(|source| CutError::Io {
            op: "creating",
            path: tmp.clone(),
            source,
        })?;
        let mut w = CycleWriter::new(BufWriter::with_capacity(CUT_BUFFER, f), &header)
            .map_err(CutError::Cycle)?;
        let mut werr = None;
        let mut sink = |disk: usize, off: u64, data: &[u8]| -> std::io::Result<()> {
            w.add(disk as u32, off, data).map_err(|e| {
                let msg = e.to_string();
                werr = Some(e);
                std::io::Error::other(msg)
            })
        };
        let stats = if partial {
            tracking::capture_partial(disks, max_grains, &mut sink)
        } else {
            tracking::capture(disks, &mut sink)
        };
        let stats = match (stats, werr) {
            (_, Some(e)) => return Err(CutError::Cycle(e)),
            (Err(e), None) => return Err(CutError::Capture(e)),
            (Ok(s), None) => s,
        };
        let plain = w.plain_bytes;
        let bw = w.finish().map_err(CutError::Cycle)?;
        let f = bw.into_inner().map_err(|e| CutError::Io {
            op: "writing",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        // No fsync: the file only carries the cycle to the daemon, which ships it at once;
        // after a crash it is never reused (the grains stay marked and are cut again).
        let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        if !direct {
            std::fs::rename(&tmp, path).map_err(|source| CutError::Io {
                op: "renaming into",
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(CutStats {
            seq,
            partial,
            grains: stats.grains,
            bytes,
            plain_bytes: plain,
            cut_unix_ms: header.cut_unix_ms,
            pause_us: stats.pause.as_micros() as u64,
            remaining_grains: tracking::dirty_total(disks),
            app_consistent: header.app_consistent,
            app_consistent_error: None,
            frozen_ms: 0,
            streamed: direct,
        })
    })();
    if r.is_err() {
        abort(disks);
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The replica applied cycle `seq`: forget its grains on every tracker.
pub fn commit(disks: &[TrackedDisk], seq: u64) -> Result<(), TrackingError> {
    for d in disks {
        d.tracker.commit(seq, false)?;
    }
    Ok(())
}

/// The cycle was not applied: its grains go again in the next one.
pub fn abort(disks: &[TrackedDisk]) {
    for d in disks {
        d.tracker.abort();
    }
}

/// Sleeps as long as `bytes` take at `bytes_per_sec` (0: no limit): the throttle of
/// initial replication.
pub fn throttle_delay(bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64)
}
