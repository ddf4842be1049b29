//! `cargo run -p memory --release --example memory-sim`: runs the balancer over simulated
//! fluctuating demand and prints how many VMs fit under dynamic memory versus static
//! allocation of each VM's peak. A simulation of the policy, not a measurement of guests.

#[path = "../tests/sim/mod.rs"]
mod sim;

const MIB: u64 = 1 << 20;

fn main() {
    let rounds = 3600;
    let traces: Vec<Vec<u64>> = (0..60).map(|s| sim::trace(s, rounds)).collect();
    let static_n = sim::static_capacity(&traces);
    let (best, bad) = sim::dynamic_capacity(&traces);
    let w = sim::sim_world();
    println!(
        "host {} MiB, reserve {} MiB, other {} MiB; VMs: startup 1024 MiB, min 256, max 4096, buffer 20 %, {rounds} rounds of 1 s",
        w.total / MIB,
        w.reserve / MIB,
        w.other / MIB
    );
    println!(
        "{:<24} {:>4} {:>16} {:>14} {:>20}",
        "policy", "VMs", "OOM-risk rounds", "peak held MiB", "min headroom MiB"
    );
    let peaks: u64 = traces[..static_n]
        .iter()
        .map(|t| t.iter().copied().max().unwrap_or(0))
        .sum();
    println!(
        "{:<24} {:>4} {:>16} {:>14} {:>20}",
        "static (peak each)",
        static_n,
        0,
        peaks / MIB,
        (w.total - w.reserve - w.other - peaks) / MIB
    );
    let row = |name: &str, s: &sim::RunStats| {
        println!(
            "{:<24} {:>4} {:>16} {:>14} {:>20}{}",
            name,
            s.vms,
            s.oom_risk_rounds,
            s.peak_held / MIB,
            s.min_headroom / MIB as i64,
            if s.admitted {
                ""
            } else {
                "  (admission refused)"
            }
        );
    };
    row("dynamic", &best);
    if let Some(b) = &bad {
        row("dynamic, one VM more", b);
    }
    println!(
        "density ratio dynamic/static: {:.2}",
        best.vms as f64 / static_n as f64
    );
    println!(
        "demand step -> granted: {} round(s) with free host memory, {} when idle VMs must give back first",
        sim::step_response(false),
        sim::step_response(true)
    );
}
