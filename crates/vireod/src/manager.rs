//! The VM manager: inventory plus lifecycle operations. Running state lives in the workers
//! (one `vireo-worker` per running VM); the manager only asks them and keeps a cache, so a
//! vireod restart loses nothing (the architecture map's first rule).
//!
//! ```text
//!            start                     stop / guest powers off
//!   off ──────────────> starting ──> running <──────────────> paused
//!    ^  ^                   ^          │ save                  │ save
//!    │  └── turn-off/stop ──┼──────────┤                       │
//!    │                      │          v                       v
//!    │                      └─ start ─ saved <── saving <──────┘
//!    └── delete (off or saved only)
//! ```

mod checkpoints;
mod disks;
mod memory;
mod migration;
mod nics;
mod replica;
mod storage_move;

use crate::error::{ApiError, ApiResult};
use crate::process;
use crate::store::{write_atomic, Store};
use api::worker::{GuestPowerAction, LaunchSpec, SaveRequest, WorkerStatus};
use api::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a start may take until the worker reports the VM running.
const START_TIMEOUT: Duration = Duration::from_secs(120);

struct VmEntry {
    spec: VmSpec,
    op_lock: Arc<tokio::sync::Mutex<()>>,
    transient: Option<VmState>,
    status_message: Option<String>,
    worker_restarts: u32,
    last_status: Option<WorkerStatus>,
    /// Request time (unix ns) and duration of the last start.
    last_start: Option<(u64, StartTimings)>,
}

/// Host-wide facts the manager needs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// The `vireo-worker` executable.
    pub worker_bin: PathBuf,
    /// What `auto` chooses on this host, and why.
    pub auto_accel: (Accel, String),
}

/// The VM manager.
pub struct Manager {
    store: Store,
    host: HostConfig,
    run_root: PathBuf,
    vms: Mutex<BTreeMap<Uuid, VmEntry>>,
    /// Virtual switch processes (`switches.rs`; VM ports in `manager/nics.rs`).
    switches: crate::switches::Switches,
    /// Dynamic memory: host settings, worker reports, balancer decisions.
    mem: memory::MemoryState,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    /// Loads the inventory from the store.
    pub fn open(host: HostConfig) -> anyhow::Result<Self> {
        let store = Store::open(&host.state_dir)?;
        let run_root = host.state_dir.join("run");
        std::fs::create_dir_all(&run_root)?;
        let mut vms = BTreeMap::new();
        for rec in store.load_all()? {
            vms.insert(
                rec.spec.uuid,
                VmEntry {
                    spec: rec.spec,
                    op_lock: Arc::new(tokio::sync::Mutex::new(())),
                    transient: None,
                    status_message: None,
                    worker_restarts: 0,
                    last_status: None,
                    last_start: None,
                },
            );
        }
        let switches = crate::switches::Switches::open(
            &host.state_dir,
            crate::switches::Switches::default_bin(&host.worker_bin),
        )?;
        Ok(Manager {
            switches,
            mem: memory::MemoryState::load(&host.state_dir),
            store,
            host,
            run_root,
            vms: Mutex::new(vms),
        })
    }

    /// Host configuration.
    pub fn host(&self) -> &HostConfig {
        &self.host
    }

    fn run_dir(&self, uuid: &Uuid) -> PathBuf {
        self.run_root.join(uuid.to_string())
    }

    fn worker_client(&self, uuid: &Uuid) -> Client {
        Client::new(self.run_dir(uuid).join("worker.sock")).with_timeout(Duration::from_secs(30))
    }

    fn worker_pid(&self, uuid: &Uuid) -> Option<u32> {
        let pid = process::read_pid(&self.run_dir(uuid).join("worker.pid"))?;
        process::alive(pid, "vireo-worker").then_some(pid)
    }

    fn qemu_pid(&self, uuid: &Uuid) -> Option<u32> {
        let pid = process::read_pid(&self.run_dir(uuid).join("qemu.pid"))?;
        process::alive(pid, "qemu-system").then_some(pid)
    }

    /// Number of VMs defined and running.
    pub fn counts(&self) -> (usize, usize) {
        let vms = lock(&self.vms);
        let running = vms.keys().filter(|u| self.qemu_pid(u).is_some()).count();
        (vms.len(), running)
    }

    fn find(&self, name: &str) -> ApiResult<(Uuid, Arc<tokio::sync::Mutex<()>>)> {
        let vms = lock(&self.vms);
        vms.iter()
            .find(|(_, e)| e.spec.name == name)
            .map(|(u, e)| (*u, e.op_lock.clone()))
            .ok_or_else(|| {
                ApiError::not_found(format!("no VM named {name:?} (see `vireo vm list`)"))
            })
    }

    fn set_transient(&self, uuid: &Uuid, s: Option<VmState>) {
        if let Some(e) = lock(&self.vms).get_mut(uuid) {
            e.transient = s;
        }
    }

    fn set_message(&self, uuid: &Uuid, m: Option<String>) {
        if let Some(e) = lock(&self.vms).get_mut(uuid) {
            e.status_message = m;
        }
    }

    fn spec(&self, uuid: &Uuid) -> ApiResult<VmSpec> {
        lock(&self.vms)
            .get(uuid)
            .map(|e| e.spec.clone())
            .ok_or_else(|| ApiError::not_found("the VM was deleted"))
    }

    fn saved_state_path(&self, uuid: &Uuid) -> PathBuf {
        self.store.vm_dir(uuid).join("saved.state")
    }

    fn accel_for(&self, choice: AccelChoice) -> (Accel, String) {
        match choice {
            AccelChoice::Auto => self.host.auto_accel.clone(),
            AccelChoice::Kvm => (Accel::Kvm, "kvm requested explicitly for this VM".into()),
            AccelChoice::Tcg => (Accel::Tcg, "tcg requested explicitly for this VM".into()),
        }
    }

    /// Current run state from the cache, worker and files (no worker round trip).
    fn state_of(&self, uuid: &Uuid, e: &VmEntry) -> VmState {
        if let Some(t) = e.transient {
            return t;
        }
        if self.qemu_pid(uuid).is_some() {
            return e
                .last_status
                .as_ref()
                .map(|s| s.state)
                .unwrap_or(VmState::Running);
        }
        if self.saved_state_path(uuid).exists() {
            VmState::Saved
        } else {
            VmState::Off
        }
    }

    fn info_of(&self, uuid: &Uuid, e: &VmEntry) -> VmInfo {
        let state = self.state_of(uuid, e);
        let live = matches!(
            state,
            VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Saving
                | VmState::Starting
        );
        let status = if live { e.last_status.as_ref() } else { None };
        let (accel, accel_reason) = match status {
            Some(s) => (s.accel, self.accel_for(e.spec.accel).1),
            None => self.accel_for(e.spec.accel),
        };
        let status_message = status
            .and_then(|s| s.boot_refusal.clone())
            .or_else(|| e.status_message.clone());
        VmInfo {
            name: e.spec.name.clone(),
            uuid: *uuid,
            generation: e.spec.generation.into(),
            state,
            heartbeat: status
                .map(|s| s.heartbeat)
                .unwrap_or(HeartbeatState::NoContact),
            accel,
            accel_reason,
            cpus: e.spec.cpus,
            memory: self.memory_info(uuid, &e.spec, live),
            secure_boot: e.spec.secure_boot,
            secure_boot_template: e.spec.secure_boot_template,
            disks: e.spec.disks.clone(),
            nics: e.spec.nics.clone(),
            boot_order: e.spec.boot_order.clone(),
            stop_timeout_secs: e.spec.stop_timeout_secs,
            guest: status.and_then(|s| s.guest.clone()),
            worker: live.then(|| WorkerInfo {
                pid: self.worker_pid(uuid),
                qemu_pid: self.qemu_pid(uuid),
                restarts: e.worker_restarts,
            }),
            console_log: self.store.vm_dir(uuid).join("console.log"),
            status_message,
            uptime_secs: status.map(|s| now_unix().saturating_sub(s.started_at)),
            last_start: e.last_start.map(|(t0, mut t)| {
                let ms = |ns: u64| ns.saturating_sub(t0) as f64 / 1e6;
                if let Some(s) = status {
                    t.api_to_first_heartbeat_ms = s.first_heartbeat_ns.map(ms);
                }
                t
            }),
        }
    }

    /// All VMs.
    pub fn list(&self) -> Vec<VmInfo> {
        let vms = lock(&self.vms);
        let mut out: Vec<VmInfo> = vms.iter().map(|(u, e)| self.info_of(u, e)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One VM.
    pub fn show(&self, name: &str) -> ApiResult<VmInfo> {
        let (uuid, _) = self.find(name)?;
        let vms = lock(&self.vms);
        let e = vms
            .get(&uuid)
            .ok_or_else(|| ApiError::not_found("the VM was deleted"))?;
        Ok(self.info_of(&uuid, e))
    }

    /// Defines a new VM.
    pub fn create(&self, req: CreateVm) -> ApiResult<VmInfo> {
        let generation = Generation::try_from(req.generation).map_err(ApiError::invalid)?;
        let default_bus = match generation {
            Generation::Gen1 => DiskBus::Ide,
            Generation::Gen2 => DiskBus::Scsi,
        };
        let spec = VmSpec {
            name: req.name.clone(),
            uuid: Uuid::new_v4(),
            generation,
            cpus: req.cpus.unwrap_or(1),
            memory: req.memory.unwrap_or(512 << 20),
            disks: req
                .disks
                .iter()
                .map(|d| DiskSpec {
                    path: absolute(&d.path),
                    bus: d.bus.unwrap_or(default_bus),
                    read_only: d.read_only,
                })
                .collect(),
            nics: vec![],
            boot_order: req
                .boot_order
                .unwrap_or_else(|| vec![BootDevice::Disk, BootDevice::Network]),
            secure_boot: req.secure_boot.unwrap_or(generation == Generation::Gen2),
            secure_boot_template: req.secure_boot_template.unwrap_or_default(),
            accel: req.accel.unwrap_or_default(),
            stop_timeout_secs: req.stop_timeout_secs.unwrap_or(60),
            dynamic_memory: Default::default(),
        };
        validate::check_spec(&spec, &|p| p.is_file())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let mut vms = lock(&self.vms);
        if vms.values().any(|e| e.spec.name == spec.name) {
            return Err(ApiError::conflict(format!(
                "a VM named {:?} already exists",
                spec.name
            )));
        }
        self.store.save(&spec)?;
        let uuid = spec.uuid;
        vms.insert(
            uuid,
            VmEntry {
                spec,
                op_lock: Arc::new(tokio::sync::Mutex::new(())),
                transient: None,
                status_message: None,
                worker_restarts: 0,
                last_status: None,
                last_start: None,
            },
        );
        let e = vms
            .get(&uuid)
            .ok_or_else(|| ApiError::internal("VM vanished after insert"))?;
        Ok(self.info_of(&uuid, e))
    }

    /// Changes a VM's configuration. Only the stop timeout may change while it runs.
    pub async fn update(&self, name: &str, patch: VmPatch) -> ApiResult<VmInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let mut spec = self.spec(&uuid)?;
        let running = self.qemu_pid(&uuid).is_some();
        let offline_only = patch.cpus.is_some()
            || patch.memory.is_some_and(|m| m != spec.memory)
            || patch.secure_boot.is_some()
            || patch.secure_boot_template.is_some()
            || patch.accel.is_some()
            || patch.boot_order.is_some()
            || !patch.add_disks.is_empty()
            || patch.name.is_some();
        if running && offline_only {
            return Err(ApiError::wrong_state(format!(
                "VM {name} is running: cpus, memory, disks, firmware, boot order and name change only while it is off (stop it with `vireo vm stop {name}`)"
            )));
        }
        if offline_only && self.saved_state_path(&uuid).exists() {
            return Err(ApiError::wrong_state(format!(
                "VM {name} has a saved state that depends on its hardware: start it and stop it (or delete the saved state by `vireo vm turn-off {name}`) first"
            )));
        }
        if let Some(c) = patch.cpus {
            spec.cpus = c;
        }
        if let Some(m) = patch.memory {
            spec.memory = m;
        }
        self.apply_memory_patch(&uuid, &mut spec, &patch, running)?;
        if let Some(s) = patch.secure_boot {
            spec.secure_boot = s;
        }
        if let Some(t) = patch.secure_boot_template {
            spec.secure_boot_template = t;
        }
        if let Some(a) = patch.accel {
            spec.accel = a;
        }
        if let Some(b) = patch.boot_order {
            spec.boot_order = b;
        }
        if let Some(t) = patch.stop_timeout_secs {
            spec.stop_timeout_secs = t;
        }
        let default_bus = match spec.generation {
            Generation::Gen1 => DiskBus::Ide,
            Generation::Gen2 => DiskBus::Scsi,
        };
        for d in &patch.add_disks {
            spec.disks.push(DiskSpec {
                path: absolute(&d.path),
                bus: d.bus.unwrap_or(default_bus),
                read_only: d.read_only,
            });
        }
        if let Some(n) = &patch.name {
            if lock(&self.vms)
                .iter()
                .any(|(u, e)| *u != uuid && &e.spec.name == n)
            {
                return Err(ApiError::conflict(format!(
                    "a VM named {n:?} already exists"
                )));
            }
            spec.name = n.clone();
        }
        validate::check_spec(&spec, &|p| p.is_file())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        self.store.save(&spec)?;
        let mut vms = lock(&self.vms);
        let e = vms
            .get_mut(&uuid)
            .ok_or_else(|| ApiError::not_found("the VM was deleted"))?;
        e.spec = spec;
        Ok(self.info_of(&uuid, e))
    }

    /// Deletes a VM that is off; its disks too unless `keep_disks`.
    pub async fn delete(&self, name: &str, keep_disks: bool) -> ApiResult<()> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        if self.qemu_pid(&uuid).is_some() {
            return Err(ApiError::wrong_state(format!(
                "VM {name} is running: stop it first (`vireo vm stop {name}` or `vireo vm turn-off {name}`)"
            )));
        }
        let spec = self.spec(&uuid)?;
        self.store.remove(&uuid)?;
        let _ = std::fs::remove_dir_all(self.run_dir(&uuid));
        lock(&self.vms).remove(&uuid);
        if !keep_disks {
            for d in &spec.disks {
                if let Err(e) = std::fs::remove_file(&d.path) {
                    tracing::warn!(vm = %name, disk = %d.path.display(), "could not remove disk: {e}");
                }
            }
        }
        Ok(())
    }

    /// Starts a VM (or resumes it from its saved state).
    pub async fn start(&self, name: &str) -> ApiResult<VmInfo> {
        let t0 = api::worker::now_ns();
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        if self.qemu_pid(&uuid).is_some() {
            return Err(ApiError::wrong_state(format!(
                "VM {name} is already running"
            )));
        }
        let spec = self.spec(&uuid)?;
        validate::check_spec(&spec, &|p| p.is_file())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let virtio_mem_region = self.admit_memory(&uuid, &spec)?;
        let run_dir = self.run_dir(&uuid);
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(ApiError::internal)?;
        let vm_dir = self.store.vm_dir(&uuid);
        let uefi_vars = match spec.generation {
            Generation::Gen1 => None,
            Generation::Gen2 => Some(self.prepare_uefi_vars(&spec, &vm_dir)?),
        };
        let saved = self.saved_state_path(&uuid);
        let (accel, _) = self.accel_for(spec.accel);
        let launch = LaunchSpec {
            vm: spec.clone(),
            accel,
            run_dir: run_dir.clone(),
            uefi_vars,
            console_log: vm_dir.join("console.log"),
            restore_from: saved.exists().then_some(saved.clone()),
            incoming: None,
            virtio_mem_region,
        };
        let bytes = serde_json::to_vec_pretty(&launch).map_err(ApiError::internal)?;
        write_atomic(&run_dir.join("launch.json"), &bytes)?;
        self.set_transient(&uuid, Some(VmState::Starting));
        self.set_message(&uuid, None);
        let result = self
            .launch_and_wait(&uuid, &run_dir, launch.restore_from.is_some())
            .await;
        self.set_transient(&uuid, None);
        if let Err(e) = result {
            // Leave nothing half-started behind.
            if let Some(pid) = self.qemu_pid(&uuid) {
                process::signal(pid, libc::SIGKILL);
            }
            if let Some(pid) = self.worker_pid(&uuid) {
                process::signal(pid, libc::SIGKILL);
            }
            self.set_message(&uuid, Some(e.message.clone()));
            return Err(e);
        }
        if launch.restore_from.is_some() {
            let _ = std::fs::remove_file(&saved);
        }
        self.reconcile_switches().await;
        let ms = |ns: u64| ns.saturating_sub(t0) as f64 / 1e6;
        if let Some(e) = lock(&self.vms).get_mut(&uuid) {
            let timings = StartTimings {
                api_to_qemu_exec_ms: e.last_status.as_ref().and_then(|s| s.qemu_exec_ns).map(ms),
                api_to_running_ms: ms(api::worker::now_ns()),
                api_to_first_heartbeat_ms: None,
            };
            e.last_start = Some((t0, timings));
        }
        self.show(name)
    }

    fn prepare_uefi_vars(&self, spec: &VmSpec, vm_dir: &Path) -> ApiResult<PathBuf> {
        // The NVRAM lives with the VM and persists across boots; it is re-made when the
        // template or Secure Boot setting changes.
        let vars = vm_dir.join("uefi-vars.fd");
        let marker = vm_dir.join("uefi-vars.template");
        let wanted = format!(
            "{}:{}",
            spec.secure_boot,
            spec.secure_boot_template.as_str()
        );
        let current = std::fs::read_to_string(&marker).unwrap_or_default();
        if !vars.exists() || current != wanted {
            let template = if spec.secure_boot {
                spec.secure_boot_template
            } else {
                SecureBootTemplate::None
            };
            let _ = std::fs::remove_file(&vars);
            qemu::firmware::prepare_vars(to_fw_template(template), &vars)
                .map_err(|e| ApiError::failed(format!("preparing the UEFI variable store: {e}")))?;
            std::fs::write(&marker, wanted).map_err(ApiError::internal)?;
        }
        Ok(vars)
    }

    async fn launch_and_wait(&self, uuid: &Uuid, run_dir: &Path, restoring: bool) -> ApiResult<()> {
        let pid = process::spawn_worker(&self.host.worker_bin, run_dir, false).map_err(|e| {
            ApiError::failed(format!(
                "cannot start {}: {e}",
                self.host.worker_bin.display()
            ))
        })?;
        let client = self
            .worker_client(uuid)
            .with_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if Instant::now() > deadline {
                return Err(ApiError::failed(
                    "the VM did not start within 120 s (see the worker log in the run directory)",
                ));
            }
            if !process::alive(pid, "vireo-worker") {
                return Err(ApiError::failed(format!(
                    "the VM failed to start: {}",
                    last_error_line(&run_dir.join("worker.log"))
                )));
            }
            if let Ok(st) = client.get::<WorkerStatus>("/status").await {
                let ready = match st.state {
                    VmState::Starting => false,
                    _ => !restoring || st.qemu_status != "inmigrate",
                };
                self.cache_status(uuid, Some(st));
                if ready {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn cache_status(&self, uuid: &Uuid, st: Option<WorkerStatus>) {
        if let Some(e) = lock(&self.vms).get_mut(uuid) {
            e.last_status = st;
        }
    }

    async fn running_worker(&self, name: &str, uuid: &Uuid) -> ApiResult<Client> {
        if self.qemu_pid(uuid).is_none() {
            return Err(ApiError::wrong_state(format!(
                "VM {name} is not running (start it with `vireo vm start {name}`)"
            )));
        }
        if self.worker_pid(uuid).is_none() {
            return Err(ApiError::failed(format!(
                "the worker of VM {name} is being replaced after it died; try again in a second"
            )));
        }
        Ok(self.worker_client(uuid))
    }

    async fn wait_gone(&self, uuid: &Uuid, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.qemu_pid(uuid).is_none() && self.worker_pid(uuid).is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    async fn force_off(&self, uuid: &Uuid) {
        let client = self
            .worker_client(uuid)
            .with_timeout(Duration::from_secs(5));
        let _ = client.post::<_, serde_json::Value>("/quit", &()).await;
        // The worker closes the disk chains cleanly after QEMU exits; give it time on a
        // loaded host before the last resort.
        if !self.wait_gone(uuid, Duration::from_secs(30)).await {
            if let Some(pid) = self.qemu_pid(uuid) {
                process::signal(pid, libc::SIGKILL);
            }
            if let Some(pid) = self.worker_pid(uuid) {
                process::signal(pid, libc::SIGKILL);
            }
            self.wait_gone(uuid, Duration::from_secs(5)).await;
        }
    }

    /// Graceful stop: guest agent, then ACPI, then turn off after the timeout.
    pub async fn stop(&self, name: &str, timeout: Option<u64>) -> ApiResult<VmInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let client = self.running_worker(name, &uuid).await?;
        let timeout = Duration::from_secs(timeout.unwrap_or(self.spec(&uuid)?.stop_timeout_secs));
        self.set_transient(&uuid, Some(VmState::Stopping));
        let status = client.get::<WorkerStatus>("/status").await.ok();
        if status.as_ref().map(|s| s.state) == Some(VmState::Paused) {
            let _ = client.post::<_, serde_json::Value>("/resume", &()).await;
        }
        let via_agent = status.as_ref().map(|s| s.heartbeat) == Some(HeartbeatState::Ok)
            && client
                .post::<_, serde_json::Value>("/shutdown", &GuestPowerAction::Powerdown)
                .await
                .is_ok();
        let how = if via_agent {
            "the guest agent"
        } else {
            "ACPI power button"
        };
        if !via_agent {
            let _ = client.post::<_, serde_json::Value>("/powerdown", &()).await;
        }
        let clean = self.wait_gone(&uuid, timeout).await;
        if !clean {
            self.force_off(&uuid).await;
        }
        self.set_transient(&uuid, None);
        self.cache_status(&uuid, None);
        self.set_message(
            &uuid,
            Some(if clean {
                format!("stopped gracefully through {how}")
            } else {
                format!(
                    "the guest did not shut down within {}s through {how}; it was turned off",
                    timeout.as_secs()
                )
            }),
        );
        self.show(name)
    }

    /// Turns the VM off at once (like pulling the plug). Discards a saved state too.
    pub async fn turn_off(&self, name: &str) -> ApiResult<VmInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        if self.qemu_pid(&uuid).is_none() {
            let saved = self.saved_state_path(&uuid);
            if saved.exists() {
                std::fs::remove_file(&saved).map_err(ApiError::internal)?;
                self.set_message(&uuid, Some("saved state discarded".into()));
                return self.show(name);
            }
            return Err(ApiError::wrong_state(format!("VM {name} is not running")));
        }
        self.force_off(&uuid).await;
        self.cache_status(&uuid, None);
        self.set_message(&uuid, Some("turned off".into()));
        self.show(name)
    }

    /// Restarts the guest: through the agent when it answers, else a hardware reset.
    pub async fn restart(&self, name: &str) -> ApiResult<VmInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let client = self.running_worker(name, &uuid).await?;
        let status = client.get::<WorkerStatus>("/status").await?;
        if status.heartbeat != HeartbeatState::Ok
            || client
                .post::<_, serde_json::Value>("/shutdown", &GuestPowerAction::Reboot)
                .await
                .is_err()
        {
            client.post::<_, serde_json::Value>("/reset", &()).await?;
        }
        self.show(name)
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self, name: &str) -> ApiResult<VmInfo> {
        self.simple(name, "/pause").await
    }

    /// Resumes the vCPUs.
    pub async fn resume(&self, name: &str) -> ApiResult<VmInfo> {
        self.simple(name, "/resume").await
    }

    async fn simple(&self, name: &str, path: &str) -> ApiResult<VmInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let client = self.running_worker(name, &uuid).await?;
        let st: WorkerStatus = client.post(path, &()).await?;
        self.cache_status(&uuid, Some(st));
        self.show(name)
    }

    /// Saves the VM's memory and device state to disk and turns it off.
    pub async fn save(&self, name: &str) -> ApiResult<VmInfo> {
        let (uuid, op) = self.find(name)?;
        let _g = op.lock().await;
        let client = self.running_worker(name, &uuid).await?;
        self.set_transient(&uuid, Some(VmState::Saving));
        let path = self.saved_state_path(&uuid);
        let r = client
            .post::<_, serde_json::Value>("/save", &SaveRequest { path: path.clone() })
            .await;
        if let Err(e) = r {
            self.set_transient(&uuid, None);
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        self.wait_gone(&uuid, Duration::from_secs(30)).await;
        self.set_transient(&uuid, None);
        self.cache_status(&uuid, None);
        self.set_message(&uuid, Some("saved; `vireo vm start` resumes it".into()));
        self.show(name)
    }

    /// Starts a command in the guest.
    pub async fn exec(&self, name: &str, req: ExecRequest) -> ApiResult<ExecStarted> {
        if req.argv.is_empty() {
            return Err(ApiError::invalid(
                "no command given: use `vireo vm exec VM -- CMD [ARGS...]`",
            ));
        }
        let (uuid, _) = self.find(name)?;
        let client = self.running_worker(name, &uuid).await?;
        Ok(client.post("/exec", &req).await?)
    }

    /// Output of a guest command since the last poll.
    pub async fn exec_output(&self, name: &str, pid: i64) -> ApiResult<ExecOutput> {
        let (uuid, _) = self.find(name)?;
        let client = self.running_worker(name, &uuid).await?;
        Ok(client.get(&format!("/exec/{pid}")).await?)
    }

    /// Both KVP pools.
    pub async fn kvp_list(&self, name: &str) -> ApiResult<KvpPools> {
        let (uuid, _) = self.find(name)?;
        let client = self.running_worker(name, &uuid).await?;
        Ok(client.get("/kvp").await?)
    }

    /// Gives the guest a key-value pair.
    pub async fn kvp_set(&self, name: &str, kv: KvpSet) -> ApiResult<KvpPools> {
        if kv.key.is_empty() || kv.key.contains('/') || kv.key.len() > 255 {
            return Err(ApiError::invalid(
                "KVP keys are 1-255 bytes and contain no '/'",
            ));
        }
        let (uuid, _) = self.find(name)?;
        let client = self.running_worker(name, &uuid).await?;
        Ok(client.put("/kvp", &kv).await?)
    }

    /// Serial console: the socket that relays it, and the log.
    pub fn console(&self, name: &str) -> ApiResult<serde_json::Value> {
        let (uuid, _) = self.find(name)?;
        if self.qemu_pid(&uuid).is_none() {
            return Err(ApiError::wrong_state(format!("VM {name} is not running")));
        }
        Ok(serde_json::json!({
            "socket": self.run_dir(&uuid).join("console.sock"),
            "log": self.store.vm_dir(&uuid).join("console.log"),
        }))
    }

    /// One supervision pass: refresh status caches, replace dead workers, notice ended VMs.
    pub async fn supervise_once(&self) {
        self.supervise_switches().await;
        let entries: Vec<(Uuid, String, Arc<tokio::sync::Mutex<()>>)> = lock(&self.vms)
            .iter()
            .map(|(u, e)| (*u, e.spec.name.clone(), e.op_lock.clone()))
            .collect();
        for (uuid, name, op) in entries {
            let worker = self.worker_pid(&uuid);
            let qemu = self.qemu_pid(&uuid);
            if worker.is_some() {
                let client = self
                    .worker_client(&uuid)
                    .with_timeout(Duration::from_secs(3));
                if let Ok(st) = client.get::<WorkerStatus>("/status").await {
                    self.cache_status(&uuid, Some(st));
                }
                continue;
            }
            // Lifecycle operations handle their own transitions.
            let Ok(_g) = op.try_lock() else { continue };
            let run_dir = self.run_dir(&uuid);
            if qemu.is_some() {
                tracing::warn!(vm = %name, "worker process died; starting a new worker that re-attaches to QEMU");
                match process::spawn_worker(&self.host.worker_bin, &run_dir, true) {
                    Ok(_) => {
                        if let Some(e) = lock(&self.vms).get_mut(&uuid) {
                            e.worker_restarts += 1;
                            e.status_message =
                                Some("the worker process died; a new worker re-attached to the running VM".into());
                        }
                        // Give it time to write its pid before the next pass.
                        for _ in 0..100 {
                            if self.worker_pid(&uuid).is_some() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Err(e) => tracing::error!(vm = %name, "cannot restart worker: {e}"),
                }
            } else if run_dir.join("worker.pid").exists() {
                // The VM ended on its own (guest powered off, crash).
                let reason = std::fs::read(run_dir.join("exit.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<api::worker::ExitRecord>(&b).ok())
                    .map(|r| r.reason)
                    .unwrap_or_else(|| "QEMU exited".into());
                tracing::info!(vm = %name, "VM stopped: {reason}");
                let _ = std::fs::remove_file(run_dir.join("worker.pid"));
                self.cache_status(&uuid, None);
                self.set_message(&uuid, Some(reason));
            }
        }
    }
}

fn to_fw_template(t: SecureBootTemplate) -> qemu::firmware::SecureBootTemplate {
    match t {
        SecureBootTemplate::MicrosoftWindows => {
            qemu::firmware::SecureBootTemplate::MicrosoftWindows
        }
        SecureBootTemplate::MicrosoftUefiCa => qemu::firmware::SecureBootTemplate::MicrosoftUefiCa,
        SecureBootTemplate::None => qemu::firmware::SecureBootTemplate::None,
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn last_error_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "the worker exited without a message".into())
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
