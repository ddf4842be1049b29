//! Dynamic memory in the manager: the host's memory settings (reserve, budget), the per-VM
//! settings in the VM config and their live changes, admission control at start, and the
//! state the balancer task ([`crate::balancer`]) keeps for `vireo vm show` and
//! `vireo memory status`. The policy itself is the `memory` crate.

use super::{lock, Manager};
use crate::error::{ApiError, ApiResult};
use crate::store::write_atomic;
use ::memory::{Decision, HostMemory, MemorySettings, Reason};
use api::memory::{
    HostMemoryPatch, HostMemorySettings, HostMemoryStatus, MemoryDecision, MemoryStatus, VmMemory,
    VmMemoryStatus, WorkerMemory,
};
use api::{Client, VmPatch, VmSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A report older than this (plus its own age) is not shown as current.
const STALE_MS: u64 = 10_000;

/// What the balancer last saw and decided for one VM.
#[derive(Default)]
struct VmMem {
    report: Option<(WorkerMemory, Instant)>,
    decision: Option<(Decision, Instant)>,
    region: Option<u64>,
}

/// Dynamic memory state of the manager.
pub struct MemoryState {
    path: PathBuf,
    settings: Mutex<HostMemorySettings>,
    vms: Mutex<HashMap<Uuid, VmMem>>,
}

impl MemoryState {
    /// Loads the host's memory settings from `<state_dir>/host-memory.json` (defaults when
    /// missing or unreadable, with a warning).
    pub fn load(state_dir: &Path) -> MemoryState {
        let path = state_dir.join("host-memory.json");
        let settings = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "ignoring unreadable host memory settings: {e}");
                HostMemorySettings::default()
            }),
            Err(_) => HostMemorySettings::default(),
        };
        MemoryState {
            path,
            settings: Mutex::new(settings),
            vms: Mutex::new(HashMap::new()),
        }
    }
}

/// The `memory` crate's view of a VM's settings.
pub fn settings_of(spec: &VmSpec) -> MemorySettings {
    let d = &spec.dynamic_memory;
    MemorySettings {
        dynamic: d.enabled,
        startup: spec.memory,
        minimum: d.minimum.unwrap_or(spec.memory),
        maximum: d.maximum.unwrap_or(spec.memory),
        buffer_percent: d.buffer_percent,
        weight: d.weight,
    }
}

/// Reads `/proc/meminfo` field `key` in bytes.
fn meminfo(key: &str) -> u64 {
    crate::host::meminfo(key)
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

const MIB: u64 = 1 << 20;

/// Why a VM holds clearly more than its target, if it does: either the guest is giving memory
/// back (the balloon is inflating, virtio-mem unplugging), or it cannot, because it needs the
/// memory (the balloon driver gets no pages; `deflate-on-oom` keeps the guest out of OOM). In
/// both cases the balancer counts what the VM holds, not its target, so nobody else is given
/// that memory.
fn holding_over(assigned: u64, demand: Option<u64>, d: &Decision) -> Option<String> {
    let over = assigned.saturating_sub(d.target);
    if over <= (assigned / 50).max(8 * MIB) {
        return None;
    }
    let needs = demand.filter(|&n| n.saturating_add(::memory::DEFAULT_MIN_FREE) > d.target);
    Some(match needs {
        Some(n) => format!(
            "holds {} MiB, {} MiB above its target of {} MiB ({}): the guest needs {} MiB and keeps it rather than run out of memory (the balloon cannot take memory in use); the host does not hand it to other VMs",
            assigned / MIB,
            over / MIB,
            d.target / MIB,
            d.reason,
            n / MIB
        ),
        None => format!(
            "giving memory back: holds {} MiB, target {} MiB ({}); counted as held until the guest has released it",
            assigned / MIB,
            d.target / MIB,
            d.reason
        ),
    })
}

/// A running VM as the balancer handles it.
pub struct RunningVm {
    /// Id.
    pub uuid: Uuid,
    /// Name.
    pub name: String,
    /// Memory settings.
    pub settings: MemorySettings,
    /// Its worker.
    pub client: Client,
}

impl Manager {
    /// The host's memory settings.
    pub fn host_memory_settings(&self) -> HostMemorySettings {
        *lock(&self.mem.settings)
    }

    /// `vireo host set --memory-reserve/--memory-budget`: validated, persisted, used from the
    /// next balancer round.
    pub fn set_host_memory(&self, patch: HostMemoryPatch) -> ApiResult<HostMemoryStatus> {
        let total = meminfo("MemTotal");
        let mut s = self.host_memory_settings();
        if let Some(r) = patch.reserve {
            s.reserve = (r != 0).then_some(r);
        }
        if let Some(b) = patch.budget {
            s.budget = (b != 0).then_some(b);
        }
        for (what, v) in [("reserve", s.reserve), ("budget", s.budget)] {
            if let Some(v) = v {
                if v % (2 * MIB) != 0 {
                    return Err(ApiError::invalid(format!(
                        "memory {what} ({v} bytes) is not a multiple of 2 MiB"
                    )));
                }
            }
        }
        if let Some(r) = s.reserve {
            if r >= total {
                return Err(ApiError::invalid(format!(
                    "memory reserve ({} MiB) must be below host memory ({} MiB)",
                    r / MIB,
                    total / MIB
                )));
            }
        }
        if let Some(b) = s.budget {
            let reserve = s
                .reserve
                .unwrap_or_else(|| HostMemory::default_reserve(total));
            if b < 32 * MIB || b.saturating_add(reserve) > total {
                return Err(ApiError::invalid(format!(
                    "memory budget ({} MiB) must be at least 32 MiB and fit with the reserve ({} MiB) in host memory ({} MiB)",
                    b / MIB,
                    reserve / MIB,
                    total / MIB
                )));
            }
        }
        let bytes = serde_json::to_vec_pretty(&s).map_err(ApiError::internal)?;
        write_atomic(&self.mem.path, &bytes)?;
        *lock(&self.mem.settings) = s;
        Ok(self.host_memory().1)
    }

    /// The host's memory for the balancer, and as shown.
    pub fn host_memory(&self) -> (HostMemory, HostMemoryStatus) {
        let physical_total = meminfo("MemTotal");
        let available = meminfo("MemAvailable");
        let s = self.host_memory_settings();
        let reserve = s
            .reserve
            .unwrap_or_else(|| HostMemory::default_reserve(physical_total));
        let (promised, assigned) = {
            let vms = lock(&self.mem.vms);
            vms.values()
                .filter_map(|v| v.report.as_ref())
                .fold((0u64, 0u64), |(p, a), (r, _)| {
                    (p + r.assigned.saturating_sub(r.qemu_rss), a + r.assigned)
                })
        };
        let real_free = available.saturating_sub(promised);
        let (total, free_for_vms) = match s.budget {
            Some(b) => {
                let total = physical_total.min(b.saturating_add(reserve));
                (total, real_free.min(total.saturating_sub(assigned)))
            }
            None => (physical_total, real_free),
        };
        let host = HostMemory {
            total,
            free_for_vms,
            reserve,
        };
        let status = HostMemoryStatus {
            total,
            physical_total,
            available,
            free_for_vms,
            reserve,
            vm_limit: host.vm_limit(),
            budget: s.budget,
            assigned,
        };
        (host, status)
    }

    /// Running VMs with a live worker, for the balancer.
    pub fn running_for_balancer(&self) -> Vec<RunningVm> {
        let vms = lock(&self.vms);
        let mut out = Vec::new();
        for (uuid, e) in vms.iter() {
            if e.transient.is_some()
                || self.qemu_pid(uuid).is_none()
                || self.worker_pid(uuid).is_none()
            {
                continue;
            }
            out.push(RunningVm {
                uuid: *uuid,
                name: e.spec.name.clone(),
                settings: settings_of(&e.spec),
                client: self
                    .worker_client(uuid)
                    .with_timeout(Duration::from_millis(1500)),
            });
        }
        out
    }

    /// Records a worker's memory report. A report of another boot generation (the guest reset,
    /// or a restarted worker counts afresh) drops the decision made for the old boot.
    pub fn record_memory_report(&self, uuid: &Uuid, r: WorkerMemory) {
        let mut vms = lock(&self.mem.vms);
        let v = vms.entry(*uuid).or_default();
        if let Some((old, _)) = &v.report {
            if r.generation != old.generation {
                tracing::info!(%uuid, "guest reset (boot generation {} -> {}): the old boot's demand and decision are dropped", old.generation, r.generation);
                v.decision = None;
            }
        }
        v.region = Some(r.region);
        v.report = Some((r, Instant::now()));
    }

    /// Forgets the last decision of a VM (its target was refused: the guest reset).
    pub fn drop_memory_decision(&self, uuid: &Uuid) {
        if let Some(v) = lock(&self.mem.vms).get_mut(uuid) {
            v.decision = None;
        }
    }

    /// The last report (and when it was fetched) of a VM.
    pub fn memory_report(&self, uuid: &Uuid) -> Option<(WorkerMemory, Instant)> {
        lock(&self.mem.vms).get(uuid).and_then(|v| v.report.clone())
    }

    /// Records the balancer's decision; returns the previous reason.
    pub fn record_memory_decision(&self, uuid: &Uuid, d: Decision) -> Option<Reason> {
        let mut vms = lock(&self.mem.vms);
        let v = vms.entry(*uuid).or_default();
        let old = v.decision.as_ref().map(|(d, _)| d.reason);
        v.decision = Some((d, Instant::now()));
        old
    }

    /// Forgets VMs that are no longer running.
    pub fn forget_memory_except(&self, running: &[Uuid]) {
        lock(&self.mem.vms).retain(|u, _| running.contains(u));
    }

    /// Admission control at start: refuses a VM whose minimum cannot be guaranteed next to the
    /// running VMs. Returns the virtio-mem region to boot with (dynamic VMs whose maximum is
    /// above startup): `maximum - startup`; maximum can grow live only within it.
    pub(super) fn admit_memory(&self, uuid: &Uuid, spec: &VmSpec) -> ApiResult<Option<u64>> {
        let new = settings_of(spec);
        let running: Vec<MemorySettings> = {
            let vms = lock(&self.vms);
            vms.iter()
                .filter(|(u, _)| *u != uuid && self.qemu_pid(u).is_some())
                .map(|(_, e)| settings_of(&e.spec))
                .collect()
        };
        let (host, _) = self.host_memory();
        ::memory::admit(&new, &running, &host).map_err(|e| {
            let msg = format!("cannot start VM {}: {}", spec.name, chain(&e));
            match e.kind() {
                ::memory::ErrorKind::Invalid => ApiError::invalid(msg),
                _ => ApiError::conflict(msg),
            }
        })?;
        if !new.dynamic || new.maximum <= new.startup {
            return Ok(None);
        }
        // The region is sized to the maximum: a region as large as the host (so that maximum
        // could grow live up to it) kept a TCG guest from booting in our tests.
        let region = new.maximum - new.startup;
        Ok(Some(region - region % (2 * MIB)))
    }

    /// The virtio-mem region a running VM booted with (from its launch file).
    fn booted_region(&self, uuid: &Uuid) -> u64 {
        std::fs::read(self.run_dir(uuid).join("launch.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<api::worker::LaunchSpec>(&b).ok())
            .and_then(|l| l.virtio_mem_region)
            .unwrap_or(0)
    }

    /// Applies the memory fields of a `vireo vm set` to `spec` (which has the other fields
    /// applied already): validation against the host, then the live-change rules when running.
    pub(super) fn apply_memory_patch(
        &self,
        uuid: &Uuid,
        spec: &mut VmSpec,
        patch: &VmPatch,
        running: bool,
    ) -> ApiResult<()> {
        let touched = patch.dynamic_memory.is_some()
            || patch.memory_minimum.is_some()
            || patch.memory_maximum.is_some()
            || patch.memory_buffer_percent.is_some()
            || patch.memory_weight.is_some()
            || patch.memory.is_some();
        if !touched {
            return Ok(());
        }
        let old = settings_of(&self.spec(uuid)?);
        let d = &mut spec.dynamic_memory;
        if let Some(on) = patch.dynamic_memory {
            d.enabled = on;
        }
        if let Some(m) = patch.memory_minimum {
            d.minimum = Some(m);
        }
        if let Some(m) = patch.memory_maximum {
            d.maximum = Some(m);
        }
        if let Some(b) = patch.memory_buffer_percent {
            d.buffer_percent = b;
        }
        if let Some(w) = patch.memory_weight {
            d.weight = w;
        }
        if d.buffer_percent > ::memory::MAX_BUFFER_PERCENT {
            return Err(ApiError::invalid(format!(
                "memory buffer {} % is above {} %",
                d.buffer_percent,
                ::memory::MAX_BUFFER_PERCENT
            )));
        }
        if d.weight > ::memory::MAX_WEIGHT {
            return Err(ApiError::invalid(format!(
                "memory weight {} is above {}",
                d.weight,
                ::memory::MAX_WEIGHT
            )));
        }
        let new = settings_of(spec);
        let (host, _) = self.host_memory();
        new.validate(host.vm_limit())
            .map_err(|e| ApiError::invalid(format!("invalid memory settings: {}", chain(&e))))?;
        if running {
            ::memory::check_live_change(&old, &new).map_err(|e| {
                ApiError::wrong_state(format!(
                    "VM {} is running: {} (stop it first)",
                    spec.name,
                    chain(&e)
                ))
            })?;
            let region = self.booted_region(uuid);
            if new.dynamic && new.maximum > new.startup + region {
                return Err(ApiError::wrong_state(format!(
                    "maximum RAM can grow while running only up to {} MiB; restart the VM to go further",
                    (new.startup + region) / MIB
                )));
            }
        }
        Ok(())
    }

    /// The `memory` object of a VM.
    pub(super) fn memory_info(&self, uuid: &Uuid, spec: &VmSpec, live: bool) -> VmMemory {
        let s = settings_of(spec);
        let vms = lock(&self.mem.vms);
        let m = vms.get(uuid).filter(|_| live);
        let report = m.and_then(|m| m.report.as_ref());
        let decision = m.and_then(|m| m.decision.as_ref());
        let assigned = report.map(|(r, _)| r.assigned).unwrap_or(s.startup);
        let age = report.and_then(|(r, at)| r.age_ms.map(|a| a + at.elapsed().as_millis() as u64));
        let demand = report.and_then(|(r, _)| r.demand);
        let status = if !live || !s.dynamic {
            None
        } else if report.is_none() {
            Some("waiting for the first memory report from the VM's worker".to_string())
        } else if age.is_none() {
            let generation = report.map_or(0, |(r, _)| r.generation);
            Some(if generation > 0 {
                format!("the guest rebooted (boot generation {generation}): it keeps its startup RAM until the new boot reports its memory (virtio_balloon driver or vireo-guest not running yet)")
            } else {
                "the guest has not reported its memory yet (virtio_balloon driver or vireo-guest not running): memory kept".to_string()
            })
        } else if age.is_some_and(|a| a > STALE_MS)
            || decision.is_some_and(|(d, _)| d.reason == Reason::StaleDemand)
        {
            let agent = report.is_some_and(|(r, _)| r.agent_seen);
            Some(format!(
                "no memory report from the guest for {} s ({}): memory kept, not shrunk blindly",
                age.unwrap_or(0) / 1000,
                if agent {
                    "the guest agent stopped answering"
                } else {
                    "the balloon driver stopped reporting"
                }
            ))
        } else if let Some(msg) = decision.and_then(|(d, _)| holding_over(assigned, demand, d)) {
            Some(msg)
        } else {
            report.and_then(|(r, _)| r.error.clone())
        };
        VmMemory {
            dynamic: s.dynamic,
            startup: s.startup,
            minimum: s.floor(),
            maximum: s.ceiling(),
            buffer_percent: s.buffer_percent,
            weight: s.weight,
            assigned,
            demand,
            pressure_percent: demand
                .filter(|_| assigned > 0)
                .map(|d| (d.saturating_mul(100) / assigned) as u32),
            demand_age_ms: age,
            demand_source: report.and_then(|(r, _)| r.source.clone()),
            virtio_mem_region: m.and_then(|m| m.region).filter(|r| *r > 0),
            last_decision: decision.map(|(d, at)| MemoryDecision {
                target: d.target,
                balloon_target: d.balloon_target,
                virtio_mem_requested: d.virtio_mem_requested,
                wanted: d.wanted,
                reason: d.reason.as_str().to_string(),
                changed: d.changed,
                age_ms: at.elapsed().as_millis() as u64,
            }),
            status,
        }
    }

    /// `vireo memory status`: the host and every running VM (and dynamic VMs that are off).
    pub fn memory_status(&self) -> MemoryStatus {
        let (_, host) = self.host_memory();
        let vms = lock(&self.vms);
        let mut out: Vec<VmMemoryStatus> = vms
            .iter()
            .filter_map(|(u, e)| {
                let live = self.qemu_pid(u).is_some();
                (live || e.spec.dynamic_memory.enabled).then(|| VmMemoryStatus {
                    name: e.spec.name.clone(),
                    memory: self.memory_info(u, &e.spec, live),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        MemoryStatus { host, vms: out }
    }
}
