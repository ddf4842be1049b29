//! Quick A/B: sequential 1 MiB writes and reads through the crate versus a raw
//! file, alternating, to separate the crate's overhead from machine noise.
//! Usage: seqcheck DIR
use std::os::unix::fs::FileExt;
use std::time::Instant;
use vhdx::{CreateOptions, Vhdx};

fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/var/tmp/seqcheck".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let size: u64 = 1 << 30;
    // Allocation: first writes to a new image vs a new sparse raw file, with the
    // write phase and the final flush timed separately.
    for round in 0..2 {
        let a = dir.join(format!("n{round}.vhdx"));
        let r = dir.join(format!("n{round}.raw"));
        let buf = vec![0x77u8; 1 << 20];
        let t = Instant::now();
        let v = Vhdx::create(
            &a,
            &CreateOptions {
                size,
                block_size: 32 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..size >> 20 {
            v.write_at(&buf, i << 20).unwrap();
        }
        let w = t.elapsed().as_secs_f64();
        v.flush().unwrap();
        let f = t.elapsed().as_secs_f64() - w;
        drop(v);
        let _ = std::process::Command::new("sync").status();
        let t = Instant::now();
        let rf = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&r)
            .unwrap();
        rf.set_len(size).unwrap();
        for i in 0..size >> 20 {
            rf.write_all_at(&buf, i << 20).unwrap();
        }
        let rw = t.elapsed().as_secs_f64();
        rf.sync_data().unwrap();
        let rfl = t.elapsed().as_secs_f64() - rw;
        println!("round {round} first write: vhdx write {w:.2}s + flush {f:.2}s; raw write {rw:.2}s + flush {rfl:.2}s");
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&r);
        let _ = std::process::Command::new("sync").status();
    }
    let v = Vhdx::create(
        dir.join("a.vhdx"),
        &CreateOptions {
            size,
            block_size: 32 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("a.raw"))
        .unwrap();
    raw.set_len(size).unwrap();
    let mut buf = vec![0x5Au8; 1 << 20];
    for i in 0..size >> 20 {
        v.write_at(&buf, i << 20).unwrap();
        raw.write_all_at(&buf, i << 20).unwrap();
    }
    v.flush().unwrap();
    raw.sync_all().unwrap();
    for round in 0..3 {
        for which in ["vhdx", "raw"] {
            let t = Instant::now();
            for i in 0..size >> 20 {
                if which == "vhdx" {
                    v.write_at(&buf, i << 20).unwrap()
                } else {
                    raw.write_all_at(&buf, i << 20).unwrap()
                }
            }
            let w = t.elapsed().as_secs_f64();
            let _ = std::process::Command::new("sync").status();
            let t = Instant::now();
            for i in 0..size >> 20 {
                if which == "vhdx" {
                    v.read_at(&mut buf, i << 20).unwrap()
                } else {
                    raw.read_exact_at(&mut buf, i << 20).unwrap()
                }
            }
            let r = t.elapsed().as_secs_f64();
            println!(
                "round {round} {which}: write {:.0} MB/s, read {:.0} MB/s",
                1073.7 / w,
                1073.7 / r
            );
        }
    }
    // Finely interleaved A/B: each 1 MiB request goes to the crate and then to the raw
    // file at the same offset, each timed on its own, so load changes hit both alike.
    let mut wratios = Vec::new();
    let mut rratios = Vec::new();
    for pass in 0..5 {
        let (mut wv, mut wr, mut rv, mut rr) = (0f64, 0f64, 0f64, 0f64);
        for i in 0..size >> 20 {
            let t = Instant::now();
            v.write_at(&buf, i << 20).unwrap();
            wv += t.elapsed().as_secs_f64();
            let t = Instant::now();
            raw.write_all_at(&buf, i << 20).unwrap();
            wr += t.elapsed().as_secs_f64();
        }
        let _ = std::process::Command::new("sync").status();
        for i in 0..size >> 20 {
            let t = Instant::now();
            v.read_at(&mut buf, i << 20).unwrap();
            rv += t.elapsed().as_secs_f64();
            let t = Instant::now();
            raw.read_exact_at(&mut buf, i << 20).unwrap();
            rr += t.elapsed().as_secs_f64();
        }
        println!(
            "interleaved pass {pass}: write vhdx {:.0} / raw {:.0} MB/s = {:.2}; read vhdx {:.0} / raw {:.0} MB/s = {:.2}",
            1073.7 / wv,
            1073.7 / wr,
            wr / wv,
            1073.7 / rv,
            1073.7 / rr,
            rr / rv
        );
        wratios.push(wr / wv);
        rratios.push(rr / rv);
    }
    wratios.sort_by(f64::total_cmp);
    rratios.sort_by(f64::total_cmp);
    println!(
        "interleaved median of 5: write {:.2} of raw, read {:.2} of raw",
        wratios[2], rratios[2]
    );
    // Random 4 KiB writes from 32 threads (stride 7919 pages), crate vs raw.
    let step = 7919 * 4096u64;
    for round in 0..3 {
        for which in ["vhdx", "raw"] {
            let next = std::sync::atomic::AtomicU64::new(0);
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..32 {
                    s.spawn(|| {
                        let b = vec![0x33u8; 4096];
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= 60_000 {
                                break;
                            }
                            let off = (i * step) % size;
                            if which == "vhdx" {
                                v.write_at(&b, off).unwrap()
                            } else {
                                raw.write_all_at(&b, off).unwrap()
                            }
                        }
                    });
                }
            });
            let w = t.elapsed().as_secs_f64();
            let _ = std::process::Command::new("sync").status();
            println!(
                "round {round} {which}: rand write 4K qd32 {:.0} MB/s",
                60_000.0 * 4096.0 / w / 1e6
            );
        }
    }
    drop(v);
    let _ = std::fs::remove_dir_all(&dir);
}
