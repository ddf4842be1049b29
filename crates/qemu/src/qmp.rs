//! Async QMP client over a unix socket.
//!
//! ```text
//!  callers ──execute(id=n)──> writer (mutex) ──> QEMU
//!  callers <──oneshot(n)──── reader task <────── QEMU   (replies matched by id)
//!  events() <──broadcast──── reader task                (asynchronous events)
//! ```
//!
//! One reader task demultiplexes replies by `id` and forwards events to a broadcast channel,
//! so any number of tasks can run commands at the same time. QEMU serves one QMP client at a
//! time on a socket; when a client (or the worker process holding it) dies, QEMU goes back to
//! listening and the next [`QmpClient::connect`] gets a fresh greeting. That is how a
//! restarted worker re-attaches to a running QEMU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::ErrorKind;

/// Default time a command may take before [`QmpError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line accepted from QEMU (query replies can be large, but not this large).
const MAX_LINE: usize = 16 * 1024 * 1024;
/// Events kept for slow subscribers before they see `Lagged`.
const EVENT_BUFFER: usize = 256;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O")]
    Io(#[source] std::io::Error),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP error class (e.g. `GenericError`, `DeviceNotFound`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No reply within the timeout (the command may still complete in QEMU).
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection is closed (QEMU exited, or it closed the socket).
    #[error("QMP connection closed")]
    Disconnected,
    /// A reply did not have the expected shape.
    #[error("unexpected reply to {command}")]
    Decode {
        /// The command.
        command: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            QmpError::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            QmpError::Connect { .. } | QmpError::Io(_) => ErrorKind::Io,
            QmpError::Protocol(_) | QmpError::Decode { .. } => ErrorKind::Corrupt,
            QmpError::Command { class, .. } if class == "CommandNotFound" => ErrorKind::Unsupported,
            QmpError::Command { class, .. } if class == "DeviceNotFound" => ErrorKind::NotFound,
            QmpError::Command { .. } => ErrorKind::Refused,
            QmpError::Timeout { .. } => ErrorKind::Timeout,
            QmpError::Disconnected => ErrorKind::Disconnected,
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = QmpError> = std::result::Result<T, E>;

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major version (7 for QEMU 7.2).
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Distribution package string (e.g. `Debian 1:7.2+dfsg-7`).
    pub package: String,
}

/// The QMP greeting QEMU sends on every new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Capabilities QEMU offers (e.g. `oob`).
    pub capabilities: Vec<String>,
}

impl Greeting {
    fn parse(v: &Value) -> Result<Greeting> {
        let qmp = v
            .get("QMP")
            .ok_or_else(|| QmpError::Protocol(format!("expected a greeting, got {v}")))?;
        let q = &qmp["version"]["qemu"];
        let num = |k: &str| q.get(k).and_then(Value::as_u64);
        let (Some(major), Some(minor), Some(micro)) = (num("major"), num("minor"), num("micro"))
        else {
            return Err(QmpError::Protocol(format!(
                "greeting without a version: {v}"
            )));
        };
        Ok(Greeting {
            version: QemuVersion {
                major,
                minor,
                micro,
                package: qmp["version"]["package"]
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            },
            capabilities: qmp["capabilities"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// Event name as QEMU spells it (`SHUTDOWN`, `STOP`, `DEVICE_DELETED`, ...).
    pub event: String,
    /// Event data (`{}` when QEMU sent none).
    pub data: Value,
    /// QEMU's timestamp: (seconds, microseconds) since the epoch.
    pub timestamp: (i64, i64),
}

impl QmpEvent {
    /// The event as a known kind.
    pub fn kind(&self) -> EventKind {
        EventKind::from_name(&self.event)
    }
}

/// Events Vireo reacts to, by kind; anything else is [`EventKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The guest shut down or QEMU is exiting (`data.guest`, `data.reason`).
    Shutdown,
    /// An ACPI power button press was delivered.
    Powerdown,
    /// The guest reset.
    Reset,
    /// The VM paused.
    Stop,
    /// The VM resumed.
    Resume,
    /// Migration status changed (`data.status`).
    Migration,
    /// A migration pass finished (`data.pass`).
    MigrationPass,
    /// A block job completed.
    BlockJobCompleted,
    /// A block job was cancelled.
    BlockJobCancelled,
    /// A block job is ready to complete (mirror).
    BlockJobReady,
    /// A block job hit an error.
    BlockJobError,
    /// A job changed status.
    JobStatusChange,
    /// A device finished unplugging (`data.device`).
    DeviceDeleted,
    /// The guest panicked.
    GuestPanicked,
    /// A block device hit an I/O error.
    BlockIoError,
    /// The balloon changed size (`data.actual`).
    BalloonChange,
    /// The guest suspended.
    Suspend,
    /// The guest woke up.
    Wakeup,
    /// A watchdog fired.
    Watchdog,
    /// A virtio-mem device changed size.
    MemoryDeviceSizeChange,
    /// Any other event.
    Other,
}

impl EventKind {
    fn from_name(name: &str) -> EventKind {
        match name {
            "SHUTDOWN" => EventKind::Shutdown,
            "POWERDOWN" => EventKind::Powerdown,
            "RESET" => EventKind::Reset,
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "MIGRATION" => EventKind::Migration,
            "MIGRATION_PASS" => EventKind::MigrationPass,
            "BLOCK_JOB_COMPLETED" => EventKind::BlockJobCompleted,
            "BLOCK_JOB_CANCELLED" => EventKind::BlockJobCancelled,
            "BLOCK_JOB_READY" => EventKind::BlockJobReady,
            "BLOCK_JOB_ERROR" => EventKind::BlockJobError,
            "JOB_STATUS_CHANGE" => EventKind::JobStatusChange,
            "DEVICE_DELETED" => EventKind::DeviceDeleted,
            "GUEST_PANICKED" => EventKind::GuestPanicked,
            "BLOCK_IO_ERROR" => EventKind::BlockIoError,
            "BALLOON_CHANGE" => EventKind::BalloonChange,
            "SUSPEND" => EventKind::Suspend,
            "WAKEUP" => EventKind::Wakeup,
            "WATCHDOG" => EventKind::Watchdog,
            "MEMORY_DEVICE_SIZE_CHANGE" => EventKind::MemoryDeviceSizeChange,
            _ => EventKind::Other,
        }
    }
}

/// QEMU's run state (`query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// An internal error stopped the VM.
    InternalError,
    /// An I/O error stopped the VM.
    IoError,
    /// Paused (`stop`).
    Paused,
    /// Migration completed; the VM is stopped on the source.
    Postmigrate,
    /// Started with `-S`, never run yet.
    Prelaunch,
    /// Finishing the migration.
    FinishMigrate,
    /// Restoring a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// Guest shut down and QEMU was told not to exit.
    Shutdown,
    /// Guest suspended (S3).
    Suspended,
    /// A watchdog fired.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO.
    Colo,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// Migration status (`query-migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationStatus {
    /// No migration has run.
    None,
    /// Setting up.
    Setup,
    /// Cancelling.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Running.
    Active,
    /// Post-copy running.
    PostcopyActive,
    /// Post-copy paused.
    PostcopyPaused,
    /// Post-copy recovering.
    PostcopyRecover,
    /// Completed.
    Completed,
    /// Failed (`error-desc` says why).
    Failed,
    /// COLO.
    Colo,
    /// Paused before switchover (pause-before-switchover capability).
    PreSwitchover,
    /// Transferring device state.
    Device,
    /// Waiting for unplug of devices.
    WaitUnplug,
    /// A status this client does not know.
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// True when the migration will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
                | MigrationStatus::None
        )
    }
}

/// RAM transfer figures of a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRam {
    /// Bytes transferred.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes left.
    #[serde(default)]
    pub remaining: u64,
    /// Total guest RAM.
    #[serde(default)]
    pub total: u64,
    /// Pages dirtied per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Completed passes over memory.
    #[serde(default)]
    pub dirty_sync_count: u64,
}

/// Reply of `query-migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Status; absent from QEMU's reply before any migration, then `None`.
    #[serde(default = "migration_none")]
    pub status: MigrationStatus,
    /// RAM figures while active or when completed.
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    /// Total time in ms (when completed).
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Downtime in ms (when completed).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error_desc: Option<String>,
}

fn migration_none() -> MigrationStatus {
    MigrationStatus::None
}

/// One vCPU from `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    /// Index of the vCPU.
    pub cpu_index: u64,
    /// QOM path of the vCPU object.
    pub qom_path: String,
    /// Host thread id running the vCPU.
    pub thread_id: i64,
    /// Topology properties.
    #[serde(default)]
    pub props: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

/// An async QMP client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: Arc<AtomicBool>,
    greeting: Greeting,
    reader: JoinHandle<()>,
    timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.inner.greeting)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl QmpClient {
    /// Connects to a QMP socket, reads the greeting and negotiates capabilities.
    ///
    /// If another client currently holds the socket, QEMU will not greet until it lets go;
    /// this waits up to [`DEFAULT_TIMEOUT`] for the greeting, then fails with
    /// [`QmpError::Timeout`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<QmpClient> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT).await
    }

    /// [`QmpClient::connect`] with a custom timeout, used for the greeting and as the default
    /// timeout of every command.
    pub async fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<QmpClient> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_stream(stream, timeout).await
    }

    /// Waits until the socket exists and accepts a client (QEMU is starting), up to `wait`.
    pub async fn connect_retry(path: impl AsRef<Path>, wait: Duration) -> Result<QmpClient> {
        let path = path.as_ref();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match UnixStream::connect(path).await {
                Ok(s) => return Self::from_stream(s, DEFAULT_TIMEOUT).await,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Runs the QMP handshake on an already connected stream.
    pub async fn from_stream(stream: UnixStream, timeout: Duration) -> Result<QmpClient> {
        let (rd, wr) = stream.into_split();
        let mut reader = BufReader::new(rd);
        let greeting = tokio::time::timeout(timeout, read_message(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                after: timeout,
            })??
            .ok_or(QmpError::Disconnected)?;
        let greeting = Greeting::parse(&greeting)?;
        tracing::debug!(version = ?greeting.version, "QMP greeting");

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let closed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(reader_task(
            reader,
            pending.clone(),
            events.clone(),
            closed.clone(),
        ));
        let client = QmpClient {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(wr),
                pending,
                next_id: AtomicU64::new(1),
                events,
                closed,
                greeting,
                reader,
                timeout,
            }),
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The greeting of this connection.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Subscribes to events received from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.events.subscribe()
    }

    /// Runs a command with the default timeout; returns the `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(command, arguments, self.inner.timeout)
            .await
    }

    /// Runs a command with an explicit timeout.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        if self.is_closed() {
            return Err(QmpError::Disconnected);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, tx);
        // The reader may have closed between the check above and the insert.
        if self.is_closed() {
            lock(&self.inner.pending).remove(&id);
            return Err(QmpError::Disconnected);
        }
        tracing::trace!(command, id, "QMP execute");
        let write = async {
            let mut w = self.inner.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        if let Err(e) = write.await {
            lock(&self.inner.pending).remove(&id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(QmpError::Command { class, desc, .. }))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                })
            }
        }
    }

    async fn execute_as<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T> {
        let v = self.execute(command, arguments).await?;
        serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: command.to_string(),
            source,
        })
    }

    /// Waits on `rx` for the next event named `name` (e.g. `DEVICE_DELETED`) whose data
    /// matches `filter`. Take `rx` from [`QmpClient::events`] *before* running the command
    /// that causes the event, so that it cannot be missed.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        filter: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.event == name && filter(&ev.data) => return Ok(ev),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "QMP event subscriber lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                command: format!("wait for event {name}"),
                after: timeout,
            })?
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute_as("query-status", None).await
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resumes the vCPUs (also starts a VM launched with `-S`).
    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", None).await.map(drop)
    }

    /// `system_powerdown`: presses the ACPI power button.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: hard reset.
    pub async fn system_reset(&self) -> Result<()> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once. A connection closed before the reply counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `migrate` to `uri` (`unix:PATH`, `tcp:H:P`, `exec:CMD`, `fd:NAME`); returns at once,
    /// poll with [`QmpClient::query_migrate`] or [`QmpClient::wait_migration`].
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate-incoming` on a QEMU started with `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&self) -> Result<()> {
        self.execute("migrate_cancel", None).await.map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        self.execute_as("query-migrate", None).await
    }

    /// Polls `query-migrate` every `interval` until the status is final or `timeout` expires.
    pub async fn wait_migration(
        &self,
        interval: Duration,
        timeout: Duration,
    ) -> Result<MigrationInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.query_migrate().await?;
            if info.status.is_final() {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    command: "migration".into(),
                    after: timeout,
                });
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// `migrate-set-capabilities`, e.g. `[("xbzrle", true), ("events", true)]`.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
        .map(drop)
    }

    /// `migrate-set-parameters` with a parameters object, e.g. `{"max-bandwidth": 1e9}`.
    pub async fn migrate_set_parameters(&self, params: Value) -> Result<()> {
        self.execute("migrate-set-parameters", Some(params))
            .await
            .map(drop)
    }

    /// `query-cpus-fast`.
    pub async fn query_cpus_fast(&self) -> Result<Vec<CpuInfoFast>> {
        self.execute_as("query-cpus-fast", None).await
    }

    /// `balloon`: asks the guest to give memory back until it has `bytes` of RAM.
    pub async fn balloon(&self, bytes: u64) -> Result<()> {
        self.execute("balloon", Some(json!({ "value": bytes })))
            .await
            .map(drop)
    }

    /// `query-balloon`: the guest's current RAM size in bytes as seen through the balloon.
    pub async fn query_balloon(&self) -> Result<u64> {
        let v = self.execute("query-balloon", None).await?;
        v.get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Protocol(format!("query-balloon without actual: {v}")))
    }

    /// Sets the balloon statistics polling interval (0 disables), on the balloon device `id`
    /// (see `cmdline`: `balloon0`).
    pub async fn set_balloon_stats_interval(&self, id: &str, secs: u32) -> Result<()> {
        self.qom_set(
            &format!("/machine/peripheral/{id}"),
            "guest-stats-polling-interval",
            json!(secs),
        )
        .await
    }

    /// Reads the balloon statistics (`guest-stats`: `stats` map and `last-update`).
    pub async fn balloon_stats(&self, id: &str) -> Result<Value> {
        self.qom_get(&format!("/machine/peripheral/{id}"), "guest-stats")
            .await
    }

    /// `device_add` with `driver`, `id` and extra properties (an object, or `Value::Null`).
    pub async fn device_add(&self, driver: &str, id: &str, props: Value) -> Result<()> {
        let args = merge_args(json!({ "driver": driver, "id": id }), props)?;
        self.execute("device_add", Some(args)).await.map(drop)
    }

    /// `device_del`: requests unplug; completion is the `DEVICE_DELETED` event.
    pub async fn device_del(&self, id: &str) -> Result<()> {
        self.execute("device_del", Some(json!({ "id": id })))
            .await
            .map(drop)
    }

    /// `netdev_add` with `type`, `id` and extra properties (an object, or `Value::Null`).
    pub async fn netdev_add(&self, kind: &str, id: &str, props: Value) -> Result<()> {
        let args = merge_args(json!({ "type": kind, "id": id }), props)?;
        self.execute("netdev_add", Some(args)).await.map(drop)
    }

    /// `netdev_del`.
    pub async fn netdev_del(&self, id: &str) -> Result<()> {
        self.execute("netdev_del", Some(json!({ "id": id })))
            .await
            .map(drop)
    }

    /// `blockdev-add` with a full blockdev options object.
    pub async fn blockdev_add(&self, options: Value) -> Result<()> {
        self.execute("blockdev-add", Some(options)).await.map(drop)
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute("blockdev-del", Some(json!({ "node-name": node_name })))
            .await
            .map(drop)
    }

    /// `human-monitor-command`: runs an HMP command and returns its text output.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String> {
        let v = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// `qom-get`.
    pub async fn qom_get(&self, path: &str, property: &str) -> Result<Value> {
        self.execute(
            "qom-get",
            Some(json!({ "path": path, "property": property })),
        )
        .await
    }

    /// `qom-set`.
    pub async fn qom_set(&self, path: &str, property: &str, value: Value) -> Result<()> {
        self.execute(
            "qom-set",
            Some(json!({ "path": path, "property": property, "value": value })),
        )
        .await
        .map(drop)
    }
}

impl QemuVersion {
    /// True if this QEMU is at least `major.minor`.
    pub fn at_least(&self, major: u64, minor: u64) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

/// Migration URIs to save a VM's state to `path` and to load it back: `file:` on QEMU 8.2
/// and newer, `exec:cat` (path shell-quoted) on older QEMU such as 7.2, which has no `file:`
/// transport. Returns `(save_uri, restore_uri)` for [`QmpClient::migrate`] and
/// [`QmpClient::migrate_incoming`] (the latter on a QEMU started with `-incoming defer`).
pub fn state_file_uris(path: &Path, version: &QemuVersion) -> (String, String) {
    let p = path.to_string_lossy();
    if version.at_least(8, 2) && !p.contains(',') {
        (format!("file:{p}"), format!("file:{p}"))
    } else {
        let q = format!("'{}'", p.replace('\'', "'\\''"));
        (format!("exec:cat > {q}"), format!("exec:cat {q}"))
    }
}

fn merge_args(mut base: Value, extra: Value) -> Result<Value> {
    match extra {
        Value::Null => Ok(base),
        Value::Object(map) => {
            if let Value::Object(b) = &mut base {
                for (k, v) in map {
                    b.insert(k, v);
                }
            }
            Ok(base)
        }
        other => Err(QmpError::Protocol(format!(
            "device/netdev properties must be an object, got {other}"
        ))),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one JSON message (one line). `Ok(None)` on EOF.
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Value>> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::Protocol("message longer than 16 MiB".into()));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&buf)
            .map(Some)
            .map_err(|e| QmpError::Protocol(format!("invalid JSON from QEMU: {e}")));
    }
}

async fn reader_task<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: Arc<AtomicBool>,
) {
    loop {
        let msg = match read_message(&mut reader).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed");
                break;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let ts = &msg["timestamp"];
            let ev = QmpEvent {
                event: name.to_string(),
                data: msg.get("data").cloned().unwrap_or_else(|| json!({})),
                timestamp: (
                    ts["seconds"].as_i64().unwrap_or_default(),
                    ts["microseconds"].as_i64().unwrap_or_default(),
                ),
            };
            tracing::debug!(event = %ev.event, "QMP event");
            // No subscriber is fine.
            let _ = events.send(ev);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(%msg, "QMP message without a known id");
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("GenericError").to_string(),
                desc: err["desc"].as_str().unwrap_or_default().to_string(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply without return or error: {msg}"
            )))
        };
        if let Some(tx) = lock(&pending).remove(&id) {
            // The caller may have timed out and gone.
            let _ = tx.send(reply);
        }
    }
    closed.store(true, Ordering::SeqCst);
    // Dropping the senders wakes every waiting caller with Disconnected.
    lock(&pending).clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The greeting of QEMU 7.2 parses into its version and capabilities.
    #[test]
    fn greeting_parses() {
        let v: Value = serde_json::from_str(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        let g = Greeting::parse(&v).unwrap();
        assert_eq!(
            (g.version.major, g.version.minor, g.version.micro),
            (7, 2, 22)
        );
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
        assert!(Greeting::parse(&json!({"return": {}})).is_err());
    }

    /// Old QEMU saves through a shell-quoted `exec:cat`, new QEMU through `file:`.
    #[test]
    fn state_uris_by_version() {
        let v = |major, minor| QemuVersion {
            major,
            minor,
            micro: 0,
            package: String::new(),
        };
        let (save, restore) = state_file_uris(Path::new("/s/it's.bin"), &v(7, 2));
        assert_eq!(save, r"exec:cat > '/s/it'\''s.bin'");
        assert_eq!(restore, r"exec:cat '/s/it'\''s.bin'");
        let (save, restore) = state_file_uris(Path::new("/s/vm.bin"), &v(9, 0));
        assert_eq!(
            (save.as_str(), restore.as_str()),
            ("file:/s/vm.bin", "file:/s/vm.bin")
        );
    }

    /// Unknown run states and migration statuses decode instead of failing.
    #[test]
    fn unknown_states_decode() {
        let s: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "brand-new"})).unwrap();
        assert_eq!(s.status, RunState::Unknown);
        let m: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(m.status, MigrationStatus::None);
        let m: MigrationInfo = serde_json::from_value(
            json!({"status": "completed", "ram": {"transferred": 5, "remaining": 0, "total": 9}, "downtime": 3}),
        )
        .unwrap();
        assert!(m.status.is_final());
        assert_eq!(m.ram.unwrap().transferred, 5);
    }
}
