//! `vireo bench memory`: dynamic memory with a real guest on a live host, and the balancer
//! policy's density over simulated fluctuating demand as a complement.
//!
//! (a) **Response**: a guest's memory demand rises in steps (tmpfs files written inside the
//! guest); for each step the time from the guest's report that shows the step (vireod gives
//! its age) to the VM having the memory the balancer decided, and from the start of the step
//! in the guest to that grant.
//! (b) **Density** with real guests (`--density-vms N`): N VMs under a host budget, each in
//! turn growing a tmpfs load while the others idle; the VMs that ran without OOM versus how
//! many the budget holds with static allocation of the peak demand seen. And
//! `memory`'s simulation (the same model as `cargo run -p memory --example
//! memory-sim`): how many VMs run without OOM-risk under dynamic memory versus static
//! allocation of their peaks on a fixed host.

use super::output;
use anyhow::{bail, Context};
use api::units::{format_size, parse_size};
use api::{Client, CreateDisk, CreateVm, VmInfo, VmPatch};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
#[path = "../../../memory/tests/sim/mod.rs"]
mod sim;

const MIB: u64 = 1 << 20;

/// Options of `vireo bench memory`.
#[derive(clap::Args)]
pub struct MemoryBenchArgs {
    /// Bootable generation 1 image with vireo-guest (`cargo xtask guest-image --generation 1`);
    /// the guest writes only to a tmpfs. Without it only the simulation runs.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Demand steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Size of one demand step.
    #[arg(long, default_value = "48M", value_parser = parse_size)]
    step: u64,
    /// Real-guest density (with `--image`): run this many VMs (copies of the image) under
    /// `--density-budget`, each loading `--density-load` in turn; 0: skip.
    #[arg(long, default_value_t = 0)]
    density_vms: usize,
    /// Host memory budget for the density run (set with `host set --memory-budget` for the run,
    /// then restored).
    #[arg(long, default_value = "1000M", value_parser = parse_size)]
    density_budget: u64,
    /// Memory each guest's load takes at its peak (tmpfs, 8 MiB a second).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    density_load: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The real-guest density run.
#[derive(Debug, Serialize)]
pub struct DensityResult {
    /// Host budget, bytes.
    pub budget: u64,
    /// VMs run under dynamic memory.
    pub vms: usize,
    /// VMs that ran their load without OOM, reboot or data loss.
    pub vms_ok: usize,
    /// Largest demand a guest showed during its load, bytes.
    pub peak_demand: u64,
    /// Static allocation of the peak: peak demand plus the 32 MiB free floor, bytes.
    pub static_peak: u64,
    /// VMs that fit the budget with static allocation of their peaks.
    pub static_vms: usize,
    /// Most memory the VMs held together during the run (polled), bytes.
    pub max_held: u64,
    /// `vms_ok / static_vms`.
    pub ratio: f64,
}

/// One demand step.
#[derive(Debug, Serialize)]
pub struct StepResult {
    /// Guest demand before and after the step, bytes.
    pub demand_before: u64,
    /// Demand after.
    pub demand_after: u64,
    /// Memory granted (the decision's target), bytes.
    pub granted: u64,
    /// From the guest's report showing the step to the memory being there, ms.
    pub report_to_grant_ms: f64,
    /// From the start of the step in the guest to the memory being there, ms.
    pub step_to_grant_ms: f64,
}

/// The results.
#[derive(Debug, Serialize)]
pub struct MemoryBench {
    /// Real-guest demand steps.
    pub steps: Vec<StepResult>,
    /// Median report-to-grant, ms.
    pub report_to_grant_median_ms: Option<f64>,
    /// Median step-to-grant, ms.
    pub step_to_grant_median_ms: Option<f64>,
    /// Simulation: VMs under static allocation of their peaks.
    pub sim_static_vms: usize,
    /// Simulation: VMs under dynamic memory without OOM risk.
    pub sim_dynamic_vms: usize,
    /// Simulation: OOM-risk VM-seconds under dynamic memory.
    pub sim_dynamic_oom_risk_rounds: u64,
    /// Density ratio dynamic / static.
    pub sim_density_ratio: f64,
    /// Real-guest density (with `--image` and `--density-vms`).
    pub density: Option<DensityResult>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

async fn show(client: &Client, name: &str) -> anyhow::Result<VmInfo> {
    Ok(client.get(&format!("/v1/vms/{name}")).await?)
}

async fn exec(client: &Client, name: &str, script: &str) -> anyhow::Result<()> {
    exec_out(client, name, script).await.map(|_| ())
}

/// Runs a guest shell command (at most 60 s); returns its stdout.
async fn exec_out(client: &Client, name: &str, script: &str) -> anyhow::Result<String> {
    let started: api::ExecStarted = client
        .post(
            &format!("/v1/vms/{name}/exec"),
            &api::ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                env: vec![],
                stdin: None,
            },
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o: api::ExecOutput = client
            .get(&format!("/v1/vms/{name}/exec/{}", started.pid))
            .await?;
        if o.exited {
            if o.exit_code != Some(0) {
                bail!("guest command failed: {script}: {}", o.stderr.trim());
            }
            return Ok(o.stdout);
        }
        if Instant::now() > deadline {
            bail!("guest command did not finish in 60 s: {script}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait<F: Fn(&VmInfo) -> bool>(
    client: &Client,
    name: &str,
    secs: u64,
    what: &str,
    pred: F,
) -> anyhow::Result<VmInfo> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = show(client, name).await?;
        if pred(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {:?}", v.memory);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn real_guest(
    client: &Client,
    image: &std::path::Path,
    a: &MemoryBenchArgs,
) -> anyhow::Result<Vec<StepResult>> {
    let name = format!("bench-memory-{}", std::process::id());
    let path =
        std::fs::canonicalize(image).with_context(|| format!("opening {}", image.display()))?;
    let _: VmInfo = client
        .post(
            "/v1/vms",
            &CreateVm {
                name: name.clone(),
                generation: 1,
                memory: Some(256 * MIB),
                disks: vec![CreateDisk {
                    path,
                    bus: None,
                    read_only: false,
                }],
                ..Default::default()
            },
        )
        .await?;
    let r = async {
        let _: VmInfo = client
            .patch(
                &format!("/v1/vms/{name}"),
                &VmPatch {
                    dynamic_memory: Some(true),
                    memory_minimum: Some(128 * MIB),
                    memory_maximum: Some(1024 * MIB),
                    ..Default::default()
                },
            )
            .await?;
        let _: VmInfo = client.post(&format!("/v1/vms/{name}/start"), &()).await?;
        wait(client, &name, 600, "the guest's first memory report", |v| {
            v.memory.demand.is_some() && v.memory.demand_source.as_deref() == Some("agent")
        })
        .await?;
        exec(
            client,
            &name,
            "mkdir -p /mnt/load && mount -t tmpfs -o size=2G tmpfs /mnt/load",
        )
        .await?;
        // Settle: the VM at its idle target.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut out = Vec::new();
        for i in 0..a.steps {
            let before = show(client, &name).await?;
            let demand_before = before.memory.demand.unwrap_or(0);
            let t0 = Instant::now();
            exec(
                client,
                &name,
                &format!(
                    "dd if=/dev/zero of=/mnt/load/s{i} bs=1M count={} 2>/dev/null",
                    a.step / MIB
                ),
            )
            .await?;
            // The report showing the step (at least 3/4 of it).
            let seen = wait(client, &name, 30, "the demand step in a report", |v| {
                v.memory.demand.unwrap_or(0) >= demand_before + a.step * 3 / 4
            })
            .await?;
            let seen_at = Instant::now();
            let report_at = seen_at - Duration::from_millis(seen.memory.demand_age_ms.unwrap_or(0));
            let demand_after = seen.memory.demand.unwrap_or(0);
            // Granted: the VM has what the balancer decided for that demand.
            let want =
                (demand_after as f64 * (1.0 + before.memory.buffer_percent as f64 / 100.0)) as u64;
            let want = want.min(before.memory.maximum) - 8 * MIB;
            let got = wait(client, &name, 30, "the memory grant", |v| {
                v.memory.assigned >= want
            })
            .await?;
            let done = Instant::now();
            out.push(StepResult {
                demand_before,
                demand_after,
                granted: got.memory.assigned,
                report_to_grant_ms: done.duration_since(report_at).as_secs_f64() * 1e3,
                step_to_grant_ms: done.duration_since(t0).as_secs_f64() * 1e3,
            });
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let _ = client
        .post::<_, serde_json::Value>(&format!("/v1/vms/{name}/turn-off"), &())
        .await;
    let _ = client
        .delete::<serde_json::Value>(&format!("/v1/vms/{name}?keep_disks=true"))
        .await;
    r
}

/// Guest script: grows a tmpfs load by 8 MiB a second up to `$1` MiB (slower than a balancer
/// round, as a working set grows), holds it 5 s, checks every copy against the seed's MD5,
/// frees it and writes `good/total` to `/tmp/dload.done`.
const DENSITY_LOAD: &str = r#"dmesg -n 7; rm -f /tmp/dload.done; mkdir -p /mnt/dload
grep -q ' /mnt/dload ' /proc/mounts || mount -t tmpfs -o size=2G tmpfs /mnt/dload
[ -f /tmp/dseed ] || dd if=/dev/urandom of=/tmp/dseed bs=1M count=8 2>/dev/null
cat > /tmp/dload.sh <<'END'
n=$(($1/8)); i=0
while [ $i -lt $n ]; do cp /tmp/dseed /mnt/dload/f$i || break; i=$((i+1)); sleep 1; done
sleep 5
s=$(md5sum < /tmp/dseed | cut -d' ' -f1); good=0
for f in /mnt/dload/f*; do [ "$(md5sum < $f | cut -d' ' -f1)" = "$s" ] && good=$((good+1)); done
rm -f /mnt/dload/*; echo "$good/$n" > /tmp/dload.done
END
setsid sh /tmp/dload.sh "$0" </dev/null >/dev/null 2>&1 &"#;

/// Real-guest density: `--density-vms` VMs (256 MiB startup, 160 MiB minimum, 512 MiB
/// maximum) under `--density-budget`; each in turn runs the load above while the others idle.
/// A VM counts if its load's data is intact, its guest has no OOM in its kernel log and it did
/// not reboot. The static figure is how many VMs the budget holds when each gets the largest
/// demand seen plus the 32 MiB free floor.
async fn density(
    client: &Client,
    image: &std::path::Path,
    a: &MemoryBenchArgs,
) -> anyhow::Result<DensityResult> {
    let path =
        std::fs::canonicalize(image).with_context(|| format!("opening {}", image.display()))?;
    let old: api::memory::HostMemoryStatus = client.get("/v1/host/memory").await?;
    let names: Vec<String> = (0..a.density_vms)
        .map(|i| format!("bench-density-{}-{i}", std::process::id()))
        .collect();
    let mut disks = Vec::new();
    for n in &names {
        let d = path.with_file_name(format!("{n}.img"));
        std::fs::copy(&path, &d)
            .with_context(|| format!("copying the image to {}", d.display()))?;
        disks.push(d);
    }
    let r = async {
        let _: api::memory::HostMemoryStatus = client
            .patch(
                "/v1/host/memory",
                &api::memory::HostMemoryPatch {
                    reserve: None,
                    budget: Some(a.density_budget),
                },
            )
            .await?;
        for (n, d) in names.iter().zip(&disks) {
            let _: VmInfo = client
                .post(
                    "/v1/vms",
                    &CreateVm {
                        name: n.clone(),
                        generation: 1,
                        memory: Some(256 * MIB),
                        disks: vec![CreateDisk {
                            path: d.clone(),
                            bus: None,
                            read_only: false,
                        }],
                        ..Default::default()
                    },
                )
                .await?;
            let _: VmInfo = client
                .patch(
                    &format!("/v1/vms/{n}"),
                    &VmPatch {
                        dynamic_memory: Some(true),
                        memory_minimum: Some(160 * MIB),
                        memory_maximum: Some(512 * MIB),
                        ..Default::default()
                    },
                )
                .await?;
        }
        for n in &names {
            let _: VmInfo = client.post(&format!("/v1/vms/{n}/start"), &()).await?;
        }
        let mut max_held = 0u64;
        for n in &names {
            wait(client, n, 900, "the guest's first memory report", |v| {
                v.memory.demand_source.as_deref() == Some("agent")
            })
            .await?;
        }
        // Every guest is up from here on: a reboot shows as a shorter uptime.
        let booted = Instant::now();
        let mut peak = 0u64;
        let mut good = vec![false; names.len()];
        for (i, n) in names.iter().enumerate() {
            exec(
                client,
                n,
                &DENSITY_LOAD.replace("\"$0\"", &(a.density_load / MIB).to_string()),
            )
            .await?;
            let deadline = Instant::now() + Duration::from_secs(600);
            let done = loop {
                let st: api::memory::MemoryStatus = client.get("/v1/memory").await?;
                max_held = max_held.max(st.host.assigned);
                if let Some(v) = st.vms.iter().find(|v| &v.name == n) {
                    peak = peak.max(v.memory.demand.unwrap_or(0));
                }
                let d = exec_out(client, n, "cat /tmp/dload.done 2>/dev/null; true")
                    .await
                    .unwrap_or_default();
                if !d.trim().is_empty() {
                    break d.trim().to_string();
                }
                if Instant::now() > deadline {
                    break "timeout".into();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            let want = format!("{0}/{0}", a.density_load / MIB / 8);
            eprintln!("{n}: load {done} copies intact");
            good[i] = done == want;
        }
        // No OOM in any guest, and none rebooted (uptime covers the whole run).
        let run = booted.elapsed().as_secs();
        for (i, n) in names.iter().enumerate() {
            let o = exec_out(
                client,
                n,
                "dmesg | grep -ci 'out of memory' || true; cut -d. -f1 /proc/uptime",
            )
            .await
            .unwrap_or_default();
            let f: Vec<u64> = o
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            if f.len() != 2 || f[0] != 0 || f[1] + 2 < run {
                eprintln!("{n}: OOM or reboot (dmesg OOM lines, uptime s): {o:?}");
                good[i] = false;
            }
        }
        let ok = good.iter().filter(|&&g| g).count();
        let static_peak = (peak + ::memory::DEFAULT_MIN_FREE).div_ceil(2 * MIB) * 2 * MIB;
        let static_vms = (a.density_budget / static_peak.max(1)) as usize;
        Ok::<_, anyhow::Error>(DensityResult {
            budget: a.density_budget,
            vms: names.len(),
            vms_ok: ok,
            peak_demand: peak,
            static_peak,
            static_vms,
            max_held,
            ratio: ok as f64 / static_vms.max(1) as f64,
        })
    }
    .await;
    for n in &names {
        let _ = client
            .post::<_, serde_json::Value>(&format!("/v1/vms/{n}/turn-off"), &())
            .await;
        let _ = client
            .delete::<serde_json::Value>(&format!("/v1/vms/{n}?keep_disks=true"))
            .await;
    }
    for d in &disks {
        let _ = std::fs::remove_file(d);
    }
    let _: Result<api::memory::HostMemoryStatus, _> = client
        .patch(
            "/v1/host/memory",
            &api::memory::HostMemoryPatch {
                reserve: None,
                budget: Some(old.budget.unwrap_or(0)),
            },
        )
        .await;
    r
}

/// Runs `vireo bench memory`.
pub async fn run(client: &Client, a: MemoryBenchArgs) -> anyhow::Result<()> {
    let density = match &a.image {
        Some(img) if a.density_vms > 0 => Some(density(client, img, &a).await?),
        _ => None,
    };
    let steps = match &a.image {
        Some(img) if a.steps > 0 => real_guest(client, img, &a).await?,
        _ => Vec::new(),
    };
    let rounds = 3600;
    let traces: Vec<Vec<u64>> = (0..60).map(|s| sim::trace(s, rounds)).collect();
    let static_n = sim::static_capacity(&traces);
    let (best, _) = sim::dynamic_capacity(&traces);
    let res = MemoryBench {
        report_to_grant_median_ms: median(steps.iter().map(|s| s.report_to_grant_ms).collect()),
        step_to_grant_median_ms: median(steps.iter().map(|s| s.step_to_grant_ms).collect()),
        steps,
        sim_static_vms: static_n,
        sim_dynamic_vms: best.vms,
        sim_dynamic_oom_risk_rounds: best.oom_risk_rounds,
        sim_density_ratio: best.vms as f64 / static_n.max(1) as f64,
        density,
    };
    if a.json {
        return output::json(&res);
    }
    if !res.steps.is_empty() {
        let rows: Vec<Vec<String>> = res
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                vec![
                    i.to_string(),
                    format_size(s.demand_before),
                    format_size(s.demand_after),
                    format_size(s.granted),
                    format!("{:.0}", s.report_to_grant_ms),
                    format!("{:.0}", s.step_to_grant_ms),
                ]
            })
            .collect();
        output::table(
            &[
                "STEP",
                "DEMAND BEFORE",
                "DEMAND AFTER",
                "GRANTED",
                "REPORT->GRANT ms",
                "STEP->GRANT ms",
            ],
            &rows,
        );
        println!(
            "median report->grant {:.0} ms (target < 2000), step->grant {:.0} ms",
            res.report_to_grant_median_ms.unwrap_or(0.0),
            res.step_to_grant_median_ms.unwrap_or(0.0)
        );
    }
    if let Some(d) = &res.density {
        println!(
            "density (real guests, budget {} MiB): dynamic {} of {} VMs ran their {} load without OOM (most held together {} MiB); static allocation of the peak ({} demand + 32 MiB = {}) fits {} VMs: ratio {:.2} (target >= 1.5)",
            d.budget / MIB,
            d.vms_ok,
            d.vms,
            format_size(a.density_load),
            d.max_held / MIB,
            format_size(d.peak_demand),
            format_size(d.static_peak),
            d.static_vms,
            d.ratio
        );
    }
    println!(
        "density (simulation, 60 traces x {rounds} s): static {} VMs, dynamic {} VMs ({} OOM-risk VM-seconds): ratio {:.2} (target >= 1.5)",
        res.sim_static_vms, res.sim_dynamic_vms, res.sim_dynamic_oom_risk_rounds, res.sim_density_ratio
    );
    Ok(())
}
