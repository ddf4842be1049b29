//! The control API between `vireod` and a VM's `vireo-worker` (HTTP/JSON over the
//! worker's unix socket). Internal to a host, but versioned with the rest.

use crate::types::{Accel, GuestInfo, HeartbeatState, VmSpec, VmState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything a worker needs to run (or re-attach to) one VM; written by vireod as
/// `launch.json` in the VM's run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The VM configuration at start time.
    pub vm: VmSpec,
    /// Accelerator chosen for this run.
    pub accel: Accel,
    /// Run directory holding the sockets, pid files and logs.
    pub run_dir: PathBuf,
    /// Per-VM UEFI variable store (generation 2).
    pub uefi_vars: Option<PathBuf>,
    /// Serial console log (appended).
    pub console_log: PathBuf,
    /// Saved-state file to restore from instead of booting.
    pub restore_from: Option<PathBuf>,
    /// Start as a live migration destination instead of booting.
    #[serde(default)]
    pub incoming: Option<crate::migration::IncomingLaunch>,
    /// Size of the virtio-mem region above startup RAM (dynamic memory); `None`: none.
    #[serde(default)]
    pub virtio_mem_region: Option<u64>,
}

/// `GET /status` of a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// QEMU's PID.
    pub qemu_pid: u32,
    /// The worker's PID.
    pub worker_pid: u32,
    /// VM state derived from QEMU's run state.
    pub state: VmState,
    /// QEMU's own run-state name (`running`, `paused`, `inmigrate`, ...).
    pub qemu_status: String,
    /// Heartbeat of the guest agent.
    pub heartbeat: HeartbeatState,
    /// Guest facts from the agent.
    pub guest: Option<GuestInfo>,
    /// Firmware refused to boot the loader (message from the console), if so.
    pub boot_refusal: Option<String>,
    /// Unix time QEMU was started.
    pub started_at: u64,
    /// Accelerator.
    pub accel: Accel,
    /// Whether this worker re-attached to an already running QEMU.
    pub attached: bool,
    /// Unix time in ns just before QEMU was exec'd (not known after a re-attach).
    #[serde(default)]
    pub qemu_exec_ns: Option<u64>,
    /// Unix time in ns of the first answered heartbeat.
    #[serde(default)]
    pub first_heartbeat_ns: Option<u64>,
}

/// Unix time in nanoseconds.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `POST /shutdown` body: what the guest agent should do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GuestPowerAction {
    /// Power off.
    Powerdown,
    /// Reboot.
    Reboot,
}

/// `POST /save` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveRequest {
    /// Where to write the saved state.
    pub path: PathBuf,
}

/// How a worker's QEMU ended; written as `exit.json` in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Human-readable reason (guest powered off, turned off, crashed...).
    pub reason: String,
    /// Whether the stop was clean (guest shutdown or requested).
    pub clean: bool,
    /// Saved state was written and is complete.
    pub saved: bool,
}
