//! The wire types of the Vireo API, shared by `vireod`, `vireo-worker` and the `vireo` CLI.
//!
//! Every type here is plain data (serde); validation lives in [`crate::validate`].
//! Field names are part of the stable `--json` contract documented in `docs/api.md`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use uuid::Uuid;

/// VM generation, as in Hyper-V: 1 = BIOS/i440fx/IDE, 2 = UEFI/q35/SCSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Generation {
    /// BIOS (SeaBIOS), `pc` machine, emulated IDE boot disk, legacy NIC.
    Gen1,
    /// UEFI (OVMF) with Secure Boot, `q35` machine, synthetic (virtio) devices.
    Gen2,
}

impl TryFrom<u8> for Generation {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(Generation::Gen1),
            2 => Ok(Generation::Gen2),
            other => Err(format!("generation must be 1 or 2, not {other}")),
        }
    }
}

impl From<Generation> for u8 {
    fn from(g: Generation) -> u8 {
        match g {
            Generation::Gen1 => 1,
            Generation::Gen2 => 2,
        }
    }
}

/// Bus a disk is attached to inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// Emulated IDE (generation 1 only).
    Ide,
    /// Synthetic SCSI (virtio-scsi).
    Scsi,
    /// virtio-blk.
    Virtio,
}

/// One virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Image file on the host (absolute path).
    pub path: PathBuf,
    /// Bus; defaults to the generation's boot bus (IDE for 1, SCSI for 2).
    pub bus: DiskBus,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// NIC device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// Legacy network adapter (Intel e1000), generation 1 only.
    E1000,
    /// Synthetic network adapter (virtio-net).
    Virtio,
}

/// One virtual network adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Name inside the VM's config (`nic0`, `nic1`, ...).
    pub name: String,
    /// MAC address, `52:54:00:xx:xx:xx` form.
    pub mac: String,
    /// Device model.
    pub model: NicModel,
    /// Virtual switch this NIC is connected to; `None` = not connected.
    #[serde(default)]
    pub switch: Option<String>,
    /// Switch port settings (VLAN, security, ACL, QoS); they follow the VM.
    #[serde(default)]
    pub port: crate::switch::NicPort,
}

/// Boot device class, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootDevice {
    /// The first disk.
    Disk,
    /// Network boot (PXE) from the first NIC.
    Network,
}

/// Which keys the UEFI variable store trusts when Secure Boot is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SecureBootTemplate {
    /// Microsoft Windows Production PCA only (Windows guests).
    #[default]
    MicrosoftWindows,
    /// Microsoft UEFI CA as well (Linux guests booting through shim).
    MicrosoftUefiCa,
    /// No keys enrolled (setup mode): nothing is enforced.
    None,
}

impl SecureBootTemplate {
    /// The name used on the command line and in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecureBootTemplate::MicrosoftWindows => "microsoft-windows",
            SecureBootTemplate::MicrosoftUefiCa => "microsoft-uefi-ca",
            SecureBootTemplate::None => "none",
        }
    }
}

/// Accelerator requested for a VM or the host default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AccelChoice {
    /// KVM where the host probe shows hardware speed, TCG otherwise.
    #[default]
    Auto,
    /// Force KVM (explicit override of the probe).
    Kvm,
    /// Force TCG (software emulation).
    Tcg,
}

/// Accelerator actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// The persistent configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name on the host.
    pub name: String,
    /// Stable identity (SMBIOS UUID).
    pub uuid: Uuid,
    /// Machine generation.
    pub generation: Generation,
    /// Virtual processors.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Disks in attachment order; the first bootable one boots.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network adapters.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Boot order.
    #[serde(default = "default_boot_order")]
    pub boot_order: Vec<BootDevice>,
    /// Secure Boot (generation 2 only).
    #[serde(default)]
    pub secure_boot: bool,
    /// Key set trusted by Secure Boot.
    #[serde(default)]
    pub secure_boot_template: SecureBootTemplate,
    /// Accelerator for this VM.
    #[serde(default)]
    pub accel: AccelChoice,
    /// Seconds a graceful stop waits before turning the VM off.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    /// Dynamic memory settings (`memory` is the startup RAM).
    #[serde(default)]
    pub dynamic_memory: crate::memory::DynamicMemory,
}

fn default_boot_order() -> Vec<BootDevice> {
    vec![BootDevice::Disk, BootDevice::Network]
}

fn default_stop_timeout() -> u64 {
    60
}

/// Request body of `POST /v1/vms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Name, unique on the host.
    pub name: String,
    /// 1 or 2.
    pub generation: u8,
    /// vCPUs (default 1).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory in bytes (default 512 MiB).
    #[serde(default)]
    pub memory: Option<u64>,
    /// Disk image paths; the bus defaults to the generation's boot bus.
    #[serde(default)]
    pub disks: Vec<CreateDisk>,
    /// Secure Boot; defaults to on for generation 2.
    #[serde(default)]
    pub secure_boot: Option<bool>,
    /// Secure Boot template (default `microsoft-windows`).
    #[serde(default)]
    pub secure_boot_template: Option<SecureBootTemplate>,
    /// Accelerator (default `auto`).
    #[serde(default)]
    pub accel: Option<AccelChoice>,
    /// Boot order.
    #[serde(default)]
    pub boot_order: Option<Vec<BootDevice>>,
    /// Graceful stop timeout in seconds (default 60).
    #[serde(default)]
    pub stop_timeout_secs: Option<u64>,
}

/// A disk in a [`CreateVm`] or a disk-add request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDisk {
    /// Image path.
    pub path: PathBuf,
    /// Bus (default: generation's boot bus).
    #[serde(default)]
    pub bus: Option<DiskBus>,
    /// Read-only attachment.
    #[serde(default)]
    pub read_only: bool,
}

/// Request body of `PATCH /v1/vms/{name}` (offline changes unless noted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    /// vCPUs.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory in bytes.
    #[serde(default)]
    pub memory: Option<u64>,
    /// Secure Boot on/off.
    #[serde(default)]
    pub secure_boot: Option<bool>,
    /// Secure Boot template.
    #[serde(default)]
    pub secure_boot_template: Option<SecureBootTemplate>,
    /// Accelerator.
    #[serde(default)]
    pub accel: Option<AccelChoice>,
    /// Boot order.
    #[serde(default)]
    pub boot_order: Option<Vec<BootDevice>>,
    /// Graceful stop timeout (may change while running).
    #[serde(default)]
    pub stop_timeout_secs: Option<u64>,
    /// Disks to append.
    #[serde(default)]
    pub add_disks: Vec<CreateDisk>,
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// Dynamic memory on/off (offline only).
    #[serde(default)]
    pub dynamic_memory: Option<bool>,
    /// Minimum RAM (may change while running).
    #[serde(default)]
    pub memory_minimum: Option<u64>,
    /// Maximum RAM (may grow while running).
    #[serde(default)]
    pub memory_maximum: Option<u64>,
    /// Memory buffer, percent (may change while running).
    #[serde(default)]
    pub memory_buffer_percent: Option<u32>,
    /// Memory weight, 0..=10000 (may change while running).
    #[serde(default)]
    pub memory_weight: Option<u32>,
}

/// Run state of a VM (`state` in `vireo vm show --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Not running.
    Off,
    /// QEMU is being started or restored.
    Starting,
    /// Guest is running.
    Running,
    /// vCPUs are paused.
    Paused,
    /// Memory is being written to the saved-state file.
    Saving,
    /// Off, with a saved state that the next start resumes.
    Saved,
    /// A graceful stop is in progress.
    Stopping,
}

impl VmState {
    /// Name as shown to users.
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Off => "off",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Saving => "saving",
            VmState::Saved => "saved",
            VmState::Stopping => "stopping",
        }
    }
}

/// Integration-services heartbeat (`heartbeat` in `vireo vm show --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeartbeatState {
    /// The guest agent answers.
    Ok,
    /// It answered before but stopped answering.
    Lost,
    /// No agent has answered since the VM started (or the VM is off).
    NoContact,
}

/// What the guest agent told about the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Which agent answers: `vireo-guest` or `qemu-ga`, with its version.
    #[serde(default)]
    pub agent: Option<String>,
    /// OS pretty name.
    #[serde(default)]
    pub os: Option<String>,
    /// Kernel release.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// IP addresses (`addr/prefix`), loopback excluded.
    #[serde(default)]
    pub ip_addresses: Vec<String>,
}

/// Where a VM's worker process stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// PID of `vireo-worker`.
    pub pid: Option<u32>,
    /// PID of QEMU.
    pub qemu_pid: Option<u32>,
    /// How many times the worker was replaced after dying.
    pub restarts: u32,
}

/// One VM as the API reports it (`vireo vm show --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Uuid,
    /// 1 or 2.
    pub generation: u8,
    /// Run state.
    pub state: VmState,
    /// Integration-services heartbeat.
    pub heartbeat: HeartbeatState,
    /// Accelerator in use (or that a start would use).
    pub accel: Accel,
    /// Why that accelerator.
    pub accel_reason: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory: settings, what the guest has and needs, the balancer's last decision.
    pub memory: crate::memory::VmMemory,
    /// Secure Boot.
    pub secure_boot: bool,
    /// Secure Boot template.
    pub secure_boot_template: SecureBootTemplate,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// NICs.
    pub nics: Vec<NicSpec>,
    /// Boot order.
    pub boot_order: Vec<BootDevice>,
    /// Graceful stop timeout (seconds).
    pub stop_timeout_secs: u64,
    /// Guest information from the agent, when known.
    pub guest: Option<GuestInfo>,
    /// Worker and QEMU processes while running.
    pub worker: Option<WorkerInfo>,
    /// Serial console log file.
    pub console_log: PathBuf,
    /// Last notable event or error (e.g. "firmware refused the boot loader: ...").
    pub status_message: Option<String>,
    /// Seconds since the VM was started, while running.
    pub uptime_secs: Option<u64>,
    /// Timings of the last start (for `vireo bench boot`).
    #[serde(default)]
    pub last_start: Option<StartTimings>,
}

/// How long the last start took, measured from the moment vireod received the request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StartTimings {
    /// Until QEMU was exec'd: Vireo's own overhead.
    pub api_to_qemu_exec_ms: Option<f64>,
    /// Until QEMU was running the guest (the start call returned).
    pub api_to_running_ms: f64,
    /// Until the guest agent first answered.
    pub api_to_first_heartbeat_ms: Option<f64>,
}

/// Host facts (`vireo host show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name.
    pub hostname: String,
    /// vireod version.
    pub version: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Accelerator that `auto` chooses on this host.
    pub accel: Accel,
    /// Why (probe result).
    pub accel_reason: String,
    /// QEMU binary and version.
    pub qemu: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_total: u64,
    /// Available memory in bytes.
    pub memory_available: u64,
    /// VMs defined.
    pub vms_defined: usize,
    /// VMs running (or paused).
    pub vms_running: usize,
    /// vireod's resident set size in bytes.
    pub daemon_rss: u64,
    /// SHA-256 fingerprint of the host certificate (peers confirm it in `vireo host trust`).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Address other hosts reach this one on (`vireod --listen`).
    #[serde(default)]
    pub listen: Option<String>,
}

/// `POST /v1/vms/{name}/stop` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds to wait for a graceful stop before turning off (default: the VM's setting).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `POST /v1/vms/{name}/exec` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the guest's PATH.
    pub argv: Vec<String>,
    /// Extra environment (`KEY=VALUE`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Bytes for the command's standard input.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// Reply to [`ExecRequest`]: the guest process to poll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecStarted {
    /// Guest PID.
    pub pid: i64,
}

/// `GET /v1/vms/{name}/exec/{pid}`: output since the last poll.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Whether the process has exited.
    pub exited: bool,
    /// Exit code when exited normally.
    pub exit_code: Option<i64>,
    /// Signal when killed by one.
    pub signal: Option<i64>,
    /// Standard output (new bytes, UTF-8 lossy).
    pub stdout: String,
    /// Standard error (new bytes, UTF-8 lossy).
    pub stderr: String,
}

/// `PUT /v1/vms/{name}/kvp` body: host → guest pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvpSet {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

/// Key-value pairs of both pools.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvpPools {
    /// Pairs the host gave the guest.
    pub host: std::collections::BTreeMap<String, String>,
    /// Pairs the guest published.
    pub guest: std::collections::BTreeMap<String, String>,
}

/// Machine-readable category of an API error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is malformed or invalid.
    Invalid,
    /// The object does not exist.
    #[serde(alias = "not_found")]
    NotFound,
    /// The object exists already.
    #[serde(alias = "exists")]
    Conflict,
    /// The VM is in a state where this is not allowed.
    WrongState,
    /// The guest or a host component failed.
    #[serde(alias = "io")]
    Failed,
    /// Internal error (details in the daemon log).
    Internal,
}

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Category.
    pub kind: ErrorKind,
    /// One-line cause, with what to do where possible.
    pub error: String,
}
