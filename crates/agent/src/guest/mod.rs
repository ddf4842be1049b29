//! Guest side: the request dispatcher and transports of the `vireo-guest` agent.
//!
//! Plain blocking std code with a few helper threads (no async runtime), so the binary
//! stays small and links statically. [`Server`] turns one JSON request into at most one
//! reply; [`transport`] moves bytes between a virtio-serial port (or a unix socket, for
//! tests) and the server.

pub mod exec;
pub mod fsfreeze;
pub mod kvp;
pub mod system;
pub mod transport;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::protocol::{
    self, Command, FsfreezeStatus, GuestAgentCommandInfo, GuestAgentInfo, GuestExec,
    GuestExecStatusCmd, GuestFsfreezeFreeze, GuestFsfreezeFreezeList, GuestFsfreezeStatus,
    GuestFsfreezeThaw, GuestGetHostName, GuestGetMemoryBlockInfo, GuestGetOsinfo, GuestGetTime,
    GuestHostName, GuestInfo, GuestMemoryBlockInfo, GuestNetworkGetInterfaces, GuestPing,
    GuestSetTime, GuestShutdown, GuestSync, GuestSyncDelimited, KvpPool, KvpValue, QgaError,
    Request, Response, ShutdownMode, VireoExecRead, VireoExecSignal, VireoKvpDelete, VireoKvpGet,
    VireoKvpList, VireoKvpSet, VireoMemoryStatus, CLASS_COMMAND_NOT_FOUND, CLASS_GENERIC,
};

pub use kvp::{KvpError, KvpStore, DEFAULT_KVP_ROOT};

/// Version string vireo-guest reports in `guest-info`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-vireo");

/// Commands allowed while filesystems are frozen (the rest could write to them).
const ALLOWED_WHILE_FROZEN: &[&str] = &[
    GuestSync::NAME,
    GuestSyncDelimited::NAME,
    GuestPing::NAME,
    GuestInfo::NAME,
    GuestGetTime::NAME,
    GuestFsfreezeStatus::NAME,
    GuestFsfreezeThaw::NAME,
    VireoMemoryStatus::NAME,
];

/// Every command vireo-guest serves, with whether it replies on success.
const COMMANDS: &[(&str, bool)] = &[
    (GuestSyncDelimited::NAME, true),
    (GuestSync::NAME, true),
    (GuestPing::NAME, true),
    (GuestInfo::NAME, true),
    (GuestGetOsinfo::NAME, true),
    (GuestGetHostName::NAME, true),
    (GuestNetworkGetInterfaces::NAME, true),
    (GuestGetTime::NAME, true),
    (GuestSetTime::NAME, true),
    (GuestShutdown::NAME, false),
    (GuestExec::NAME, true),
    (GuestExecStatusCmd::NAME, true),
    (GuestFsfreezeStatus::NAME, true),
    (GuestFsfreezeFreeze::NAME, true),
    (GuestFsfreezeFreezeList::NAME, true),
    (GuestFsfreezeThaw::NAME, true),
    (GuestGetMemoryBlockInfo::NAME, true),
    (VireoKvpSet::NAME, true),
    (VireoKvpGet::NAME, true),
    (VireoKvpList::NAME, true),
    (VireoKvpDelete::NAME, true),
    (VireoMemoryStatus::NAME, true),
    (VireoExecRead::NAME, true),
    (VireoExecSignal::NAME, true),
];

/// What the agent does on requests that change the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SystemMode {
    /// Really shut down, set the clock and freeze filesystems (inside a guest).
    #[default]
    Real,
    /// Record shutdowns and clock settings and pretend to freeze, for running the agent on
    /// a host in tests.
    Simulated,
}

/// Configuration of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Root of the KVP pools (`/run/vireo/kvp`).
    pub kvp_root: PathBuf,
    /// Commands answered with `CommandNotFound` ("has been disabled"), like qemu-ga `-b`.
    pub blocked: Vec<String>,
    /// Real or simulated system actions.
    pub system: SystemMode,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            kvp_root: PathBuf::from(DEFAULT_KVP_ROOT),
            blocked: Vec::new(),
            system: SystemMode::Real,
        }
    }
}

#[derive(Debug, Default)]
struct Simulated {
    shutdowns: Vec<ShutdownMode>,
    clock_offset_ns: i64,
    frozen: bool,
}

/// The request dispatcher.
pub struct Server {
    blocked: HashSet<String>,
    system: SystemMode,
    kvp: KvpStore,
    execs: exec::ExecTable,
    freezer: Mutex<fsfreeze::Freezer>,
    sim: Mutex<Simulated>,
    muted: AtomicBool,
}

type Reply = Result<Value, QgaError>;

fn generic(desc: impl Into<String>) -> QgaError {
    QgaError {
        class: CLASS_GENERIC.into(),
        desc: desc.into(),
    }
}

fn to_value<T: Serialize>(v: T) -> Reply {
    serde_json::to_value(v).map_err(|e| generic(format!("encoding reply: {e}")))
}

/// Decodes `arguments` into the command's type, with qemu-ga-like messages.
fn args<T: DeserializeOwned>(a: Option<Value>) -> Result<T, QgaError> {
    let v = a.unwrap_or_else(|| Value::Object(Default::default()));
    serde_json::from_value(v).map_err(|e| generic(format!("Invalid arguments: {e}")))
}

/// Refuses arguments for commands that take none.
fn no_args(a: &Option<Value>) -> Result<(), QgaError> {
    match a {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(m)) => match m.keys().next() {
            None => Ok(()),
            Some(k) => Err(generic(format!("Parameter '{k}' is unexpected"))),
        },
        Some(_) => Err(generic("Invalid arguments: expected an object")),
    }
}

impl Server {
    /// A dispatcher with `cfg`.
    pub fn new(cfg: ServerConfig) -> Self {
        Server {
            blocked: cfg.blocked.into_iter().collect(),
            system: cfg.system,
            kvp: KvpStore::new(cfg.kvp_root),
            execs: exec::ExecTable::default(),
            freezer: Mutex::new(fsfreeze::Freezer::default()),
            sim: Mutex::new(Simulated::default()),
            muted: AtomicBool::new(false),
        }
    }

    /// The KVP pools this server serves.
    pub fn kvp(&self) -> &KvpStore {
        &self.kvp
    }

    /// While muted the server reads requests and answers none (a hung agent, for tests).
    pub fn set_muted(&self, muted: bool) {
        self.muted.store(muted, Ordering::SeqCst);
    }

    /// Shutdown modes requested so far ([`SystemMode::Simulated`] only).
    pub fn shutdown_requests(&self) -> Vec<ShutdownMode> {
        self.sim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdowns
            .clone()
    }

    fn frozen(&self) -> bool {
        match self.system {
            SystemMode::Real => {
                self.freezer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .status()
                    == FsfreezeStatus::Frozen
            }
            SystemMode::Simulated => self.sim.lock().unwrap_or_else(|e| e.into_inner()).frozen,
        }
    }

    /// Handles one JSON text; returns the bytes to send back, if any.
    pub fn handle(&self, text: &[u8]) -> Option<Vec<u8>> {
        if self.muted.load(Ordering::SeqCst) {
            return None;
        }
        let req: Request = match serde_json::from_slice(text) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "bad request");
                return Some(
                    Response::Error {
                        error: generic(format!("JSON parse error, {e}")),
                        id: None,
                    }
                    .encode(),
                );
            }
        };
        let name = req.execute.clone();
        let id = req.id.clone();
        tracing::debug!(command = %name, "request");
        let delimited = name == GuestSyncDelimited::NAME;
        let result = if self.blocked.contains(&name) {
            Err(QgaError {
                class: CLASS_COMMAND_NOT_FOUND.into(),
                desc: format!("Command {name} has been disabled"),
            })
        } else if !ALLOWED_WHILE_FROZEN.contains(&name.as_str()) && self.frozen() {
            Err(QgaError {
                class: CLASS_COMMAND_NOT_FOUND.into(),
                desc: format!("Command {name} has been disabled while filesystems are frozen"),
            })
        } else {
            // `None`: guest-shutdown, which sends no reply on success.
            self.dispatch(&name, req.arguments)?
        };
        if let Err(e) = &result {
            tracing::debug!(command = %name, error = %e, "request failed");
        }
        let resp = match result {
            Ok(value) => Response::Return { value, id },
            Err(error) => Response::Error { error, id },
        };
        let mut out = Vec::new();
        if delimited && matches!(resp, Response::Return { .. }) {
            out.push(protocol::SYNC_DELIMITER);
        }
        out.extend(resp.encode());
        Some(out)
    }

    fn info(&self) -> GuestAgentInfo {
        GuestAgentInfo {
            version: VERSION.to_string(),
            supported_commands: COMMANDS
                .iter()
                .map(|&(name, success_response)| GuestAgentCommandInfo {
                    name: name.to_string(),
                    enabled: !self.blocked.contains(name),
                    success_response,
                })
                .collect(),
        }
    }

    fn dispatch(&self, name: &str, a: Option<Value>) -> Option<Reply> {
        let r = match name {
            GuestSyncDelimited::NAME => args::<GuestSyncDelimited>(a).and_then(|c| to_value(c.id)),
            GuestSync::NAME => args::<GuestSync>(a).and_then(|c| to_value(c.id)),
            GuestPing::NAME => no_args(&a).and_then(|_| to_value(protocol::Empty {})),
            GuestInfo::NAME => no_args(&a).and_then(|_| to_value(self.info())),
            GuestGetOsinfo::NAME => no_args(&a).and_then(|_| to_value(system::osinfo())),
            GuestGetHostName::NAME => no_args(&a).and_then(|_| {
                let host_name = system::hostname().map_err(generic)?;
                to_value(GuestHostName { host_name })
            }),
            GuestNetworkGetInterfaces::NAME => {
                no_args(&a).and_then(|_| to_value(system::interfaces().map_err(generic)?))
            }
            GuestGetTime::NAME => no_args(&a).and_then(|_| {
                let t = system::get_time().map_err(generic)?;
                let off = match self.system {
                    SystemMode::Real => 0,
                    SystemMode::Simulated => {
                        self.sim
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clock_offset_ns
                    }
                };
                to_value(t.saturating_add(off))
            }),
            GuestSetTime::NAME => args::<GuestSetTime>(a).and_then(|c| {
                match self.system {
                    SystemMode::Real => system::set_time(c.time).map_err(generic)?,
                    SystemMode::Simulated => {
                        let now = system::get_time().map_err(generic)?;
                        let mut s = self.sim.lock().unwrap_or_else(|e| e.into_inner());
                        s.clock_offset_ns = c.time.map_or(0, |t| t.saturating_sub(now));
                    }
                }
                to_value(protocol::Empty {})
            }),
            GuestShutdown::NAME => {
                let c = match args::<GuestShutdown>(a) {
                    Ok(c) => c,
                    Err(e) => return Some(Err(e)),
                };
                let mode = c.mode.unwrap_or_default();
                match self.system {
                    SystemMode::Real => {
                        if let Err(e) = system::shutdown(mode) {
                            return Some(Err(generic(e)));
                        }
                    }
                    SystemMode::Simulated => self
                        .sim
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .shutdowns
                        .push(mode),
                }
                return None;
            }
            GuestExec::NAME => args::<GuestExec>(a).and_then(|c| {
                let pid = self.execs.spawn(&c).map_err(generic)?;
                to_value(protocol::GuestExecPid { pid })
            }),
            GuestExecStatusCmd::NAME => args::<GuestExecStatusCmd>(a)
                .and_then(|c| to_value(self.execs.status(c.pid, false).map_err(generic)?)),
            VireoExecRead::NAME => args::<VireoExecRead>(a)
                .and_then(|c| to_value(self.execs.status(c.pid, true).map_err(generic)?)),
            VireoExecSignal::NAME => args::<VireoExecSignal>(a).and_then(|c| {
                self.execs
                    .signal(c.pid, c.signal.unwrap_or(15))
                    .map_err(generic)?;
                to_value(protocol::Empty {})
            }),
            GuestFsfreezeStatus::NAME => no_args(&a).and_then(|_| {
                to_value(if self.frozen() {
                    FsfreezeStatus::Frozen
                } else {
                    FsfreezeStatus::Thawed
                })
            }),
            GuestFsfreezeFreeze::NAME => no_args(&a).and_then(|_| self.freeze(None)),
            GuestFsfreezeFreezeList::NAME => args::<GuestFsfreezeFreezeList>(a)
                .and_then(|c| self.freeze(c.mountpoints.as_deref())),
            GuestFsfreezeThaw::NAME => no_args(&a).and_then(|_| match self.system {
                SystemMode::Real => to_value(
                    self.freezer
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .thaw()
                        .map_err(generic)?,
                ),
                SystemMode::Simulated => {
                    let mut s = self.sim.lock().unwrap_or_else(|e| e.into_inner());
                    let n = i64::from(std::mem::take(&mut s.frozen));
                    to_value(n)
                }
            }),
            GuestGetMemoryBlockInfo::NAME => no_args(&a).and_then(|_| {
                to_value(GuestMemoryBlockInfo {
                    size: system::memory_block_size().map_err(generic)?,
                })
            }),
            VireoMemoryStatus::NAME => {
                no_args(&a).and_then(|_| to_value(system::memory_status().map_err(generic)?))
            }
            VireoKvpSet::NAME => args::<VireoKvpSet>(a).and_then(|c| {
                self.kvp
                    .set(KvpPool::Host, &c.key, &c.value)
                    .map_err(|e| generic(error_chain(&e)))?;
                tracing::info!(key = %c.key, "host set a KVP pair");
                to_value(protocol::Empty {})
            }),
            VireoKvpDelete::NAME => args::<VireoKvpDelete>(a).and_then(|c| {
                self.kvp
                    .delete(KvpPool::Host, &c.key)
                    .map_err(|e| generic(error_chain(&e)))?;
                to_value(protocol::Empty {})
            }),
            VireoKvpGet::NAME => args::<VireoKvpGet>(a).and_then(|c| {
                let value = self
                    .kvp
                    .get(c.pool.unwrap_or_default(), &c.key)
                    .map_err(|e| generic(error_chain(&e)))?;
                to_value(KvpValue { value })
            }),
            VireoKvpList::NAME => args::<VireoKvpList>(a).and_then(|c| {
                to_value(
                    self.kvp
                        .list(c.pool)
                        .map_err(|e| generic(error_chain(&e)))?,
                )
            }),
            other => Err(QgaError {
                class: CLASS_COMMAND_NOT_FOUND.into(),
                desc: format!("The command {other} has not been found"),
            }),
        };
        Some(r)
    }

    fn freeze(&self, only: Option<&[String]>) -> Reply {
        match self.system {
            SystemMode::Real => to_value(
                self.freezer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .freeze(only)
                    .map_err(generic)?,
            ),
            SystemMode::Simulated => {
                self.sim.lock().unwrap_or_else(|e| e.into_inner()).frozen = true;
                to_value(1)
            }
        }
    }

    /// Thaws filesystems this agent froze (call before exiting, so a stopped agent never
    /// leaves the guest frozen).
    pub fn release_freeze(&self) {
        if self.system == SystemMode::Real && self.frozen() {
            let r = self
                .freezer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .thaw();
            tracing::info!(?r, "thawed filesystems on exit");
        }
    }
}

/// `e` and its sources joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
