//! Dynamic memory on the wire: a VM's settings (persisted in [`crate::VmSpec`]), the `memory`
//! object of `vireo vm show --json`, `vireo memory status --json`, the host's memory settings,
//! and the worker's memory report and commands (`GET`/`POST /memory` on `worker.sock`).
//!
//! The policy (validation, admission, the balancer) lives in the `memory` crate; these are
//! plain data. All sizes are bytes.

use serde::{Deserialize, Serialize};

/// Default memory buffer, percent.
pub const DEFAULT_BUFFER_PERCENT: u32 = 20;
/// Default memory weight.
pub const DEFAULT_WEIGHT: u32 = 5000;

fn default_buffer() -> u32 {
    DEFAULT_BUFFER_PERCENT
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// A VM's dynamic memory settings (`dynamic_memory` in its config). Startup RAM is
/// [`crate::VmSpec::memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicMemory {
    /// Dynamic memory on or off.
    #[serde(default)]
    pub enabled: bool,
    /// Minimum RAM; `None`: the startup RAM.
    #[serde(default)]
    pub minimum: Option<u64>,
    /// Maximum RAM; `None`: the startup RAM.
    #[serde(default)]
    pub maximum: Option<u64>,
    /// Memory buffer, percent of demand.
    #[serde(default = "default_buffer")]
    pub buffer_percent: u32,
    /// Memory weight (priority when the host is short), 0..=10000.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl Default for DynamicMemory {
    fn default() -> Self {
        DynamicMemory {
            enabled: false,
            minimum: None,
            maximum: None,
            buffer_percent: DEFAULT_BUFFER_PERCENT,
            weight: DEFAULT_WEIGHT,
        }
    }
}

/// The balancer's last decision for a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryDecision {
    /// Memory the guest should have.
    pub target: u64,
    /// The part of `target` within startup RAM (balloon).
    pub balloon_target: u64,
    /// The part of `target` above startup RAM (virtio-mem `requested-size`).
    pub virtio_mem_requested: u64,
    /// Demand plus buffer within the VM's limits.
    pub wanted: u64,
    /// Why (`demand`, `weighted`, `stale-demand`, ... see docs/dynamic-memory.md).
    pub reason: String,
    /// Whether the worker was asked to change the VM's memory.
    pub changed: bool,
    /// Milliseconds since the decision.
    pub age_ms: u64,
}

/// The `memory` object of a VM (`vireo vm show --json`, `vireo memory status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMemory {
    /// Dynamic memory on or off.
    pub dynamic: bool,
    /// Startup RAM.
    pub startup: u64,
    /// Minimum RAM (= startup when static).
    pub minimum: u64,
    /// Maximum RAM (= startup when static).
    pub maximum: u64,
    /// Memory buffer, percent.
    pub buffer_percent: u32,
    /// Memory weight.
    pub weight: u32,
    /// Memory the guest has now (balloon + virtio-mem plugged); the startup RAM while off
    /// or before the first report.
    pub assigned: u64,
    /// What the guest needs now; `None` before its first report.
    pub demand: Option<u64>,
    /// demand / assigned, percent.
    pub pressure_percent: Option<u32>,
    /// Milliseconds since the guest last reported its demand.
    pub demand_age_ms: Option<u64>,
    /// Where demand comes from: `agent` (vireo-guest), `balloon` (virtio-balloon statistics).
    pub demand_source: Option<String>,
    /// Size of the virtio-mem region the VM booted with (how far maximum can grow live).
    pub virtio_mem_region: Option<u64>,
    /// The balancer's last decision.
    pub last_decision: Option<MemoryDecision>,
    /// Why memory is not moving, when something is wrong (e.g. the guest stopped reporting).
    pub status: Option<String>,
}

/// One VM in `vireo memory status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMemoryStatus {
    /// VM name.
    pub name: String,
    /// Its memory.
    #[serde(flatten)]
    pub memory: VmMemory,
}

/// The host's memory as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostMemoryStatus {
    /// Host memory the balancer works with (`MemTotal`, or budget + reserve when a budget is
    /// set).
    pub total: u64,
    /// Host `MemTotal`.
    pub physical_total: u64,
    /// Host `MemAvailable`.
    pub available: u64,
    /// Free for VMs now (available minus memory promised to VMs but not touched yet, within
    /// the budget), before the reserve.
    pub free_for_vms: u64,
    /// Memory never handed to VMs.
    pub reserve: u64,
    /// The most all VMs together may hold (`total - reserve`).
    pub vm_limit: u64,
    /// Operator's budget for VMs, if set.
    pub budget: Option<u64>,
    /// Memory all running VMs hold now.
    pub assigned: u64,
}

/// `GET /v1/memory`: `vireo memory status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Host.
    pub host: HostMemoryStatus,
    /// Running VMs (and VMs with dynamic memory that are off).
    pub vms: Vec<VmMemoryStatus>,
}

/// Host memory settings, persisted in `<state>/host-memory.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMemorySettings {
    /// Memory never handed to VMs; `None`: 10 % of host memory, 1..8 GiB.
    #[serde(default)]
    pub reserve: Option<u64>,
    /// The most all VMs together may hold; `None`: host memory minus the reserve.
    #[serde(default)]
    pub budget: Option<u64>,
}

/// `PATCH /v1/host/memory` body (`vireo host set`). A value of 0 returns to the default.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMemoryPatch {
    /// New reserve.
    #[serde(default)]
    pub reserve: Option<u64>,
    /// New budget.
    #[serde(default)]
    pub budget: Option<u64>,
}

/// `GET /memory` of a worker: what the VM has and what its guest needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerMemory {
    /// Balloon `actual` plus virtio-mem plugged size.
    pub assigned: u64,
    /// Balloon `actual` (RAM within startup the guest has).
    pub balloon_actual: u64,
    /// virtio-mem plugged size.
    pub plugged: u64,
    /// What the VM's devices are asked to give the guest now (the last target applied:
    /// balloon target plus virtio-mem `requested-size`); `None` before the first target of
    /// this boot. Above `assigned`: growth in flight; below: memory not given back yet.
    #[serde(default)]
    pub requested: Option<u64>,
    /// virtio-mem region size (0: no virtio-mem device).
    pub region: u64,
    /// Guest demand, when reported.
    pub demand: Option<u64>,
    /// Milliseconds since the demand was reported (the worker's clock stays in the worker).
    pub age_ms: Option<u64>,
    /// `agent` or `balloon`.
    pub source: Option<String>,
    /// The agent answered the memory status at least once during this boot.
    pub agent_seen: bool,
    /// QEMU's resident set size (memory the guest really uses on the host).
    pub qemu_rss: u64,
    /// Last QMP or agent failure, if any.
    pub error: Option<String>,
    /// Boot generation: the worker counts the guest's resets (0 for the boot it launched).
    /// Demand and `requested` belong to this boot; a target computed for another boot is
    /// refused ([`SetMemory::generation`]).
    #[serde(default)]
    pub generation: u64,
}

/// `POST /memory` of a worker: apply a balancer decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMemory {
    /// QMP `balloon` value.
    pub balloon_target: u64,
    /// virtio-mem `requested-size`.
    pub virtio_mem_requested: u64,
    /// The boot generation ([`WorkerMemory::generation`]) of the report this target was
    /// computed from: the worker refuses it (409) once the guest has reset since, so a target
    /// for the old boot never squeezes the new one. `None`: applied whatever the boot.
    #[serde(default)]
    pub generation: Option<u64>,
}
