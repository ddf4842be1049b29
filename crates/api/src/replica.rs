//! Replica wire types: the `/v1/replica` routes of vireod, the worker's `/replica` routes
//! (change tracking and cycle cuts) and the host settings of a replica host.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Worker `POST /replica/track` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrackRequest {
    /// Mark every grain changed (initial replication).
    #[serde(default)]
    pub mark_all: bool,
}

/// Worker change tracking status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrackStatus {
    /// Trackers are attached.
    pub tracking: bool,
    /// Grains changed and not yet shipped.
    pub dirty_grains: u64,
    /// The tracker could not be trusted (a checksum resync is needed).
    pub resync_required: bool,
    /// Last committed cycle.
    pub generation: u64,
    /// Size of each tracked disk.
    #[serde(default)]
    pub disk_sizes: Vec<u64>,
}

/// Worker `POST /replica/cut` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CutRequest {
    /// VM name written in the cycle.
    pub vm: String,
    /// Sequence number.
    pub seq: u64,
    /// More changed grains than this make a partial cycle.
    pub max_grains: u64,
    /// Where the cycle file goes.
    pub path: PathBuf,
    /// Freeze the guest's file systems through the agent for the cut (an
    /// application-consistent point); a cut that cannot freeze is crash-consistent and
    /// says why.
    #[serde(default)]
    pub app_consistent: bool,
    /// Write the cycle straight into `path` as it is cut (no temporary file): the daemon
    /// ships it while it grows. A worker that predates this writes a temporary file and
    /// renames it (`CutStats::streamed` false).
    #[serde(default)]
    pub stream: bool,
}

/// Worker `POST /replica/resync` body: compare the tracked disks with the replica's
/// checksums and mark the differing blocks (answer: `replica::ResyncStats`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncRequest {
    /// The replica's sums file (`replica::Sums`), written by vireod.
    pub path: PathBuf,
}

/// `POST /v1/replica/{vm}/export` body (primary): write a copy of the VM's disks for
/// removable media.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportReplica {
    /// Directory (absolute) that receives `export.json` and `disk<i>.vhdx`.
    pub dir: PathBuf,
}

/// Worker `POST /replica/export` answer: the disks copied into the export directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportedDisks {
    /// Size of each disk.
    pub disk_sizes: Vec<u64>,
    /// File of each disk in the directory.
    pub files: Vec<String>,
    /// Bytes of data written (all-zero MiBs are left out).
    pub bytes: u64,
}

/// `POST /v1/replica/{vm}/import` body (replica host): seed the replica of `vm` from an
/// export (`from`) or from an existing copy of its disks on this host (`disks`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportReplica {
    /// An export directory (`vireo replica export`).
    #[serde(default)]
    pub from: Option<PathBuf>,
    /// VHDX images of an existing copy, in the VM's disk order (used in place).
    #[serde(default)]
    pub disks: Vec<PathBuf>,
}

/// `POST /v1/replica/{vm}/enable` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableReplica {
    /// Replica host: a trusted peer's name or address.
    pub to: String,
    /// Seconds between cycles; 0 = continuous (ship as soon as data changes).
    pub interval_secs: u64,
    /// Hourly recovery points kept besides the latest.
    #[serde(default = "default_points")]
    pub recovery_points: usize,
    /// Initial replication: `network` (everything over the host link), `export` (the
    /// replica host imported `vireo replica export`) or `existing` (a copy already there,
    /// `vireo replica import --disk`); the last two compare checksums and ship only what
    /// differs.
    #[serde(default = "default_initial")]
    pub initial: String,
    /// Initial replication bandwidth limit, bytes per second (0: none).
    #[serde(default)]
    pub bandwidth: u64,
    /// Seconds between application-consistent points (the guest's file systems frozen
    /// through the agent for the cut); 0 or absent: crash-consistent points only.
    #[serde(default)]
    pub app_consistent_every_secs: u64,
    /// Unix milliseconds at which the initial replication starts by itself (absent: at
    /// `vireo replica start`, or now with `--start`).
    #[serde(default)]
    pub start_at_unix_ms: Option<u64>,
}

/// Shortest period between application-consistent points: a freeze stalls the guest's
/// writers for the cut, which an administrator plans in hours, not seconds.
pub const MIN_APP_CONSISTENT_SECS: u64 = 10;

fn default_points() -> usize {
    4
}

fn default_initial() -> String {
    "network".into()
}

/// Parses `30s`, `5m`, `15m` or `continuous` into seconds (0: continuous).
pub fn parse_interval(s: &str) -> Result<u64, String> {
    match s {
        "30s" => Ok(30),
        "5m" => Ok(300),
        "15m" => Ok(900),
        "continuous" => Ok(0),
        other => Err(format!(
            "interval {other:?}: use 30s, 5m, 15m or continuous"
        )),
    }
}

/// Human form of an interval.
pub fn interval_name(secs: u64) -> String {
    match secs {
        0 => "continuous".into(),
        30 => "30s".into(),
        300 => "5m".into(),
        900 => "15m".into(),
        s => format!("{s}s"),
    }
}

/// Replication state of a VM on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Enabled, initial replication not started (`vireo replica start`).
    Enabled,
    /// Initial replication running.
    Initial,
    /// Cycles are shipped.
    Replicating,
    /// Paused by the administrator.
    Paused,
    /// Failed over (this side no longer replicates).
    FailedOver,
    /// A checksum resync is due or running (change tracking could not be trusted, or a
    /// reverse replication after an unplanned failover compares the diverged disks).
    Resyncing,
    /// The last attempt failed (it is retried).
    Error,
}

/// Role of this host for a replicated VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaRole {
    /// The VM runs here and ships cycles.
    Primary,
    /// The recovery points are kept here.
    Replica,
}

/// A recovery point on the replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// Id (the cycle's sequence number).
    pub id: u64,
    /// Unix milliseconds of its cut.
    pub cut_unix_ms: u64,
    /// Cut with the guest's file systems frozen (application-consistent); otherwise
    /// crash-consistent.
    #[serde(default)]
    pub app_consistent: bool,
}

/// One line of `vireo replica status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// VM name.
    pub vm: String,
    /// This host's role.
    pub role: ReplicaRole,
    /// The other host.
    pub peer: String,
    /// State.
    pub state: ReplicaState,
    /// Seconds between cycles (0: continuous).
    pub interval_secs: u64,
    /// Last applied cycle.
    pub last_seq: u64,
    /// Unix milliseconds of the newest cut the replica holds as a recovery point.
    pub last_cut_unix_ms: Option<u64>,
    /// Seconds since that cut.
    pub lag_secs: Option<f64>,
    /// Bytes shipped (primary) or received (replica).
    pub bytes_shipped: u64,
    /// Cycles shipped or applied.
    pub cycles: u64,
    /// Initial replication progress, 0.0-1.0 (primary).
    pub initial_progress: Option<f64>,
    /// Grains changed and not yet shipped (primary).
    #[serde(default)]
    pub pending_grains: u64,
    /// Warning (lag over twice the interval, errors).
    pub warning: Option<String>,
    /// Last error.
    pub last_error: Option<String>,
    /// Recovery points (replica).
    #[serde(default)]
    pub points: Vec<RecoveryPoint>,
    /// The VM running from a failover or a test failover (replica).
    #[serde(default)]
    pub failover: Option<String>,
    /// Achieved RPO over the last hour (primary): the worst lag, in seconds, at any
    /// instant of the hour (since the daemon started, when that is more recent).
    #[serde(default)]
    pub rpo_last_hour_secs: Option<f64>,
    /// Last checksum resync (primary): blocks (1 MiB) compared.
    #[serde(default)]
    pub resync_blocks: Option<u64>,
    /// Last checksum resync (primary): blocks that differed and were shipped.
    #[serde(default)]
    pub resync_differing_blocks: Option<u64>,
    /// Seconds between application-consistent points (0: none) (primary).
    #[serde(default)]
    pub app_consistent_every_secs: u64,
    /// Unix milliseconds of the last application-consistent cut shipped (primary).
    #[serde(default)]
    pub last_app_consistent_unix_ms: Option<u64>,
    /// When the initial replication starts by itself, Unix milliseconds (primary, while
    /// it waits).
    #[serde(default)]
    pub start_at_unix_ms: Option<u64>,
}

/// `POST /v1/replica/{vm}/failover` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// Planned (run on the primary): stop, ship the last changes, start on the replica.
    #[serde(default)]
    pub planned: bool,
    /// Recovery point (replica; default the latest).
    #[serde(default)]
    pub point: Option<u64>,
    /// Test failover: the switch the test copy's adapters join (absent: disconnected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_switch: Option<String>,
}

/// What a failover step did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The steps, in order.
    pub steps: Vec<String>,
    /// The VM that runs now (name).
    pub vm: String,
    /// The recovery point used.
    pub point: Option<u64>,
}

/// Replica settings of a host (`vireo host set --allow-replica-from --replica-path`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplicaHostSettings {
    /// Hosts (trusted peers' names, addresses or fingerprints; `*`: any trusted host)
    /// allowed to replicate to this host.
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// Directory for replicas.
    #[serde(default)]
    pub path: Option<PathBuf>,
}
