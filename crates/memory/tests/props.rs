//! Property tests of the balancer over random VM sets, settings, demands and host states.

mod sim;

use memory::{balance, HostMemory, MemorySettings, Reason, VmDemand, MIB};
use proptest::prelude::*;
use sim::World;

const NOW: u64 = 1_000_000;

/// A random VM: valid settings, demand up to twice the maximum, assigned within its limits;
/// one in ten is static and one in ten has a stale report.
fn vm() -> impl Strategy<Value = VmDemand> {
    (
        64u64..2048,                   // startup, 2 MiB units
        0u64..=100,                    // minimum, percent of startup
        0u64..4096,                    // maximum above startup, 2 MiB units
        0u32..=200,                    // buffer
        0u32..=10_000,                 // weight
        0u64..=1000,                   // demand, per mille of 2 x maximum
        0u64..=1000,                   // assigned, per mille of [floor, ceiling]
        0u8..10,                       // kind: 0 static, 1 stale, else fresh
        prop::option::of(0u64..=1000), // requested, per mille of [floor, ceiling]
    )
        .prop_map(|(st, minp, extra, buffer, weight, dem, asg, kind, req)| {
            let startup = st * 2 * MIB;
            let minimum = ((startup * minp / 100) / (2 * MIB) * 2 * MIB).max(32 * MIB);
            let settings = MemorySettings {
                dynamic: kind != 0,
                startup,
                minimum,
                maximum: startup + extra * 2 * MIB,
                buffer_percent: buffer,
                weight,
            };
            let (floor, ceiling) = (settings.floor(), settings.ceiling());
            VmDemand {
                id: String::new(),
                settings,
                assigned: floor + (ceiling - floor) / 1000 * asg,
                requested: req.map(|r| floor + (ceiling - floor) / 1000 * r),
                demand: settings.maximum * 2 / 1000 * dem,
                reported_at: if kind == 1 {
                    Some(NOW - 60_000)
                } else {
                    Some(NOW - 500)
                },
            }
        })
}

/// A host: 4..64 GiB, reserve up to 4 GiB, up to 2 GiB used outside VMs; free memory is
/// what VMs and the host's own use leave.
fn host_and_vms() -> impl Strategy<Value = (u64, u64, u64, Vec<VmDemand>)> {
    (
        4u64..64,
        0u64..=2048,
        0u64..=1024,
        prop::collection::vec(vm(), 1..8),
    )
        .prop_map(|(t, r, o, vms)| (t << 30, r * 2 * MIB, o * 2 * MIB, vms))
}

fn host(total: u64, reserve: u64, other: u64, vms: &[VmDemand]) -> HostMemory {
    let held: u64 = vms.iter().map(|v| v.assigned).sum();
    HostMemory {
        total,
        free_for_vms: total.saturating_sub(other + held),
        reserve,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every target is within its VM's [minimum, maximum] (startup if static) and the
    /// virtio-mem part is a whole number of blocks.
    #[test]
    fn targets_within_limits((total, reserve, other, vms) in host_and_vms()) {
        let h = host(total, reserve, other, &vms);
        for (v, d) in vms.iter().zip(balance(&vms, &h, NOW)) {
            prop_assert!(d.target >= v.settings.floor(), "{v:?} {d:?}");
            prop_assert!(d.target <= v.settings.ceiling(), "{v:?} {d:?}");
            prop_assert_eq!(d.balloon_target + d.virtio_mem_requested, d.target);
            prop_assert!(d.balloon_target <= v.settings.startup);
            prop_assert_eq!(d.virtio_mem_requested % (2 * MIB), 0);
        }
    }

    /// When the minimums fit, the targets never add up to more than `total - reserve`, nor
    /// to more than the host's own use leaves above the reserve; growth never exceeds what
    /// the host can spare now.
    #[test]
    fn reserve_never_handed_out((total, reserve, other, vms) in host_and_vms()) {
        let h = host(total, reserve, other, &vms);
        let floors: u64 = vms.iter().map(|v| v.settings.floor()).sum();
        let held: u64 = vms.iter().map(|v| v.assigned).sum();
        let d = balance(&vms, &h, NOW);
        let sum: u64 = d.iter().map(|d| d.target).sum();
        let growth: u64 = vms.iter().zip(&d).map(|(v, d)| d.target.saturating_sub(v.committed())).sum();
        prop_assert!(growth <= h.spare(), "growth {growth} > spare {}", h.spare());
        let budget = h.vm_limit().min((held + h.free_for_vms).saturating_sub(reserve));
        if floors <= budget {
            prop_assert!(sum <= budget, "sum {sum} > budget {budget}");
        }
        if floors <= h.vm_limit() && held <= h.vm_limit() {
            prop_assert!(sum <= h.vm_limit(), "sum {sum} > limit {}", h.vm_limit());
        }
    }

    /// Growth is measured from what each VM holds or was promised, and never exceeds what is
    /// actually free: the host's spare minus growth in flight, within `total - reserve` minus
    /// every commitment. Memory a VM was asked to give back but still holds is not free.
    #[test]
    fn growth_only_from_free_memory((total, reserve, other, vms) in host_and_vms()) {
        let h = host(total, reserve, other, &vms);
        let d = balance(&vms, &h, NOW);
        let growth: u64 = vms.iter().zip(&d).map(|(v, d)| d.target.saturating_sub(v.committed())).sum();
        let committed: u64 = vms.iter().map(|v| v.committed()).sum();
        let in_flight: u64 = vms.iter().map(|v| v.committed() - v.assigned).sum();
        prop_assert_eq!(h.spare_for(&vms), h.spare().saturating_sub(in_flight).min(h.vm_limit().saturating_sub(committed)));
        prop_assert!(growth <= h.spare_for(&vms), "growth {growth} > free {}", h.spare_for(&vms));
        // Applied, with every guest giving back nothing: still within what was held plus free.
        let after: u64 = vms.iter().zip(&d).map(|(v, d)| d.target.max(v.committed())).sum();
        prop_assert!(after <= committed + h.spare_for(&vms));
        if committed <= h.vm_limit() {
            prop_assert!(after <= h.vm_limit(), "{after} > limit {}", h.vm_limit());
        }
    }

    /// A VM with a stale report keeps its memory unless the minimums of the others need it.
    #[test]
    fn stale_vms_keep_memory((total, reserve, other, vms) in host_and_vms()) {
        let h = host(total, reserve, other, &vms);
        for (v, d) in vms.iter().zip(balance(&vms, &h, NOW)) {
            if v.settings.dynamic && v.reported_at == Some(NOW - 60_000) {
                // Keeps what it holds or was promised (2 MiB rounding), within its limits.
                let keep = v.committed().clamp(v.settings.floor(), v.settings.ceiling());
                let kept = d.reason == Reason::StaleDemand
                    && d.target <= keep
                    && d.target + 2 * MIB > keep;
                prop_assert!(kept || d.reason == Reason::HostShortage, "{v:?} {d:?}");
            }
        }
    }

    /// Rounds converge within ten rounds to a fixed point (a further round changes nothing),
    /// and at that point weights are respected: a VM short of what it wants never has less
    /// memory above its minimum than a VM of lower weight, nor less per unit of weight.
    #[test]
    fn converges_and_respects_weights((total, reserve, other, mut vms) in host_and_vms()) {
        for v in &mut vms {
            v.settings.dynamic = true;
            v.reported_at = Some(NOW);
        }
        // Start from a state the host can hold (an over-committed start only converges at the
        // pace the host reports its shortfall, `reserve` per round, which this model cannot show).
        if vms.iter().map(|v| v.assigned).sum::<u64>() + other > total - reserve {
            for v in &mut vms {
                v.assigned = v.settings.minimum;
            }
        }
        prop_assume!(vms.iter().map(|v| v.assigned).sum::<u64>() + other <= total - reserve);
        let mut w = World::new(total, reserve, other);
        w.now_ms = NOW;
        for v in &vms {
            w.add(v.settings, v.assigned, v.demand);
        }
        let mut rounds = 0;
        let d = loop {
            w.report_all_except(&[]);
            let d = w.round();
            if d.iter().all(|d| !d.changed) {
                break d;
            }
            rounds += 1;
            prop_assert!(rounds <= 10, "no fixed point after 10 rounds: {d:?}");
        };
        let floors: u64 = w.vms.iter().map(|v| v.settings.minimum).sum();
        if floors > w.host().vm_limit().saturating_sub(other) {
            return Ok(());
        }
        let tol = u128::from(w.vms.iter().map(|v| (v.assigned / 100 * 2).max(8 * MIB)).max().unwrap_or(0) + 4 * MIB);
        for (i, (vi, di)) in w.vms.iter().zip(&d).enumerate() {
            // Short because the host is (not only by hysteresis or rounding).
            if u128::from(di.wanted.saturating_sub(di.target)) <= tol {
                continue;
            }
            for (j, (vj, dj)) in w.vms.iter().zip(&d).enumerate() {
                let (wi, wj) = (u128::from(vi.settings.weight), u128::from(vj.settings.weight));
                if i == j || wi < wj || wj == 0 {
                    continue;
                }
                let si = u128::from(di.target - vi.settings.minimum);
                let sj = u128::from(dj.target - vj.settings.minimum);
                prop_assert!(si + tol >= sj, "share {si} (w {wi}) < {sj} (w {wj}): {d:?}");
                prop_assert!(si * wj + tol * (wi + wj) >= sj * wi, "per weight: {d:?}");
            }
        }
    }
}
