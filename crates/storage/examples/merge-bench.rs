//! Live-merge benchmark (in process, no NBD): sequential 1 MiB write throughput into a
//! differencing leaf, then the rate of a live merge of that leaf into its parent, and the 4 KiB
//! write latency (p50/p99) of a concurrent writer with and without a merge running.
//!
//! Each round uses a fresh image; the latencies of all rounds are pooled, the rates are the
//! medians of the rounds.
//!
//! usage: cargo run --release -p storage --example merge-bench [SIZE_MIB=512] [ROUNDS=3] [DIR=/var/tmp]

use nbd::Export;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{CheckpointKind, DiskConfig, DiskService, MergeState};

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
}

fn writer(
    chain: Arc<storage::DiskChain>,
    size: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    // Named, so that `perf record -e sched:sched_switch --call-graph dwarf` followed by
    // `perf script --comm writer` shows where the writer waits.
    std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            let mut lat = Vec::new();
            let buf = vec![0x5au8; 4096];
            let mut x: u64 = 0x9e3779b97f4a7c15;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size / 4096)) * 4096;
                let t = Instant::now();
                chain.write_at(&buf, off, false).expect("write");
                lat.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(1));
            }
            lat
        })
        .expect("spawning the writer thread")
}

/// Sequential MiB/s, merge MiB/s, latencies without and during the merge.
type Round = (f64, f64, Vec<Duration>, Vec<Duration>);

/// One round on a fresh base image.
fn round(base_dir: &str, mib: u64) -> Result<Round, Box<dyn std::error::Error>> {
    let dir = tempfile::Builder::new()
        .prefix("merge-bench")
        .tempdir_in(base_dir)?;
    let size = mib << 20;
    let base = dir.path().join("base.vhdx");
    vhdx::Vhdx::create(
        &base,
        &vhdx::CreateOptions {
            size,
            ..Default::default()
        },
    )?
    .close()?;
    let (vm, run) = (dir.path().join("vm"), dir.path().join("run"));
    std::fs::create_dir_all(&vm)?;
    std::fs::create_dir_all(&run)?;
    let svc = DiskService::start(
        &vm,
        &run,
        &[DiskConfig {
            path: base.clone(),
            read_only: false,
        }],
    )?;
    let chain = svc.chain(0).ok_or("no chain")?;
    let buf = vec![0xa5u8; 1 << 20];
    svc.create_checkpoint(Some("cp".into()), CheckpointKind::Production, None)?;
    // Sequential 1 MiB writes into the (empty) differencing leaf, made durable.
    let t = Instant::now();
    for i in 0..mib {
        chain.write_at(&buf, i << 20, false)?;
    }
    chain.flush()?;
    let seq = mib as f64 / t.elapsed().as_secs_f64();
    // Latency of a paced 4 KiB writer without a merge.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(chain.clone(), size, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let idle = w.join().map_err(|_| "writer panicked")?;
    // Live merge with the same writer running.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(chain.clone(), size, stop.clone());
    let t = Instant::now();
    svc.remove_checkpoint("cp")?.ok_or("no merge job")?;
    loop {
        match svc.state().jobs.last().map(|j| j.state.clone()) {
            Some(MergeState::Done) => break,
            Some(MergeState::Failed { reason }) => return Err(reason.into()),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let merge_s = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let busy = w.join().map_err(|_| "writer panicked")?;
    svc.shutdown();
    Ok((seq, mib as f64 / merge_s, idle, busy))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(512);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let base_dir = args.get(3).cloned().unwrap_or_else(|| "/var/tmp".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _g = rt.enter();
    let (mut seqs, mut rates, mut idle, mut busy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (seq, rate, i, b) = round(&base_dir, mib)?;
        let (i99, b99) = (
            percentile(&mut i.clone(), 0.99),
            percentile(&mut b.clone(), 0.99),
        );
        println!(
            "round {r}: sequential {seq:.0} MiB/s, merge {rate:.0} MiB/s ({:.0}%), 4 KiB write p99 {i99:.0} us idle, {b99:.0} us merging (ratio {:.2})",
            100.0 * rate / seq,
            b99 / i99.max(1.0)
        );
        seqs.push(seq);
        rates.push(rate);
        idle.extend(i);
        busy.extend(b);
    }
    let (seq, rate) = (median(&mut seqs), median(&mut rates));
    println!("sequential 1 MiB write into the leaf (median of {rounds}): {seq:.0} MiB/s");
    println!(
        "live merge of {mib} MiB (median of {rounds}): {rate:.0} MiB/s ({:.0}% of sequential write)",
        100.0 * rate / seq
    );
    let (i50, i99) = (percentile(&mut idle, 0.5), percentile(&mut idle, 0.99));
    let (b50, b99) = (percentile(&mut busy, 0.5), percentile(&mut busy, 0.99));
    println!(
        "4 KiB write latency without merge: p50 {i50:.0} us, p99 {i99:.0} us ({} writes)",
        idle.len()
    );
    println!(
        "4 KiB write latency during merge:  p50 {b50:.0} us, p99 {b99:.0} us ({} writes), p99 ratio {:.2}",
        busy.len(),
        b99 / i99.max(1.0)
    );
    Ok(())
}
