//! The balancer's rules from issue 6, one test each: demand plus buffer, idle VMs, pressure,
//! weights, minimums, the host reserve, the one-greedy-VM trap, stale reports, hysteresis and
//! the balloon / virtio-mem split.

mod sim;

use memory::{balance, balance_with, BalanceConfig, HostMemory, MemorySettings, Reason, GIB, MIB};
use sim::World;

fn dynamic() -> MemorySettings {
    MemorySettings::dynamic(GIB, 256 * MIB, 8 * GIB)
}

/// A VM gets demand plus its buffer; below startup through the balloon, above through virtio-mem.
#[test]
fn demand_plus_buffer_split_between_balloon_and_virtio_mem() {
    let mut w = World::new(32 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), GIB, 2000 * MIB);
    let b = w.add(
        MemorySettings {
            buffer_percent: 50,
            ..dynamic()
        },
        GIB,
        400 * MIB,
    );
    let d = w.round();
    assert_eq!(d[a].target, 2400 * MIB);
    assert_eq!(
        (d[a].balloon_target, d[a].virtio_mem_requested),
        (GIB, 1376 * MIB)
    );
    assert_eq!(d[a].reason, Reason::Demand);
    assert_eq!(d[a].pressure_percent, 195);
    assert_eq!(d[b].target, 600 * MIB);
    assert_eq!(
        (d[b].balloon_target, d[b].virtio_mem_requested),
        (600 * MIB, 0)
    );
    assert_eq!(d[b].pressure_percent, 39);
}

/// An idle VM gives memory back down to its minimum, and no further.
#[test]
fn idle_vm_shrinks_to_minimum() {
    let mut w = World::new(32 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), 6 * GIB, 100 * MIB);
    let d = w.round();
    assert_eq!(d[a].target, 256 * MIB);
    assert_eq!(d[a].reason, Reason::AtMinimum);
    assert_eq!(
        (d[a].balloon_target, d[a].virtio_mem_requested),
        (256 * MIB, 0)
    );
}

/// Demand above maximum: the VM is held at its maximum.
#[test]
fn capped_at_maximum() {
    let mut w = World::new(32 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), 8 * GIB, 20 * GIB);
    let d = w.round();
    assert_eq!(d[a].target, 8 * GIB);
    assert_eq!(d[a].reason, Reason::AtMaximum);
    assert_eq!(d[a].virtio_mem_requested, 7 * GIB);
}

/// Under host pressure two VMs with weights 8000 and 2000 share the memory above their
/// minimums 4 : 1.
#[test]
fn weights_share_memory_above_minimums() {
    // 12 GiB for VMs: minimums take 1 GiB, 11 GiB are shared.
    let mut w = World::new(15 * GIB, 2 * GIB, GIB);
    let hi = w.add(
        MemorySettings {
            weight: 8000,
            ..MemorySettings::dynamic(GIB, 512 * MIB, 12 * GIB)
        },
        6 * GIB,
        10 * GIB,
    );
    let lo = w.add(
        MemorySettings {
            weight: 2000,
            ..MemorySettings::dynamic(GIB, 512 * MIB, 12 * GIB)
        },
        6 * GIB,
        10 * GIB,
    );
    // Round 1 shrinks `lo`; `hi` grows into what `lo` gave back in round 2.
    let mut d = w.round();
    for _ in 0..2 {
        w.report_all_except(&[]);
        d = w.round();
    }
    assert_eq!(d[hi].reason, Reason::Weighted);
    assert_eq!(d[lo].reason, Reason::Weighted);
    let above_hi = d[hi].target - 512 * MIB;
    let above_lo = d[lo].target - 512 * MIB;
    assert_eq!(
        above_hi + above_lo,
        11 * GIB - 2 * MIB,
        "all shared, up to block rounding"
    );
    assert!(
        above_hi.abs_diff(4 * above_lo) <= 8 * MIB,
        "{above_hi} vs 4 x {above_lo}"
    );
    assert!(w.held() <= w.total - w.reserve - w.other);
}

/// Weight 0 and a crowded host: every VM still gets its minimum, and weight-0 VMs get only
/// what the others leave.
#[test]
fn minimums_hold_under_pressure() {
    let mut w = World::new(10 * GIB, 2 * GIB, 0);
    let greedy = w.add(
        MemorySettings {
            weight: 10_000,
            ..MemorySettings::dynamic(GIB, GIB, 8 * GIB)
        },
        4 * GIB,
        16 * GIB,
    );
    let zero = w.add(
        MemorySettings {
            weight: 0,
            ..MemorySettings::dynamic(GIB, 2 * GIB, 8 * GIB)
        },
        2 * GIB,
        6 * GIB,
    );
    let d = w.round();
    assert_eq!(d[zero].target, 2 * GIB);
    assert_eq!(d[greedy].target, 6 * GIB);
    assert_eq!(w.held(), 8 * GIB);
}

/// The reserve is never handed out: growth stops at `free - reserve`, and the sum of targets
/// stays within `total - reserve` even when the host's own use grows.
#[test]
fn reserve_never_crossed() {
    let mut w = World::new(16 * GIB, 2 * GIB, 4 * GIB);
    let a = w.add(dynamic(), GIB, 7 * GIB);
    let b = w.add(dynamic(), GIB, 7 * GIB);
    for _ in 0..10 {
        w.report_all_except(&[]);
        let d = w.round();
        assert!(w.held() + w.other + w.reserve <= w.total, "{d:?}");
    }
    // 10 GiB for VMs, shared equally.
    assert_eq!(w.vms[a].assigned, 5 * GIB);
    assert_eq!(w.vms[b].assigned, 5 * GIB);
    // The host itself now uses 2 GiB more: the VMs give it back.
    w.other += 2 * GIB;
    w.report_all_except(&[]);
    let d = w.round();
    assert_eq!(d[a].target + d[b].target, 8 * GIB);
    assert!(d.iter().all(|d| d.reason == Reason::Weighted));
}

/// Pressure: a VM whose demand jumps gets memory back from idle VMs within two rounds.
#[test]
fn pressure_reclaims_from_idle_vms() {
    let mut w = World::new(12 * GIB, 2 * GIB, GIB);
    let idle: Vec<usize> = (0..3).map(|_| w.add(dynamic(), 3 * GIB, 3 * GIB)).collect();
    let busy = w.add(dynamic(), 512 * MIB, 400 * MIB);
    w.round();
    assert!(w.host().spare() < 600 * MIB);
    for &i in &idle {
        w.report(i, 200 * MIB);
    }
    w.report(busy, 4 * GIB);
    let d = w.round();
    assert_eq!(d[busy].reason, Reason::GrowthLimited, "{d:?}");
    assert!(idle.iter().all(|&i| d[i].target == 256 * MIB));
    w.report_all_except(&[]);
    let d = w.round();
    assert_eq!(d[busy].target, 4916 * MIB, "{d:?}");
    assert!(w.held() + w.other + w.reserve <= w.total);
}

/// The one-greedy-VM trap: a VM with a huge maximum and endless demand only grows into free
/// memory; when others need memory it gives back to its weighted share, the host keeps its
/// reserve in every round, and nobody starves.
#[test]
fn greedy_vm_never_starves_host_or_others() {
    let mut w = World::new(24 * GIB, 2 * GIB, GIB);
    let greedy = w.add(MemorySettings::dynamic(GIB, 256 * MIB, 20 * GIB), GIB, GIB);
    let small: Vec<usize> = (0..3)
        .map(|_| w.add(dynamic(), 512 * MIB, 300 * MIB))
        .collect();
    for r in 0..40u64 {
        // The greedy guest always wants twice what it has (a leak, a cache that never stops).
        let g = w.vms[greedy].assigned * 2;
        w.report(greedy, g);
        if r == 20 {
            for &i in &small {
                w.report(i, 3 * GIB);
            }
        }
        w.report_all_except(&[]);
        let d = w.round();
        assert!(
            w.held() + w.other + w.reserve <= w.total,
            "round {r}: {d:?}"
        );
        if r == 19 {
            // Alone, it may take what is free: all but the small VMs' 3 x 360 MiB.
            assert_eq!(w.vms[greedy].assigned, 21 * GIB - 1080 * MIB);
        }
    }
    // Each small VM wants 3 GiB + 20 % (in 2 MiB blocks); all four share 21 GiB by weight.
    for &i in &small {
        assert_eq!(w.vms[i].assigned, 3688 * MIB, "{:?}", w.vms[i]);
    }
    assert!(w.vms[greedy].assigned >= 10 * GIB);
}

/// The growth of the others after the trap springs takes at most three rounds.
#[test]
fn greedy_vm_gives_back_within_three_rounds() {
    let mut w = World::new(24 * GIB, 2 * GIB, GIB);
    let greedy = w.add(
        MemorySettings::dynamic(GIB, 256 * MIB, 20 * GIB),
        20 * GIB,
        64 * GIB,
    );
    let small = w.add(dynamic(), 512 * MIB, 300 * MIB);
    w.round();
    w.report(small, 2 * GIB);
    for r in 1..=3 {
        w.report(greedy, 64 * GIB);
        w.report_all_except(&[]);
        w.round();
        if w.vms[small].assigned >= 2 * GIB + 2 * GIB / 5 {
            assert!(r <= 2);
            return;
        }
    }
    panic!("small VM still at {} MiB", w.vms[small].assigned / MIB);
}

/// A guest that stops reporting (agent killed, driver gone) keeps its memory, with the reason.
#[test]
fn stale_demand_keeps_assignment() {
    let mut w = World::new(32 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), 3 * GIB, 100 * MIB);
    let never = w.add(dynamic(), 2 * GIB, 0);
    w.vms[never].reported_at = None;
    // 11 seconds without a report from `a`.
    w.now_ms += 11_000;
    let d = w.round();
    assert_eq!((d[a].target, d[a].reason), (3 * GIB, Reason::StaleDemand));
    assert_eq!(
        (d[never].target, d[never].reason),
        (2 * GIB, Reason::StaleDemand)
    );
    assert_eq!(d[a].reason.to_string(), "stale-demand");
    assert_eq!(serde_json_reason(d[a].reason), "\"stale-demand\"");
    // Reporting again resumes balancing.
    w.report(a, 100 * MIB);
    assert_eq!(w.round()[a].reason, Reason::AtMinimum);
}

fn serde_json_reason(r: Reason) -> String {
    serde_json::to_string(&r).unwrap()
}

/// Small moves are skipped, unless the guest needs more than it has.
#[test]
fn hysteresis_avoids_flapping() {
    let mut w = World::new(32 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), 1200 * MIB, 1000 * MIB);
    w.round();
    assert_eq!(w.vms[a].assigned, 1200 * MIB);
    for demand in [1005, 995, 1003, 998] {
        w.report(a, demand * MIB);
        let d = w.round();
        assert_eq!(
            (d[a].target, d[a].reason),
            (1200 * MIB, Reason::Hysteresis),
            "{demand}"
        );
    }
    // Demand above assigned always moves.
    w.report(a, 1201 * MIB);
    let d = w.round();
    assert_eq!(d[a].target, 1442 * MIB);
}

/// Under contention a VM a few MiB below its weighted share still gets it (hysteresis would
/// hold it off the proportion the weights decide; seen with real guests: 282 instead of 288 MiB).
#[test]
fn weighted_share_not_held_by_hysteresis() {
    let s = |w| MemorySettings {
        weight: w,
        ..MemorySettings::dynamic(256 * MIB, 192 * MIB, 512 * MIB)
    };
    let vm = |id: &str, w, assigned, demand| memory::VmDemand {
        id: id.into(),
        settings: s(w),
        assigned,
        requested: None,
        demand,
        reported_at: Some(1000),
    };
    let vms = [
        vm("heavy", 7500, 480 * MIB, 460 * MIB),
        vm("light", 2500, 282 * MIB, 257 * MIB),
    ];
    let host = HostMemory {
        total: 1024 * MIB,
        free_for_vms: 8 * GIB,
        reserve: 256 * MIB,
    };
    let d = balance(&vms, &host, 1500);
    assert_eq!(
        (d[0].target, d[0].reason, d[1].target, d[1].reason),
        (480 * MIB, Reason::Weighted, 288 * MIB, Reason::Weighted)
    );
}

/// Static VMs keep startup and count against the budget.
#[test]
fn static_vms_fixed_and_counted() {
    let mut w = World::new(12 * GIB, 2 * GIB, GIB);
    let s = w.add(MemorySettings::fixed(6 * GIB), 6 * GIB, 100 * MIB);
    let a = w.add(dynamic(), GIB, 8 * GIB);
    for _ in 0..3 {
        w.report_all_except(&[]);
        w.round();
    }
    let d = w.round();
    assert_eq!((d[s].target, d[s].reason), (6 * GIB, Reason::Static));
    assert_eq!(d[a].target, 3 * GIB);
}

/// If host memory outside Vireo's control eats into the minimums, every VM is held at its
/// minimum and the status says why.
#[test]
fn host_shortage() {
    let mut w = World::new(8 * GIB, 2 * GIB, 4 * GIB);
    let a = w.add(
        MemorySettings::dynamic(2 * GIB, 2 * GIB, 4 * GIB),
        2 * GIB,
        3 * GIB,
    );
    // The host's own use grows by 1 GiB: only 2 GiB are left for 3 GiB of minimums.
    w.other += GIB;
    let b = w.add(MemorySettings::dynamic(2 * GIB, GIB, 4 * GIB), GIB, 3 * GIB);
    let d = w.round();
    assert_eq!((d[a].target, d[b].target), (2 * GIB, GIB));
    assert!(d.iter().all(|d| d.reason == Reason::HostShortage));
}

/// The reserve comes before "no blind shrinking": when the host's own use grows into the
/// reserve, a VM with a stale report gives back towards its minimum.
#[test]
fn stale_vm_yields_to_host_shortage() {
    let mut w = World::new(8 * GIB, 2 * GIB, GIB);
    let stale = w.add(dynamic(), 4 * GIB, 3 * GIB);
    let active = w.add(dynamic(), GIB, GIB);
    w.vms[stale].reported_at = None;
    w.other += 2 * GIB;
    let d = w.round();
    assert_eq!(
        (d[stale].target, d[stale].reason),
        (2 * GIB + 768 * MIB, Reason::HostShortage)
    );
    assert_eq!(
        (d[active].target, d[active].reason),
        (256 * MIB, Reason::HostShortage)
    );
    assert_eq!(w.held() + w.other + w.reserve, w.total);
}

/// A minimum raised while running is reached as soon as the host can spare it.
#[test]
fn raised_minimum_is_reached() {
    let mut w = World::new(8 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), 512 * MIB, 100 * MIB);
    w.vms[a].settings.minimum = GIB;
    let d = w.round();
    assert_eq!((d[a].target, d[a].reason), (GIB, Reason::AtMinimum));
}

/// virtio-mem targets are whole blocks; a tunable block size is honoured.
#[test]
fn virtio_mem_block_size() {
    let cfg = BalanceConfig {
        block_size: 128 * MIB,
        ..BalanceConfig::default()
    };
    let vm = memory::VmDemand {
        id: "a".into(),
        settings: dynamic(),
        assigned: GIB,
        requested: None,
        demand: 1500 * MIB,
        reported_at: Some(5),
    };
    let host = HostMemory {
        total: 32 * GIB,
        free_for_vms: 20 * GIB,
        reserve: 2 * GIB,
    };
    let d = &balance_with(std::slice::from_ref(&vm), &host, 5, &cfg)[0];
    assert_eq!(d.virtio_mem_requested % (128 * MIB), 0);
    assert_eq!(
        d.target,
        GIB + 896 * MIB,
        "1800 MiB rounded up to a whole block above startup"
    );
    let d = &balance(&[vm], &host, 5)[0];
    assert_eq!(d.target, 1800 * MIB);
}

/// What VMs hold (or were promised and may take any moment) never exceeds what the host can
/// give them, checked after every round.
fn assert_within_host(w: &World, round: usize, d: &[memory::Decision]) {
    assert!(
        w.committed() <= w.limit(),
        "round {round}: VMs hold or were promised {} MiB, the host limit is {} MiB: {d:?}\n{:?}",
        w.committed() / MIB,
        w.limit() / MIB,
        w.vms
    );
}

/// A guest that cannot give memory back (balloon inflation fails: it needs the memory) keeps
/// it, and the other VMs never grow into it: the sum of what VMs hold stays within the host
/// limit in every round, while the target still says what the VM should have (weighted).
#[test]
fn guest_that_cannot_give_back_is_not_counted_as_free() {
    let mut w = World::new(10 * GIB, 2 * GIB, GIB);
    // `stuck` holds 5 GiB and its guest will not go below 4.5 GiB whatever it is asked.
    let stuck = w.add(dynamic(), 5 * GIB, 4 * GIB);
    w.guests[stuck].keeps = 4608 * MIB;
    let other = w.add(dynamic(), GIB, 200 * MIB);
    w.round();
    // Both now want about 5 GiB; 7 GiB for VMs: equal weights give each 3.5 GiB.
    w.report(other, 4 * GIB);
    for r in 0..10 {
        w.report_all_except(&[]);
        let d = w.round();
        assert_within_host(&w, r, &d);
        assert!(d[stuck].target < w.vms[stuck].assigned, "{d:?}");
    }
    assert_eq!(w.vms[stuck].assigned, 4608 * MIB);
    // `other` got exactly what `stuck` really gave back, no more.
    assert_eq!(w.vms[other].assigned, w.limit() - 4608 * MIB);
    let d = w.round();
    assert_eq!(d[other].reason, Reason::GrowthLimited, "{d:?}");
}

/// Growth in flight (a guest plugging virtio-mem memory slowly) is held memory: the next
/// round does not hand the part not yet plugged to another VM.
#[test]
fn growth_in_flight_is_not_granted_twice() {
    let mut w = World::new(10 * GIB, 2 * GIB, GIB);
    let slow = w.add(dynamic(), GIB, 5 * GIB);
    w.guests[slow].step = 256 * MIB;
    let fast = w.add(dynamic(), GIB, 500 * MIB);
    let d = w.round();
    assert_within_host(&w, 0, &d);
    // `slow` was promised 5 GiB + 20 %; it holds only 256 MiB more so far.
    assert_eq!(w.vms[slow].requested, Some(6 * GIB));
    assert_eq!(w.vms[slow].assigned, GIB + 256 * MIB);
    // `fast` now needs 3 GiB: it gets what `slow` has not taken only through the weights
    // (lowering `slow`'s request first), never on top of `slow`'s promise.
    w.report(fast, 3 * GIB);
    for r in 1..20 {
        w.report_all_except(&[]);
        let d = w.round();
        assert_within_host(&w, r, &d);
    }
    let (s, f) = (w.vms[slow].assigned, w.vms[fast].assigned);
    assert_eq!(s + f, w.limit(), "{:?}", w.vms);
    // Equal weights: 7 GiB shared equally, as both want more than half.
    assert_eq!((s, f), (3584 * MIB, 3584 * MIB));
}

/// A guest that stops reporting while its growth is in flight keeps the promise (counted as
/// held), and keeps it stable: the decision does not flip-flop between the two.
#[test]
fn stale_vm_keeps_growth_in_flight() {
    let mut w = World::new(10 * GIB, 2 * GIB, GIB);
    let a = w.add(dynamic(), GIB, 3 * GIB);
    w.guests[a].step = 512 * MIB;
    let b = w.add(dynamic(), GIB, 500 * MIB);
    w.round();
    let promised = w.vms[a].requested.unwrap();
    assert!(promised > w.vms[a].assigned);
    // `a` goes silent; `b` wants everything.
    w.now_ms += 11_000;
    w.report(b, 16 * GIB);
    for r in 0..10 {
        w.report_all_except(&[a]);
        let d = w.round();
        assert_within_host(&w, r, &d);
        assert_eq!((d[a].target, d[a].reason), (promised, Reason::StaleDemand));
    }
    assert_eq!(w.vms[a].assigned, promised);
    assert_eq!(w.vms[b].assigned, w.limit() - promised);
}
