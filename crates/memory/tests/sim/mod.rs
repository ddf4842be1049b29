//! A discrete-time host model for the balancer (shared by the tests and the `memory-sim`
//! example): one round is one second; guests' demand changes, the balancer runs, targets are
//! applied at once (balloon and virtio-mem act within a second on a real guest), unless a
//! VM's [`Guest`] model says it moves slowly or cannot give memory back.
#![allow(dead_code)]

use memory::{admit, balance, Decision, HostMemory, MemorySettings, VmDemand, GIB, MIB};

/// A host with VMs.
pub struct World {
    /// Host memory.
    pub total: u64,
    /// Host reserve.
    pub reserve: u64,
    /// Host memory used outside VMs (kernel, daemons, QEMU overhead).
    pub other: u64,
    /// The VMs.
    pub vms: Vec<VmDemand>,
    /// Clock, milliseconds.
    pub now_ms: u64,
    /// How each VM's guest follows its target (same order as `vms`).
    pub guests: Vec<Guest>,
}

/// How a guest follows its target.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// At most this many bytes move per round (growth and shrink alike).
    pub step: u64,
    /// The guest never gives memory back below this (it needs it: balloon inflation fails).
    pub keeps: u64,
}

impl Default for Guest {
    fn default() -> Self {
        Guest {
            step: u64::MAX,
            keeps: 0,
        }
    }
}

impl World {
    /// An empty host.
    pub fn new(total: u64, reserve: u64, other: u64) -> World {
        World {
            total,
            reserve,
            other,
            vms: Vec::new(),
            now_ms: 1_000_000,
            guests: Vec::new(),
        }
    }

    /// Adds a VM holding `assigned` with a fresh report of `demand`.
    pub fn add(&mut self, settings: MemorySettings, assigned: u64, demand: u64) -> usize {
        self.vms.push(VmDemand {
            id: format!("vm{}", self.vms.len()),
            settings,
            assigned,
            requested: None,
            demand,
            reported_at: Some(self.now_ms),
        });
        self.guests.push(Guest::default());
        self.vms.len() - 1
    }

    /// Sum of the VMs' assigned memory.
    pub fn held(&self) -> u64 {
        self.vms.iter().map(|v| v.assigned).sum()
    }

    /// Sum of the VMs' commitments (held, or requested when growth is in flight).
    pub fn committed(&self) -> u64 {
        self.vms.iter().map(|v| v.committed()).sum()
    }

    /// What VMs may hold at most without crossing the reserve: `total - reserve - other`.
    pub fn limit(&self) -> u64 {
        self.total.saturating_sub(self.reserve + self.other)
    }

    /// What the host reports.
    pub fn host(&self) -> HostMemory {
        HostMemory {
            total: self.total,
            free_for_vms: self.total.saturating_sub(self.other + self.held()),
            reserve: self.reserve,
        }
    }

    /// The guest of VM `i` reports `demand` now.
    pub fn report(&mut self, i: usize, demand: u64) {
        self.vms[i].demand = demand;
        self.vms[i].reported_at = Some(self.now_ms);
    }

    /// Every guest reports its current demand again (except those in `silent`).
    pub fn report_all_except(&mut self, silent: &[usize]) {
        for (i, v) in self.vms.iter_mut().enumerate() {
            if !silent.contains(&i) {
                v.reported_at = Some(self.now_ms);
            }
        }
    }

    /// One balancer round: decide, apply the targets that changed (as vireod does; the
    /// guests follow their last request as their [`Guest`] model allows), advance the clock by
    /// a second.
    pub fn round(&mut self) -> Vec<Decision> {
        let d = balance(&self.vms, &self.host(), self.now_ms);
        for ((v, d), g) in self.vms.iter_mut().zip(&d).zip(&self.guests) {
            if d.changed {
                v.requested = Some(d.target);
            }
            let goal = v.requested.unwrap_or(v.assigned);
            v.assigned = if goal >= v.assigned {
                v.assigned.saturating_add(g.step).min(goal)
            } else {
                let goal = goal.max(g.keeps).min(v.assigned);
                v.assigned.saturating_sub(g.step).max(goal)
            };
        }
        self.now_ms += 1000;
        d
    }
}

/// A small deterministic generator (xorshift64*), so runs are reproducible without a crate.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        lo + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (hi - lo)
    }
}

/// A demand trace of `rounds` seconds: an idle baseline (256..768 MiB) with bursts every 1 to
/// 4 minutes that climb by 10 % a second to a peak (1.5..3 GiB), hold it for 20..80 s and fall
/// back by 20 % a second.
pub fn trace(seed: u64, rounds: usize) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    let base = rng.range(256, 768) * MIB;
    let mut out = Vec::with_capacity(rounds);
    let mut next_burst = rng.range(10, 240) as usize;
    let mut d = base;
    while out.len() < rounds {
        if out.len() < next_burst {
            d = (d * 8 / 10).max(base);
            out.push(d);
            continue;
        }
        let peak = rng.range(1536, 3072) * MIB;
        while d < peak && out.len() < rounds {
            d = (d + d / 10).min(peak);
            out.push(d);
        }
        for _ in 0..rng.range(20, 80) {
            if out.len() == rounds {
                break;
            }
            out.push(d);
        }
        next_burst = out.len() + rng.range(60, 240) as usize;
    }
    out
}

/// Settings of every simulated VM: boots with 1 GiB, may shrink to 256 MiB and grow to 4 GiB.
pub fn sim_settings() -> MemorySettings {
    MemorySettings::dynamic(GIB, 256 * MIB, 4 * GIB)
}

/// The simulated host: 32 GiB, 2 GiB reserve, 1 GiB used outside VMs.
pub fn sim_world() -> World {
    World::new(32 * GIB, 2 * GIB, GIB)
}

/// Outcome of running `n` VMs for the whole trace length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// VMs run.
    pub vms: usize,
    /// VM-rounds in which a guest needed more than it had (a guest OOM risk).
    pub oom_risk_rounds: u64,
    /// Rounds in which some target was outside its VM's [minimum, maximum].
    pub out_of_bounds: u64,
    /// Most memory all VMs held at once.
    pub peak_held: u64,
    /// Least headroom above the reserve the host ever had (negative: reserve crossed).
    pub min_headroom: i64,
    /// Whether admission control accepted all `n` VMs.
    pub admitted: bool,
}

/// Runs `traces[..n]` under dynamic memory.
pub fn run_dynamic(traces: &[Vec<u64>], n: usize) -> RunStats {
    let mut w = sim_world();
    let mut admitted = true;
    for t in &traces[..n] {
        let running: Vec<MemorySettings> = w.vms.iter().map(|v| v.settings).collect();
        admitted &= admit(&sim_settings(), &running, &w.host()).is_ok();
        let start = (t[0] + t[0] / 5).next_multiple_of(2 * MIB).max(256 * MIB);
        w.add(sim_settings(), start, t[0]);
    }
    let rounds = traces[0].len();
    let mut s = RunStats {
        vms: n,
        oom_risk_rounds: 0,
        out_of_bounds: 0,
        peak_held: 0,
        min_headroom: i64::MAX,
        admitted,
    };
    for r in 0..rounds {
        for (i, t) in traces[..n].iter().enumerate() {
            w.report(i, t[r]);
            if t[r] > w.vms[i].assigned {
                s.oom_risk_rounds += 1;
            }
        }
        let d = w.round();
        if w.vms
            .iter()
            .zip(&d)
            .any(|(v, d)| d.target < v.settings.minimum || d.target > v.settings.maximum)
        {
            s.out_of_bounds += 1;
        }
        s.peak_held = s.peak_held.max(w.held());
        let headroom = (w.total - w.reserve - w.other) as i64 - w.held() as i64;
        s.min_headroom = s.min_headroom.min(headroom);
    }
    s
}

/// How many VMs fit with each statically given its peak demand (in trace order).
pub fn static_capacity(traces: &[Vec<u64>]) -> usize {
    let w = sim_world();
    let mut left = w.total - w.reserve - w.other;
    let mut n = 0;
    for t in traces {
        let peak = t
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .next_multiple_of(2 * MIB);
        if peak > left {
            break;
        }
        left -= peak;
        n += 1;
    }
    n
}

/// The largest VM count that runs the whole trace under dynamic memory with no OOM-risk round,
/// no bound violated, the reserve never crossed and every VM admitted, with its stats.
pub fn dynamic_capacity(traces: &[Vec<u64>]) -> (RunStats, Option<RunStats>) {
    let mut best = run_dynamic(traces, 1);
    for n in 2..=traces.len() {
        let s = run_dynamic(traces, n);
        let ok =
            s.oom_risk_rounds == 0 && s.out_of_bounds == 0 && s.min_headroom >= 0 && s.admitted;
        if !ok {
            return (best, Some(s));
        }
        best = s;
    }
    (best, None)
}

/// Seconds from a guest's demand step (its report) until it holds the demand plus half the
/// buffer, on a host where `idle` other VMs first have to give memory back when `crowded`.
pub fn step_response(crowded: bool) -> u64 {
    let mut w = if crowded {
        World::new(16 * GIB, 2 * GIB, GIB)
    } else {
        World::new(32 * GIB, 2 * GIB, GIB)
    };
    // Idle VMs holding more than they need (their demand just dropped).
    for _ in 0..4 {
        w.add(sim_settings(), 3 * GIB, 300 * MIB);
    }
    let vm = w.add(sim_settings(), 600 * MIB, 500 * MIB);
    for _ in 0..3 {
        // Settle, but keep the idle VMs at 3 GiB as if their load just stopped.
        w.report_all_except(&[]);
    }
    w.report(vm, 2560 * MIB);
    for s in 1..=30 {
        w.report_all_except(&[]);
        w.round();
        if w.vms[vm].assigned >= 2560 * MIB + 2560 * MIB / 10 {
            return s;
        }
    }
    u64::MAX
}
