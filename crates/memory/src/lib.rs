//! Dynamic memory policy for Vireo: per-VM memory settings (startup, minimum, maximum, buffer,
//! weight), admission control and the host-wide balancer.
//!
//! This crate is **pure policy**: demand in, targets out. It owns
//! - [`MemorySettings`] and their validation ([`MemorySettings::validate`]) and which fields may
//!   change while a VM runs ([`check_live_change`]);
//! - guest demand estimation from balloon statistics and the guest agent ([`guest_demand`]);
//! - the balancer ([`balance`]), which turns each VM's demand and the host's free memory into a
//!   memory target per VM, split into a balloon part (below startup) and a virtio-mem part
//!   (above startup);
//! - admission control ([`admit`]), which refuses a VM whose minimum cannot be guaranteed;
//! - how far one virtio-mem unplug step may go ([`unplug_step`]): never below what the guest
//!   reports available, minus a floor.
//!
//! It must not do I/O, read a clock or talk to QEMU: time is passed in as milliseconds, and
//! vireod / vireo-worker apply the [`Decision`]s through QMP (see `docs/dynamic-memory.md`).
//!
//! All sizes are bytes.
//!
//! # Example
//! ```
//! use memory::{balance, HostMemory, MemorySettings, VmDemand, GIB, MIB};
//!
//! let settings = MemorySettings::dynamic(512 * MIB, 256 * MIB, 4 * GIB);
//! let vm = VmDemand {
//!     id: "web".into(),
//!     settings,
//!     assigned: 512 * MIB,
//!     requested: None,
//!     demand: 900 * MIB,
//!     reported_at: Some(10_000),
//! };
//! let host = HostMemory { total: 16 * GIB, free_for_vms: 8 * GIB, reserve: 2 * GIB };
//! let d = &balance(&[vm], &host, 10_500)[0];
//! assert_eq!(d.target, 1080 * MIB); // 900 MiB + 20 % buffer, in 2 MiB blocks
//! assert_eq!(d.balloon_target, 512 * MIB); // balloon fully deflated
//! assert_eq!(d.virtio_mem_requested, 568 * MIB); // the rest hot-plugged above startup
//! ```
#![warn(missing_docs)]

mod admission;
mod balancer;
mod demand;
mod settings;
mod unplug;

pub use admission::{admit, AdmissionError};
pub use balancer::{
    balance, balance_with, BalanceConfig, Decision, HostMemory, Reason, VmDemand, DEFAULT_MIN_FREE,
};
pub use demand::{demand_reported_at, guest_demand, AgentMemory, BalloonStats};
pub use settings::{
    check_live_change, LiveChangeError, MemorySettings, SettingsError, DEFAULT_BUFFER_PERCENT,
    DEFAULT_WEIGHT, MAX_BUFFER_PERCENT, MAX_WEIGHT, MIN_RAM,
};
pub use unplug::{unplug_step, UNPLUG_FLOOR};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// Every memory size in [`MemorySettings`] is a multiple of this (QEMU's smallest virtio-mem
/// block on x86 and a huge page).
pub const ALIGN: u64 = 2 * MIB;

/// What kind of failure an error of this crate is, for callers to map (the API maps it to an
/// HTTP status in one place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The settings themselves are wrong (HTTP 400).
    Invalid,
    /// The change is not allowed while the VM runs (HTTP 409).
    Unsupported,
    /// The host has not enough memory (HTTP 409 / 507).
    Capacity,
}
