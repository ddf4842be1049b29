//! Replica in the daemon: the cycle scheduler of the primary, the replica side of the
//! host channel, failover (planned, unplanned, test) and status.
//!
//! ```text
//!  primary                                          replica
//!  enable ─> Initial ──(partial cycles, throttled)──> base/ (in place)
//!            │ first complete cycle                   p-<n>/ (recovery point)
//!            v
//!          Replicating ──(cycle every interval)─────> p-<n+1>/ ... (retention: latest + hourly)
//!            │ pause/resume                           failover [--point] ─> VM runs on a
//!            v                                          differencing layer over the point
//!          FailedOver (planned failover:              commit | cancel-failover
//!           pause, last cycle, turn off, start there) test-failover / test-stop: a copy
//! ```
//!
//! Records: `<state>/replica/primary/<uuid>.json` on the primary; on the replica host
//! `<replica path>/<vm>/replica-vm.json` next to the store (`store/`) and the layers a
//! failed-over VM (`failover-<point>/`) or a test copy (`test-<point>/`) runs on. All are
//! written atomically. The cycle loop survives a vireod restart: the trackers live in the
//! worker (write-ahead files), the sequence numbers are re-read from the replica after
//! any failure, and a cycle is either applied whole on the replica or put back.

use super::Manager;
use crate::error::{ApiError, ApiResult};
use crate::peers::{self, PeerId};
use crate::store::write_atomic;
use api::replica::*;
use api::{CreateDisk, CreateVm, VmSpec};
use migration::tls::StreamHeader;
use migration::PeerClient;
use replica::{CutStats, ReplicaStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

mod consolidate;

/// Grains per partial cycle of the initial replication: 128 MiB, so the per-cycle costs
/// (a connection, the replica's flushes and state file, the tracker commit) are paid
/// rarely; the replica applies a cycle as it streams in, so a big one costs no latency.
const INITIAL_CHUNK: u64 = 2048;
/// With a bandwidth limit, a partial cycle holds about this much sending time (at least
/// [`INITIAL_CHUNK_MIN`] grains), so a pause or a stop still ends the run soon.
const INITIAL_CHUNK_SECS: u64 = 2;
/// Smallest partial cycle (16 MiB).
const INITIAL_CHUNK_MIN: u64 = 256;
/// Largest cycle a replica accepts.
const MAX_CYCLE: u64 = 8 << 30;
/// Continuous mode: shortest time between cycles.
const CONTINUOUS_TICK: Duration = Duration::from_secs(1);
/// Continuous mode: an empty cycle at least this often (keeps the lag honest).
const CONTINUOUS_IDLE: Duration = Duration::from_secs(30);
const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PrimaryRec {
    format_version: u32,
    vm: String,
    uuid: Uuid,
    to: String,
    address: String,
    fingerprint: String,
    interval_secs: u64,
    recovery_points: usize,
    bandwidth: u64,
    state: ReplicaState,
    /// The replica's store exists and `seq` was read from it.
    initialized: bool,
    /// Every grain was marked for the initial replication.
    marked: bool,
    seq: u64,
    last_cut_unix_ms: Option<u64>,
    bytes_shipped: u64,
    cycles: u64,
    initial_total: u64,
    initial_done: u64,
    last_error: Option<String>,
    /// Reverse replication after a planned failover: the VM started here from this point
    /// of the former primary's cycles, whose disks hold exactly that point; only the
    /// blocks changed here since then are shipped back.
    #[serde(default)]
    reverse_point: Option<u64>,
    /// A checksum compare with the replica is due before the next cycle (`vireo replica
    /// resync`, tracking that could not be trusted, or a reverse after an unplanned
    /// failover).
    #[serde(default)]
    resync: bool,
    /// Reverse replication after an unplanned failover: the receiving host seeds its
    /// store from its own diverged copy of the VM and the compare ships the differences.
    #[serde(default)]
    diverged: bool,
    /// Figures of the last checksum compare.
    #[serde(default)]
    last_resync: Option<replica::ResyncStats>,
    /// Initial replication from a seed on the replica host (`--initial export|existing`).
    #[serde(default)]
    seed: bool,
    /// Seconds between application-consistent points (0: none).
    #[serde(default)]
    app_consistent_secs: u64,
    /// Unix milliseconds of the last cut that tried to be application-consistent (the
    /// schedule runs from it, so a guest whose agent cannot freeze is not asked each cycle).
    #[serde(default)]
    app_attempt_ms: Option<u64>,
    /// Unix milliseconds of the last application-consistent cut the replica applied.
    #[serde(default)]
    last_app_consistent_ms: Option<u64>,
    /// Why the last application-consistent cut could not freeze the guest.
    #[serde(default)]
    app_consistent_error: Option<String>,
    /// The initial replication starts by itself at this Unix millisecond.
    #[serde(default)]
    start_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Running {
    point: u64,
    vm: String,
    dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplicaRec {
    format_version: u32,
    vm: String,
    primary_uuid: Uuid,
    primary_fp: String,
    primary: String,
    spec: VmSpec,
    interval_secs: u64,
    bytes: u64,
    cycles: u64,
    failover: Option<Running>,
    test: Option<Running>,
    committed: bool,
    /// Store directory name (a reverse replication into a directory that still holds
    /// the layers of an earlier store gets a new one).
    #[serde(default = "default_store")]
    store: String,
    /// Recovery points asked by the primary.
    #[serde(default = "default_points")]
    recovery_points: usize,
    /// Application-consistent schedule of the primary (kept for a reverse replication).
    #[serde(default)]
    app_consistent_secs: u64,
    /// A planned failover made the VM run here and replication was reversed.
    #[serde(default)]
    reversed: bool,
    /// After the commit, the recovery-point layers under the VM's disks were merged into
    /// them and the unused layer files deleted ([`consolidate`]).
    #[serde(default)]
    consolidated: bool,
    /// Why that merge waits or failed (shown by status).
    #[serde(default)]
    consolidate_note: Option<String>,
}

fn default_store() -> String {
    "store".into()
}

fn default_points() -> usize {
    4
}

/// How [`Manager::failover_local`] starts the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    /// Unplanned failover (the primary is lost).
    Failover,
    /// A test copy; replication continues. Its adapters are connected to this test
    /// switch, or left disconnected.
    Test(Option<String>),
    /// Planned failover asked by the primary (certificate fingerprint): the VM starts
    /// with change tracking attached and replication is reversed to that host.
    Planned(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct InitRequest {
    spec: VmSpec,
    disk_sizes: Vec<u64>,
    recovery_points: usize,
    interval_secs: u64,
    /// Reverse replication: the receiving host's copy of the VM is at this point.
    #[serde(default)]
    reverse_point: Option<u64>,
    /// Reverse after an unplanned failover: the receiving host's copy of the VM diverged.
    #[serde(default)]
    diverged: bool,
    /// The replica host seeds the store from `<replica dir>/seed` (an imported export or
    /// an existing copy).
    #[serde(default)]
    seed: bool,
    /// The primary's application-consistent schedule, seconds (0: none).
    #[serde(default)]
    app_consistent_secs: u64,
}

/// Replica's answer on `replica-sums`, followed by `len` bytes of `replica::Sums`.
#[derive(Debug, Serialize, Deserialize)]
struct SumsInfo {
    seq: u64,
    len: u64,
}

/// Largest sums file accepted (32 bytes per MiB: 64 MiB covers 2 PiB of disks).
const MAX_SUMS: u64 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer<T> {
    Ok(T),
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct InitAnswer {
    latest_seq: u64,
    initializing: bool,
}

#[derive(Default)]
struct Sched {
    busy: BTreeSet<Uuid>,
    last: BTreeMap<Uuid, Instant>,
}

/// Wakes the scheduler before its next tick (an initial replication was started).
/// Continuous mode: when a check last found nothing to ship (the replica was current
/// then). The lag runs from it rather than from the last cut: an idle VM ships an empty
/// cycle only every [`CONTINUOUS_IDLE`], and is not behind meanwhile.
static IN_SYNC: Mutex<BTreeMap<Uuid, u64>> = Mutex::new(BTreeMap::new());

static SCHED_WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

static SCHED: Mutex<Sched> = Mutex::new(Sched {
    busy: BTreeSet::new(),
    last: BTreeMap::new(),
});
/// Per replicated VM (primary): (cut, applied) unix ms of the complete cycles of about the
/// last hour, for the achieved RPO (kept in memory: since the daemon started).
static HISTORY: Mutex<BTreeMap<Uuid, std::collections::VecDeque<(u64, u64)>>> =
    Mutex::new(BTreeMap::new());
const HOUR_MS: u64 = 3_600_000;

/// Records that the replica applied a complete cycle cut at `cut` (unix ms).
fn record_applied(uuid: Uuid, cut: u64) {
    let now = now_ms();
    let mut h = lock(&HISTORY);
    let q = h.entry(uuid).or_default();
    q.push_back((cut, now));
    // Keep one entry older than the hour: the lag at the window's start depends on it.
    while q.len() > 2 && q[1].1 < now.saturating_sub(HOUR_MS) {
        q.pop_front();
    }
}

/// Achieved RPO over the last hour: the worst lag (time since the cut of the newest point
/// the replica held) at any instant of the hour, in seconds; `None` without a cycle.
fn achieved_rpo(uuid: &Uuid) -> Option<f64> {
    let now = now_ms();
    let h = lock(&HISTORY);
    let q = h.get(uuid)?;
    let start = now.saturating_sub(HOUR_MS);
    let mut worst = now.saturating_sub(q.back()?.0);
    for w in q.iter().collect::<Vec<_>>().windows(2) {
        let (prev, next) = (w[0], w[1]);
        if next.1 >= start {
            worst = worst.max(next.1.saturating_sub(prev.0.max(start)));
        }
    }
    Some(worst as f64 / 1000.0)
}

/// Serializes the replica side per VM name.
static REPLICA_LOCKS: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>> =
    Mutex::new(BTreeMap::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn replica_lock(vm: &str) -> Arc<tokio::sync::Mutex<()>> {
    lock(&REPLICA_LOCKS)
        .entry(vm.to_string())
        .or_default()
        .clone()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn chain(e: &dyn std::error::Error) -> String {
    replica::error_chain(e)
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn save_json<T: Serialize>(p: &Path, v: &T) -> ApiResult<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(ApiError::internal)?;
    }
    let b = serde_json::to_vec_pretty(v).map_err(ApiError::internal)?;
    write_atomic(p, &b).map_err(ApiError::internal)
}

/// A VM name usable as a directory name.
fn safe_name(vm: &str) -> Option<&str> {
    let ok = !vm.is_empty()
        && vm != "."
        && vm != ".."
        && vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ok.then_some(vm)
}

/// Retention bucket: an hour (tests shorten it).
fn bucket_ms() -> u64 {
    std::env::var("VIREO_TEST_REPLICA_BUCKET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_600_000)
}

fn store_err(e: replica::StoreError) -> ApiError {
    match e.kind() {
        replica::ErrorKind::InvalidInput => ApiError::invalid(chain(&e)),
        _ => ApiError::failed(chain(&e)),
    }
}

impl Manager {
    fn replica_root(&self) -> PathBuf {
        self.host.state_dir.join("replica")
    }

    fn primary_path(&self, uuid: &Uuid) -> PathBuf {
        self.replica_root()
            .join("primary")
            .join(format!("{uuid}.json"))
    }

    fn primary_recs(&self) -> Vec<PrimaryRec> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.replica_root().join("primary")) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    if let Some(r) = read_json::<PrimaryRec>(&e.path()) {
                        out.push(r);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        out
    }

    fn primary_rec(&self, vm: &str) -> ApiResult<PrimaryRec> {
        self.primary_recs()
            .into_iter()
            .find(|r| r.vm == vm)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "VM {vm:?} is not replicated from this host (`vireo replica enable {vm} --to HOST`)"
                ))
            })
    }

    fn save_primary(&self, r: &PrimaryRec) -> ApiResult<()> {
        save_json(&self.primary_path(&r.uuid), r)?;
        if r.state == ReplicaState::Initial {
            // A started initial replication begins now, not at the scheduler's next tick.
            SCHED_WAKE.notify_one();
        }
        Ok(())
    }

    /// This host's replica settings.
    pub fn replica_settings(&self) -> ReplicaHostSettings {
        read_json(&self.host.state_dir.join("replica-host.json")).unwrap_or_default()
    }

    /// Changes this host's replica settings.
    pub fn set_replica_settings(&self, s: ReplicaHostSettings) -> ApiResult<ReplicaHostSettings> {
        if let Some(p) = &s.path {
            if !p.is_absolute() {
                return Err(ApiError::invalid(format!(
                    "--replica-path {}: give an absolute directory",
                    p.display()
                )));
            }
            std::fs::create_dir_all(p)
                .map_err(|e| ApiError::invalid(format!("--replica-path {}: {e}", p.display())))?;
        }
        save_json(&self.host.state_dir.join("replica-host.json"), &s)?;
        Ok(s)
    }

    fn replica_dir(&self, vm: &str) -> ApiResult<PathBuf> {
        let base = self.replica_settings().path.ok_or_else(|| {
            ApiError::wrong_state(
                "this host keeps no replicas (`vireo host set --replica-path DIR`)",
            )
        })?;
        let name = safe_name(vm)
            .ok_or_else(|| ApiError::invalid(format!("VM name {vm:?} cannot name a replica")))?;
        Ok(base.join(name))
    }

    fn replica_recs(&self) -> Vec<(PathBuf, ReplicaRec)> {
        let mut out = Vec::new();
        if let Some(base) = self.replica_settings().path {
            if let Ok(rd) = std::fs::read_dir(base) {
                for e in rd.flatten() {
                    if let Some(r) = read_json::<ReplicaRec>(&e.path().join("replica-vm.json")) {
                        out.push((e.path(), r));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.1.vm.cmp(&b.1.vm));
        out
    }

    fn replica_rec(&self, vm: &str) -> ApiResult<(PathBuf, ReplicaRec)> {
        let dir = self.replica_dir(vm)?;
        read_json::<ReplicaRec>(&dir.join("replica-vm.json"))
            .map(|r| (dir, r))
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "VM {vm:?} is not replicated to this host (see `vireo replica status`)"
                ))
            })
    }

    // ---------------------------------------------------------------- primary

    /// `vireo replica enable VM --to HOST`.
    pub async fn replica_enable(&self, vm: &str, req: EnableReplica) -> ApiResult<ReplicaStatus> {
        let (uuid, _) = self.find(vm)?;
        if self.primary_recs().iter().any(|r| r.uuid == uuid) {
            return Err(ApiError::conflict(format!(
                "VM {vm:?} is already replicated (`vireo replica status`)"
            )));
        }
        let seed = match req.initial.as_str() {
            "network" => false,
            "export" | "existing" => true,
            other => {
                return Err(ApiError::invalid(format!(
                    "initial replication {other:?}: use network, export or existing"
                )))
            }
        };
        if ![0, 30, 300, 900].contains(&req.interval_secs) {
            return Err(ApiError::invalid(
                "interval: use 30s, 5m, 15m or continuous",
            ));
        }
        if req.recovery_points == 0 || req.recovery_points > 24 {
            return Err(ApiError::invalid("--recovery-points: 1 to 24"));
        }
        if req.app_consistent_every_secs != 0
            && req.app_consistent_every_secs < api::replica::MIN_APP_CONSISTENT_SECS
        {
            return Err(ApiError::invalid(format!(
                "--app-consistent-every: at least {}s (each point freezes the guest's file systems)",
                api::replica::MIN_APP_CONSISTENT_SECS
            )));
        }
        let p = peers::get()?;
        let peer = p.trust.find(&req.to).ok_or_else(|| {
            ApiError::invalid(format!(
                "host {:?} is not trusted (`vireo host trust ADDR:PORT` on both hosts first)",
                req.to
            ))
        })?;
        let rec = PrimaryRec {
            format_version: RECORD_VERSION,
            vm: vm.to_string(),
            uuid,
            to: peer.name.clone(),
            address: peer.address.clone(),
            fingerprint: peer.fingerprint.clone(),
            interval_secs: req.interval_secs,
            recovery_points: req.recovery_points,
            bandwidth: req.bandwidth,
            state: ReplicaState::Enabled,
            initialized: false,
            // A seeded replica is compared by checksums, not copied whole.
            marked: seed,
            seq: 0,
            last_cut_unix_ms: None,
            bytes_shipped: 0,
            cycles: 0,
            initial_total: 0,
            initial_done: 0,
            last_error: None,
            reverse_point: None,
            resync: seed,
            diverged: false,
            last_resync: None,
            seed,
            app_consistent_secs: req.app_consistent_every_secs,
            app_attempt_ms: None,
            last_app_consistent_ms: None,
            app_consistent_error: None,
            start_at_ms: req.start_at_unix_ms,
        };
        // Ask the replica now, so a refusal (not allowed, untrusted) is reported here.
        let spec = self.spec(&uuid)?;
        let client = self.peer_client(&rec)?;
        let mut s = open_channel(&client, vm, &rec.to, "replica-probe")
            .await
            .map_err(ApiError::failed)?;
        let _ = replica::write_json(&mut s, &spec.uuid).await;
        let a: Answer<()> = replica::read_json(&mut s, 64 << 10)
            .await
            .map_err(|e| ApiError::failed(format!("replica host {}: {}", rec.to, chain(&e))))?;
        if let Answer::Error(e) = a {
            return Err(ApiError::invalid(format!("replica host {}: {e}", rec.to)));
        }
        self.save_primary(&rec)?;
        tracing::info!(vm, to = %rec.to, "replication enabled");
        Ok(self.primary_status(&rec))
    }

    /// `vireo replica start|pause|resume VM`.
    pub fn replica_set_state(&self, vm: &str, action: &str) -> ApiResult<ReplicaStatus> {
        let mut r = self.primary_rec(vm)?;
        r.state = match (action, r.state) {
            ("start", ReplicaState::Enabled) => {
                r.start_at_ms = None;
                ReplicaState::Initial
            }
            ("start", s) => {
                return Err(ApiError::wrong_state(format!(
                    "replication of {vm} is already started ({s:?})"
                )))
            }
            ("pause", ReplicaState::Initial | ReplicaState::Replicating) => ReplicaState::Paused,
            ("pause", s) => {
                return Err(ApiError::wrong_state(format!(
                    "replication of {vm} is not running ({s:?})"
                )))
            }
            ("resume", ReplicaState::Paused) => {
                if r.last_cut_unix_ms.is_some() {
                    ReplicaState::Replicating
                } else {
                    ReplicaState::Initial
                }
            }
            ("resume", s) => {
                return Err(ApiError::wrong_state(format!(
                    "replication of {vm} is not paused ({s:?})"
                )))
            }
            _ => return Err(ApiError::invalid(format!("unknown action {action}"))),
        };
        self.save_primary(&r)?;
        Ok(self.primary_status(&r))
    }

    /// `vireo replica disable VM` (on the primary): stops replicating; the replica keeps
    /// its recovery points.
    pub async fn replica_disable(&self, vm: &str) -> ApiResult<()> {
        let r = self.primary_rec(vm)?;
        self.wait_idle(&r.uuid).await;
        std::fs::remove_file(self.primary_path(&r.uuid)).map_err(ApiError::internal)?;
        if self.worker_pid(&r.uuid).is_some() {
            let _: Result<TrackStatus, _> = self
                .worker_client(&r.uuid)
                .post("/replica/untrack", &())
                .await;
        }
        Ok(())
    }

    async fn wait_idle(&self, uuid: &Uuid) {
        for _ in 0..600 {
            if !lock(&SCHED).busy.contains(uuid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn peer_client(&self, r: &PrimaryRec) -> ApiResult<PeerClient> {
        let p = peers::get()?;
        Ok(
            PeerClient::new(p.identity.clone(), &r.address, Some(&r.fingerprint))
                .with_timeout(Duration::from_secs(120)),
        )
    }

    fn primary_status(&self, r: &PrimaryRec) -> ReplicaStatus {
        let in_sync = lock(&IN_SYNC).get(&r.uuid).copied().unwrap_or(0);
        let lag = r
            .last_cut_unix_ms
            .map(|c| now_ms().saturating_sub(c.max(in_sync)) as f64 / 1000.0);
        let limit = 2.0 * (r.interval_secs.max(5) as f64);
        let warning = match (r.state, lag) {
            (ReplicaState::Replicating, Some(l)) if l > limit => Some(format!(
                "lag {l:.0}s is over twice the interval ({})",
                interval_name(r.interval_secs)
            )),
            _ => r
                .last_error
                .as_ref()
                .map(|e| format!("last attempt failed: {e}"))
                .or_else(|| {
                    (r.resync && r.state == ReplicaState::Paused).then(|| {
                        format!("paused: a checksum resync runs when replication resumes (`vireo replica resume {}`)", r.vm)
                    })
                })
                .or_else(|| {
                    r.app_consistent_error.as_ref().map(|e| {
                        format!("the last application-consistent point is crash-consistent: {e} (is the guest agent running?)")
                    })
                }),
        };
        ReplicaStatus {
            vm: r.vm.clone(),
            role: ReplicaRole::Primary,
            peer: r.to.clone(),
            // A pause wins: the compare waits for `resume` like every cycle.
            state: if r.resync
                && !matches!(r.state, ReplicaState::FailedOver | ReplicaState::Paused)
            {
                ReplicaState::Resyncing
            } else {
                r.state
            },
            interval_secs: r.interval_secs,
            last_seq: r.seq,
            last_cut_unix_ms: r.last_cut_unix_ms,
            lag_secs: lag,
            bytes_shipped: r.bytes_shipped,
            cycles: r.cycles,
            initial_progress: (r.initial_total > 0)
                .then(|| (r.initial_done as f64 / r.initial_total as f64).min(1.0)),
            pending_grains: 0,
            warning,
            last_error: r.last_error.clone(),
            points: Vec::new(),
            failover: None,
            rpo_last_hour_secs: achieved_rpo(&r.uuid),
            resync_blocks: r.last_resync.as_ref().map(|x| x.blocks),
            resync_differing_blocks: r.last_resync.as_ref().map(|x| x.differing_blocks),
            app_consistent_every_secs: r.app_consistent_secs,
            last_app_consistent_unix_ms: r.last_app_consistent_ms,
            start_at_unix_ms: r.start_at_ms.filter(|_| r.state == ReplicaState::Enabled),
        }
    }

    /// `vireo replica status`: both roles.
    pub fn replica_status(&self) -> Vec<ReplicaStatus> {
        let mut out: Vec<ReplicaStatus> = self
            .primary_recs()
            .iter()
            .map(|r| self.primary_status(r))
            .collect();
        for (dir, r) in self.replica_recs() {
            // A consolidated store's points are merged into the failed-over VM's disks.
            let store = ReplicaStore::peek(&dir.join(&r.store))
                .ok()
                .filter(|_| !r.consolidated);
            let points: Vec<RecoveryPoint> = store
                .as_ref()
                .map(|s| {
                    s.points()
                        .iter()
                        .map(|p| RecoveryPoint {
                            id: p.seq,
                            cut_unix_ms: p.cut_unix_ms,
                            app_consistent: p.app_consistent,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let last = points.last().map(|p| p.cut_unix_ms);
            let state = if r.failover.is_some() {
                ReplicaState::FailedOver
            } else if store.as_ref().is_some_and(|s| s.initializing()) {
                ReplicaState::Initial
            } else {
                ReplicaState::Replicating
            };
            let lag = last.map(|c| now_ms().saturating_sub(c) as f64 / 1000.0);
            let limit = 2.0 * (r.interval_secs.max(5) as f64);
            out.push(ReplicaStatus {
                vm: r.vm.clone(),
                role: ReplicaRole::Replica,
                peer: r.primary.clone(),
                state,
                interval_secs: r.interval_secs,
                last_seq: store.as_ref().map(|s| s.latest().seq).unwrap_or(0),
                last_cut_unix_ms: last,
                lag_secs: lag,
                bytes_shipped: r.bytes,
                cycles: r.cycles,
                initial_progress: None,
                pending_grains: 0,
                warning: match lag {
                    Some(l) if state == ReplicaState::Replicating && l > limit => Some(format!(
                        "lag {l:.0}s is over twice the interval ({})",
                        interval_name(r.interval_secs)
                    )),
                    _ => None,
                },
                last_error: None,
                points,
                failover: r
                    .failover
                    .as_ref()
                    .map(|f| {
                        format!(
                            "{} on point {}{}",
                            f.vm,
                            f.point,
                            match (r.committed, r.consolidated, &r.consolidate_note) {
                                (false, _, _) => String::new(),
                                (true, true, _) => {
                                    " (committed; the point's layers are merged into its disks)"
                                        .to_string()
                                }
                                (true, false, Some(n)) => format!(" (committed; {n})"),
                                (true, false, None) => {
                                    " (committed; merging the point's layers into its disks)"
                                        .to_string()
                                }
                            }
                        )
                    })
                    .or_else(|| {
                        r.test
                            .as_ref()
                            .map(|t| format!("test copy {} on point {}", t.vm, t.point))
                    }),
                rpo_last_hour_secs: None,
                resync_blocks: None,
                resync_differing_blocks: None,
                app_consistent_every_secs: 0,
                last_app_consistent_unix_ms: None,
                start_at_unix_ms: None,
            });
        }
        out
    }

    /// The replica scheduler: runs each replicated VM's cycles (spawned at start).
    pub async fn replica_scheduler(self: Arc<Self>) {
        let mut housekeeping = Instant::now();
        loop {
            if housekeeping.elapsed() >= Duration::from_secs(2) {
                housekeeping = Instant::now();
                self.replica_consolidations();
            }
            // A start wakes it at once (`save_primary`): the tick delayed every start.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = SCHED_WAKE.notified() => {}
            }
            for mut r in self.primary_recs() {
                if r.state == ReplicaState::Enabled && r.start_at_ms.is_some_and(|t| t <= now_ms())
                {
                    // The scheduled start of the initial replication.
                    r.start_at_ms = None;
                    r.state = ReplicaState::Initial;
                    if let Err(e) = self.save_primary(&r) {
                        tracing::warn!(vm = %r.vm, "starting the scheduled initial replication: {}", e.message);
                        continue;
                    }
                    tracing::info!(vm = %r.vm, "scheduled initial replication started");
                }
                if !matches!(r.state, ReplicaState::Initial | ReplicaState::Replicating) {
                    continue;
                }
                if self.qemu_pid(&r.uuid).is_none() {
                    continue;
                }
                let due = {
                    let mut s = lock(&SCHED);
                    let period = if r.last_error.is_some() {
                        Duration::from_secs(2)
                    } else if r.state == ReplicaState::Initial {
                        Duration::ZERO
                    } else if r.interval_secs == 0 {
                        CONTINUOUS_TICK
                    } else {
                        Duration::from_secs(r.interval_secs)
                    };
                    let due = !s.busy.contains(&r.uuid)
                        && s.last.get(&r.uuid).is_none_or(|t| t.elapsed() >= period);
                    if due {
                        s.busy.insert(r.uuid);
                        s.last.insert(r.uuid, Instant::now());
                    }
                    due
                };
                if due {
                    let m = self.clone();
                    tokio::spawn(async move {
                        let uuid = r.uuid;
                        // The initial replication's chunks follow each other at once
                        // (the bandwidth limit paces them inside the cycle); waiting for
                        // the next scheduler pass capped it at 4 chunks a second.
                        loop {
                            match m.replica_cycle(uuid, false).await {
                                Ok(Some(cut)) if cut.partial => {}
                                Ok(_) => break,
                                Err(e) => {
                                    tracing::warn!(vm = %r.vm, "replication cycle: {}", e.message);
                                    break;
                                }
                            }
                            let still_initial = read_json::<PrimaryRec>(&m.primary_path(&uuid))
                                .is_some_and(|now| now.state == ReplicaState::Initial);
                            if !still_initial || m.qemu_pid(&uuid).is_none() {
                                break;
                            }
                        }
                        lock(&SCHED).busy.remove(&uuid);
                    });
                }
            }
        }
    }

    /// One cycle of `uuid` (the caller holds its busy flag). With `final_cut`, a complete
    /// (never partial) cycle is shipped even when nothing changed. Returns the cut.
    async fn replica_cycle(&self, uuid: Uuid, final_cut: bool) -> ApiResult<Option<CutStats>> {
        let path = self.primary_path(&uuid);
        let Some(mut r) = read_json::<PrimaryRec>(&path) else {
            return Ok(None);
        };
        let res = self.replica_cycle_inner(&mut r, final_cut).await;
        // The record may have been removed (disable) meanwhile: do not bring it back.
        if path.exists() {
            if let Some(now) = read_json::<PrimaryRec>(&path) {
                // Keep an administrator's state change made while the cycle ran.
                if now.state != r.state
                    && matches!(now.state, ReplicaState::Paused | ReplicaState::FailedOver)
                {
                    r.state = now.state;
                }
            }
            match &res {
                Ok(_) => r.last_error = None,
                Err(e) => {
                    r.last_error = Some(e.message.clone());
                    r.initialized = false;
                }
            }
            self.save_primary(&r)?;
        }
        res
    }

    async fn replica_cycle_inner(
        &self,
        r: &mut PrimaryRec,
        final_cut: bool,
    ) -> ApiResult<Option<CutStats>> {
        let worker = self.worker_client(&r.uuid);
        let mut st: TrackStatus = worker
            .get("/replica")
            .await
            .map_err(|e| ApiError::failed(format!("asking the worker for change tracking: {e}")))?;
        if !st.tracking {
            // A reverse replication's trackers are attached when the VM starts; missing
            // them before the first cycle means changes may be unrecorded: copy it all.
            let full = r.reverse_point.is_some() && r.cycles == 0;
            if full {
                tracing::warn!(vm = %r.vm, "change tracking was not attached at start: reverse replication ships every block");
            } else if r.marked && !r.resync {
                // Replication was under way and tracking is gone: what changed meanwhile
                // is unknown, so the replica is compared by checksums.
                tracing::warn!(vm = %r.vm, "change tracking was not attached: a checksum resync follows");
                r.resync = true;
                self.save_primary(r)?;
            }
            st = worker
                .post(
                    "/replica/track",
                    &TrackRequest {
                        mark_all: !r.marked || full,
                    },
                )
                .await
                .map_err(|e| ApiError::failed(format!("attaching change tracking: {e}")))?;
            if !r.marked {
                r.marked = true;
                r.initial_total = st.dirty_grains;
                self.save_primary(r)?;
            }
        }
        let client = self.peer_client(r)?;
        if !r.initialized {
            let spec = self.spec(&r.uuid)?;
            let sizes = st.disk_sizes.clone();
            let mut s = open_channel(&client, &r.vm, &r.to, "replica-init")
                .await
                .map_err(ApiError::failed)?;
            replica::write_json(
                &mut s,
                &InitRequest {
                    spec,
                    disk_sizes: sizes,
                    recovery_points: r.recovery_points,
                    app_consistent_secs: r.app_consistent_secs,
                    interval_secs: r.interval_secs,
                    reverse_point: r.reverse_point,
                    diverged: r.diverged,
                    seed: r.seed,
                },
            )
            .await
            .map_err(|e| ApiError::failed(chain(&e)))?;
            match replica::read_json::<_, Answer<InitAnswer>>(&mut s, 64 << 10)
                .await
                .map_err(|e| ApiError::failed(chain(&e)))?
            {
                Answer::Ok(a) => {
                    r.seq = a.latest_seq;
                    r.initialized = true;
                    if !a.initializing && r.state == ReplicaState::Initial {
                        r.state = ReplicaState::Replicating;
                    }
                }
                Answer::Error(e) => {
                    return Err(ApiError::failed(format!("replica host {}: {e}", r.to)))
                }
            }
        }
        if st.resync_required && !r.resync {
            tracing::warn!(vm = %r.vm, "change tracking cannot be trusted: a checksum resync follows");
            r.resync = true;
            self.save_primary(r)?;
        }
        if r.resync {
            self.resync_compare(r, &client).await?;
            st = worker.get("/replica").await.map_err(|e| {
                ApiError::failed(format!("asking the worker for change tracking: {e}"))
            })?;
        }
        // An application-consistent point is due (complete cycles only, once replicating).
        let app_due = r.app_consistent_secs > 0
            && r.state == ReplicaState::Replicating
            && r.app_attempt_ms.is_none_or(|t| {
                now_ms().saturating_sub(t) >= r.app_consistent_secs.saturating_mul(1000)
            });
        if !final_cut
            && !app_due
            && st.dirty_grains == 0
            && r.state == ReplicaState::Replicating
            && r.interval_secs == 0
            && r.last_cut_unix_ms
                .is_some_and(|c| now_ms().saturating_sub(c) < CONTINUOUS_IDLE.as_millis() as u64)
        {
            lock(&IN_SYNC).insert(r.uuid, now_ms());
            return Ok(None);
        }
        let max_grains = if r.state == ReplicaState::Initial && !final_cut {
            initial_chunk(r.bandwidth)
        } else {
            u64::MAX
        };
        let file = self.store.vm_dir(&r.uuid).join("replica").join("out.cycle");
        if let Some(d) = file.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        // The file exists (empty) before the cut starts: a partial cycle is shipped while
        // it grows. A complete one is cut whole first: streamed, its cut shared the CPU with
        // the shipping and continuous mode slowed (benchmark: 93 instead of 119 cycles in
        // 120 s, lag p99 3.2 s instead of 1.6 s).
        let stream = max_grains != u64::MAX;
        std::fs::File::create(&file)
            .map_err(|e| ApiError::failed(format!("creating {}: {e}", file.display())))?;
        let seq = r.seq + 1;
        let req = CutRequest {
            vm: r.vm.clone(),
            seq,
            max_grains,
            path: file.clone(),
            app_consistent: app_due,
            stream,
        };
        let cutting = async {
            worker
                .post::<_, CutStats>("/replica/cut", &req)
                .await
                .map_err(|e| ApiError::failed(format!("cutting cycle {seq}: {e}")))
        };
        let (cut, shipped) = ship_while_cut(&client, &r.vm, &r.to, &file, cutting).await;
        let cut = match cut {
            Ok(c) => c,
            Err(e) => {
                // The worker put its trackers back; the replica refused the truncated cycle.
                let _ = std::fs::remove_file(&file);
                return Err(e);
            }
        };
        if app_due {
            r.app_attempt_ms = Some(cut.cut_unix_ms);
            r.app_consistent_error = cut.app_consistent_error.clone();
            if cut.app_consistent {
                tracing::info!(vm = %r.vm, seq = cut.seq, frozen_ms = cut.frozen_ms, "application-consistent cut");
            }
        }
        let _ = std::fs::remove_file(&file);
        match shipped {
            Ok((seq, len)) if seq == cut.seq => {
                let _: TrackStatus = worker
                    .post("/replica/commit", &seq)
                    .await
                    .map_err(|e| ApiError::failed(format!("committing cycle {seq}: {e}")))?;
                r.seq = seq;
                r.cycles += 1;
                r.bytes_shipped += len;
                if cut.partial {
                    r.initial_done += cut.grains;
                } else {
                    r.initial_done = r.initial_total;
                    r.last_cut_unix_ms = Some(cut.cut_unix_ms);
                    if cut.app_consistent {
                        r.last_app_consistent_ms = Some(cut.cut_unix_ms);
                    }
                    record_applied(r.uuid, cut.cut_unix_ms);
                    if r.state == ReplicaState::Initial {
                        r.state = ReplicaState::Replicating;
                        tracing::info!(vm = %r.vm, "initial replication complete");
                    }
                }
                tracing::debug!(vm = %r.vm, seq, bytes = len, partial = cut.partial, "cycle applied by the replica");
                if cut.partial && r.bandwidth > 0 {
                    tokio::time::sleep(replica::primary::throttle_delay(len, r.bandwidth)).await;
                }
                Ok(Some(cut))
            }
            other => {
                let _: Result<TrackStatus, _> = worker.post("/replica/abort", &()).await;
                let why = match other {
                    Ok((seq, _)) => {
                        format!("the replica applied cycle {seq}, expected {}", cut.seq)
                    }
                    Err(e) => e,
                };
                Err(ApiError::failed(why))
            }
        }
    }

    /// The checksum compare of a resync: the replica's sums of its latest point (or of the
    /// base it seeds), compared by the worker with the live disks (tracking attached
    /// first), which marks the differing blocks; the next cycles ship them.
    async fn resync_compare(&self, r: &mut PrimaryRec, client: &PeerClient) -> ApiResult<()> {
        let mut s = open_channel(client, &r.vm, &r.to, "replica-sums")
            .await
            .map_err(ApiError::failed)?;
        let info = match replica::read_json::<_, Answer<SumsInfo>>(&mut s, 64 << 10)
            .await
            .map_err(|e| ApiError::failed(chain(&e)))?
        {
            Answer::Ok(i) => i,
            Answer::Error(e) => {
                return Err(ApiError::failed(format!(
                    "replica host {}: checksums: {e}",
                    r.to
                )))
            }
        };
        if info.len > MAX_SUMS {
            return Err(ApiError::failed(format!(
                "replica host {}: {} bytes of checksums",
                r.to, info.len
            )));
        }
        if info.seq != r.seq {
            return Err(ApiError::failed(format!(
                "the replica is at cycle {}, expected {}",
                info.seq, r.seq
            )));
        }
        let mut bytes = vec![0u8; info.len as usize];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut bytes)
            .await
            .map_err(|e| ApiError::failed(format!("reading the replica's checksums: {e}")))?;
        let file = self
            .store
            .vm_dir(&r.uuid)
            .join("replica")
            .join("remote.sums");
        std::fs::write(&file, &bytes).map_err(ApiError::internal)?;
        // Reading and hashing every disk takes a while: a long timeout.
        let worker = api::Client::new(self.run_dir(&r.uuid).join("worker.sock"))
            .with_timeout(Duration::from_secs(3600));
        let st: replica::ResyncStats = worker
            .post(
                "/replica/resync",
                &api::replica::ResyncRequest { path: file.clone() },
            )
            .await
            .map_err(|e| ApiError::failed(format!("comparing checksums: {e}")))?;
        let _ = std::fs::remove_file(&file);
        tracing::info!(vm = %r.vm, blocks = st.blocks, differing = st.differing_blocks, "checksum resync: the differing blocks go in the next cycles");
        if r.state == ReplicaState::Initial {
            r.initial_total = st.differing_bytes.div_ceil(storage::tracking::GRAIN);
            r.initial_done = 0;
        }
        r.resync = false;
        r.last_resync = Some(st);
        self.save_primary(r)
    }

    /// `vireo replica export VM --to DIR` (on the primary): a copy of the VM's disks for
    /// removable media (read through the worker while the VM runs, or from the images when
    /// it is off); `export.json` is written last.
    pub async fn replica_export(&self, vm: &str, dir: PathBuf) -> ApiResult<FailoverReport> {
        let (uuid, _) = self.find(vm)?;
        if !dir.is_absolute() {
            return Err(ApiError::invalid(format!(
                "--to {}: give an absolute directory",
                dir.display()
            )));
        }
        if dir.join(replica::seed::EXPORT_META).exists() {
            return Err(ApiError::conflict(format!(
                "{} already holds an export",
                dir.display()
            )));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(ApiError::invalid(format!(
                "--to {} is a file, not a directory: give a new or empty directory (e.g. on the removable disk)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::invalid(format!(
                "--to {}: {e} (give a directory this host can create and write)",
                dir.display()
            ))
        })?;
        let started = now_ms();
        let out: api::replica::ExportedDisks = if self.qemu_pid(&uuid).is_some() {
            let worker = api::Client::new(self.run_dir(&uuid).join("worker.sock"))
                .with_timeout(Duration::from_secs(24 * 3600));
            worker
                .post(
                    "/replica/export",
                    &api::replica::ExportReplica { dir: dir.clone() },
                )
                .await
                .map_err(|e| ApiError::failed(format!("exporting {vm}: {e}")))?
        } else {
            let disks: Vec<PathBuf> = self
                .spec(&uuid)?
                .disks
                .iter()
                .map(|d| d.path.clone())
                .collect();
            let d = dir.clone();
            tokio::task::spawn_blocking(move || {
                let mut out = api::replica::ExportedDisks::default();
                for (i, p) in disks.iter().enumerate() {
                    let v = vhdx::Vhdx::open(p, vhdx::OpenOptions { read_only: true })
                        .map_err(|e| format!("{}: {}", p.display(), chain(&e)))?;
                    let name = format!("disk{i}.vhdx");
                    let n = replica::seed::export_image(
                        v.size(),
                        |off, buf| v.read_at(buf, off).map_err(std::io::Error::other),
                        &d.join(&name),
                    )
                    .map_err(|e| chain(&e))?;
                    out.disk_sizes.push(v.size());
                    out.files.push(name);
                    out.bytes += n;
                }
                Ok::<_, String>(out)
            })
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| ApiError::failed(format!("exporting {vm}: {e}")))?
        };
        let meta = replica::seed::ExportMeta {
            format_version: replica::seed::EXPORT_VERSION,
            vm: vm.to_string(),
            disk_sizes: out.disk_sizes.clone(),
            files: out.files.clone(),
            started_unix_ms: started,
        };
        replica::seed::save_meta(&dir, replica::seed::EXPORT_META, &meta)
            .map_err(|e| ApiError::failed(chain(&e)))?;
        Ok(FailoverReport {
            steps: vec![
                format!(
                    "exported {} disk(s) of {vm} to {} ({} bytes of data; all-zero MiBs left out)",
                    out.files.len(),
                    dir.display(),
                    out.bytes
                ),
                format!("carry it to the replica host and run there: vireo replica import {vm} --from DIR"),
                format!("then here: vireo replica enable {vm} --to HOST --initial export --start (only the blocks that differ from the export cross the network)"),
            ],
            vm: vm.to_string(),
            point: None,
        })
    }

    /// `vireo replica import VM --from DIR | --disk FILE...` (on the replica host): the
    /// seed of the replica of `vm` (an export, copied in; or an existing copy, used in
    /// place), which the primary's `--initial export|existing` starts from.
    pub async fn replica_import(
        &self,
        vm: &str,
        req: api::replica::ImportReplica,
    ) -> ApiResult<FailoverReport> {
        let dir = self.replica_dir(vm)?;
        let l = replica_lock(vm);
        let _g = l.lock().await;
        if dir.join("replica-vm.json").exists() {
            return Err(ApiError::conflict(format!(
                "a replica of {vm} is already kept here (`vireo replica status`)"
            )));
        }
        let seed_dir = dir.join("seed");
        let name = vm.to_string();
        let r = tokio::task::spawn_blocking(move || match (&req.from, req.disks.is_empty()) {
            (Some(from), true) => {
                replica::seed::import(from, &name, &seed_dir).map(|(m, b)| (m, b, true))
            }
            (None, false) => {
                replica::seed::import_existing(&req.disks, &name, &seed_dir).map(|m| (m, 0, false))
            }
            _ => Err(replica::StoreError::Mismatch(
                "give --from DIR (an export) or --disk FILE... (an existing copy), not both".into(),
            )),
        })
        .await
        .map_err(ApiError::internal)?;
        let (m, bytes, copied) = r.map_err(|e| match e.kind() {
            replica::ErrorKind::InvalidInput => ApiError::invalid(chain(&e)),
            _ => ApiError::failed(chain(&e)),
        })?;
        Ok(FailoverReport {
            steps: vec![
                if copied {
                    format!(
                        "imported the export of {vm}: {} disk(s), {bytes} bytes copied into {}",
                        m.files.len(),
                        dir.join("seed").display()
                    )
                } else {
                    format!("recorded the existing copy of {vm} ({} disk(s)) as its seed; the files are never written", m.files.len())
                },
                format!(
                    "on the primary: vireo replica enable {vm} --to THIS-HOST --initial {} --start",
                    if copied { "export" } else { "existing" }
                ),
            ],
            vm: vm.to_string(),
            point: None,
        })
    }

    /// `vireo replica resync VM` (on the primary): compare the replica with the disks by
    /// checksums before the next cycle and ship only what differs (change tracking that
    /// cannot be trusted triggers the same compare by itself).
    pub fn replica_resync(&self, vm: &str) -> ApiResult<FailoverReport> {
        let mut r = self.primary_rec(vm)?;
        if matches!(r.state, ReplicaState::Enabled | ReplicaState::FailedOver) {
            return Err(ApiError::wrong_state(format!(
                "replication of {vm} is not running ({:?}): nothing to resync",
                r.state
            )));
        }
        r.resync = true;
        self.save_primary(&r)?;
        Ok(FailoverReport {
            steps: vec![
                format!("a checksum resync of {vm} runs before its next cycle: both hosts hash every MiB of its disks"),
                format!("only the differing blocks are shipped to {} (`vireo replica status` shows resyncing until then)", r.to),
            ],
            vm: vm.to_string(),
            point: None,
        })
    }

    /// `vireo replica reverse VM` on the former replica after an unplanned failover, once
    /// the old primary is back: commits the failover, attaches change tracking to the
    /// running VM and replicates it back; the old primary seeds a store from its own
    /// (diverged) copy and a checksum compare ships only the differing blocks.
    pub async fn replica_reverse(&self, vm: &str) -> ApiResult<FailoverReport> {
        let l = replica_lock(vm);
        let _g = l.lock().await;
        let (dir, mut rec) = self.replica_rec(vm)?;
        let Some(f) = rec.failover.clone() else {
            return Err(ApiError::wrong_state(format!(
                "{vm} has not failed over to this host: nothing to reverse (`vireo replica failover {vm}` first)"
            )));
        };
        if rec.reversed || self.primary_recs().iter().any(|r| r.vm == vm) {
            return Err(ApiError::wrong_state(format!(
                "replication of {vm} is already reversed (`vireo replica status`)"
            )));
        }
        let (uuid, _) = self.find(&f.vm)?;
        if self.qemu_pid(&uuid).is_none() {
            return Err(ApiError::wrong_state(format!(
                "{vm} is not running here: start it first (`vireo vm start {vm}`), its changes are tracked from then on"
            )));
        }
        let mut steps = Vec::new();
        if !rec.committed {
            rec.committed = true;
            save_json(&dir.join("replica-vm.json"), &rec)?;
            steps.push(format!(
                "committed the failover to point {} (the other recovery points are no longer offered)",
                f.point
            ));
        }
        let st: TrackStatus = self
            .worker_client(&uuid)
            .post("/replica/track", &TrackRequest { mark_all: false })
            .await
            .map_err(|e| ApiError::failed(format!("attaching change tracking: {e}")))?;
        steps.push(format!(
            "change tracking attached to {vm}'s {} disk(s): every block written from now on is recorded",
            st.disk_sizes.len()
        ));
        let to = self.reverse_replication(vm, &rec, &rec.primary_fp.clone(), None)?;
        rec.reversed = true;
        save_json(&dir.join("replica-vm.json"), &rec)?;
        steps.push(format!(
            "replication reversed towards {to}: its copy of {vm} (which must be off there) becomes the base; both sides hash every MiB (SHA-256) and only the differing blocks are shipped"
        ));
        steps.push(format!(
            "watch `vireo replica status` (resyncing, then initial, then replicating); then `vireo replica failover {vm} --planned` here moves {vm} home"
        ));
        Ok(FailoverReport {
            steps,
            vm: vm.to_string(),
            point: Some(f.point),
        })
    }

    /// `vireo replica failover VM --planned` on the primary.
    async fn planned_failover(&self, vm: &str) -> ApiResult<FailoverReport> {
        let mut r = self.primary_rec(vm)?;
        let mut steps = Vec::new();
        if r.state == ReplicaState::FailedOver {
            return Err(ApiError::wrong_state(format!(
                "{vm} has already failed over to {}",
                r.to
            )));
        }
        if r.last_cut_unix_ms.is_none() {
            return Err(ApiError::wrong_state(format!(
                "initial replication of {vm} is not complete: there is nothing to fail over to yet"
            )));
        }
        if self.qemu_pid(&r.uuid).is_none() {
            return Err(ApiError::wrong_state(format!(
                "{vm} is not running: a planned failover ships the last changes from the running VM; start it first, or run the failover on the replica"
            )));
        }
        // Keep the scheduler off this VM.
        loop {
            {
                let mut s = lock(&SCHED);
                if !s.busy.contains(&r.uuid) {
                    s.busy.insert(r.uuid);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let res = async {
            let _: api::worker::WorkerStatus = self
                .worker_client(&r.uuid)
                .post("/pause", &())
                .await
                .map_err(|e| ApiError::failed(format!("pausing {vm}: {e}")))?;
            steps.push(format!("1. paused {vm} (no more guest writes)"));
            let cut = self
                .replica_cycle(r.uuid, true)
                .await?
                .ok_or_else(|| ApiError::failed("the final cycle was not cut"))?;
            steps.push(format!(
                "2. shipped the last changes: cycle {} ({} grains), applied on {}",
                cut.seq, cut.grains, r.to
            ));
            self.turn_off(vm).await?;
            steps.push(format!("3. turned {vm} off here"));
            r = self.primary_rec(vm)?;
            r.state = ReplicaState::FailedOver;
            self.save_primary(&r)?;
            let client = self.peer_client(&r)?;
            let mut s = open_channel(&client, vm, &r.to, "replica-failover")
                .await
                .map_err(ApiError::failed)?;
            replica::write_json(
                &mut s,
                &FailoverRequest {
                    planned: true,
                    point: Some(cut.seq),
                    test_switch: None,
                },
            )
            .await
            .map_err(|e| ApiError::failed(chain(&e)))?;
            match replica::read_json::<_, Answer<FailoverReport>>(&mut s, 1 << 20)
                .await
                .map_err(|e| ApiError::failed(chain(&e)))?
            {
                Answer::Ok(rep) => {
                    for st in rep.steps {
                        steps.push(format!("   on {}: {st}", r.to));
                    }
                    steps.push(format!(
                        "4. {vm} runs on {} from point {} (zero data loss)",
                        r.to, cut.seq
                    ));
                    Ok(cut.seq)
                }
                Answer::Error(e) => Err(ApiError::failed(format!(
                    "the replica host {} could not start {vm}: {e} (the VM is off here: `vireo replica failover {vm}` on {} retries, `vireo vm start {vm}` here goes back)",
                    r.to, r.to
                ))),
            }
        }
        .await;
        lock(&SCHED).busy.remove(&r.uuid);
        let point = res?;
        Ok(FailoverReport {
            steps,
            vm: vm.to_string(),
            point: Some(point),
        })
    }

    // ---------------------------------------------------------------- replica side

    /// `vireo replica failover VM [--planned] [--point ID]`.
    pub async fn replica_failover(
        &self,
        vm: &str,
        req: FailoverRequest,
    ) -> ApiResult<FailoverReport> {
        if req.planned {
            if self.primary_recs().iter().any(|r| r.vm == vm) {
                return self.planned_failover(vm).await;
            }
            return Err(ApiError::not_found(format!(
                "VM {vm:?} is not replicated from this host: run a planned failover on the primary (without --planned on the replica when the primary is lost)"
            )));
        }
        if self.replica_rec(vm).is_err() && self.primary_recs().iter().any(|r| r.vm == vm) {
            return Err(ApiError::wrong_state(format!(
                "{vm} is replicated from this host (the primary): use `vireo replica failover {vm} --planned` here, or run the failover on the replica host"
            )));
        }
        self.failover_local(vm, req.point, Start::Failover).await
    }

    /// Starts the replica of `vm` from a point ([`Start::Test`]: a copy named `<vm>-test`
    /// without network adapters, replication continues; [`Start::Planned`]: replication is
    /// reversed once the VM runs).
    async fn failover_local(
        &self,
        vm: &str,
        point: Option<u64>,
        how: Start,
    ) -> ApiResult<FailoverReport> {
        let test = matches!(how, Start::Test(_));
        if let Start::Test(Some(sw)) = &how {
            if self.switch_show(sw).await.is_err() {
                return Err(ApiError::invalid(format!(
                    "test switch {sw:?} does not exist on this host: create an isolated one first (`vireo switch new {sw} --type private`)"
                )));
            }
        }
        let l = replica_lock(vm);
        let _g = l.lock().await;
        let (dir, mut rec) = self.replica_rec(vm)?;
        let mut steps = Vec::new();
        if test && rec.test.is_some() {
            return Err(ApiError::conflict(format!(
                "a test failover of {vm} is running: `vireo replica test-stop {vm}` first"
            )));
        }
        if rec.committed {
            return Err(ApiError::wrong_state(if test {
                format!("the failover of {vm} is committed: {vm} runs here, there is no replica to test")
            } else {
                format!("the failover of {vm} is committed: the recovery points are gone")
            }));
        }
        let sdir = dir.join(&rec.store);
        let store = tokio::task::spawn_blocking({
            let sdir = sdir.clone();
            move || ReplicaStore::open(&sdir)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(store_err)?;
        if store.initializing() || store.points().is_empty() {
            return Err(ApiError::wrong_state(format!(
                "initial replication of {vm} is not complete: there is no recovery point yet"
            )));
        }
        let ids: Vec<u64> = store.points().iter().map(|p| p.seq).collect();
        let pick = point.unwrap_or(store.latest().seq);
        let Some(p) = store.points().iter().find(|p| p.seq == pick).cloned() else {
            return Err(ApiError::invalid(format!(
                "{vm} has no recovery point {pick} (points: {ids:?})"
            )));
        };
        steps.push(format!(
            "chose recovery point {} (cut {} ms ago)",
            p.seq,
            now_ms().saturating_sub(p.cut_unix_ms)
        ));
        if !test {
            if let Some(old) = rec.failover.take() {
                self.remove_copy(&dir, &old).await;
                let mut s = ReplicaStore::open(&sdir).map_err(store_err)?;
                s.pin(old.point, false).map_err(store_err)?;
                steps.push(format!(
                    "removed the VM started from point {} (choice revised)",
                    old.point
                ));
                save_json(&dir.join("replica-vm.json"), &rec)?;
            }
        }
        let kind = if test { "test" } else { "failover" };
        let ldir_name = format!("{kind}-{}", p.seq);
        let ldir = dir.join(&ldir_name);
        let parents = store.point_paths(p.seq).unwrap_or_default();
        {
            let mut s = ReplicaStore::open(&sdir).map_err(store_err)?;
            s.pin(p.seq, true).map_err(store_err)?;
        }
        let layers = tokio::task::spawn_blocking({
            let ldir = ldir.clone();
            move || -> Result<Vec<PathBuf>, String> {
                let _ = std::fs::remove_dir_all(&ldir);
                std::fs::create_dir_all(&ldir).map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                for (i, parent) in parents.iter().enumerate() {
                    let path = ldir.join(format!("disk{i}.avhdx"));
                    let v = vhdx::Vhdx::create(
                        &path,
                        &vhdx::CreateOptions {
                            disk_type: vhdx::DiskType::Differencing,
                            parent: Some(parent.clone()),
                            ..Default::default()
                        },
                    )
                    .map_err(|e| chain(&e))?;
                    v.close().map_err(|e| chain(&e))?;
                    out.push(path);
                }
                Ok(out)
            }
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::failed(format!("creating the disks on point {}: {e}", p.seq)))?;
        steps.push(format!(
            "created differencing disks on the point in {}",
            ldir.display()
        ));
        let name = if test {
            format!("{vm}-test")
        } else {
            vm.to_string()
        };
        let spec = &rec.spec;
        let req = CreateVm {
            name: name.clone(),
            generation: match spec.generation {
                api::Generation::Gen1 => 1,
                api::Generation::Gen2 => 2,
            },
            cpus: Some(spec.cpus),
            memory: Some(spec.memory),
            disks: layers
                .iter()
                .zip(&spec.disks)
                .map(|(p, d)| CreateDisk {
                    path: p.clone(),
                    bus: Some(d.bus),
                    read_only: d.read_only,
                })
                .collect(),
            secure_boot: Some(spec.secure_boot),
            secure_boot_template: Some(spec.secure_boot_template),
            accel: Some(spec.accel),
            boot_order: Some(spec.boot_order.clone()),
            stop_timeout_secs: Some(spec.stop_timeout_secs),
        };
        let running = Running {
            point: p.seq,
            vm: name.clone(),
            dir: ldir_name,
        };
        if let Err(e) = self.create(req) {
            self.remove_copy(&dir, &running).await;
            return Err(e);
        }
        if let Start::Planned(_) = &how {
            // The worker attaches change tracking before the guest runs (see
            // `vireo-worker/src/replica.rs`): every block written here is recorded.
            let marked = self.find(&name).and_then(|(uuid, _)| {
                let d = self.store.vm_dir(&uuid).join("replica");
                std::fs::create_dir_all(&d)
                    .and_then(|()| std::fs::write(d.join("tracking"), b"1"))
                    .map_err(|e| ApiError::failed(format!("arming change tracking: {e}")))
            });
            if let Err(e) = marked {
                self.remove_copy(&dir, &running).await;
                return Err(e);
            }
        }
        steps.push(format!(
            "defined VM {name} ({})",
            if test { "test copy" } else { "replica" }
        ));
        match self.replica_nics(&name, &rec.spec.nics, &how).await {
            Ok(notes) => steps.extend(notes),
            Err(e) => {
                self.remove_copy(&dir, &running).await;
                return Err(e);
            }
        }
        if test {
            rec.test = Some(running);
        } else {
            rec.failover = Some(running);
        }
        save_json(&dir.join("replica-vm.json"), &rec)?;
        self.start(&name).await?;
        steps.push(format!("started VM {name}"));
        if let Start::Planned(fp) = &how {
            match self.reverse_replication(vm, &rec, fp, Some(p.seq)) {
                Ok(to) => {
                    rec.committed = true;
                    rec.reversed = true;
                    save_json(&dir.join("replica-vm.json"), &rec)?;
                    steps.push(format!(
                        "replication reversed: blocks changed here since point {} flow back to {to} (which must accept replicas from this host)",
                        p.seq
                    ));
                }
                Err(e) => steps.push(format!(
                    "replication NOT reversed: {} (`vireo replica enable {vm} --to HOST` copies it all)",
                    e.message
                )),
            }
        } else if test {
            steps.push(format!(
                "replication continues; remove the copy with `vireo replica test-stop {vm}`"
            ));
        } else {
            steps.push(format!(
                "cycles from {} are refused now; next: `vireo replica commit {vm}`, or `vireo replica failover {vm} --point ID` to choose another point, or `vireo replica cancel-failover {vm}`",
                rec.primary
            ));
        }
        Ok(FailoverReport {
            steps,
            vm: name,
            point: Some(p.seq),
        })
    }

    /// After a planned failover to this host: `vm` replicates back to the former primary
    /// (certificate fingerprint `fp`), whose disks hold point `point`.
    /// With `point` `None` (reverse after an unplanned failover), the former primary's
    /// disks diverged: it seeds a store from them and a checksum compare ships only the
    /// differing blocks (initial state until the first complete cycle).
    fn reverse_replication(
        &self,
        vm: &str,
        rec: &ReplicaRec,
        fp: &str,
        point: Option<u64>,
    ) -> ApiResult<String> {
        let (uuid, _) = self.find(vm)?;
        let p = peers::get()?;
        let peer = p.trust.by_fingerprint(fp).ok_or_else(|| {
            ApiError::wrong_state(format!("{} is no longer a trusted host", rec.primary))
        })?;
        if let Some(old) = self.primary_recs().into_iter().find(|r| r.vm == vm) {
            let _ = std::fs::remove_file(self.primary_path(&old.uuid));
        }
        let r = PrimaryRec {
            format_version: RECORD_VERSION,
            vm: vm.to_string(),
            uuid,
            to: peer.name.clone(),
            address: peer.address.clone(),
            fingerprint: peer.fingerprint.clone(),
            interval_secs: rec.interval_secs,
            recovery_points: rec.recovery_points,
            bandwidth: 0,
            state: if point.is_some() {
                ReplicaState::Replicating
            } else {
                ReplicaState::Initial
            },
            initialized: false,
            marked: true,
            seq: 0,
            last_cut_unix_ms: None,
            bytes_shipped: 0,
            cycles: 0,
            initial_total: 0,
            initial_done: 0,
            last_error: None,
            reverse_point: point,
            resync: point.is_none(),
            diverged: point.is_none(),
            last_resync: None,
            seed: false,
            app_consistent_secs: rec.app_consistent_secs,
            app_attempt_ms: None,
            last_app_consistent_ms: None,
            app_consistent_error: None,
            start_at_ms: None,
        };
        self.save_primary(&r)?;
        tracing::info!(vm, to = %r.to, ?point, "replication reversed");
        Ok(r.to)
    }

    async fn remove_copy(&self, dir: &Path, r: &Running) {
        if self.find(&r.vm).is_ok() {
            let _ = self.turn_off(&r.vm).await;
            if let Err(e) = self.delete(&r.vm, true).await {
                tracing::warn!(vm = %r.vm, "deleting the failed-over VM: {}", e.message);
            }
        }
        let _ = std::fs::remove_dir_all(dir.join(&r.dir));
    }

    /// `vireo replica commit VM`.
    pub async fn replica_commit(&self, vm: &str) -> ApiResult<FailoverReport> {
        let l = replica_lock(vm);
        let _g = l.lock().await;
        let (dir, mut rec) = self.replica_rec(vm)?;
        let Some(f) = rec.failover.clone() else {
            return Err(ApiError::wrong_state(format!(
                "{vm} has not failed over: nothing to commit (`vireo replica failover {vm}` first)"
            )));
        };
        if rec.committed {
            return Err(ApiError::wrong_state(format!(
                "the failover of {vm} is already committed"
            )));
        }
        rec.committed = true;
        save_json(&dir.join("replica-vm.json"), &rec)?;
        Ok(FailoverReport {
            steps: vec![
                format!("committed: {vm} keeps running from point {}", f.point),
                "the other recovery points are no longer offered; replication from the old primary is over".into(),
            ],
            vm: f.vm,
            point: Some(f.point),
        })
    }

    /// `vireo replica cancel-failover VM`.
    pub async fn replica_cancel_failover(&self, vm: &str) -> ApiResult<FailoverReport> {
        let l = replica_lock(vm);
        let _g = l.lock().await;
        let (dir, mut rec) = self.replica_rec(vm)?;
        let Some(f) = rec.failover.clone() else {
            return Err(ApiError::wrong_state(format!(
                "{vm} has not failed over: nothing to cancel"
            )));
        };
        if rec.committed {
            return Err(ApiError::wrong_state(format!(
                "the failover of {vm} is committed and cannot be cancelled"
            )));
        }
        self.remove_copy(&dir, &f).await;
        if let Ok(mut s) = ReplicaStore::open(&dir.join(&rec.store)) {
            let _ = s.pin(f.point, false);
        }
        rec.failover = None;
        save_json(&dir.join("replica-vm.json"), &rec)?;
        Ok(FailoverReport {
            steps: vec![
                format!(
                    "turned off and removed {} (started from point {})",
                    f.vm, f.point
                ),
                format!(
                    "the recovery points are kept; cycles from {} are accepted again",
                    rec.primary
                ),
            ],
            vm: vm.to_string(),
            point: None,
        })
    }

    /// `vireo replica test-failover VM [--point ID]`.
    pub async fn replica_test_failover(
        &self,
        vm: &str,
        point: Option<u64>,
        test_switch: Option<String>,
    ) -> ApiResult<FailoverReport> {
        self.failover_local(vm, point, Start::Test(test_switch))
            .await
    }

    /// Gives the VM `name` (defined from a replica, not started) the primary's network
    /// adapters: same names, MACs, models and port settings (VLAN, security, ACL, QoS).
    /// A failover connects each to the switch of the same name here, or leaves it
    /// disconnected when there is none; a test copy ([`Start::Test`]) connects them to its
    /// test switch, or to nothing, so it never reaches production networks.
    /// Returns one line per adapter for the failover's steps.
    async fn replica_nics(
        &self,
        name: &str,
        primary: &[api::NicSpec],
        how: &Start,
    ) -> ApiResult<Vec<String>> {
        let test_switch = match how {
            Start::Test(sw) => Some(sw),
            _ => None,
        };
        if primary.is_empty() {
            return Ok(vec!["no network adapters (the primary has none)".into()]);
        }
        let mut notes = Vec::new();
        let mut nics = Vec::new();
        for n in primary {
            let mut n = n.clone();
            let vlan = serde_json::to_string(&n.port.vlan).unwrap_or_default();
            let target = match test_switch {
                Some(sw) => sw.clone(),
                None => match &n.switch {
                    Some(sw) if self.switch_show(sw).await.is_ok() => Some(sw.clone()),
                    Some(sw) => {
                        notes.push(format!(
                            "adapter {} ({}): switch {sw} does not exist on this host, left disconnected (`vireo switch new {sw} ...`, then `vireo vm nic set {name} {} --switch {sw}`)",
                            n.name, n.mac, n.name
                        ));
                        None
                    }
                    None => None,
                },
            };
            match (test_switch, &target) {
                (Some(_), Some(sw)) => notes.push(format!(
                    "adapter {} ({}) on test switch {sw} (VLAN {vlan}); production networks are not reachable",
                    n.name, n.mac
                )),
                (Some(_), None) => notes.push(format!(
                    "adapter {} ({}) disconnected: the test copy is isolated (`--switch NAME` puts test copies on a test switch)",
                    n.name, n.mac
                )),
                (None, Some(sw)) => notes.push(format!(
                    "adapter {} ({}) on switch {sw}, VLAN {vlan}, port settings of the primary",
                    n.name, n.mac
                )),
                (None, None) => {}
            }
            n.switch = target;
            nics.push(n);
        }
        let (uuid, mut spec) = self.vm_by_name(name)?;
        spec.nics = nics;
        self.save_spec(&uuid, spec)?;
        Ok(notes)
    }

    /// `vireo replica test-stop VM`.
    pub async fn replica_test_stop(&self, vm: &str) -> ApiResult<FailoverReport> {
        let l = replica_lock(vm);
        let _g = l.lock().await;
        let (dir, mut rec) = self.replica_rec(vm)?;
        let Some(t) = rec.test.clone() else {
            return Err(ApiError::wrong_state(format!(
                "no test failover of {vm} is running"
            )));
        };
        self.remove_copy(&dir, &t).await;
        if let Ok(mut s) = ReplicaStore::open(&dir.join(&rec.store)) {
            let _ = s.pin(t.point, false);
        }
        rec.test = None;
        save_json(&dir.join("replica-vm.json"), &rec)?;
        Ok(FailoverReport {
            steps: vec![format!("turned off and removed the test copy {}", t.vm)],
            vm: t.vm,
            point: Some(t.point),
        })
    }

    /// Whether the host `who` may replicate to this host.
    fn replica_allowed(&self, who: &PeerId) -> Result<(String, PathBuf), String> {
        let s = self.replica_settings();
        let p = peers::get().map_err(|e| e.message)?;
        let peer = p.trust.by_fingerprint(&who.fingerprint);
        let name = peer
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_else(|| who.addr.clone());
        let allowed = s.allow_from.iter().any(|a| {
            a == "*"
                || a == &who.fingerprint
                || peer.as_ref().is_some_and(|p| {
                    a == &p.name
                        || a == &p.address
                        || p.address.rsplit_once(':').is_some_and(|(h, _)| a == h)
                })
        });
        if !allowed {
            return Err(format!(
                "this host does not accept replicas from {name}: run `vireo host set --allow-replica-from {name}` on it"
            ));
        }
        let path = s.path.ok_or_else(|| {
            "this host keeps no replicas: run `vireo host set --replica-path DIR` on it".to_string()
        })?;
        Ok((name, path))
    }

    /// A `replica-*` stream from a peer (hooked into `serve_stream` after the trust check).
    pub async fn replica_stream(
        &self,
        mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        h: StreamHeader,
        who: PeerId,
    ) {
        let refuse = |why: &str| format!("refused {why}\n");
        let (primary, base) = match self.replica_allowed(&who) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(peer = %who.addr, vm = %h.migration, "refused a replica stream: {e}");
                let _ = tls.write_all(refuse(&e).as_bytes()).await;
                return;
            }
        };
        let Some(name) = safe_name(&h.migration) else {
            let _ = tls.write_all(refuse("(bad VM name)").as_bytes()).await;
            return;
        };
        let dir = base.join(name);
        if tls.write_all(b"ok\n").await.is_err() {
            return;
        }
        let _ = tls.flush().await;
        let l = replica_lock(name);
        match h.channel.as_str() {
            "replica-probe" => {
                let uuid: Result<Uuid, _> = replica::read_json(&mut tls, 1024).await;
                let a: Answer<()> =
                    match (uuid, read_json::<ReplicaRec>(&dir.join("replica-vm.json"))) {
                        (Ok(u), Some(r)) if r.primary_uuid != u => Answer::Error(format!(
                            "a replica of another VM named {name} is kept here"
                        )),
                        (Ok(_), Some(r)) if r.failover.is_some() => {
                            Answer::Error(format!("the replica of {name} has failed over here"))
                        }
                        _ => Answer::Ok(()),
                    };
                let _ = replica::write_json(&mut tls, &a).await;
            }
            "replica-init" => {
                let _g = l.lock().await;
                let a = match replica::read_json::<_, InitRequest>(&mut tls, 4 << 20).await {
                    Ok(req) => self.replica_init(&dir, name, &primary, &who, req).await,
                    Err(e) => Answer::Error(chain(&e)),
                };
                let _ = replica::write_json(&mut tls, &a).await;
            }
            "replica-cycle" | "replica-cycle2" => {
                // Version 2 of the shipping protocol is spoken here: say so (an older
                // host answers this channel as unknown, and the primary falls back).
                if h.channel == "replica-cycle2"
                    && replica::write_json(&mut tls, &Answer::Ok(2u32))
                        .await
                        .is_err()
                {
                    return;
                }
                // The lock is held while the cycle streams in: it is applied as it arrives
                // (the receive stops after a stall, so a failover never waits forever).
                let _g = l.lock().await;
                let rec = match read_json::<ReplicaRec>(&dir.join("replica-vm.json")) {
                    None => Err(format!(
                        "no replica of {name} here (it is initialized first)"
                    )),
                    Some(r) if r.primary_fp != who.fingerprint => {
                        Err(format!("the replica of {name} belongs to another primary"))
                    }
                    Some(r) if r.failover.is_some() => Err(format!(
                        "the replica of {name} has failed over: cycles are refused"
                    )),
                    Some(r) => Ok(r),
                };
                let sdir = rec.as_ref().ok().map(|r| dir.join(&r.store));
                let pause = test_apply_pause();
                let received = replica::receive_streamed(&mut tls, MAX_CYCLE, move |rd| {
                    let Some(sdir) = sdir else {
                        return Err(String::new());
                    };
                    ReplicaStore::open(&sdir)
                        .and_then(|mut s| match pause {
                            Some(p) => s.apply_with_pause(rd, p),
                            None => s.apply(rd),
                        })
                        .map_err(|e| chain(&e))
                })
                .await;
                let (len, applied) = match received {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(vm = %name, "receiving a cycle: {}", chain(&e));
                        return;
                    }
                };
                let outcome = match (rec, applied) {
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                    (Ok(mut r), Ok(p)) => {
                        r.bytes += len;
                        r.cycles += 1;
                        let _ = save_json(&dir.join("replica-vm.json"), &r);
                        Ok(p.seq)
                    }
                };
                if let Err(e) = &outcome {
                    tracing::warn!(vm = %name, "refused a cycle: {e}");
                }
                let _ = replica::answer_cycle(&mut tls, outcome).await;
            }
            "replica-sums" => {
                let _g = l.lock().await;
                let a = match read_json::<ReplicaRec>(&dir.join("replica-vm.json")) {
                    None => Err(format!("no replica of {name} here")),
                    Some(r) if r.primary_fp != who.fingerprint => {
                        Err(format!("the replica of {name} belongs to another primary"))
                    }
                    Some(r) if r.failover.is_some() => {
                        Err(format!("the replica of {name} has failed over here"))
                    }
                    Some(r) => {
                        let sdir = dir.join(&r.store);
                        tokio::task::spawn_blocking(move || {
                            let s = ReplicaStore::open(&sdir).map_err(|e| chain(&e))?;
                            let seq = s.latest().seq;
                            let paths = s.point_paths(seq).unwrap_or_default();
                            let sums =
                                replica::resync::sums_of_images(&paths).map_err(|e| chain(&e))?;
                            Ok::<_, String>((seq, sums.encode()))
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|x| x)
                    }
                };
                match a {
                    Ok((seq, bytes)) => {
                        let info = SumsInfo {
                            seq,
                            len: bytes.len() as u64,
                        };
                        if replica::write_json(&mut tls, &Answer::Ok(info))
                            .await
                            .is_ok()
                        {
                            let _ = tls.write_all(&bytes).await;
                            let _ = tls.flush().await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(vm = %name, "checksums for a resync: {e}");
                        let _ = replica::write_json(&mut tls, &Answer::<SumsInfo>::Error(e)).await;
                    }
                }
            }
            "replica-failover" => {
                let a = match replica::read_json::<_, FailoverRequest>(&mut tls, 4096).await {
                    Ok(req) => {
                        let how = if req.planned {
                            Start::Planned(who.fingerprint.clone())
                        } else {
                            Start::Failover
                        };
                        match self.failover_local(name, req.point, how).await {
                            Ok(rep) => Answer::Ok(rep),
                            Err(e) => Answer::Error(e.message),
                        }
                    }
                    Err(e) => Answer::Error(chain(&e)),
                };
                let _ = replica::write_json(&mut tls, &a).await;
            }
            other => {
                let _ = replica::write_json(
                    &mut tls,
                    &Answer::<()>::Error(format!("unknown replica channel {other}")),
                )
                .await;
            }
        }
    }

    async fn replica_init(
        &self,
        dir: &Path,
        name: &str,
        primary: &str,
        who: &PeerId,
        req: InitRequest,
    ) -> Answer<InitAnswer> {
        let rec_path = dir.join("replica-vm.json");
        let old = read_json::<ReplicaRec>(&rec_path);
        if let Some(r) = &old {
            if r.primary_uuid == req.spec.uuid {
                if r.failover.is_some() {
                    return Answer::Error(format!("the replica of {name} has failed over here"));
                }
                return match ReplicaStore::open(&dir.join(&r.store)) {
                    Ok(s) => Answer::Ok(InitAnswer {
                        latest_seq: s.latest().seq,
                        initializing: s.initializing(),
                    }),
                    Err(e) => Answer::Error(chain(&e)),
                };
            }
            // A reverse replication may replace a replica whose VM was failed over here
            // and has since been failed over back (planned) to the sender.
            if (req.reverse_point.is_none() && !req.diverged) || !r.reversed {
                return Answer::Error(format!("a replica of another VM named {name} is kept here"));
            }
        }
        // Reverse replication: this host's VM holds exactly point `p` of its own cycles.
        let parents = match (req.reverse_point, req.diverged) {
            (None, false) => None,
            (Some(p), _) => match self.reverse_base(name, who, p).await {
                Ok(x) => Some(x),
                Err(e) => return Answer::Error(e),
            },
            (None, true) => match self.diverged_base(name, who) {
                Ok(x) => Some(x),
                Err(e) => return Answer::Error(e),
            },
        };
        let diverged = req.diverged && req.reverse_point.is_none();
        let parents = match (parents, req.seed) {
            (None, true) => {
                let sd = dir.join("seed");
                let got = tokio::task::spawn_blocking(move || replica::seed::seed_paths(&sd)).await;
                match got {
                    Ok(Ok((m, paths))) if m.disk_sizes == req.disk_sizes => {
                        Some((Uuid::nil(), paths))
                    }
                    Ok(Ok((m, _))) => {
                        return Answer::Error(format!(
                            "the seed of {name} here has disks of {:?} bytes, the VM has {:?}",
                            m.disk_sizes, req.disk_sizes
                        ))
                    }
                    Ok(Err(e)) => {
                        return Answer::Error(format!(
                            "no usable seed of {name} here ({}): run `vireo replica import {name} --from DIR` (an export) or `--disk FILE...` (an existing copy) on this host",
                            chain(&e)
                        ))
                    }
                    Err(e) => return Answer::Error(e.to_string()),
                }
            }
            (p, _) => p,
        };
        let resync_base = diverged || req.seed;
        // A store directory that is not in use; an older one may hold layers a disk of
        // the sender's former VM here still sits on: it is kept.
        let store_name = if old.is_some() || dir.join("store").exists() {
            format!("store-{}", now_ms())
        } else {
            "store".to_string()
        };
        let sdir = dir.join(&store_name);
        let sizes = req.disk_sizes.clone();
        let points = req.recovery_points;
        let vm = name.to_string();
        let over = parents.as_ref().map(|(_, p)| p.clone());
        let made = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&sdir).map_err(|e| e.to_string())?;
            let mut s = match &over {
                Some(parents) if resync_base => {
                    ReplicaStore::create_resync_over(&sdir, &vm, parents, &sizes, points)
                }
                Some(parents) => ReplicaStore::create_over(&sdir, &vm, parents, &sizes, points),
                None => ReplicaStore::create(&sdir, &vm, &sizes, points),
            }
            .map_err(|e| chain(&e))?;
            s.set_retention(points, bucket_ms())
                .map_err(|e| chain(&e))?;
            Ok::<_, String>((s.latest().seq, s.initializing()))
        })
        .await;
        let (seq, initializing) = match made {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Answer::Error(e),
            Err(e) => return Answer::Error(e.to_string()),
        };
        if let Some((uuid, _)) = parents.as_ref().filter(|(u, _)| !u.is_nil()) {
            // The old VM is now the base of the store: it must never run (and diverge) again.
            if let Err(e) = self.delete(name, true).await {
                return Answer::Error(format!("removing the former VM {name}: {}", e.message));
            }
            let _ = std::fs::remove_file(self.primary_path(uuid));
            tracing::info!(vm = %name, "the former primary VM is the base of the reverse replica");
        }
        let rec = ReplicaRec {
            format_version: RECORD_VERSION,
            vm: name.to_string(),
            primary_uuid: req.spec.uuid,
            primary_fp: who.fingerprint.clone(),
            primary: primary.to_string(),
            spec: req.spec,
            interval_secs: req.interval_secs,
            bytes: 0,
            cycles: 0,
            failover: None,
            test: None,
            committed: false,
            store: store_name,
            recovery_points: points,
            app_consistent_secs: req.app_consistent_secs,
            reversed: false,
            consolidated: false,
            consolidate_note: None,
        };
        if let Err(e) = save_json(&rec_path, &rec) {
            return Answer::Error(e.message);
        }
        tracing::info!(vm = %name, from = %primary, reverse = ?req.reverse_point, "replica created");
        Answer::Ok(InitAnswer {
            latest_seq: seq,
            initializing,
        })
    }

    /// Checks that this host's VM `name` may seed a reverse replication from `who` after
    /// an unplanned failover (it replicated to `who`, which failed over; it is off here):
    /// its disks diverged, the sender compares checksums. Returns its uuid and disk leaves.
    fn diverged_base(&self, name: &str, who: &PeerId) -> Result<(Uuid, Vec<PathBuf>), String> {
        let refuse = |why: String| format!("reverse replication of {name} refused: {why}");
        let r = self
            .primary_recs()
            .into_iter()
            .find(|r| r.vm == name)
            .ok_or_else(|| {
                refuse("this host has no record of replicating it (enable replication to this host instead)".into())
            })?;
        if r.fingerprint != who.fingerprint {
            return Err(refuse(format!(
                "it replicated to {}, not to the sender",
                r.to
            )));
        }
        if self.qemu_pid(&r.uuid).is_some() {
            return Err(refuse(format!(
                "{name} runs here: turn it off first (`vireo vm stop {name}`); its disks become the base the differences are written over"
            )));
        }
        let spec = self.spec(&r.uuid).map_err(|e| refuse(e.message))?;
        Ok((r.uuid, spec.disks.iter().map(|d| d.path.clone()).collect()))
    }

    /// Checks that this host's VM `name` may be the base of a reverse replication from
    /// `who` at point `p` (it failed over to `who` at that point, planned, and is off);
    /// returns its uuid and disk leaves.
    async fn reverse_base(
        &self,
        name: &str,
        who: &PeerId,
        p: u64,
    ) -> Result<(Uuid, Vec<PathBuf>), String> {
        let refuse = |why: String| format!("reverse replication of {name} refused: {why}");
        let r = self
            .primary_recs()
            .into_iter()
            .find(|r| r.vm == name)
            .ok_or_else(|| refuse("this host has no record of replicating it".into()))?;
        if r.state != ReplicaState::FailedOver || r.fingerprint != who.fingerprint {
            return Err(refuse(format!(
                "it did not fail over to the sender ({:?})",
                r.state
            )));
        }
        if r.seq != p {
            return Err(refuse(format!(
                "this host's copy is at cycle {}, the sender started from point {p}",
                r.seq
            )));
        }
        if self.qemu_pid(&r.uuid).is_some() {
            return Err(refuse(format!("{name} runs here")));
        }
        let spec = self.spec(&r.uuid).map_err(|e| refuse(e.message))?;
        Ok((r.uuid, spec.disks.iter().map(|d| d.path.clone()).collect()))
    }
}

/// How often a cycle file being cut is looked at for new bytes.
const TAIL_POLL: Duration = Duration::from_millis(2);
/// Bytes read from the cycle file at a time.
const SHIP_BUF: usize = 1 << 20;

/// Ships the cycle file `file` to the replica host `to` while the worker cuts it
/// (`cutting`; a cut without `stream`, or by an older worker, is shipped once it is
/// complete): version 2 of the shipping protocol on channel
/// `replica-cycle2`, or, with a replica host that predates it, version 1 once the cut is
/// complete. The channel is opened only once the first bytes are there (an
/// application-consistent cut freezes the guest first, and the replica holds the VM's lock
/// while a cycle streams in). Returns the cut and the applied sequence with the bytes
/// shipped; the cut always ran to its end when this returns.
async fn ship_while_cut(
    client: &PeerClient,
    vm: &str,
    to: &str,
    file: &Path,
    cutting: impl std::future::Future<Output = ApiResult<CutStats>>,
) -> (ApiResult<CutStats>, Result<(u64, u64), String>) {
    use tokio::io::AsyncReadExt;
    tokio::pin!(cutting);
    let mut done: Option<ApiResult<CutStats>> = None;
    let cut_failed = || "the cut failed".to_string();
    let reading = |e: std::io::Error| format!("reading {}: {e}", file.display());
    let shipped = async {
        let mut f = tokio::fs::File::open(file).await.map_err(reading)?;
        while done.is_none() && f.metadata().await.map_err(reading)?.len() == 0 {
            tokio::select! {
                c = &mut cutting => done = Some(c),
                _ = tokio::time::sleep(TAIL_POLL) => {}
            }
        }
        if matches!(done, Some(Err(_))) {
            return Err(cut_failed());
        }
        let mut s = open_channel(client, vm, to, "replica-cycle2").await?;
        match replica::read_json::<_, Answer<u32>>(&mut s, 64 << 10).await {
            Ok(Answer::Ok(_)) => {}
            Ok(Answer::Error(e)) if e.contains("unknown replica channel") => {
                // A replica host that predates version 2: the whole file, once cut.
                drop(s);
                let c = match done.take() {
                    Some(c) => c,
                    None => (&mut cutting).await,
                };
                let ok = c.is_ok();
                done = Some(c);
                if !ok {
                    return Err(cut_failed());
                }
                let mut f = tokio::fs::File::open(file).await.map_err(reading)?;
                let len = f.metadata().await.map_err(reading)?.len();
                let mut s = open_channel(client, vm, to, "replica-cycle").await?;
                let seq = replica::send_cycle_from(&mut s, &mut f, len)
                    .await
                    .map_err(|e| chain(&e))?;
                return Ok((seq, len));
            }
            Ok(Answer::Error(e)) => return Err(format!("replica host {to}: {e}")),
            Err(e) => return Err(format!("replica host {to}: {}", chain(&e))),
        }
        let mut tx = replica::StreamSender::begin(&mut s)
            .await
            .map_err(|e| chain(&e))?;
        let mut buf = vec![0u8; SHIP_BUF];
        let mut reopened = false;
        loop {
            let n = f.read(&mut buf).await.map_err(reading)?;
            if n > 0 {
                tx.send(&buf[..n]).await.map_err(|e| chain(&e))?;
                continue;
            }
            match &done {
                None => tokio::select! {
                    c = &mut cutting => done = Some(c),
                    _ = tokio::time::sleep(TAIL_POLL) => {}
                },
                Some(Err(_)) => return Err(cut_failed()),
                Some(Ok(c)) if tx.sent() == c.bytes => break,
                // A worker that predates streaming cut into a temporary file and renamed
                // it over the (still empty) file this reads.
                Some(Ok(c)) if !c.streamed && !reopened && tx.sent() == 0 => {
                    f = tokio::fs::File::open(file).await.map_err(reading)?;
                    reopened = true;
                }
                Some(Ok(c)) => {
                    return Err(format!(
                        "the cycle file {} holds {} bytes, the cut wrote {}",
                        file.display(),
                        tx.sent(),
                        c.bytes
                    ))
                }
            }
        }
        let len = tx.sent();
        let seq = tx.finish().await.map_err(|e| chain(&e))?;
        Ok((seq, len))
    }
    .await;
    let cut = match done {
        Some(c) => c,
        None => cutting.await,
    };
    (cut, shipped)
}

/// Grains of a partial cycle of the initial replication under a bandwidth limit of
/// `bandwidth` bytes a second (0: none).
fn initial_chunk(bandwidth: u64) -> u64 {
    if bandwidth == 0 {
        return INITIAL_CHUNK;
    }
    (bandwidth.saturating_mul(INITIAL_CHUNK_SECS) / storage::tracking::GRAIN)
        .clamp(INITIAL_CHUNK_MIN, INITIAL_CHUNK)
}

/// Test hook: `replica-apply MS` in the file named by `VIREO_TEST_HOLD_FILE` makes this
/// replica host wait `MS` in the middle of applying each cycle (its layers written, not yet
/// a point), so a test can kill it there. Without the variable it does nothing.
fn test_apply_pause() -> Option<Duration> {
    let ms = super::migration::test_hold_ms("replica-apply")?;
    tracing::warn!(ms, "test hook: holding the apply of a cycle");
    Some(Duration::from_millis(ms))
}

/// Opens replica channel `channel` (`replica-init`, `replica-cycle`, ...) for `vm` on the
/// replica host `to`; the error names the host.
async fn open_channel(
    client: &PeerClient,
    vm: &str,
    to: &str,
    channel: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    client
        .open_stream(&StreamHeader {
            migration: vm.to_string(),
            channel: channel.into(),
        })
        .await
        .map_err(|e| format!("replica host {to}: {e}"))
}
