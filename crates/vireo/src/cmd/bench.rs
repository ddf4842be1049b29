//! `vireo bench ...`: measurements run against a live host, reported with median and spread
//! because the machines are shared and noisy.

use super::output;
use anyhow::{bail, Context};
use api::units::format_size;
use api::*;
use clap::Subcommand;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Boot latency of generation 1 and 2 guests, Vireo's own overhead, and memory use.
    Boot {
        /// Bootable generation 1 image (e.g. from `cargo xtask guest-image --generation 1`).
        #[arg(long)]
        image1: Option<PathBuf>,
        /// Bootable generation 2 image.
        #[arg(long)]
        image2: Option<PathBuf>,
        /// Starts per generation.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Switch dataplane vs the Linux bridge: frames/s, Gbit/s, latency (root).
    Switch(super::bench_switch::SwitchBenchArgs),
    /// Dynamic memory: guest demand step to grant time, and density (simulation).
    Memory(super::bench_memory::MemoryBenchArgs),
    /// Shared-nothing live migration vs libvirt (`virsh migrate --live --copy-storage-all`).
    Migration(super::bench_migration::MigrationBenchArgs),
    /// Replica cycle (track, cut, apply) vs rsync and a full copy of the same delta.
    Replica(super::replica_bench::ReplicaBenchArgs),
}

/// Median and spread of a series, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Option<Stat> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    fn show(s: &Option<Stat>) -> String {
        match s {
            Some(s) => format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max),
            None => "-".into(),
        }
    }
}

/// Results for one generation.
#[derive(Debug, Serialize)]
pub struct GenerationResult {
    /// 1 or 2.
    pub generation: u8,
    /// Runs.
    pub runs: usize,
    /// API call received → QEMU exec (Vireo's overhead), ms.
    pub api_to_qemu_exec_ms: Option<Stat>,
    /// `vireo vm start` → QEMU running the guest, ms.
    pub start_to_running_ms: Option<Stat>,
    /// `vireo vm start` → first heartbeat, ms.
    pub start_to_heartbeat_ms: Option<Stat>,
    /// vireo-worker resident set (QEMU excluded), bytes, largest seen.
    pub worker_rss_max: u64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct BootReport {
    /// Accelerator used.
    pub accel: String,
    /// Per generation.
    pub generations: Vec<GenerationResult>,
    /// vireod RSS with no VMs of ours defined, bytes.
    pub vireod_rss_idle: u64,
    /// vireod RSS with 10 more VMs defined, bytes.
    pub vireod_rss_10_defined: u64,
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|k| k * 1024)
        .unwrap_or(0)
}

/// Runs a benchmark.
pub async fn run(client: &Client, cmd: BenchCommand) -> anyhow::Result<()> {
    let (image1, image2, runs, json) = match cmd {
        BenchCommand::Switch(a) => return super::bench_switch::run(a),
        BenchCommand::Memory(a) => return super::bench_memory::run(client, a).await,
        BenchCommand::Migration(a) => return super::bench_migration::run(a),
        BenchCommand::Replica(a) => return super::replica_bench::run(a),
        BenchCommand::Boot {
            image1,
            image2,
            runs,
            json,
        } => (image1, image2, runs, json),
    };
    if image1.is_none() && image2.is_none() {
        bail!("give --image1 and/or --image2 (bootable test guests: `cargo xtask guest-image --generation N --out FILE`)");
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let host: HostInfo = client.get("/v1/host").await?;
    let rss_idle = host.daemon_rss;
    let mut defined = Vec::new();
    for i in 0..10 {
        let name = format!("bench-defined-{i}-{}", std::process::id());
        let req = CreateVm {
            name: name.clone(),
            generation: 1,
            ..Default::default()
        };
        let _: VmInfo = client.post("/v1/vms", &req).await.context("defining VMs")?;
        defined.push(name);
    }
    let rss_10: HostInfo = client.get("/v1/host").await?;
    for name in &defined {
        let _: serde_json::Value = client
            .delete(&format!("/v1/vms/{name}?keep_disks=true"))
            .await?;
    }
    let mut results = Vec::new();
    for (generation, image) in [(1u8, image1), (2u8, image2)] {
        let Some(image) = image else { continue };
        let image =
            std::fs::canonicalize(&image).with_context(|| format!("image {}", image.display()))?;
        results.push(bench_generation(client, generation, image, runs).await?);
    }
    let report = BootReport {
        accel: super::host::accel_name(host.accel).to_string(),
        generations: results,
        vireod_rss_idle: rss_idle,
        vireod_rss_10_defined: rss_10.daemon_rss,
    };
    if json {
        return output::json(&report);
    }
    println!(
        "boot benchmark, accelerator {}, median (min-max) in ms:",
        report.accel
    );
    let rows: Vec<Vec<String>> = report
        .generations
        .iter()
        .map(|g| {
            vec![
                g.generation.to_string(),
                g.runs.to_string(),
                Stat::show(&g.api_to_qemu_exec_ms),
                Stat::show(&g.start_to_running_ms),
                Stat::show(&g.start_to_heartbeat_ms),
                format_size(g.worker_rss_max),
            ]
        })
        .collect();
    output::table(
        &[
            "GEN",
            "RUNS",
            "API->QEMU EXEC",
            "START->RUNNING",
            "START->HEARTBEAT",
            "WORKER RSS",
        ],
        &rows,
    );
    println!(
        "vireod RSS: {} idle, {} with 10 more VMs defined",
        format_size(report.vireod_rss_idle),
        format_size(report.vireod_rss_10_defined)
    );
    Ok(())
}

async fn bench_generation(
    client: &Client,
    generation: u8,
    image: PathBuf,
    runs: usize,
) -> anyhow::Result<GenerationResult> {
    let name = format!("bench-gen{generation}-{}", std::process::id());
    let req = CreateVm {
        name: name.clone(),
        generation,
        // OVMF needs room to decompress the kernel: 512 MiB for generation 2.
        memory: Some(if generation == 1 {
            256 << 20
        } else {
            512 << 20
        }),
        disks: vec![CreateDisk {
            path: image,
            bus: None,
            read_only: false,
        }],
        secure_boot: Some(generation == 2),
        secure_boot_template: Some(SecureBootTemplate::MicrosoftUefiCa),
        ..Default::default()
    };
    let _: VmInfo = client
        .post("/v1/vms", &req)
        .await
        .context("defining the benchmark VM")?;
    let path = format!("/v1/vms/{name}");
    let mut exec = Vec::new();
    let mut running = Vec::new();
    let mut heartbeat = Vec::new();
    let mut worker_rss = 0;
    let result = async {
        for _ in 0..runs {
            let t0 = Instant::now();
            let _: VmInfo = client.post(&format!("{path}/start"), &()).await?;
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                let v: VmInfo = client.get(&path).await?;
                if let Some(t) = v.last_start {
                    if let Some(hb) = t.api_to_first_heartbeat_ms {
                        exec.extend(t.api_to_qemu_exec_ms);
                        running.push(t.api_to_running_ms);
                        heartbeat.push(hb);
                        if let Some(pid) = v.worker.as_ref().and_then(|w| w.pid) {
                            worker_rss = worker_rss.max(rss_of(pid));
                        }
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("generation {generation} guest gave no heartbeat within 180 s (started {:?} ago)", t0.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _: VmInfo = client.post(&format!("{path}/turn-off"), &()).await?;
        }
        Ok(())
    }
    .await;
    let _: Result<VmInfo, _> = client.post(&format!("{path}/turn-off"), &()).await;
    let _: serde_json::Value = client.delete(&format!("{path}?keep_disks=true")).await?;
    result?;
    Ok(GenerationResult {
        generation,
        runs,
        api_to_qemu_exec_ms: Stat::of(exec),
        start_to_running_ms: Stat::of(running),
        start_to_heartbeat_ms: Stat::of(heartbeat),
        worker_rss_max: worker_rss,
    })
}
