//! `vireo bench memory`: dynamic memory with a real guest on a live host, and the balancer
//! policy's density over simulated fluctuating demand as a complement.
//!
//! (a) **Response**: a guest's memory demand rises in steps (tmpfs files written inside the
//! guest); for each step the time from the guest's report that shows the step (vireod gives
//! its age) to the VM having the memory the balancer decided, and from the start of the step
//! in the guest to that grant.
//! (b) **Density**: `memory`'s simulation (the same model as `cargo run -p memory --example
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
    /// Print JSON.
    #[arg(long)]
    json: bool,
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
            return Ok(());
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

/// Runs `vireo bench memory`.
pub async fn run(client: &Client, a: MemoryBenchArgs) -> anyhow::Result<()> {
    let steps = match &a.image {
        Some(img) => real_guest(client, img, &a).await?,
        None => Vec::new(),
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
    println!(
        "density (simulation, 60 traces x {rounds} s): static {} VMs, dynamic {} VMs ({} OOM-risk VM-seconds): ratio {:.2} (target >= 1.5)",
        res.sim_static_vms, res.sim_dynamic_vms, res.sim_dynamic_oom_risk_rounds, res.sim_density_ratio
    );
    Ok(())
}
