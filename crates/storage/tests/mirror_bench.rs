//! Benchmark (ignored by default): storage migration of a served two-layer chain
//! (512 MiB base + 128 MiB checkpoint leaf) into another directory on the same file
//! system, side by side with `cp` of the same files (+ `sync`), in one run: paired rounds
//! whose order alternates (cp first, then the move first), caches dropped before every
//! measurement (`MIRROR_BENCH_DROP_CACHES=0` keeps them), the median of the per-round
//! ratios reported (`MIRROR_BENCH_ROUNDS`, default 5).
//!
//! `cargo test --release -p storage --test mirror_bench -- --ignored --nocapture`
//! (set `MIRROR_BENCH_DIR` to choose the file system; default the system temp dir).

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use storage::mirror::{DirSink, MirrorOptions};
use storage::{CheckpointKind, DiskConfig, DiskService};
use vhdx::{CreateOptions, DiskType, Vhdx};

const MIB: u64 = 1 << 20;

fn fill(seed: u64, b: &mut [u8]) {
    let mut x = seed | 1;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = c.len();
        c.copy_from_slice(&x.to_le_bytes()[..n]);
    }
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn storage_migration_vs_cp() {
    let root = std::env::var("MIRROR_BENCH_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let tmp = tempfile::tempdir_in(root).unwrap();
    let src = tmp.path().join("src");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let base = src.join("disk0.vhdx");
    let v = Vhdx::create(
        &base,
        &CreateOptions {
            size: 1 << 30,
            disk_type: DiskType::Dynamic,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; (4 * MIB) as usize];
    for i in 0..128u64 {
        fill(i + 1, &mut buf);
        v.write_at(&buf, i * 4 * MIB).unwrap();
    }
    v.close().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let svc = DiskService::start(
        tmp.path(),
        &run,
        &[DiskConfig {
            path: base,
            read_only: false,
        }],
    )
    .unwrap();
    svc.create_checkpoint(None, CheckpointKind::Production, None)
        .unwrap();
    let c = svc.chain(0).unwrap();
    for i in 0..32u64 {
        fill(1000 + i, &mut buf);
        nbd::Export::write_at(c.as_ref(), &buf, (512 * MIB) + i * 4 * MIB, false).unwrap();
    }
    nbd::Export::flush(c.as_ref()).unwrap();
    let bytes = dir_bytes(&src);
    println!(
        "chain: {} files, {} MiB",
        std::fs::read_dir(&src).unwrap().count(),
        bytes / MIB
    );
    let rounds: usize = std::env::var("MIRROR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Caches are dropped before every measurement (both sides cold), unless
    // MIRROR_BENCH_DROP_CACHES=0 (both sides then start with whatever is cached).
    let drop_caches = std::env::var("MIRROR_BENCH_DROP_CACHES")
        .ok()
        .is_none_or(|v| v != "0");
    // Optional quiet time after the sync (MIRROR_BENCH_SETTLE_MS, default 0). On these VMs
    // (free page reporting to the host, `discard` mount) a pause makes both sides slower
    // and far noisier (page cache refaulted from the host), so the default has none.
    let settle_ms: u64 = std::env::var("MIRROR_BENCH_SETTLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let settle = || {
        assert!(Command::new("sync").status().unwrap().success());
        std::thread::sleep(std::time::Duration::from_millis(settle_ms));
        assert!(Command::new("sync").status().unwrap().success());
        if drop_caches {
            std::fs::write("/proc/sys/vm/drop_caches", "3\n")
                .expect("dropping caches needs root (or MIRROR_BENCH_DROP_CACHES=0)");
        }
    };
    let mut cp_s = Vec::new();
    let mut mv_s = Vec::new();
    let mut ratios = Vec::new();
    let mut here = src.clone();
    let mb = bytes as f64 / MIB as f64;
    for round in 0..rounds {
        // Interleaved: even rounds cp first, odd rounds the move first.
        let mut cp_t = 0.0;
        let mut mv_t = 0.0;
        let mut held = 0;
        let order = if round.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        };
        for which in order {
            settle();
            if which == 0 {
                // cp of the current files (+ sync), then removed.
                let d = tmp.path().join(format!("cp{round}"));
                std::fs::create_dir_all(&d).unwrap();
                let t = Instant::now();
                let mut cmd = Command::new("cp");
                cmd.arg("--sparse=auto");
                for e in std::fs::read_dir(&here).unwrap() {
                    cmd.arg(e.unwrap().path());
                }
                assert!(cmd.arg(&d).status().unwrap().success());
                assert!(Command::new("sync")
                    .arg("-f")
                    .arg(&d)
                    .status()
                    .unwrap()
                    .success());
                cp_t = t.elapsed().as_secs_f64();
                std::fs::remove_dir_all(&d).unwrap();
            } else {
                // Storage migration of the served chain (it then runs from the new files).
                let d = tmp.path().join(format!("mv{round}"));
                let t = Instant::now();
                let m = svc
                    .mirror_disk(0, Box::new(DirSink::new(&d)), MirrorOptions::default())
                    .unwrap();
                // Timeline: when the frozen layers were done and when the active layer
                // converged (polled every 10 ms), then the switch and the removal.
                let mut frozen_done = None;
                loop {
                    let p = m.progress();
                    if frozen_done.is_none() && p.phase != storage::mirror::MirrorPhase::Frozen {
                        frozen_done = Some(t.elapsed().as_secs_f64());
                    }
                    if p.converged || m.is_finished() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                let converged = t.elapsed().as_secs_f64();
                let out = svc.complete_move(0, m).unwrap();
                let switched = t.elapsed().as_secs_f64();
                for f in &out.source_files {
                    std::fs::remove_file(f).unwrap();
                }
                mv_t = t.elapsed().as_secs_f64();
                println!(
                    "  move timeline: frozen layers {:.2} s, active converged {converged:.2} s, switched {switched:.2} s, old files removed {mv_t:.2} s",
                    frozen_done.unwrap_or(converged)
                );
                held = out.io_pause.as_millis();
                here = d;
            }
        }
        cp_s.push(cp_t);
        mv_s.push(mv_t);
        ratios.push(cp_t / mv_t);
        println!(
            "round {round}: cp {cp_t:.2} s ({:.0} MiB/s), move-storage {mv_t:.2} s ({:.0} MiB/s), ratio {:.2}, I/O held {held} ms",
            mb / cp_t,
            mb / mv_t,
            cp_t / mv_t
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, 0.0f64), |(a, b), &r| (a.min(r), b.max(r)));
    println!(
        "storage migration throughput / cp throughput: median of {rounds} paired rounds {:.2} (range {lo:.2}-{hi:.2}); medians cp {:.0} MiB/s, move {:.0} MiB/s; caches {}; load {}",
        median(ratios.clone()),
        mb / median(cp_s.clone()),
        mb / median(mv_s.clone()),
        if drop_caches { "dropped before each" } else { "kept" },
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    svc.close().unwrap();
}
