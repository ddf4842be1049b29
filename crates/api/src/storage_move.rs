//! Storage live migration wire types (`POST /v1/vms/{name}/move-storage`, the worker's
//! `/storage-move` routes and the job record kept in the VM directory).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `POST /v1/vms/{name}/move-storage` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveStorage {
    /// Absolute destination directory (created if missing).
    pub path: PathBuf,
    /// Only this disk (index, as in `vireo vm show`); all disks when absent.
    #[serde(default)]
    pub disk: Option<usize>,
    /// Copy rate limit in bytes per second.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

/// File name of the job record in the VM directory.
pub const JOB_FILE: &str = "storage-move.json";

/// State of a storage move job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// Copying (frozen layers, then the active layer and its dirty ranges).
    Copying,
    /// Final pass, verification and switch of a disk (guest I/O held briefly).
    Switching,
    /// Every disk moved, verified, switched; old files removed.
    Done,
    /// Cancelled: the VM runs on the old files, partial new files removed.
    Cancelled,
    /// Failed: the VM runs on the files it used before the failing disk.
    Failed,
}

impl MoveState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            MoveState::Copying => "copying",
            MoveState::Switching => "switching",
            MoveState::Done => "done",
            MoveState::Cancelled => "cancelled",
            MoveState::Failed => "failed",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            MoveState::Done | MoveState::Cancelled | MoveState::Failed
        )
    }
}

/// One file moved: where it was, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedFile {
    /// Disk index.
    pub disk: usize,
    /// Old path (removed once the new one was verified and in use).
    pub from: PathBuf,
    /// New path.
    pub to: PathBuf,
}

/// A storage move job (the worker's answer, persisted as [`JOB_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveJob {
    /// Job id.
    pub id: String,
    /// Destination directory.
    pub dir: PathBuf,
    /// Disks to move, in order.
    pub disks: Vec<usize>,
    /// The disk being moved (or the last one).
    pub disk: usize,
    /// Where it is.
    pub state: MoveState,
    /// Bytes copied so far (all disks).
    pub bytes_copied: u64,
    /// Bytes left of the current disk (frozen bytes left plus dirty ranges).
    pub bytes_remaining: u64,
    /// Estimated bytes of all the disks (files of the chains).
    pub bytes_total: u64,
    /// Rate at which the guest dirties the disk being copied (bytes per second).
    pub dirty_bytes_per_sec: u64,
    /// Longest guest I/O hold at a switch, in milliseconds.
    pub max_io_pause_ms: u64,
    /// Files moved so far.
    #[serde(default)]
    pub moved: Vec<MovedFile>,
    /// Failure reason.
    #[serde(default)]
    pub error: Option<String>,
    /// Unix seconds of start.
    pub started: u64,
    /// Whether vireod has written the new disk paths into the VM configuration.
    #[serde(default)]
    pub config_updated: bool,
}
