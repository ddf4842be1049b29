//! Checkpoint and job wire types (`/v1/vms/{name}/checkpoints`, `/v1/vms/{name}/jobs`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Kind of checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointType {
    /// Disks plus memory and device state.
    #[default]
    Standard,
    /// Disks only, guest file systems frozen through the agent.
    Production,
}

/// `POST /v1/vms/{name}/checkpoints` body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewCheckpoint {
    /// Name (default `checkpoint-N`).
    #[serde(default)]
    pub name: Option<String>,
    /// Kind.
    #[serde(default, rename = "type")]
    pub kind: CheckpointType,
}

/// `POST .../checkpoints/{cp}/rename` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameCheckpoint {
    /// New name.
    pub name: String,
}

/// `POST .../checkpoints/{cp}/export` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportCheckpoint {
    /// Directory receiving `disk<i>.vhdx`.
    pub dir: PathBuf,
}

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Parent checkpoint id.
    pub parent: Option<String>,
    /// Kind.
    #[serde(rename = "type")]
    pub kind: CheckpointType,
    /// Unix seconds.
    pub created: u64,
    /// Frozen image of each disk.
    pub images: Vec<PathBuf>,
    /// Memory and device state (standard).
    pub memory_state: Option<PathBuf>,
}

/// A long-running job (live merge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Id.
    pub id: String,
    /// What it does (`merge`).
    pub kind: String,
    /// The checkpoint it removes.
    pub checkpoint: String,
    /// `copying`, `cancelled`, `done`, `failed`.
    pub state: String,
    /// Blocks done.
    pub done: u64,
    /// Blocks in all (of the disk being merged).
    pub total: u64,
    /// Disk index being merged.
    pub disk: usize,
    /// Failure reason.
    pub error: Option<String>,
}

/// `GET /v1/vms/{name}/checkpoints`: the tree (parents link children).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CheckpointTree {
    /// All checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// The checkpoint the VM's current state descends from.
    pub current: Option<String>,
    /// Current leaf image of each disk.
    pub leaves: Vec<PathBuf>,
    /// Jobs.
    pub jobs: Vec<JobInfo>,
}

/// `DELETE .../checkpoints/{cp}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveCheckpoint {
    /// The live merge job, when the removal merges.
    pub job: Option<JobInfo>,
}
