//! Mechanism for driving QEMU (7.2 and newer) from Vireo.
//!
//! This crate owns:
//! - [`qmp`]: an async QMP client over a unix socket (concurrent callers, events, typed helpers,
//!   re-attach after the previous client died);
//! - [`cmdline`]: the QEMU argv for a [`MachineConfig`] following the generation table
//!   (generation 1 = `pc` + SeaBIOS + IDE + e1000, generation 2 = `q35` + OVMF + virtio);
//! - [`process`]: spawning QEMU so that it survives its parent (the per-VM worker), and
//!   re-attaching to it through its pidfile;
//! - [`accel`]: the KVM usability probe and the accelerator choice;
//! - [`firmware`]: OVMF / SeaBIOS locations, Secure Boot templates and an OVMF variable store
//!   editor.
//!
//! It holds no policy: it never decides *when* to start, stop, balloon or migrate a VM. Those
//! decisions live in `memory`, `migration` and the daemon; this crate only carries them out.

#![warn(missing_docs)]

pub mod accel;
pub mod cmdline;
pub mod firmware;
pub mod process;
pub mod qmp;
pub mod qmp_memory;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use accel::{
    choose_accel, probe_kvm, probe_kvm_at, probe_kvm_cached, AccelProbe, AccelRequest,
};
pub use cmdline::{
    disk_hotplug_args, Accel, BalloonConfig, CmdlineError, DiskAttachment, DiskBus, DiskFormat,
    DiskMedia, DiskSource, Firmware, Generation, MachineConfig, NicAttachment, NicBackend,
    NicModel, RunPaths, VirtioMemConfig,
};
pub use firmware::{
    detect_boot_refusal, prepare_vars, FirmwareError, OvmfPaths, SecureBootTemplate,
};
pub use process::{ProcessError, QemuProcess};
pub use qmp::{QmpClient, QmpError, QmpEvent};

/// Coarse classification of every error in this crate, to match on without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operating system I/O error (socket, file, process).
    Io,
    /// The peer (QEMU, a firmware file) sent or holds something malformed.
    Corrupt,
    /// The request is valid but not supported by this QEMU / firmware / host.
    Unsupported,
    /// A file, socket or object does not exist.
    NotFound,
    /// The caller's input is invalid (bad id, bad path, inconsistent configuration).
    InvalidInput,
    /// QEMU refused a command (a QMP error reply).
    Refused,
    /// The operation did not finish in time.
    Timeout,
    /// The connection to QEMU is gone (QEMU exited or another client holds the socket).
    Disconnected,
}
