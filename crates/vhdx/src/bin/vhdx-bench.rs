//! Benchmark: our VHDX crate against QEMU's VHDX driver, qcow2 and raw, with the
//! same patterns and cache mode in one run (`qemu-img bench -t writeback` and our
//! buffered positional I/O; neither uses O_DIRECT).
//!
//! Patterns (all wrap like `qemu-img bench`: offset = (offset + step) % size):
//! sequential 1 MiB read/write, "random" 4 KiB read/write (stride of 7919 pages,
//! which visits every page of the image in a scattered order and defeats
//! read-ahead) at queue depth 1 and 32, on dynamic images and differencing
//! images (QEMU cannot open VHDX differencing disks: its column there is qcow2
//! with a backing file), plus allocation-heavy first writes on a new image.
//!
//! Ratios are medians of per-repetition paired ratios (see `paired_ratio`);
//! throughputs are medians. The last column compares with a raw file request by
//! request (`ab_bench`), the measure least moved by other load on the machine.
//!
//! Usage: vhdx-bench [DIR] [SIZE_MIB] [REPS]   (default /var/tmp/vhdx-bench, 1024, 5)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const STRIDE_PAGES: u64 = 7919;
/// Passes over the image per sequential run: one pass of 1 GiB from the page cache
/// takes a quarter of a second, too short to rise above this shared machine's noise.
const SEQ_PASSES: u64 = 4;

#[derive(Clone, Copy)]
struct Pattern {
    name: &'static str,
    bs: u64,
    step: u64,
    count: u64,
    depth: usize,
    write: bool,
}

fn qemu_bench(fmt: &str, path: &Path, p: &Pattern) -> f64 {
    qemu_bench_flush(fmt, path, p, false)
}

fn qemu_bench_flush(fmt: &str, path: &Path, p: &Pattern, timed_flush: bool) -> f64 {
    let mut args: Vec<String> = vec![
        "bench".into(),
        "-f".into(),
        fmt.into(),
        "-t".into(),
        "writeback".into(),
        "-c".into(),
        p.count.to_string(),
        "-d".into(),
        p.depth.to_string(),
        "-s".into(),
        p.bs.to_string(),
        "-S".into(),
        p.step.to_string(),
    ];
    if p.write {
        args.push("-w".into());
    }
    if timed_flush {
        args.push(format!("--flush-interval={}", p.count));
    }
    args.push(path.display().to_string());
    let out = Command::new("qemu-img")
        .args(&args)
        .output()
        .expect("qemu-img (install qemu-utils)");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    settle(p);
    s.split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse qemu-img bench output: {s}"))
}

/// Runs a pattern on anything with positional I/O, `depth` threads sharing one
/// offset sequence. Like `qemu-img bench` without `--flush-interval`, steady-state
/// patterns are timed without a flush (flushed after timing); `timed_flush`
/// includes one final flush (the allocation pattern, where qemu gets
/// `--flush-interval=COUNT`).
fn our_bench<R, W>(
    size: u64,
    p: &Pattern,
    read: R,
    write: W,
    flush: &dyn Fn(),
    timed_flush: bool,
) -> f64
where
    R: Fn(&mut [u8], u64) + Sync,
    W: Fn(&[u8], u64) + Sync,
{
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..p.depth {
            s.spawn(|| {
                let mut buf = vec![0xA5u8; p.bs as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        break;
                    }
                    let off = (i * p.step) % size;
                    if p.write {
                        write(&buf, off);
                    } else {
                        read(&mut buf, off);
                    }
                }
            });
        }
    });
    if p.write && timed_flush {
        flush();
    }
    let secs = t.elapsed().as_secs_f64();
    if p.write && !timed_flush {
        flush();
    }
    settle(p);
    secs
}

/// Request-level A/B against a raw file: every request goes to the crate and then
/// to the raw file at the same offset, each timed on its own (`depth` threads share
/// the offset sequence). Load that comes and goes on this shared machine then hits
/// both sides alike, which separate runs seconds apart cannot promise. Returns the
/// summed request times (ours, raw).
fn ab_bench<R, W, RR, RW>(size: u64, p: &Pattern, ours: (R, W), raw: (RR, RW)) -> (f64, f64)
where
    R: Fn(&mut [u8], u64) + Sync,
    W: Fn(&[u8], u64) + Sync,
    RR: Fn(&mut [u8], u64) + Sync,
    RW: Fn(&[u8], u64) + Sync,
{
    let next = AtomicU64::new(0);
    let totals = std::sync::Mutex::new((0f64, 0f64));
    std::thread::scope(|s| {
        for _ in 0..p.depth {
            s.spawn(|| {
                let mut buf = vec![0xA5u8; p.bs as usize];
                let (mut to, mut tr) = (0f64, 0f64);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        break;
                    }
                    let off = (i * p.step) % size;
                    let t = Instant::now();
                    if p.write {
                        (ours.1)(&buf, off);
                    } else {
                        (ours.0)(&mut buf, off);
                    }
                    to += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    if p.write {
                        (raw.1)(&buf, off);
                    } else {
                        (raw.0)(&mut buf, off);
                    }
                    tr += t.elapsed().as_secs_f64();
                }
                let mut g = totals.lock().unwrap_or_else(|e| e.into_inner());
                g.0 += to;
                g.1 += tr;
            });
        }
    });
    settle(p);
    totals.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// After a write run, writes back all dirty pages (untimed) so the next
/// contender does not pay for this one's write-back.
fn settle(p: &Pattern) {
    if p.write {
        let _ = Command::new("sync").status();
    }
}

/// Reads every file once (untimed) so all contenders start a pattern with the same
/// page-cache state. Without it, a file left idle while others were hammered (the
/// dynamic image during the differencing rows) starts colder than the raw file,
/// which every row touches: the host's proactive reclaim pages out cold file data.
fn warm(files: &[&Path]) {
    use std::io::Read;
    let mut buf = vec![0u8; MIB as usize];
    for f in files {
        if let Ok(mut h) = std::fs::File::open(f) {
            while matches!(h.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median of the per-repetition throughput ratios `theirs_time / ours_time`: each
/// ratio compares two runs made back to back, so load that drifts across the
/// repetitions (this machine is shared) cancels out instead of landing on one side.
fn paired_ratio(ours: &[f64], theirs: &[f64]) -> f64 {
    median(ours.iter().zip(theirs).map(|(o, t)| t / o).collect())
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fill_ours(v: &Vhdx) {
    let buf = vec![0x5Au8; MIB as usize];
    for i in 0..v.size() / MIB {
        v.write_at(&buf, i * MIB).expect("fill");
    }
    v.flush().expect("flush");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "/var/tmp/vhdx-bench".into()),
    );
    let size = args
        .get(2)
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1024)
        * MIB;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let s = |p: &Path| p.display().to_string();
    let bsz = "32M";

    // Images: ours (dynamic + differencing), QEMU vhdx, qcow2 (+ backing), raw; all filled.
    let ours = dir.join("ours.vhdx");
    let v = Vhdx::create(
        &ours,
        &CreateOptions {
            size,
            block_size: 32 << 20,
            ..Default::default()
        },
    )
    .expect("create");
    fill_ours(&v);
    drop(v);
    let ours_child = dir.join("ours-child.vhdx");
    Vhdx::create(
        &ours_child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(ours.clone()),
            ..Default::default()
        },
    )
    .expect("child");
    let qv = dir.join("qemu.vhdx");
    let qc = dir.join("qemu.qcow2");
    let qc_child = dir.join("qemu-child.qcow2");
    let raw = dir.join("raw.img");
    let sz = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        &format!("block_size={bsz}"),
        &s(&qv),
        &sz,
    ]);
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&qc), &sz]);
    qemu_img(&["create", "-q", "-f", "raw", &s(&raw), &sz]);
    let fill = Pattern {
        name: "fill",
        bs: MIB,
        step: MIB,
        count: size / MIB,
        depth: 1,
        write: true,
    };
    for (f, p) in [("vhdx", &qv), ("qcow2", &qc), ("raw", &raw)] {
        qemu_bench(f, p, &fill);
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&qc),
        "-F",
        "qcow2",
        &s(&qc_child),
    ]);

    let pages = size / 4096;
    let stride = (STRIDE_PAGES % pages.max(1)) * 4096;
    let pats = [
        Pattern {
            name: "seq read 1M qd1",
            bs: MIB,
            step: MIB,
            count: SEQ_PASSES * size / MIB,
            depth: 1,
            write: false,
        },
        Pattern {
            name: "seq write 1M qd1",
            bs: MIB,
            step: MIB,
            count: SEQ_PASSES * size / MIB,
            depth: 1,
            write: true,
        },
        Pattern {
            name: "rand read 4K qd1",
            bs: 4096,
            step: stride,
            count: 60_000,
            depth: 1,
            write: false,
        },
        Pattern {
            name: "rand read 4K qd32",
            bs: 4096,
            step: stride,
            count: 60_000,
            depth: 32,
            write: false,
        },
        Pattern {
            name: "rand write 4K qd1",
            bs: 4096,
            step: stride,
            count: 60_000,
            depth: 1,
            write: true,
        },
        Pattern {
            name: "rand write 4K qd32",
            bs: 4096,
            step: stride,
            count: 60_000,
            depth: 32,
            write: true,
        },
    ];
    let reps = args
        .get(3)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(5)
        .max(1);
    println!("# vhdx-bench: {} MiB images, 32 MiB blocks, page cache (qemu-img bench -t writeback), median of {reps}; ratios are medians of paired per-repetition ratios", size / MIB);
    println!("| image | pattern | ours (MB/s) | qemu vhdx | qemu qcow2 | qemu raw | raw pread (same harness) | ours/qemu-vhdx | ours/raw | ours/raw A/B per request |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let rawf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .expect("raw");
    use std::os::unix::fs::FileExt;
    let mbps = |p: &Pattern, secs: f64| (p.bs * p.count) as f64 / secs / 1e6;
    // VHDX_BENCH_IMAGES=dynamic (or differencing) runs only those rows.
    let only = std::env::var("VHDX_BENCH_IMAGES").ok();
    for (img, our_path, qemu_vhdx, qcow) in [
        ("differencing", &ours_child, None, &qc_child),
        ("dynamic", &ours, Some(&qv), &qc),
    ] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x == img))
        {
            continue;
        }
        // Differencing first: the dynamic rows then write to its parent. The child's
        // first write pattern allocates; later patterns find its blocks allocated.
        let v = Arc::new(Vhdx::open(our_path, OpenOptions { read_only: false }).expect("open"));
        for p in &pats {
            let mut files: Vec<&Path> = vec![our_path, &ours, qcow, &qc, &raw];
            files.extend(qemu_vhdx.map(|q| q.as_path()));
            warm(&files);
            // Interleave the contenders in each repetition so background load and
            // write-back hit them alike; report medians.
            let (mut ot, mut qvt, mut qct, mut qrt, mut rpt, mut abr) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..reps {
                let (a_ours, a_raw) = ab_bench(
                    size,
                    p,
                    (
                        |b: &mut [u8], off| v.read_at(b, off).expect("read"),
                        |b: &[u8], off| v.write_at(b, off).expect("write"),
                    ),
                    (
                        |b: &mut [u8], off| rawf.read_exact_at(b, off).expect("raw read"),
                        |b: &[u8], off| rawf.write_all_at(b, off).expect("raw write"),
                    ),
                );
                if p.write {
                    v.flush().expect("flush");
                    rawf.sync_data().expect("raw sync");
                }
                abr.push(a_raw / a_ours);
                ot.push(our_bench(
                    size,
                    p,
                    |b, off| v.read_at(b, off).expect("read"),
                    |b, off| v.write_at(b, off).expect("write"),
                    &|| v.flush().expect("flush"),
                    false,
                ));
                if let Some(q) = qemu_vhdx {
                    qvt.push(qemu_bench("vhdx", q, p));
                }
                qct.push(qemu_bench("qcow2", qcow, p));
                qrt.push(qemu_bench("raw", &raw, p));
                rpt.push(our_bench(
                    size,
                    p,
                    |b, off| rawf.read_exact_at(b, off).expect("raw read"),
                    |b, off| rawf.write_all_at(b, off).expect("raw write"),
                    &|| rawf.sync_data().expect("raw sync"),
                    false,
                ));
            }
            let vs_qemu = (!qvt.is_empty()).then(|| paired_ratio(&ot, &qvt));
            let vs_raw = paired_ratio(&ot, &rpt);
            let ab = median(abr);
            let qv_t = (!qvt.is_empty()).then(|| median(qvt));
            let (o, qc_t, qr_t, rp_t) = (median(ot), median(qct), median(qrt), median(rpt));
            println!(
                "| {img} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.2} |",
                p.name,
                mbps(p, o),
                qv_t.map_or("n/a (no differencing)".to_string(), |t| format!(
                    "{:.0}",
                    mbps(p, t)
                )),
                mbps(p, qc_t),
                mbps(p, qr_t),
                mbps(p, rp_t),
                vs_qemu.map_or("n/a".to_string(), |r| format!("{r:.2}")),
                vs_raw,
                ab,
            );
        }
    }
    // Allocation-heavy first writes: sequential 1 MiB writes to new images.
    let p = Pattern {
        name: "first write 1M qd1 (allocating)",
        bs: MIB,
        step: MIB,
        count: size / MIB,
        depth: 1,
        write: true,
    };
    let mut ours_t = Vec::new();
    let mut q_t = Vec::new();
    let mut qc_t = Vec::new();
    for r in 0..reps {
        let a = dir.join(format!("alloc{r}.vhdx"));
        let v = Vhdx::create(
            &a,
            &CreateOptions {
                size,
                block_size: 32 << 20,
                ..Default::default()
            },
        )
        .expect("create");
        ours_t.push(our_bench(
            size,
            &p,
            |b, off| v.read_at(b, off).expect("read"),
            |b, off| v.write_at(b, off).expect("write"),
            &|| v.flush().expect("flush"),
            true,
        ));
        drop(v);
        let _ = std::fs::remove_file(&a);
        let q = dir.join(format!("alloc{r}-q.vhdx"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &format!("block_size={bsz}"),
            &s(&q),
            &sz,
        ]);
        q_t.push(qemu_bench_flush("vhdx", &q, &p, true));
        let _ = std::fs::remove_file(&q);
        let q = dir.join(format!("alloc{r}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &s(&q), &sz]);
        qc_t.push(qemu_bench_flush("qcow2", &q, &p, true));
        let _ = std::fs::remove_file(&q);
    }
    let vs_qemu = paired_ratio(&ours_t, &q_t);
    let (o, q, c) = (median(ours_t), median(q_t), median(qc_t));
    println!(
        "| new dynamic | {} | {:.0} | {:.0} | {:.0} | - | - | {:.2} | - | - |",
        p.name,
        mbps(&p, o),
        mbps(&p, q),
        mbps(&p, c),
        vs_qemu
    );
    let _ = std::fs::remove_dir_all(&dir);
}
