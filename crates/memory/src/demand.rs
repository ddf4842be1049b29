//! Guest memory demand: how many bytes a guest needs, from what the guest reports.
//!
//! The virtio-balloon driver reports `/proc/meminfo`-like statistics without any agent
//! (QEMU's `guest-stats` on the balloon device: `stats-total-memory`,
//! `stats-available-memory`, `stats-free-memory`). Where `vireo-guest` runs, its
//! `vireo-memory-status` adds `Committed_AS`, which shows memory the guest has promised but
//! not yet touched (a program that just allocated), so the balancer can grow the VM before
//! the pages are used.

/// Balloon statistics (QEMU `qom-get /machine/peripheral/balloon0 guest-stats`), bytes.
/// A statistic the guest did not report is `None` (QEMU shows it as -1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonStats {
    /// `stats-total-memory`: RAM the guest sees (shrinks as the balloon inflates).
    pub total: Option<u64>,
    /// `stats-available-memory` (`MemAvailable`).
    pub available: Option<u64>,
    /// `stats-free-memory` (`MemFree`), used when `available` is missing (old guests).
    pub free: Option<u64>,
}

/// The guest agent's `vireo-memory-status` (`agent::MemoryStatus`), bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentMemory {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable`.
    pub available: u64,
    /// `Committed_AS`.
    pub committed: u64,
}

/// The guest's demand in bytes, or `None` when nothing usable was reported.
///
/// Demand is the memory the guest cannot give up: what the VM has now (`assigned`, balloon
/// `actual` from QEMU, which counts plugged virtio-mem memory) minus what the guest still has
/// available (`MemAvailable`, or `MemFree` on guests that do not report it). Measuring from
/// `assigned` rather than from the guest's `MemTotal` counts the memory the guest kernel keeps
/// for itself (kernel image, page structs, reserved ranges: tens of MiB on a small guest, and
/// more as virtio-mem adds memory) and is the same whether or not balloon pages are counted
/// in `MemTotal` (they are with `deflate-on-oom`). Giving a VM `demand + buffer` thus leaves
/// the guest about `buffer` available. With `assigned == 0` (unknown) the guest's own total is
/// used instead.
///
/// The agent's figures, when given, replace the balloon's (same source, but fresher).
/// Committed memory then raises demand by the part of `Committed_AS` above the guest's used
/// memory (`MemTotal - MemAvailable`), at most half of that used memory: Linux overcommits,
/// and counting all of `Committed_AS` would make a guest that reserved more than it will ever
/// touch grow to its maximum.
pub fn guest_demand(
    assigned: u64,
    balloon: Option<&BalloonStats>,
    agent: Option<&AgentMemory>,
) -> Option<u64> {
    let (total, available) = match (agent, balloon) {
        (Some(a), _) if a.total > 0 => (a.total, a.available),
        (_, Some(b)) => (b.total?, b.available.or(b.free)?),
        _ => return None,
    };
    let used = total.saturating_sub(available);
    let base = if assigned > 0 {
        assigned.saturating_sub(available)
    } else {
        used
    };
    let committed = agent.map_or(0, |a| a.committed);
    let extra = committed
        .min(used.saturating_add(used / 2))
        .saturating_sub(used);
    Some(base.saturating_add(extra))
}

/// When the guest last reported its demand, for [`crate::VmDemand::reported_at`], from the
/// times (caller's clock, milliseconds) the balloon statistics last changed (`last-update`)
/// and the agent last answered `vireo-memory-status`.
///
/// Once the agent has answered during this boot (`agent_seen`), only the agent's answers
/// count: if the agent is then killed or hangs, the VM's report goes stale and the balancer
/// keeps its memory ([`crate::Reason::StaleDemand`]) rather than shrinking it on the coarser
/// balloon figures. A guest without an agent is balanced on balloon statistics alone.
pub fn demand_reported_at(
    balloon_at: Option<u64>,
    agent_at: Option<u64>,
    agent_seen: bool,
) -> Option<u64> {
    if agent_seen {
        agent_at
    } else {
        balloon_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MIB;

    /// Balloon statistics alone: total minus available, or minus free on old guests.
    #[test]
    fn balloon_only() {
        let b = BalloonStats {
            total: Some(1024 * MIB),
            available: Some(700 * MIB),
            free: Some(100 * MIB),
        };
        assert_eq!(guest_demand(0, Some(&b), None), Some(324 * MIB));
        let b = BalloonStats {
            available: None,
            ..b
        };
        assert_eq!(guest_demand(0, Some(&b), None), Some(924 * MIB));
        let b = BalloonStats { total: None, ..b };
        assert_eq!(guest_demand(0, Some(&b), None), None);
        assert_eq!(guest_demand(0, None, None), None);
    }

    /// Measured from what the VM has: the guest kernel's own memory (here 1100 - 1024 MiB)
    /// counts as demand, and so do balloon pages a `deflate-on-oom` guest keeps in MemTotal.
    #[test]
    fn from_assigned() {
        let b = BalloonStats {
            total: Some(1024 * MIB),
            available: Some(700 * MIB),
            free: None,
        };
        assert_eq!(guest_demand(1100 * MIB, Some(&b), None), Some(400 * MIB));
        // deflate-on-oom: 512 MiB ballooned out but still in MemTotal, 200 MiB available.
        let b = BalloonStats {
            total: Some(1000 * MIB),
            available: Some(200 * MIB),
            free: None,
        };
        assert_eq!(guest_demand(600 * MIB, Some(&b), None), Some(400 * MIB));
        // Never negative.
        assert_eq!(guest_demand(100 * MIB, Some(&b), None), Some(0));
    }

    /// Once the agent has been seen, only its reports keep the demand fresh.
    #[test]
    fn report_time() {
        assert_eq!(demand_reported_at(Some(9), None, false), Some(9));
        assert_eq!(demand_reported_at(Some(9), Some(5), true), Some(5));
        assert_eq!(demand_reported_at(Some(9), None, true), None);
        assert_eq!(demand_reported_at(None, None, false), None);
    }

    /// The agent's report wins, and committed memory raises demand by at most half of used.
    #[test]
    fn agent_refines() {
        let b = BalloonStats {
            total: Some(1024 * MIB),
            available: Some(700 * MIB),
            free: None,
        };
        let a = AgentMemory {
            total: 1024 * MIB,
            available: 624 * MIB,
            committed: 300 * MIB,
        };
        assert_eq!(guest_demand(0, Some(&b), Some(&a)), Some(400 * MIB));
        let a = AgentMemory {
            committed: 500 * MIB,
            ..a
        };
        assert_eq!(guest_demand(0, Some(&b), Some(&a)), Some(500 * MIB));
        // Committed memory adds on top of the kernel's share too.
        assert_eq!(
            guest_demand(1100 * MIB, Some(&b), Some(&a)),
            Some(576 * MIB)
        );
        let a = AgentMemory {
            committed: 64 * 1024 * MIB,
            ..a
        };
        assert_eq!(guest_demand(0, None, Some(&a)), Some(600 * MIB));
        // An empty agent report falls back to the balloon.
        assert_eq!(
            guest_demand(0, Some(&b), Some(&AgentMemory::default())),
            Some(324 * MIB)
        );
    }
}
