//! Dynamic memory mechanism of one VM: reads what the guest has and needs once a second and
//! applies the balancer's targets that vireod sends (`GET`/`POST /memory`).
//!
//! - What it has: balloon `actual` (QMP `query-balloon`: boot RAM minus the balloon; QEMU 7.2
//!   does not count virtio-mem memory in it) plus the virtio-mem device's plugged `size`.
//! - What it needs: [`memory::guest_demand`] from the virtio-balloon driver's statistics
//!   (polled every second), refined by `vireo-guest`'s `vireo-memory-status` where it answers.
//!   The report carries the *age* of the demand, not a timestamp, so vireod's and the
//!   worker's clocks never mix.
//! - Applying: growing deflates the balloon first, then raises virtio-mem `requested-size`;
//!   shrinking lowers `requested-size` first, then inflates the balloon. Both are asynchronous
//!   in the guest: the next report shows what it really has.
//!
//! A guest reset (reboot) gives the VM its startup RAM back: the worker deflates the balloon,
//! asks virtio-mem to unplug everything (QEMU unplugs on reset anyway, but would plug the old
//! `requested-size` again) and forgets the guest's demand, so the balancer keeps the VM at
//! startup until the new boot reports again (`StaleDemand`, then [`BOOT_GRACE`]). A balloon
//! target set for the old boot would otherwise squeeze the new one while it boots.
//!
//! **Boot generation.** vireod computes a target from a report and sends it up to a second
//! later; a reset in between would let the old boot's target land on the new boot (seen: a
//! target queued behind the reset's deflate shrank the rebooting guest from 256 to 210 MiB).
//! So the worker counts resets ([`WorkerMemory::generation`]): under the lock that serializes
//! targets, a reset bumps the generation and replaces the report at once (startup RAM, no
//! demand), and a target carrying another generation ([`SetMemory::generation`]) is refused
//! with 409. The balloon statistics QEMU keeps from the old boot are ignored until the new
//! boot's driver sends its own.
//! QEMU (7.2) keeps the balloon's `actual` across a reset, and the new boot's driver writes it
//! only when it first inflates or deflates, so until the next `BALLOON_CHANGE` event the VM is
//! reported with all its boot RAM (which the new boot really has) instead of the old `actual`.
//!
//! Hot-plugged memory must be onlined by the guest: once the agent answers, the worker sets the
//! guest's `auto_online_blocks` to `online_movable` (movable memory can be unplugged again)
//! and onlines blocks that were added before.

use crate::vm::Vm;
use agent::client::RunRequest;
use api::memory::{SetMemory, WorkerMemory};
use api::{ErrorBody, ErrorKind};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use qemu::cmdline::{BALLOON_ID, VIRTIO_MEM_ID};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The guest's memory statistics interval, seconds.
const STATS_INTERVAL_SECS: u32 = 1;
/// Demand counts only after the balloon statistics have flowed this long: a guest still
/// booting (loading modules, starting services) changes its needs quickly, and the VM keeps
/// its startup RAM until then.
const BOOT_GRACE: Duration = Duration::from_secs(10);
/// The virtio-mem device's block size (`launch` creates it with 2 MiB blocks).
const VIRTIO_MEM_BLOCK: u64 = 2 << 20;
/// How long one agent memory-status call may take.
const AGENT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Guest script run once through the agent on VMs with virtio-mem (see the module doc).
const ONLINE_SCRIPT: &str = "f=/sys/devices/system/memory/auto_online_blocks; \
    [ -w $f ] && echo online_movable > $f; \
    for s in /sys/devices/system/memory/memory*/state; do \
    [ \"$(cat $s)\" = offline ] && echo online_movable > $s; done; true";

/// What the sampling loop knows.
#[derive(Default)]
struct Sample {
    report: WorkerMemory,
    balloon_at: Option<Instant>,
    /// First balloon statistics report of this boot.
    balloon_first: Option<Instant>,
    last_update: u64,
    agent_at: Option<Instant>,
    agent: Option<memory::AgentMemory>,
    balloon: Option<memory::BalloonStats>,
    /// The last target applied (balloon + virtio-mem), reported as `requested`.
    requested: Option<u64>,
    /// The virtio-mem `requested-size` last set.
    mem_requested: Option<u64>,
}

struct MemState {
    region: u64,
    /// Boot generation: resets seen (see the module doc). Changed only under `apply`.
    generation: AtomicU64,
    /// A reset happened and the balloon's `actual` is still the old boot's (see the module doc).
    actual_stale: AtomicBool,
    sample: Mutex<Sample>,
    /// Serializes applying targets.
    apply: tokio::sync::Mutex<()>,
}

static STATE: OnceLock<Arc<MemState>> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts sampling for a VM whose virtio-mem region is `region` bytes (0: none).
pub fn start(vm: Arc<Vm>, region: u64) {
    let st = STATE
        .get_or_init(|| {
            Arc::new(MemState {
                region,
                generation: AtomicU64::new(0),
                actual_stale: AtomicBool::new(false),
                sample: Mutex::new(Sample::default()),
                apply: tokio::sync::Mutex::new(()),
            })
        })
        .clone();
    tokio::spawn(run(vm, st));
}

async fn run(vm: Arc<Vm>, st: Arc<MemState>) {
    if let Err(e) = vm
        .qmp
        .set_balloon_stats_interval(BALLOON_ID, STATS_INTERVAL_SECS)
        .await
    {
        tracing::warn!("cannot set the balloon statistics interval: {e}");
    }
    let mut onlined = st.region == 0;
    let mut events = vm.qmp.events();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ev = events.recv() => {
                match ev {
                    Ok(ev) if ev.event == "RESET" => {
                        st.actual_stale.store(true, Ordering::SeqCst);
                        after_reset(&vm, &st).await;
                        onlined = st.region == 0;
                    }
                    Ok(ev) if ev.event == "BALLOON_CHANGE" => {
                        st.actual_stale.store(false, Ordering::SeqCst);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
                continue;
            }
        }
        if vm.qmp.is_closed() {
            return;
        }
        if !onlined && heartbeat_ok(&vm) {
            onlined = online_hotplugged(&vm).await;
        }
        sample_once(&vm, &st).await;
        guard_unplug(&vm, &st).await;
    }
}

fn heartbeat_ok(vm: &Vm) -> bool {
    lock(&vm.guest).heartbeat_now() == api::HeartbeatState::Ok
}

async fn online_hotplugged(vm: &Vm) -> bool {
    let Some(req) = RunRequest::from_argv(&["sh", "-c", ONLINE_SCRIPT]) else {
        return false;
    };
    match tokio::time::timeout(Duration::from_secs(5), vm.agent.exec(&req)).await {
        Ok(Ok(_)) => {
            tracing::info!("guest onlines hot-plugged memory as movable");
            true
        }
        Ok(Err(e)) => {
            tracing::debug!("setting the guest's memory online policy: {e}");
            false
        }
        Err(_) => false,
    }
}

/// The guest was reset: a new boot generation, startup RAM back, no virtio-mem, demand
/// unknown until the new boot reports (see the module doc). Holds the target lock throughout,
/// so a target sent for the old boot waits and is then refused.
async fn after_reset(vm: &Vm, st: &MemState) {
    let _g = st.apply.lock().await;
    let generation = st.generation.fetch_add(1, Ordering::SeqCst) + 1;
    let base = match vm.qmp.memory_size_summary().await {
        Ok(m) => Some(m.base),
        Err(e) => {
            tracing::warn!("guest reset: reading the VM's memory size failed: {e}");
            None
        }
    };
    {
        let mut s = lock(&st.sample);
        let old = std::mem::take(&mut *s);
        // QEMU keeps the old boot's balloon statistics: only a new `last-update` counts.
        s.last_update = old.last_update;
        let startup = base.unwrap_or(old.report.balloon_actual);
        s.requested = Some(startup);
        s.mem_requested = Some(0);
        // What the new boot has once the commands below are done (the balloon's `actual` is
        // the old boot's until the new driver writes it: `actual_stale`).
        s.report = WorkerMemory {
            assigned: startup,
            balloon_actual: startup,
            plugged: 0,
            requested: Some(startup),
            region: st.region,
            qemu_rss: old.report.qemu_rss,
            generation,
            ..WorkerMemory::default()
        };
    }
    if st.region > 0 {
        if let Err(e) = vm.qmp.set_virtio_mem_requested(VIRTIO_MEM_ID, 0).await {
            tracing::warn!("guest reset: unplugging virtio-mem memory failed: {e}");
        }
    }
    // The balloon value is relative to boot RAM (QEMU 7.2 counts no virtio-mem memory in it):
    // asking for all of it deflates the balloon completely.
    if let Some(base) = base {
        match vm.qmp.balloon(base).await {
            Ok(()) => tracing::info!(
                startup = base,
                generation,
                "guest reset: boot generation {generation}, balloon deflated, the VM has its startup RAM until the guest reports again"
            ),
            Err(e) => tracing::warn!("guest reset: deflating the balloon failed: {e}"),
        }
    }
}

async fn sample_once(vm: &Vm, st: &MemState) {
    let now = Instant::now();
    let generation = st.generation.load(Ordering::SeqCst);
    let mut error = None;
    let stats = match vm.qmp.guest_memory_stats(BALLOON_ID).await {
        Ok(s) => Some(s),
        Err(e) => {
            error = Some(format!("balloon statistics: {e}"));
            None
        }
    };
    // The agent's memory status, when vireo-guest answers.
    let agent = if heartbeat_ok(vm) && vm.vireo_agent().await {
        match tokio::time::timeout(AGENT_TIMEOUT, vm.agent.memory_status()).await {
            Ok(Ok(m)) => Some(memory::AgentMemory {
                total: m.total,
                available: m.available,
                committed: m.committed,
            }),
            _ => None,
        }
    } else {
        None
    };
    let actual = if st.actual_stale.load(Ordering::SeqCst) {
        // The new boot has all boot RAM; `actual` is the old boot's.
        vm.qmp.memory_size_summary().await.map(|m| m.base)
    } else {
        vm.qmp.query_balloon().await
    };
    let plugged = if st.region > 0 {
        vm.qmp.virtio_mem_size(VIRTIO_MEM_ID).await
    } else {
        Ok(0)
    };
    let rss = qemu_rss(vm.qemu_pid);
    let mut s = lock(&st.sample);
    if let Some(stats) = stats {
        if stats.last_update != 0 && stats.last_update != s.last_update {
            s.last_update = stats.last_update;
            s.balloon_at = Some(now);
            s.balloon_first.get_or_insert(now);
            s.balloon = Some(memory::BalloonStats {
                total: stats.total,
                available: stats.available,
                free: stats.free,
            });
        }
    }
    if agent.is_some() {
        s.agent = agent;
        s.agent_at = Some(now);
    }
    let agent_seen = s.agent_at.is_some();
    let ms = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_millis() as u64);
    let booted = s
        .balloon_first
        .is_some_and(|t| now.saturating_duration_since(t) >= BOOT_GRACE);
    let reported_at =
        memory::demand_reported_at(ms(s.balloon_at), ms(s.agent_at), agent_seen).filter(|_| booted);
    let (balloon_actual, plugged) = match (actual, plugged) {
        (Ok(a), Ok(p)) => (a, p),
        (a, p) => {
            let e = a
                .err()
                .or(p.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            error = Some(format!("reading the VM's memory size: {e}"));
            (s.report.balloon_actual, s.report.plugged)
        }
    };
    // QEMU 7.2's balloon `actual` is boot RAM minus the balloon; virtio-mem memory is not in
    // it (checked: 32 MiB plugged left `actual` at 256 MiB), so the VM has both.
    let assigned = balloon_actual + plugged;
    let demand = memory::guest_demand(
        assigned,
        s.balloon.as_ref(),
        if agent_seen { s.agent.as_ref() } else { None },
    );
    s.report = WorkerMemory {
        assigned,
        balloon_actual,
        plugged,
        requested: s.requested,
        region: st.region,
        demand: demand.filter(|_| reported_at.is_some()),
        // demand_reported_at works on ages here: the smaller clock value is the age itself.
        age_ms: reported_at,
        source: reported_at.map(|_| if agent_seen { "agent" } else { "balloon" }.to_string()),
        agent_seen,
        qemu_rss: rss,
        error,
        generation,
    };
}

/// The guest's `MemAvailable` as last reported: the agent's once it has answered during this
/// boot, otherwise the balloon driver's; `None` when neither has.
fn guest_available(s: &Sample) -> Option<u64> {
    let agent = s
        .agent
        .as_ref()
        .zip(s.agent_at)
        .map(|(a, t)| (a.available, t));
    let balloon = s
        .balloon
        .as_ref()
        .and_then(|b| b.available.or(b.free))
        .zip(s.balloon_at);
    // The fresher of the two: the balloon driver keeps reporting when the agent is gone.
    match (agent, balloon) {
        (Some((a, ta)), Some((b, tb))) => Some(if tb > ta { b } else { a }),
        (a, b) => a.or(b).map(|(v, _)| v),
    }
}

/// Stops a virtio-mem unplug still in flight when the guest's available memory has fallen
/// below half the unplug floor (its own allocations, or a load that grew since the step was
/// decided): `requested-size` goes back to what is plugged now. Without this the guest keeps
/// migrating pages out of the blocks it was asked to give back into its last free memory,
/// and, with nothing reclaimable (tmpfs without swap), its OOM killer kills every process and
/// the kernel panics ("System is deadlocked on memory", seen in the end-to-end test).
async fn guard_unplug(vm: &Vm, st: &MemState) {
    if st.region == 0 {
        return;
    }
    let Ok(_g) = st.apply.try_lock() else {
        return;
    };
    let (plugged, balloon_actual, requested, wanted, available) = {
        let s = lock(&st.sample);
        (
            s.report.plugged,
            s.report.balloon_actual,
            s.requested,
            s.mem_requested,
            guest_available(&s),
        )
    };
    let (Some(available), Some(wanted)) = (available, wanted) else {
        return;
    };
    if wanted >= plugged || available >= memory::UNPLUG_FLOOR / 2 {
        return;
    }
    match vm
        .qmp
        .set_virtio_mem_requested(VIRTIO_MEM_ID, plugged)
        .await
    {
        Ok(()) => {
            tracing::info!(
                plugged,
                requested = wanted,
                available,
                "virtio-mem unplug stopped: the guest is short of memory"
            );
            let mut s = lock(&st.sample);
            let held = balloon_actual.max(requested.unwrap_or(0).saturating_sub(wanted)) + plugged;
            s.requested = Some(held);
            s.report.requested = Some(held);
            s.mem_requested = Some(plugged);
        }
        Err(e) => tracing::warn!("stopping a virtio-mem unplug failed: {e}"),
    }
}

/// QEMU's resident set size in bytes.
fn qemu_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// An error answered to vireod.
struct MemError(ErrorKind, String);

impl IntoResponse for MemError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        (
            status,
            Json(ErrorBody {
                kind: self.0,
                error: self.1,
            }),
        )
            .into_response()
    }
}

/// `GET /memory` and `POST /memory`, merged into the control router.
pub fn routes() -> Router<Arc<Vm>> {
    Router::new().route("/memory", get(report).post(set))
}

fn state() -> Result<&'static Arc<MemState>, MemError> {
    STATE.get().ok_or_else(|| {
        MemError(
            ErrorKind::Failed,
            "memory sampling has not started yet".into(),
        )
    })
}

async fn report(State(_vm): State<Arc<Vm>>) -> Result<Json<WorkerMemory>, MemError> {
    let st = state()?;
    let r = lock(&st.sample).report.clone();
    Ok(Json(r))
}

async fn set(
    State(vm): State<Arc<Vm>>,
    Json(req): Json<SetMemory>,
) -> Result<Json<WorkerMemory>, MemError> {
    let st = state()?;
    if req.virtio_mem_requested > st.region {
        return Err(MemError(
            ErrorKind::Invalid,
            format!(
                "virtio-mem request of {} bytes is above the VM's region of {} bytes",
                req.virtio_mem_requested, st.region
            ),
        ));
    }
    let _g = st.apply.lock().await;
    let generation = st.generation.load(Ordering::SeqCst);
    if let Some(g) = req.generation.filter(|&g| g != generation) {
        tracing::info!(
            target_generation = g,
            generation,
            "memory target refused: computed for boot generation {g}, the guest has reset since"
        );
        return Err(MemError(
            ErrorKind::Conflict,
            format!(
                "memory target for boot generation {g} refused: the guest has reset since (boot generation {generation})"
            ),
        ));
    }
    let (current, plugged, balloon_actual, available) = {
        let s = lock(&st.sample);
        (
            s.report.assigned,
            s.report.plugged,
            s.report.balloon_actual,
            guest_available(&s),
        )
    };
    let target = req.balloon_target + req.virtio_mem_requested;
    // Unplugging takes at most what the guest has available now, minus a floor (see
    // `memory::unplug_step`); the next round asks again from the guest's new report.
    let mem_step = memory::unplug_step(
        plugged,
        req.virtio_mem_requested,
        available,
        VIRTIO_MEM_BLOCK,
    );
    if mem_step != req.virtio_mem_requested {
        tracing::info!(
            plugged,
            target = req.virtio_mem_requested,
            step = mem_step,
            available = available.unwrap_or(0),
            "virtio-mem unplug limited to what the guest has available"
        );
    }
    // While virtio-mem still holds back, the balloon takes nothing either this step.
    let balloon_step = if mem_step > req.virtio_mem_requested {
        req.balloon_target.max(balloon_actual)
    } else {
        req.balloon_target
    };
    let applied = balloon_step + mem_step;
    let failed =
        |what: &str, e: qemu::QmpError| MemError(ErrorKind::Failed, format!("{what}: {e}"));
    let set_mem = |bytes: u64| {
        let vm = vm.clone();
        async move {
            if st.region > 0 {
                vm.qmp.set_virtio_mem_requested(VIRTIO_MEM_ID, bytes).await
            } else {
                Ok(())
            }
        }
    };
    // QEMU's `balloon` value is relative to boot RAM only (virtio-mem memory is not counted in
    // it, checked on QEMU 7.2: `balloon 250M` with 32 MiB plugged gave `actual` 250 MiB), so the
    // balloon leaves exactly `balloon_target` of boot RAM to the guest.
    let balloon = || {
        let vm = vm.clone();
        async move { vm.qmp.balloon(balloon_step).await }
    };
    if target >= current {
        balloon().await.map_err(|e| failed("balloon", e))?;
        set_mem(mem_step)
            .await
            .map_err(|e| failed("virtio-mem requested-size", e))?;
    } else {
        // Also when the step equals what is plugged: that stops an unplug still in flight.
        set_mem(mem_step)
            .await
            .map_err(|e| failed("virtio-mem requested-size", e))?;
        balloon().await.map_err(|e| failed("balloon", e))?;
    }
    tracing::debug!(
        balloon = balloon_step,
        virtio_mem = mem_step,
        target,
        "memory target applied"
    );
    let mut s = lock(&st.sample);
    s.requested = Some(applied);
    s.report.requested = Some(applied);
    if st.region > 0 {
        s.mem_requested = Some(mem_step);
    }
    Ok(Json(s.report.clone()))
}
