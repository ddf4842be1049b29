//! Wire types of the QEMU guest agent (QGA) protocol and Vireo's `vireo-*` extensions.
//!
//! The protocol is QMP without the greeting: the host writes JSON objects
//! `{"execute": NAME, "arguments": {...}, "id": ANY}` and the agent answers each with
//! `{"return": VALUE, "id": ANY}` or `{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}`,
//! one JSON text per line. `guest-sync-delimited` answers with a leading `0xFF` byte so the
//! host can find the start of a fresh reply in a stream that may hold stale data; the host
//! likewise sends `0xFF` before it so the agent drops any half-read request.
//!
//! Every command is a type implementing [`Command`], with its arguments as fields (field
//! names match qemu-ga 7.2 exactly, see `qga/qapi-schema.json`) and its reply as
//! [`Command::Returns`]. Reply types accept unknown fields, because newer agents add some.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The byte that precedes a `guest-sync-delimited` reply (and that the host sends to flush
/// the agent's parser).
pub const SYNC_DELIMITER: u8 = 0xFF;

/// The virtio-serial port name qemu-ga and vireo-guest listen on.
pub const GUEST_AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// Error class for a failed command (qemu-ga's default class).
pub const CLASS_GENERIC: &str = "GenericError";
/// Error class for an unknown or disabled command.
pub const CLASS_COMMAND_NOT_FOUND: &str = "CommandNotFound";

/// A request as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Command name, such as `guest-ping`.
    pub execute: String,
    /// Command arguments (an object), absent for commands without any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// Any JSON value; the agent echoes it in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Request {
    /// Builds the request for `cmd`, with `id` to be echoed.
    pub fn new<C: Command>(cmd: &C, id: Option<Value>) -> Result<Self, serde_json::Error> {
        Ok(Request {
            execute: C::NAME.to_string(),
            arguments: cmd.arguments()?,
            id,
        })
    }
}

/// The error object of a failed command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QgaError {
    /// Error class, e.g. `GenericError` or `CommandNotFound`.
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

impl std::fmt::Display for QgaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

/// A reply as it travels on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `{"return": VALUE}`.
    Return {
        /// The command's result.
        value: Value,
        /// The request's `id`, echoed.
        id: Option<Value>,
    },
    /// `{"error": {...}}`.
    Error {
        /// What went wrong.
        error: QgaError,
        /// The request's `id`, echoed.
        id: Option<Value>,
    },
}

#[derive(Serialize, Deserialize)]
struct RawResponse {
    #[serde(rename = "return", default, skip_serializing_if = "Option::is_none")]
    ret: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<QgaError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<Value>,
}

/// Why a JSON text is not a valid reply.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The text is not JSON of the expected shape.
    #[error("reply is not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),
    /// The object has neither `return` nor `error`.
    #[error("reply has neither \"return\" nor \"error\"")]
    NoResult,
}

impl Response {
    /// Parses one JSON text received from an agent.
    pub fn decode(text: &[u8]) -> Result<Self, DecodeError> {
        let raw: RawResponse = serde_json::from_slice(text).map_err(DecodeError::Json)?;
        match (raw.ret, raw.error) {
            (_, Some(error)) => Ok(Response::Error { error, id: raw.id }),
            // `"return": null` is not produced by qemu-ga, but accept it as an empty result.
            (Some(value), None) => Ok(Response::Return { value, id: raw.id }),
            (None, None) => {
                // Distinguish `{"return": null}` from a missing key.
                let v: Value = serde_json::from_slice(text).map_err(DecodeError::Json)?;
                if v.get("return").is_some() {
                    Ok(Response::Return {
                        value: Value::Null,
                        id: v.get("id").cloned(),
                    })
                } else {
                    Err(DecodeError::NoResult)
                }
            }
        }
    }

    /// Serializes the reply as qemu-ga does: one JSON text followed by `\n`.
    pub fn encode(&self) -> Vec<u8> {
        let raw = match self {
            Response::Return { value, id } => RawResponse {
                ret: Some(value.clone()),
                error: None,
                id: id.clone(),
            },
            Response::Error { error, id } => RawResponse {
                ret: None,
                error: Some(error.clone()),
                id: id.clone(),
            },
        };
        // Serializing a struct of JSON values cannot fail.
        let mut out = serde_json::to_vec(&raw).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The echoed request id.
    pub fn id(&self) -> Option<&Value> {
        match self {
            Response::Return { id, .. } | Response::Error { id, .. } => id.as_ref(),
        }
    }
}

/// A QGA command: its name, its arguments (the implementing type) and its reply type.
pub trait Command: Serialize {
    /// The wire name, e.g. `guest-ping`.
    const NAME: &'static str;
    /// The type of the `return` member.
    type Returns: DeserializeOwned;
    /// Whether the agent replies on success (`guest-shutdown` does not).
    const SUCCESS_RESPONSE: bool = true;

    /// The `arguments` member: `None` for commands whose arguments serialize to nothing.
    fn arguments(&self) -> Result<Option<Value>, serde_json::Error> {
        let v = serde_json::to_value(self)?;
        Ok(match v {
            Value::Null => None,
            Value::Object(ref m) if m.is_empty() => None,
            v => Some(v),
        })
    }
}

/// The empty object `{}` some commands return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Empty {}

macro_rules! command {
    ($(#[$m:meta])* $ty:ident, $name:literal, $ret:ty) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $ret;
        }
    };
}

/// `guest-sync-delimited {id}` -> `id`, reply preceded by `0xFF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSyncDelimited {
    /// Random number echoed back.
    pub id: i64,
}
impl Command for GuestSyncDelimited {
    const NAME: &'static str = "guest-sync-delimited";
    type Returns = i64;
}

/// `guest-sync {id}` -> `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSync {
    /// Random number echoed back.
    pub id: i64,
}
impl Command for GuestSync {
    const NAME: &'static str = "guest-sync";
    type Returns = i64;
}

command!(
    /// `guest-ping` -> `{}`.
    GuestPing, "guest-ping", Empty
);
command!(
    /// `guest-info` -> [`GuestAgentInfo`].
    GuestInfo, "guest-info", GuestAgentInfo
);
command!(
    /// `guest-get-osinfo` -> [`GuestOsInfo`].
    GuestGetOsinfo, "guest-get-osinfo", GuestOsInfo
);
command!(
    /// `guest-get-host-name` -> [`GuestHostName`].
    GuestGetHostName, "guest-get-host-name", GuestHostName
);
command!(
    /// `guest-network-get-interfaces` -> list of [`GuestNetworkInterface`].
    GuestNetworkGetInterfaces, "guest-network-get-interfaces", Vec<GuestNetworkInterface>
);
command!(
    /// `guest-get-time` -> nanoseconds since the epoch (UTC).
    GuestGetTime, "guest-get-time", i64
);
command!(
    /// `guest-fsfreeze-status` -> [`FsfreezeStatus`].
    GuestFsfreezeStatus, "guest-fsfreeze-status", FsfreezeStatus
);
command!(
    /// `guest-fsfreeze-freeze` -> number of filesystems frozen.
    GuestFsfreezeFreeze, "guest-fsfreeze-freeze", i64
);
command!(
    /// `guest-fsfreeze-thaw` -> number of filesystems thawed.
    GuestFsfreezeThaw, "guest-fsfreeze-thaw", i64
);
command!(
    /// `guest-get-memory-block-info` -> [`GuestMemoryBlockInfo`].
    GuestGetMemoryBlockInfo, "guest-get-memory-block-info", GuestMemoryBlockInfo
);
command!(
    /// `vireo-memory-status` (Vireo extension) -> [`MemoryStatus`].
    VireoMemoryStatus, "vireo-memory-status", MemoryStatus
);

/// `guest-set-time {time?}`: sets the guest clock to `time` (ns since the epoch), or from
/// the RTC when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSetTime {
    /// Nanoseconds since 1970-01-01 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
}
impl Command for GuestSetTime {
    const NAME: &'static str = "guest-set-time";
    type Returns = Empty;
}

/// How `guest-shutdown` takes the guest down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Power off (the default).
    #[default]
    Powerdown,
    /// Reboot.
    Reboot,
    /// Halt without powering off.
    Halt,
}

impl std::str::FromStr for ShutdownMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "powerdown" => Ok(ShutdownMode::Powerdown),
            "reboot" => Ok(ShutdownMode::Reboot),
            "halt" => Ok(ShutdownMode::Halt),
            other => Err(format!(
                "unknown shutdown mode '{other}' (powerdown, reboot, halt)"
            )),
        }
    }
}

/// `guest-shutdown {mode?}`: no reply on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestShutdown {
    /// Shutdown mode; qemu-ga takes it as a plain string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ShutdownMode>,
}
impl Command for GuestShutdown {
    const NAME: &'static str = "guest-shutdown";
    type Returns = Empty;
    const SUCCESS_RESPONSE: bool = false;
}

/// `capture-output` of `guest-exec`: a bool in qemu-ga 7.2, a mode string from 8.0 on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CaptureOutput {
    /// `true` captures stdout and stderr separately; `false` discards them.
    Flag(bool),
    /// `none`, `stdout`, `stderr`, `separated` or `merged` (qemu-ga 8.0+).
    Mode(String),
}

/// `guest-exec`: starts a process and returns its pid at once.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GuestExec {
    /// Program, looked up in `PATH` when it has no slash.
    pub path: String,
    /// Arguments (without argv\[0\]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<Vec<String>>,
    /// Environment as `NAME=VALUE`; when given it replaces the agent's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Base64 of the bytes fed to stdin (stdin is empty otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_data: Option<String>,
    /// Whether stdout and stderr are captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_output: Option<CaptureOutput>,
}
impl Command for GuestExec {
    const NAME: &'static str = "guest-exec";
    type Returns = GuestExecPid;
}

/// Reply of `guest-exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestExecPid {
    /// Guest process id, the handle for `guest-exec-status`.
    pub pid: i64,
}

/// `guest-exec-status {pid}` -> [`GuestExecStatus`]. Once it has reported `exited: true`
/// the agent forgets the pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestExecStatusCmd {
    /// The pid `guest-exec` returned.
    pub pid: i64,
}
impl Command for GuestExecStatusCmd {
    const NAME: &'static str = "guest-exec-status";
    type Returns = GuestExecStatus;
}

/// `vireo-exec-read {pid}` (Vireo extension) -> [`GuestExecStatus`] holding only the
/// output produced since the previous `vireo-exec-read`, so the host can stream it. Once
/// it has reported `exited: true` the agent forgets the pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VireoExecRead {
    /// The pid `guest-exec` returned.
    pub pid: i64,
}
impl Command for VireoExecRead {
    const NAME: &'static str = "vireo-exec-read";
    type Returns = GuestExecStatus;
}

/// `vireo-exec-signal {pid, signal?}` (Vireo extension): sends `signal` (default 15,
/// SIGTERM) to a process started by `guest-exec` that has not been reaped yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VireoExecSignal {
    /// The pid `guest-exec` returned.
    pub pid: i64,
    /// Signal number, 15 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
}
impl Command for VireoExecSignal {
    const NAME: &'static str = "vireo-exec-signal";
    type Returns = Empty;
}

/// State of a process started by `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExecStatus {
    /// Whether the process has ended.
    pub exited: bool,
    /// Exit code, when it exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    /// Signal number, when a signal killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    /// Base64 of captured stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_data: Option<String>,
    /// Base64 of captured stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_data: Option<String>,
    /// Whether stdout went past the agent's capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_truncated: Option<bool>,
    /// Whether stderr went past the agent's capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_truncated: Option<bool>,
}

/// One entry of `guest-info`'s `supported_commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestAgentCommandInfo {
    /// Command name.
    pub name: String,
    /// Whether the guest's administrator left it enabled.
    pub enabled: bool,
    /// Whether it replies on success.
    pub success_response: bool,
}

/// Reply of `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// Agent version, e.g. `7.2.22` for qemu-ga.
    pub version: String,
    /// Commands the agent knows (note: snake_case on the wire, unlike everything else).
    pub supported_commands: Vec<GuestAgentCommandInfo>,
}

impl GuestAgentInfo {
    /// Whether `name` is known and enabled.
    pub fn supports(&self, name: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == name && c.enabled)
    }
}

/// Reply of `guest-get-osinfo`: `/etc/os-release` fields plus `uname`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestOsInfo {
    /// `uname -r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// `uname -v`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// `uname -m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// os-release `ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// os-release `NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// os-release `PRETTY_NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    /// os-release `VERSION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// os-release `VERSION_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// os-release `VARIANT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// os-release `VARIANT_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant_id: Option<String>,
}

/// Reply of `guest-get-host-name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestHostName {
    /// The guest's host name.
    pub host_name: String,
}

/// Address family of a [`GuestIpAddress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestIpAddressType {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// One address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestIpAddress {
    /// Textual address.
    pub ip_address: String,
    /// Family.
    pub ip_address_type: GuestIpAddressType,
    /// Prefix length.
    pub prefix: i64,
}

/// Counters of a guest interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterfaceStat {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errs: u64,
    /// Receive drops.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Send errors.
    pub tx_errs: u64,
    /// Send drops.
    pub tx_dropped: u64,
}

/// One entry of `guest-network-get-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterface {
    /// Interface name.
    pub name: String,
    /// MAC address `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    /// Addresses; absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_addresses: Option<Vec<GuestIpAddress>>,
    /// Counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<GuestNetworkInterfaceStat>,
}

/// Reply of `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsfreezeStatus {
    /// Filesystems are writable.
    Thawed,
    /// Local filesystems are frozen.
    Frozen,
}

/// `guest-fsfreeze-freeze-list {mountpoints?}` -> number of filesystems frozen.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFsfreezeFreezeList {
    /// Mount points to freeze; all freezable ones when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoints: Option<Vec<String>>,
}
impl Command for GuestFsfreezeFreezeList {
    const NAME: &'static str = "guest-fsfreeze-freeze-list";
    type Returns = i64;
}

/// Reply of `guest-get-memory-block-info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemoryBlockInfo {
    /// Size of a hot-pluggable memory block in bytes.
    pub size: u64,
}

/// Which side published a key-value pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvpPool {
    /// Pairs the host pushed into the guest (`/run/vireo/kvp/host/`).
    Host,
    /// Pairs the guest published (`/run/vireo/kvp/guest/`).
    #[default]
    Guest,
}

impl KvpPool {
    /// Directory name of the pool under the KVP root.
    pub fn dir_name(self) -> &'static str {
        match self {
            KvpPool::Host => "host",
            KvpPool::Guest => "guest",
        }
    }
}

/// `vireo-kvp-set {key, value}`: stores a pair in the host pool inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VireoKvpSet {
    /// Key: 1..=128 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
    pub key: String,
    /// UTF-8 value, at most [`KVP_MAX_VALUE`] bytes.
    pub value: String,
}
impl Command for VireoKvpSet {
    const NAME: &'static str = "vireo-kvp-set";
    type Returns = Empty;
}

/// `vireo-kvp-delete {key}`: removes a pair from the host pool (no error if absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VireoKvpDelete {
    /// Key.
    pub key: String,
}
impl Command for VireoKvpDelete {
    const NAME: &'static str = "vireo-kvp-delete";
    type Returns = Empty;
}

/// `vireo-kvp-get {key, pool?}` -> [`KvpValue`]; `pool` defaults to `guest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VireoKvpGet {
    /// Key.
    pub key: String,
    /// Pool to read, `guest` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<KvpPool>,
}
impl Command for VireoKvpGet {
    const NAME: &'static str = "vireo-kvp-get";
    type Returns = KvpValue;
}

/// Reply of `vireo-kvp-get`: `{}` when the key is absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvpValue {
    /// The value, absent when the key is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// `vireo-kvp-list {pool}` -> list of [`KvpPair`] sorted by key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VireoKvpList {
    /// Pool to list.
    pub pool: KvpPool,
}
impl Command for VireoKvpList {
    const NAME: &'static str = "vireo-kvp-list";
    type Returns = Vec<KvpPair>;
}

/// A key-value pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvpPair {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

/// Longest KVP key in bytes.
pub const KVP_MAX_KEY: usize = 128;
/// Longest KVP value in bytes.
pub const KVP_MAX_VALUE: usize = 4096;

/// Checks a KVP key: 1..=128 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_kvp_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > KVP_MAX_KEY {
        return Err(format!("key must be 1 to {KVP_MAX_KEY} bytes long"));
    }
    if key.starts_with('.') {
        return Err("key must not start with '.'".into());
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err("key may only hold A-Z a-z 0-9 . _ -".into());
    }
    Ok(())
}

/// Checks a KVP value's size.
pub fn validate_kvp_value(value: &str) -> Result<(), String> {
    if value.len() > KVP_MAX_VALUE {
        return Err(format!("value is longer than {KVP_MAX_VALUE} bytes"));
    }
    Ok(())
}

/// Reply of `vireo-memory-status`: `/proc/meminfo` in bytes, for dynamic memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`.
    pub available: u64,
    /// `Committed_AS`.
    pub committed: u64,
}

/// Commands the vireo extensions add; `guest-info` of vireo-guest lists them.
pub const VIREO_COMMANDS: &[&str] = &[
    VireoKvpSet::NAME,
    VireoKvpGet::NAME,
    VireoKvpList::NAME,
    VireoKvpDelete::NAME,
    VireoMemoryStatus::NAME,
    VireoExecRead::NAME,
    VireoExecSignal::NAME,
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Requests serialize exactly as qemu-ga expects (kebab-case, no empty arguments).
    #[test]
    fn request_encoding() {
        let r = Request::new(&GuestPing, None).unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"execute": "guest-ping"})
        );
        let r = Request::new(
            &GuestExec {
                path: "/bin/echo".into(),
                arg: Some(vec!["hi".into()]),
                env: None,
                input_data: Some("aGk=".into()),
                capture_output: Some(CaptureOutput::Flag(true)),
            },
            Some(json!(7)),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"execute": "guest-exec", "id": 7, "arguments":
                {"path": "/bin/echo", "arg": ["hi"], "input-data": "aGk=", "capture-output": true}})
        );
        let r = Request::new(
            &GuestShutdown {
                mode: Some(ShutdownMode::Reboot),
            },
            None,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}})
        );
        let r = Request::new(
            &VireoKvpList {
                pool: KvpPool::Host,
            },
            None,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"execute": "vireo-kvp-list", "arguments": {"pool": "host"}})
        );
    }

    /// Replies captured from qemu-ga 7.2 decode into the typed structures.
    #[test]
    fn decode_qemu_ga_replies() {
        let r = Response::decode(br#"{"return": {"exitcode": 3, "err-data": "ZXJyCg==", "out-data": "aGkK", "err-truncated": false, "out-truncated": false, "exited": true}}"#).unwrap();
        let Response::Return { value, id: None } = r else {
            panic!("{r:?}")
        };
        let st: GuestExecStatus = serde_json::from_value(value).unwrap();
        assert_eq!(st.exitcode, Some(3));
        assert_eq!(st.out_data.as_deref(), Some("aGkK"));
        assert_eq!(st.out_truncated, Some(false));

        let r = Response::decode(br#"{"return": [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}], "statistics": {"tx-packets": 30, "tx-errs": 0, "rx-bytes": 3245, "rx-dropped": 0, "rx-packets": 30, "rx-errs": 0, "tx-bytes": 3245, "tx-dropped": 0}, "hardware-address": "00:00:00:00:00:00"}, {"name": "ifb0", "hardware-address": "32:58:33:e5:25:c7"}]}"#).unwrap();
        let Response::Return { value, .. } = r else {
            panic!()
        };
        let ifs: Vec<GuestNetworkInterface> = serde_json::from_value(value).unwrap();
        assert_eq!(ifs[0].ip_addresses.as_ref().unwrap()[0].prefix, 8);
        assert_eq!(ifs[0].statistics.unwrap().rx_bytes, 3245);
        assert!(ifs[1].ip_addresses.is_none());

        let r = Response::decode(br#"{"error": {"class": "CommandNotFound", "desc": "Command guest-shutdown has been disabled"}, "id": "x"}"#).unwrap();
        assert_eq!(r.id(), Some(&json!("x")));
        assert!(
            matches!(r, Response::Error { ref error, .. } if error.class == CLASS_COMMAND_NOT_FOUND)
        );

        let r = Response::decode(br#"{"return": {}, "id": "abc"}"#).unwrap();
        assert_eq!(
            r,
            Response::Return {
                value: json!({}),
                id: Some(json!("abc"))
            }
        );
        assert!(Response::decode(br#"{"foo": 1}"#).is_err());
        assert!(Response::decode(br#"not json"#).is_err());
    }

    /// Our replies are one line and round-trip.
    #[test]
    fn response_roundtrip() {
        for r in [
            Response::Return {
                value: json!(12345),
                id: None,
            },
            Response::Error {
                error: QgaError {
                    class: CLASS_GENERIC.into(),
                    desc: "bad\nthing".into(),
                },
                id: Some(json!({"a": 1})),
            },
        ] {
            let bytes = r.encode();
            assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(*bytes.last().unwrap(), b'\n');
            assert_eq!(Response::decode(&bytes).unwrap(), r);
        }
    }

    /// `capture-output` accepts both the 7.2 bool and the 8.0 mode string.
    #[test]
    fn capture_output_forms() {
        let a: GuestExec =
            serde_json::from_value(json!({"path": "x", "capture-output": true})).unwrap();
        assert_eq!(a.capture_output, Some(CaptureOutput::Flag(true)));
        let a: GuestExec =
            serde_json::from_value(json!({"path": "x", "capture-output": "merged"})).unwrap();
        assert_eq!(a.capture_output, Some(CaptureOutput::Mode("merged".into())));
        assert!(serde_json::from_value::<GuestExec>(json!({"path": "x", "bogus": 1})).is_err());
    }

    /// KVP keys that could escape the pool directory are refused.
    #[test]
    fn kvp_key_validation() {
        for ok in ["a", "vm.role", "A_b-9", &"k".repeat(128)] {
            assert!(validate_kvp_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            &"k".repeat(129),
        ] {
            assert!(validate_kvp_key(bad).is_err(), "{bad}");
        }
        assert!(validate_kvp_value(&"v".repeat(4096)).is_ok());
        assert!(validate_kvp_value(&"v".repeat(4097)).is_err());
    }
}
