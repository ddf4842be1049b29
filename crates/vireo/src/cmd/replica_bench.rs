//! `vireo bench replica`: the data path of one replication cycle (change tracking, cut,
//! LZ4 cycle file, atomic apply into a recovery point) for a given delta, side by side in
//! the same run with two anchors that ship the same delta without change tracking:
//! `rsync --inplace --no-whole-file` of the raw image (delta transfer by rolling checksums)
//! and a full copy of the image with `qemu-img convert`. Local files only: the network
//! (mutual TLS) is not part of the figures, for Vireo nor for the anchors.

use anyhow::{bail, Context};
use clap::Args;
use nbd::Export;
use replica::ReplicaStore;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use storage::tracking::{self, ChangeTracker, TrackedDisk};

/// `vireo bench replica` options.
#[derive(Args)]
pub struct ReplicaBenchArgs {
    /// Disk size (MiB).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Changed data per cycle (MiB), written as 64 KiB blocks at random places.
    #[arg(long, default_value_t = 64)]
    delta_mib: u64,
    /// Cycles measured.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory (needs about 4x the disk size).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Measure the achieved RPO instead: a steady writer at --write-mib-s on a tracked
    /// disk of --size-mib while cycles run at each of --intervals for --rpo-secs; prints
    /// p50/p99/max lag (time since the cut of the newest applied point, sampled every
    /// 100 ms).
    #[arg(long)]
    rpo: bool,
    /// RPO: seconds measured per interval.
    #[arg(long, default_value_t = 60)]
    rpo_secs: u64,
    /// RPO: guest write load, MiB/s (64 KiB random writes, incompressible).
    #[arg(long, default_value_t = 10)]
    write_mib_s: u64,
    /// RPO: intervals measured (continuous, 30s, 5m, 15m).
    #[arg(long, default_value = "continuous,30s", value_delimiter = ',')]
    intervals: Vec<String>,
}

/// Scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic incompressible bytes (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (install it: scripts/setup.sh)"))?;
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(a: ReplicaBenchArgs) -> anyhow::Result<()> {
    const BLOCK: u64 = 64 << 10;
    if a.runs == 0 || a.size_mib == 0 || a.delta_mib == 0 || a.delta_mib > a.size_mib {
        bail!("--runs, --size-mib and --delta-mib must be positive, the delta at most the size");
    }
    let size = a.size_mib << 20;
    if a.rpo {
        return rpo(&a, size);
    }
    let scratch = Scratch(
        a.dir
            .join(format!("vireo-bench-replica-{}", std::process::id())),
    );
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("scratch directory {}", scratch.0.display()))?;
    let d = scratch.0.as_path();
    let (prim_vhdx, base_copy) = (d.join("primary.vhdx"), d.join("replica-base.vhdx"));
    let (prim_raw, repl_raw) = (d.join("primary.raw"), d.join("replica.raw"));
    eprintln!("filling a {} MiB disk with random data...", a.size_mib);
    vhdx::Vhdx::create(
        &prim_vhdx,
        &vhdx::CreateOptions {
            size,
            block_size: 1 << 20,
            ..Default::default()
        },
    )?
    .close()?;
    let chain = Arc::new(storage::DiskChain::open(&prim_vhdx, false)?);
    let raw = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&prim_raw)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < size {
        let n = buf.len().min((size - off) as usize);
        rng.fill(&mut buf[..n]);
        chain.write_at(&buf[..n], off, false)?;
        std::os::unix::fs::FileExt::write_all_at(&raw, &buf[..n], off)?;
        off += n as u64;
    }
    chain.flush()?;
    raw.sync_all()?;
    chain.close()?;
    drop(chain);
    std::fs::copy(&prim_vhdx, &base_copy)?;
    std::fs::copy(&prim_raw, &repl_raw)?;
    let chain = Arc::new(storage::DiskChain::open(&prim_vhdx, false)?);
    let (t, _) = ChangeTracker::open(&d.join("disk0.cbt"), size)?;
    tracking::attach(&chain, t.clone())?;
    let disks = vec![TrackedDisk {
        chain: chain.clone(),
        tracker: t,
    }];
    let mut store = ReplicaStore::create_over(
        &d.join("store"),
        "bench",
        std::slice::from_ref(&base_copy),
        &[size],
        4,
    )?;
    let blocks = (a.delta_mib << 20) / BLOCK;
    let mut block = vec![0u8; BLOCK as usize];
    let (mut v_ms, mut r_ms, mut q_ms) = (Vec::new(), Vec::new(), Vec::new());
    // Apply alone (the replica's side): MiB of changed data per second.
    let mut apply_mib_s = Vec::new();
    let (mut v_bytes, mut r_bytes, mut changed) = (0u64, 0u64, 0u64);
    println!(
        "run  changed_MiB  vireo_ms  vireo_wire_B  wire/changed  rsync_ms  rsync_sent_B  full_copy_ms"
    );
    for run in 1..=a.runs {
        // The same writes go to the tracked VHDX (Vireo) and to the raw image (anchors).
        let mut grains = std::collections::BTreeSet::new();
        for _ in 0..blocks {
            let g = rng.next() % (size / BLOCK);
            grains.insert(g);
            rng.fill(&mut block);
            chain.write_at(&block, g * BLOCK, false)?;
            std::os::unix::fs::FileExt::write_all_at(&raw, &block, g * BLOCK)?;
        }
        chain.flush()?;
        raw.sync_all()?;
        let delta = grains.len() as u64 * BLOCK;
        let cyc = d.join("c.cycle");
        let t0 = Instant::now();
        let cut = replica::cut_to_file(&disks, "bench", run as u64, u64::MAX, &cyc)?;
        let f = std::fs::File::open(&cyc)?;
        let ta = Instant::now();
        let p = store.apply(std::io::BufReader::new(f))?;
        apply_mib_s.push(cut.plain_bytes as f64 / (1 << 20) as f64 / ta.elapsed().as_secs_f64());
        replica::primary::commit(&disks, run as u64)?;
        let vms = t0.elapsed().as_secs_f64() * 1000.0;
        if p.seq != run as u64 {
            bail!("applied point {} for cycle {run}", p.seq);
        }
        let _ = std::fs::remove_file(&cyc);

        let t0 = Instant::now();
        let out = run_tool(
            Command::new("rsync")
                .args(["--inplace", "--no-whole-file", "--stats"])
                .arg(&prim_raw)
                .arg(&repl_raw),
        )?;
        let rms = t0.elapsed().as_secs_f64() * 1000.0;
        let sent: u64 = out
            .lines()
            .find(|l| l.starts_with("Total bytes sent:"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().replace(',', ""))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);

        let full = d.join("full.raw");
        let t0 = Instant::now();
        run_tool(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&prim_raw)
                .arg(&full),
        )?;
        let _ = run_tool(Command::new("sync").arg("-f").arg(&full));
        let qms = t0.elapsed().as_secs_f64() * 1000.0;
        let _ = std::fs::remove_file(&full);

        println!(
            "{run:>3}  {:>11.1}  {vms:>8.0}  {:>12}  {:>12.3}  {rms:>8.0}  {sent:>12}  {qms:>12.0}",
            delta as f64 / (1 << 20) as f64,
            cut.bytes,
            cut.bytes as f64 / delta as f64,
        );
        v_ms.push(vms);
        r_ms.push(rms);
        q_ms.push(qms);
        v_bytes += cut.bytes;
        r_bytes += sent;
        changed += delta;
    }
    // The last point must equal the primary: read it back and compare with the raw image.
    let leaf = store
        .point_paths(store.latest().seq)
        .and_then(|v| v.into_iter().next())
        .context("latest point")?;
    let check = d.join("check.raw");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(&leaf)
            .arg(&check),
    )
    .or_else(|_| {
        run_tool(
            Command::new(std::env::current_exe()?)
                .args(["disk", "convert"])
                .arg(&leaf)
                .arg(&check)
                .args(["--format", "raw"]),
        )
    })?;
    let same = files_equal(&check, &prim_raw)?;
    let (vm, rm, qm) = (median(v_ms), median(r_ms), median(q_ms));
    println!(
        "apply on the replica (read + check + decompress + write the new point, fsync, rename): median {:.0} MiB/s of changed data",
        median(apply_mib_s)
    );
    println!(
        "median: vireo {vm:.0} ms, rsync {rm:.0} ms ({:.1}x vireo), full copy {qm:.0} ms ({:.1}x vireo); wire/changed: vireo {:.3}, rsync {:.3}; latest point == primary: {same}",
        rm / vm,
        qm / vm,
        v_bytes as f64 / changed as f64,
        r_bytes as f64 / changed as f64,
    );
    if !same {
        bail!("the latest recovery point differs from the primary's disk");
    }
    Ok(())
}

fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let (mut x, mut y) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut bx, mut by) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = x.read(&mut bx)?;
        if n == 0 {
            return Ok(y.read(&mut by)? == 0);
        }
        y.read_exact(&mut by[..n])?;
        if bx[..n] != by[..n] {
            return Ok(false);
        }
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The achieved RPO under a steady write load: for each interval, a writer thread writes
/// `--write-mib-s` of random 64 KiB blocks to a tracked, served VHDX; the replication loop
/// runs the daemon's schedule (continuous: a cycle at most every second when data
/// changed; otherwise every interval) through the real cut, cycle file, atomic apply and
/// commit; a sampler records the lag every 100 ms. Local files: the network is not in it.
fn rpo(a: &ReplicaBenchArgs, size: u64) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;
    const BLOCK: u64 = 64 << 10;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    println!(
        "interval  secs  write_MiB/s  cycles  cycle_ms_p50  cycle_ms_max  lag_s_p50  lag_s_p99  lag_s_max  MiB/cycle_p50"
    );
    for name in &a.intervals {
        let interval = api::replica::parse_interval(name).map_err(anyhow::Error::msg)?;
        let scratch = Scratch(
            a.dir
                .join(format!("vireo-bench-rpo-{}-{name}", std::process::id())),
        );
        std::fs::create_dir_all(&scratch.0)?;
        let d = scratch.0.as_path();
        let p = d.join("primary.vhdx");
        vhdx::Vhdx::create(
            &p,
            &vhdx::CreateOptions {
                size,
                block_size: 1 << 20,
                ..Default::default()
            },
        )?
        .close()?;
        let chain = Arc::new(storage::DiskChain::open(&p, false)?);
        let (t, _) = ChangeTracker::open(&d.join("disk0.cbt"), size)?;
        tracking::attach(&chain, t.clone())?;
        let disks = vec![TrackedDisk {
            chain: chain.clone(),
            tracker: t,
        }];
        // Both sides start equal (an empty disk, an empty base).
        let mut store = ReplicaStore::create(&d.join("store"), "bench", &[size], 4)?;
        let stop = Arc::new(AtomicBool::new(false));
        let last_cut = Arc::new(AtomicU64::new(now_ms()));
        let writer = {
            let (chain, stop, rate) = (chain.clone(), stop.clone(), a.write_mib_s);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut rng = Rng(0xA076_1D64_78BD_642F);
                let mut block = vec![0u8; BLOCK as usize];
                let per_sec = (rate << 20) / BLOCK;
                let t0 = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = t0 + Duration::from_secs_f64(n as f64 / per_sec.max(1) as f64);
                    if let Some(w) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(w);
                    }
                    rng.fill(&mut block);
                    chain.write_at(&block, (rng.next() % (size / BLOCK)) * BLOCK, false)?;
                    n += 1;
                }
                Ok(())
            })
        };
        let sampler = {
            let (stop, last_cut) = (stop.clone(), last_cut.clone());
            std::thread::spawn(move || {
                let mut lags = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let l = now_ms().saturating_sub(last_cut.load(Ordering::Relaxed));
                    lags.push(l as f64 / 1000.0);
                }
                lags
            })
        };
        let period = if interval == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(interval)
        };
        let (mut cycle_ms, mut mib) = (Vec::new(), Vec::new());
        let t_end = Instant::now() + Duration::from_secs(a.rpo_secs);
        let cyc = d.join("c.cycle");
        let mut seq = 0;
        let mut next = Instant::now() + period;
        let res = (|| -> anyhow::Result<()> {
            while Instant::now() < t_end {
                if let Some(w) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
                next = Instant::now() + period;
                if tracking::dirty_total(&disks) == 0 {
                    continue;
                }
                let t0 = Instant::now();
                seq += 1;
                let cut = replica::cut_to_file(&disks, "bench", seq, u64::MAX, &cyc)?;
                let f = std::fs::File::open(&cyc)?;
                store.apply(std::io::BufReader::new(f))?;
                replica::primary::commit(&disks, seq)?;
                last_cut.store(cut.cut_unix_ms, Ordering::Relaxed);
                cycle_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                mib.push(cut.plain_bytes as f64 / (1 << 20) as f64);
                let _ = std::fs::remove_file(&cyc);
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let wres = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        let lags = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        res?;
        wres?;
        if cycle_ms.is_empty() || lags.is_empty() {
            bail!(
                "interval {name}: no cycle in {} s (raise --rpo-secs)",
                a.rpo_secs
            );
        }
        println!(
            "{name:>8}  {:>4}  {:>11}  {:>6}  {:>12.0}  {:>12.0}  {:>9.2}  {:>9.2}  {:>9.2}  {:>13.1}",
            a.rpo_secs,
            a.write_mib_s,
            cycle_ms.len(),
            percentile(&cycle_ms, 0.5),
            percentile(&cycle_ms, 1.0),
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            percentile(&lags, 1.0),
            percentile(&mib, 0.5),
        );
        tracking::detach(&chain);
    }
    Ok(())
}
