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
    /// What it does: `merge` (a checkpoint removed) or `consolidate` (parent layers
    /// absorbed into the running leaves, after a Replica failover).
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

/// `POST /disks/consolidate` (worker) answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsolidateDisks {
    /// The job absorbing the parent layers into the running leaves; `None`: every leaf
    /// already sits on its bottom image (or on a checkpoint image).
    pub job: Option<JobInfo>,
    /// Every file the VM's disks use now (each disk's chain and its checkpoints' images),
    /// canonical paths.
    #[serde(default)]
    pub in_use: Vec<std::path::PathBuf>,
}

/// Format of a disk image vireod creates for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NewImageFormat {
    /// Dynamic VHDX (the default: checkpoints need it).
    #[default]
    Vhdx,
    /// Sparse raw file (no checkpoints).
    Raw,
}

/// `POST /v1/vms/{name}/disks` body: attach an existing image (`path`) or create a new one
/// of `size` bytes in the VM's directory (`disk<N>.vhdx`, or `.img` for raw). The VM must be
/// off.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AddDisk {
    /// Existing image to attach (absolute path).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Size in bytes of a new image.
    #[serde(default)]
    pub size: Option<u64>,
    /// Format of a new image (default VHDX).
    #[serde(default)]
    pub format: Option<NewImageFormat>,
    /// Bus (default: the generation's boot bus).
    #[serde(default)]
    pub bus: Option<crate::DiskBus>,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Smallest and largest size of a disk vireod creates.
pub const NEW_DISK_SIZE: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 40);

impl AddDisk {
    /// Checks the request alone (no file system access).
    pub fn check(&self) -> Result<(), String> {
        match (&self.path, self.size) {
            (Some(_), Some(_)) => Err("give either a path or a size, not both".into()),
            (None, None) => Err("give the path of an image or the size of a new one".into()),
            (Some(p), None) => {
                if self.format.is_some() {
                    return Err(
                        "the format is that of the image at the path (--format is for new disks)"
                            .into(),
                    );
                }
                if p.is_absolute() {
                    Ok(())
                } else {
                    Err(format!("{} is not an absolute path", p.display()))
                }
            }
            (None, Some(s)) => {
                if !NEW_DISK_SIZE.contains(&s) {
                    Err(format!("a new disk has 1 MiB to 64 TiB, not {s} bytes"))
                } else if s % (1 << 20) != 0 {
                    Err(format!(
                        "a new disk's size is a whole number of MiB, not {s} bytes"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}
