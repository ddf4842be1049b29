//! Host trust and live migration wire types: `/v1/hosts`, `/v1/host/trust`,
//! `/v1/host/settings`, `/v1/vms/{name}/move`, `/v1/migrations`, and the worker's
//! `/migration/*` control calls.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `POST /v1/host/trust` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRequest {
    /// The peer's `--listen` address, `ADDR:PORT`.
    pub address: String,
    /// The fingerprint the operator confirmed; without it the peer is only looked at.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// Answer of `POST /v1/host/trust`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustResponse {
    /// The peer as seen (and, when `trusted`, stored).
    pub peer: PeerInfo,
    /// Whether the peer is now trusted (false: confirm the fingerprint and call again).
    pub trusted: bool,
}

/// A host this host knows (`vireo host list`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's host name (from its hello; its address when unknown).
    pub name: String,
    /// `ADDR:PORT` it listens on.
    pub address: String,
    /// SHA-256 of its certificate (DER), `AB:CD:...`.
    pub fingerprint: String,
    /// Its vireod version.
    #[serde(default)]
    pub version: String,
    /// Its migration protocol version.
    #[serde(default)]
    pub protocol_version: u32,
    /// Unix seconds when it was trusted.
    #[serde(default)]
    pub trusted_at: u64,
}

/// Host settings (`vireo host set`), persisted in the state directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostSettings {
    /// Live migrations (in and out) this host runs at the same time.
    #[serde(default = "default_max_migrations")]
    pub max_migrations: u32,
}

fn default_max_migrations() -> u32 {
    2
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            max_migrations: default_max_migrations(),
        }
    }
}

/// `PATCH /v1/host/settings` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSettingsPatch {
    /// New maximum of simultaneous migrations (1..=16).
    #[serde(default)]
    pub max_migrations: Option<u32>,
}

/// `POST /v1/vms/{name}/move` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// Destination host: a trusted peer's name or address.
    pub to: String,
    /// Copy the disks (whole chain) to the destination (shared-nothing).
    #[serde(default)]
    pub include_storage: bool,
    /// Directory on the destination for the copied disks (with `include_storage`).
    #[serde(default)]
    pub destination_path: Option<PathBuf>,
    /// Bandwidth limit in bytes per second (0: unlimited).
    #[serde(default)]
    pub bandwidth: u64,
    /// Longest acceptable pause at switchover, in milliseconds.
    #[serde(default = "default_max_downtime_ms")]
    pub max_downtime_ms: u64,
}

fn default_max_downtime_ms() -> u64 {
    300
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Exchanging hello and compatibility with the destination.
    Negotiating,
    /// The destination prepares an empty VM waiting for the state.
    Preparing,
    /// Disks are copied while the VM runs (shared-nothing).
    CopyingDisks,
    /// Memory pre-copy passes.
    Memory,
    /// The VM is paused; the last dirty pages, device state and disk writes move.
    Switchover,
    /// The destination runs the VM; the source copy was removed.
    Completed,
    /// Stopped by the user; the VM runs on the source.
    Cancelled,
    /// Failed; the VM runs on the source.
    Failed,
}

impl MigrationPhase {
    /// True once nothing changes any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Cancelled | MigrationPhase::Failed
        )
    }
}

/// A migration job (`GET /v1/migrations/{id}`, also listed by `vireo job list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationJobInfo {
    /// Job id (`mig-...`).
    pub id: String,
    /// VM name.
    pub vm: String,
    /// `outgoing` (this host is the source) or `incoming`.
    pub direction: String,
    /// The other host.
    pub peer: String,
    /// Phase.
    pub phase: MigrationPhase,
    /// Whether disks are copied (shared-nothing).
    pub include_storage: bool,
    /// Memory bytes sent so far.
    pub memory_transferred: u64,
    /// Memory bytes still to send in this pass.
    pub memory_remaining: u64,
    /// Guest memory size.
    pub memory_total: u64,
    /// Disk bytes copied so far.
    pub disk_transferred: u64,
    /// Disk bytes to copy.
    pub disk_total: u64,
    /// Pages dirtied per second (QEMU's estimate).
    pub dirty_pages_rate: u64,
    /// Pre-copy passes done.
    pub passes: u64,
    /// QEMU's expected downtime in ms.
    pub expected_downtime_ms: u64,
    /// Measured downtime in ms (after completion).
    pub downtime_ms: Option<u64>,
    /// Bandwidth limit (bytes/s, 0 = none).
    pub bandwidth: u64,
    /// Unix seconds at start.
    pub started: u64,
    /// Seconds the job ran (so far).
    pub elapsed_secs: f64,
    /// Why it failed or what happened.
    pub message: Option<String>,
}

/// `POST /migration/start` (worker): start sending memory and device state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerMigrateStart {
    /// QEMU migration URI (a unix socket the daemon tunnels over TLS).
    pub uri: String,
    /// Bandwidth limit in bytes/s (0: unlimited).
    pub bandwidth: u64,
    /// Downtime limit in ms.
    pub max_downtime_ms: u64,
    /// Enable auto-converge.
    #[serde(default)]
    pub auto_converge: bool,
    /// Multifd channels (0: off).
    #[serde(default)]
    pub multifd_channels: u32,
}

/// `GET /migration/status` (worker).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerMigrateStatus {
    /// QEMU's migration status (`active`, `pre-switchover`, `completed`, `failed`...).
    pub status: String,
    /// QEMU's run state.
    pub run_state: String,
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes remaining in this pass.
    pub remaining: u64,
    /// Guest RAM.
    pub total: u64,
    /// Dirty pages per second.
    pub dirty_pages_rate: u64,
    /// Passes.
    pub passes: u64,
    /// Expected downtime (ms).
    pub expected_downtime_ms: u64,
    /// Actual downtime (ms), once completed.
    pub downtime_ms: Option<u64>,
    /// QEMU's error text when failed.
    pub error: Option<String>,
}

/// A launch as a migration destination (`launch.json` field `incoming`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingLaunch {
    /// URI QEMU receives on (`unix:PATH`).
    pub uri: String,
    /// Each disk's export as the source serves it, to serve identical placeholder exports
    /// until the disks are handed over.
    pub disks: Vec<ExportFacts>,
    /// Multifd channels (0: off); must match the source.
    #[serde(default)]
    pub multifd_channels: u32,
}

/// What an NBD client sees of an export at the handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFacts {
    /// Size in bytes.
    pub size: u64,
    /// NBD transmission flags.
    pub flags: u16,
    /// Block size constraints (minimum, preferred, maximum), when the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

/// `POST /migration/mirror-start` (worker, shared-nothing source): mirror every disk's
/// chain into a unix socket each (the daemon tunnels it to the destination).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerMirrorStart {
    /// Socket of disk `i`'s mirror stream.
    pub sockets: Vec<PathBuf>,
    /// Copy rate limit in bytes per second, shared by the disks (0: unlimited).
    #[serde(default)]
    pub bandwidth: u64,
}

/// `GET /migration/mirror-status` (worker).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerMirrorStatus {
    /// Mirrors running (0 when none was started or they completed).
    pub disks: usize,
    /// Bytes sent so far (all disks).
    pub bytes_copied: u64,
    /// Bytes still to send (frozen layers left plus dirty ranges).
    pub bytes_remaining: u64,
    /// Bytes per second the guest dirties the disks.
    pub dirty_bytes_per_sec: u64,
    /// Every mirror is in sync (at most its convergence threshold dirty).
    pub converged: bool,
    /// The first mirror failure.
    pub error: Option<String>,
}

/// Answer of `POST /migration/mirror-complete` (worker): every disk is byte-identical at
/// the destination (verified by checksum) and committed there.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerMirrorDone {
    /// Source files of every chain (leaf first per disk), to remove once the destination
    /// runs the VM.
    pub source_files: Vec<PathBuf>,
    /// Combined CRC32C of each disk's virtual contents.
    pub checksums: Vec<u32>,
    /// Bytes sent in all.
    pub bytes_copied: u64,
    /// Bytes of the final pass (with I/O held).
    pub final_pass_bytes: u64,
    /// Longest time guest I/O was held for one disk, ms.
    pub io_pause_ms: u64,
}

/// `GET /migration/chain-files` (worker): every file of each disk's chain (leaf first,
/// then parents, then other checkpoint images).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerChainFiles {
    /// Per disk.
    pub disks: Vec<Vec<PathBuf>>,
}
