//! The per-VM disk state, persisted as `disks.json` in the VM directory (temp file, fsync,
//! rename, directory fsync): each disk's current leaf, the checkpoint tree and the merge
//! jobs. The disk service reads it at start (so a restarted worker serves the same chains)
//! and commits every switch to it before resuming I/O.
//!
//! Merge job states:
//! ```text
//!  Copying{next_block} --block copied--> Copying{next_block+1} --last--> Done
//!        |  \--cancel--> Cancelled --resume--> Copying
//!        \--error--> Failed{reason}
//! ```

use crate::error::{Result, StorageError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the file layout; an unknown version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// File name in the VM directory.
pub const FILE_NAME: &str = "disks.json";

/// Kind of checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Disks plus memory and device state.
    #[default]
    Standard,
    /// Disks only, with the guest's file systems frozen through the agent.
    Production,
}

/// One checkpoint of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Stable id.
    pub id: String,
    /// User-visible name (unique per VM).
    pub name: String,
    /// Parent checkpoint.
    pub parent: Option<String>,
    /// Kind.
    pub kind: CheckpointKind,
    /// Unix seconds of creation.
    pub created: u64,
    /// Frozen image of each disk at that point (index = disk index).
    pub images: Vec<PathBuf>,
    /// Memory and device state file (standard checkpoints).
    #[serde(default)]
    pub memory_state: Option<PathBuf>,
}

/// State of a merge job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MergeState {
    /// Copying blocks; all before `next_block` are in the target.
    Copying {
        /// First block not known to be copied.
        next_block: u64,
    },
    /// Stopped by the user; the checkpoint stays "being removed" and can be resumed.
    Cancelled {
        /// First block not known to be copied.
        next_block: u64,
    },
    /// Finished.
    Done,
    /// Failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Direction of a merge job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MergeKind {
    /// The running leaf merges into its parent (the checkpoint the VM runs on, with no
    /// children, is removed; its image becomes the leaf).
    #[default]
    IntoParent,
    /// An inner checkpoint is removed: each image whose parent is the checkpoint's image
    /// (its children's images, and the leaf when the VM runs on it) takes over that image's
    /// data and is re-pointed at its parent; the image is then deleted.
    IntoChildren,
    /// No checkpoint is removed: each disk's running leaf absorbs its parents one after
    /// another (down to the bottom image, or to the first checkpoint image) and is
    /// re-pointed past each; the absorbed layers are listed in [`MergeJob::absorbed`] and
    /// left in place ([`crate::DiskService::consolidate`]).
    Consolidate,
}

/// A merge of one disk's layers: removing a checkpoint, or consolidating the running
/// chains ([`MergeKind::Consolidate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeJob {
    /// Job id.
    pub id: String,
    /// The checkpoint being removed (empty for [`MergeKind::Consolidate`]).
    pub checkpoint: String,
    /// Direction.
    #[serde(default)]
    pub kind: MergeKind,
    /// Disk index.
    pub disk: usize,
    /// The layer whose data moves: the leaf ([`MergeKind::IntoParent`]), the removed
    /// checkpoint's image ([`MergeKind::IntoChildren`]) or the leaf's parent being absorbed
    /// ([`MergeKind::Consolidate`]).
    pub top: PathBuf,
    /// The image receiving the data: the leaf's parent, the child being filled, or the
    /// leaf ([`MergeKind::Consolidate`]).
    pub target: PathBuf,
    /// Children already re-pointed ([`MergeKind::IntoChildren`]).
    #[serde(default)]
    pub finished: Vec<PathBuf>,
    /// Files the finished job made obsolete, deleted after the commit (again at the next
    /// start, if a crash came in between).
    #[serde(default)]
    pub obsolete: Vec<PathBuf>,
    /// Layers a consolidation absorbed, in order: no chain of this VM references them any
    /// more, but they are not deleted (a replica store or another chain may still use
    /// them); the caller decides ([`MergeKind::Consolidate`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absorbed: Vec<PathBuf>,
    /// Blocks to copy.
    pub total_blocks: u64,
    /// Where it is.
    #[serde(flatten)]
    pub state: MergeState,
    /// Unix seconds of start.
    pub started: u64,
}

impl MergeJob {
    /// A new job of `kind` (for `checkpoint`, empty for a consolidation), copying
    /// nothing yet: the job fills in its disk, layers and block count as it goes.
    pub(crate) fn new(kind: MergeKind, checkpoint: String) -> MergeJob {
        MergeJob {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            checkpoint,
            kind,
            disk: 0,
            top: PathBuf::new(),
            target: PathBuf::new(),
            finished: Vec::new(),
            obsolete: Vec::new(),
            absorbed: Vec::new(),
            total_blocks: 0,
            state: MergeState::Copying { next_block: 0 },
            started: now_unix(),
        }
    }
}

/// Everything persisted about a VM's disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Current leaf of each disk (index = disk index).
    pub leaves: Vec<PathBuf>,
    /// The checkpoint tree.
    #[serde(default)]
    pub checkpoints: Vec<Checkpoint>,
    /// The checkpoint the running state descends from.
    #[serde(default)]
    pub current: Option<String>,
    /// Merge jobs (finished ones are kept for `job show`).
    #[serde(default)]
    pub jobs: Vec<MergeJob>,
}

impl DiskState {
    /// A fresh state whose leaves are the configured disks.
    pub fn new(leaves: Vec<PathBuf>) -> DiskState {
        DiskState {
            format_version: FORMAT_VERSION,
            leaves,
            checkpoints: Vec::new(),
            current: None,
            jobs: Vec::new(),
        }
    }

    /// Loads `dir/disks.json`, or `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<DiskState>> {
        let path = dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StorageError::Io {
                    op: "reading",
                    path,
                    source: e,
                })
            }
        };
        if bytes.len() > 16 << 20 {
            return Err(StorageError::State {
                path,
                why: "larger than 16 MiB".into(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StorageError::State {
                path: path.clone(),
                why: e.to_string(),
            })?;
        let ver = v
            .get("format_version")
            .and_then(|x| x.as_u64())
            .unwrap_or(0);
        if ver != u64::from(FORMAT_VERSION) {
            return Err(StorageError::State {
                path,
                why: format!("unknown format_version {ver}"),
            });
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| StorageError::State {
                path,
                why: e.to_string(),
            })
    }

    /// Loads the state, or starts one from the configured disks. When the configured disks
    /// differ in number from the saved leaves, new disks are appended.
    pub fn load_or_new(dir: &Path, disks: &[PathBuf]) -> Result<DiskState> {
        let mut s = DiskState::load(dir)?.unwrap_or_else(|| DiskState::new(disks.to_vec()));
        if s.leaves.len() < disks.len() {
            s.leaves.extend_from_slice(&disks[s.leaves.len()..]);
        }
        Ok(s)
    }

    /// Writes `dir/disks.json` atomically and durably.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StorageError::State {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(StorageError::io("creating", &tmp))?;
        f.write_all(&bytes)
            .map_err(StorageError::io("writing", &tmp))?;
        f.sync_all().map_err(StorageError::io("syncing", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(StorageError::io("renaming into", &path))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(StorageError::io("syncing", dir))
    }

    /// Finds a checkpoint by name or id.
    pub fn find(&self, name: &str) -> Option<&Checkpoint> {
        self.checkpoints
            .iter()
            .find(|c| c.name == name || c.id == name)
    }

    /// Children of a checkpoint (`None`: roots).
    pub fn children(&self, id: Option<&str>) -> Vec<&Checkpoint> {
        self.checkpoints
            .iter()
            .filter(|c| c.parent.as_deref() == id)
            .collect()
    }

    /// The unfinished merge job, if any.
    pub fn active_merge(&self) -> Option<&MergeJob> {
        self.jobs.iter().find(|j| {
            matches!(
                j.state,
                MergeState::Copying { .. } | MergeState::Cancelled { .. }
            )
        })
    }
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
