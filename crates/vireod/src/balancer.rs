//! The host's dynamic memory balancer task: once a second it asks every running VM's worker
//! what the VM has and what its guest needs (`GET /memory`), runs [`memory::balance`] for the
//! whole host, and sends the workers the targets that changed (`POST /memory`). Decisions are
//! kept in the manager for `vireo vm show` and `vireo memory status`.
//!
//! A VM whose worker does not answer is still counted with the memory it last had, and is
//! given nothing: the balancer never hands out memory it cannot account for.
//!
//! Every target carries the boot generation of the report it was computed from; the worker
//! refuses it when the guest has reset since (a target for the old boot would squeeze the new
//! one while it boots), and the next round starts from the new boot's report.

use crate::manager::Manager;
use api::memory::{SetMemory, WorkerMemory};
use memory::{Reason, VmDemand};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Offset added to the balancer's clock so that ages reported before vireod started still
/// map to valid (past) times.
const CLOCK_BASE_MS: u64 = 1 << 40;

/// Runs the balancer forever (spawned by `main`).
pub async fn run(m: Arc<Manager>) {
    let epoch = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        round(&m, epoch).await;
    }
}

/// One balancer round.
pub async fn round(m: &Arc<Manager>, epoch: Instant) {
    let vms = m.running_for_balancer();
    m.forget_memory_except(&vms.iter().map(|v| v.uuid).collect::<Vec<_>>());
    if vms.is_empty() {
        return;
    }
    // Ask every worker at once.
    let mut set = tokio::task::JoinSet::new();
    for (i, v) in vms.iter().enumerate() {
        let client = v.client.clone();
        set.spawn(async move { (i, client.get::<WorkerMemory>("/memory").await) });
    }
    let mut fresh = vec![false; vms.len()];
    while let Some(r) = set.join_next().await {
        let Ok((i, r)) = r else { continue };
        match r {
            Ok(rep) => {
                m.record_memory_report(&vms[i].uuid, rep);
                fresh[i] = true;
            }
            Err(e) => tracing::debug!(vm = %vms[i].name, "no memory report: {e}"),
        }
    }
    let now_ms = CLOCK_BASE_MS + epoch.elapsed().as_millis() as u64;
    let demands: Vec<VmDemand> = vms
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let rep = m.memory_report(&v.uuid);
            let (assigned, requested, demand, reported_at) = match (&rep, fresh[i]) {
                (Some((r, _)), true) => (
                    r.assigned,
                    r.requested,
                    r.demand.unwrap_or(0),
                    r.demand.and(r.age_ms).map(|a| now_ms.saturating_sub(a)),
                ),
                // No answer this round: counted with what it last had or was promised, never
                // fresh.
                (Some((r, _)), false) => (r.assigned, r.requested, 0, None),
                (None, _) => (v.settings.startup, None, 0, None),
            };
            VmDemand {
                id: v.uuid.to_string(),
                settings: v.settings,
                assigned,
                requested,
                demand,
                reported_at,
            }
        })
        .collect();
    let (host, _) = m.host_memory();
    let decisions = memory::balance(&demands, &host, now_ms);
    for (i, d) in decisions.into_iter().enumerate() {
        let v = &vms[i];
        let rep = m.memory_report(&v.uuid);
        tracing::debug!(vm = %v.name, target = d.target, reason = %d.reason, changed = d.changed, "memory decision");
        if d.changed && fresh[i] {
            let generation = rep.as_ref().map(|(r, _)| r.generation);
            let req = SetMemory {
                balloon_target: d.balloon_target,
                virtio_mem_requested: d.virtio_mem_requested,
                generation,
            };
            match v.client.post::<_, WorkerMemory>("/memory", &req).await {
                // The answer carries the new `requested`: the next round counts it as held.
                Ok(rep) => m.record_memory_report(&v.uuid, rep),
                Err(e) if e.api_kind() == Some(api::ErrorKind::Conflict) => {
                    // The guest reset between the report and the target: the old boot's
                    // demand is dropped, the next round reads the new boot.
                    tracing::info!(vm = %v.name, "memory target {} for the old boot refused: {e}", d.target);
                    m.drop_memory_decision(&v.uuid);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(vm = %v.name, "applying memory target {} failed: {e}", d.target)
                }
            }
        }
        let reason = d.reason;
        let old = m.record_memory_decision(&v.uuid, d);
        if old != Some(reason) && matches!(reason, Reason::StaleDemand | Reason::HostShortage) {
            tracing::info!(vm = %v.name, "memory: {reason}");
        }
    }
}
