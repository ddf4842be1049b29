//! The API wire form of the persisted state (`api::checkpoint`).

use crate::state::{Checkpoint, CheckpointKind, DiskState, MergeJob, MergeKind, MergeState};
use api::checkpoint::{CheckpointInfo, CheckpointTree, CheckpointType, JobInfo};

/// Converts a persisted checkpoint.
pub fn checkpoint_info(c: &Checkpoint) -> CheckpointInfo {
    CheckpointInfo {
        id: c.id.clone(),
        name: c.name.clone(),
        parent: c.parent.clone(),
        kind: match c.kind {
            CheckpointKind::Standard => CheckpointType::Standard,
            CheckpointKind::Production => CheckpointType::Production,
        },
        created: c.created,
        images: c.images.clone(),
        memory_state: c.memory_state.clone(),
    }
}

/// Converts a persisted merge job.
pub fn job_info(j: &MergeJob) -> JobInfo {
    let (state, done, error) = match &j.state {
        MergeState::Copying { next_block } => ("copying", *next_block, None),
        MergeState::Cancelled { next_block } => ("cancelled", *next_block, None),
        MergeState::Done => ("done", j.total_blocks, None),
        MergeState::Failed { reason } => ("failed", 0, Some(reason.clone())),
    };
    JobInfo {
        id: j.id.clone(),
        kind: match j.kind {
            MergeKind::Consolidate => "consolidate",
            _ => "merge",
        }
        .into(),
        checkpoint: j.checkpoint.clone(),
        state: state.into(),
        done,
        total: j.total_blocks,
        disk: j.disk,
        error,
    }
}

/// Converts the persisted state.
pub fn tree(st: &DiskState) -> CheckpointTree {
    CheckpointTree {
        checkpoints: st.checkpoints.iter().map(checkpoint_info).collect(),
        current: st.current.clone(),
        leaves: st.leaves.clone(),
        jobs: st.jobs.iter().map(job_info).collect(),
    }
}
