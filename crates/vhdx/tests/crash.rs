//! Crash safety: a child process writes, flushes and resizes and is killed with
//! SIGKILL at random points; after every kill the image opens (replaying its
//! log), passes check, and every write acknowledged by a completed flush reads
//! back. Unacknowledged writes may be present or not, byte for byte, but nothing
//! else may appear.

mod common;
#[path = "common/torture_ops.rs"]
mod torture_ops;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use torture_ops::{Gen, TOp, LARGE, SMALL};
use vhdx::{CreateOptions, OpenOptions, Vhdx};

#[test]
fn sigkill_at_random_points() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.vhdx");
    Vhdx::create(
        &img,
        &CreateOptions {
            size: SMALL,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let mut model = vec![0u8; LARGE as usize];
    let mut size = SMALL;
    let mut rng = Gen::new(42);
    let start = Instant::now();
    let (mut iters, mut acked_total, mut replays) = (0u64, 0u64, 0u64);
    while iters < 300 && start.elapsed() < Duration::from_secs(45) {
        iters += 1;
        let seed = rng.u64();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vhdx-torture"))
            .arg(&img)
            .arg(seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(5_000 + rng.u64() % 120_000));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            err.is_empty() && status.code().is_none(),
            "helper failed: {status:?} {err}"
        );
        let (mut started, mut acked) = (None::<u64>, None::<u64>);
        for l in out.lines() {
            match l.split_once(' ') {
                Some(("S", n)) => started = n.parse().ok(),
                Some(("A", n)) => acked = n.parse().ok(),
                _ => {}
            }
        }
        // Model after the acknowledged prefix; ranges touched after it.
        let mut g = Gen::new(seed);
        let mut sz = size;
        let mut m = model.clone();
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut sizes = vec![];
        if let Some(last) = started {
            for i in 0..=last {
                let op = g.op(i, sz);
                let committed = acked.is_some_and(|a| i <= a);
                match op {
                    TOp::Write { off, len, seed } => {
                        let data = torture_ops::data(seed, len);
                        if committed {
                            m[off as usize..off as usize + len].copy_from_slice(&data);
                        } else {
                            pending.push((off, data));
                        }
                    }
                    TOp::Resize(n) => {
                        if !committed {
                            sizes.push(n);
                        }
                        sz = n;
                    }
                    TOp::Flush => {}
                }
                if committed {
                    size = sz;
                }
            }
        }
        if acked.is_some() {
            acked_total += 1;
        }
        // Open read-write: replays the log if the kill left one.
        let v = Vhdx::open(&img, OpenOptions { read_only: false }).unwrap();
        if v.log_replayed() {
            replays += 1;
        }
        assert!(
            v.size() == size || sizes.contains(&v.size()),
            "size {} not in {size}/{sizes:?}",
            v.size()
        );
        let mut got = vec![0u8; SMALL as usize];
        v.read_at(&mut got, 0).unwrap();
        v.close().unwrap();
        for (c, (gc, wc)) in got
            .chunks(4096)
            .zip(m[..SMALL as usize].chunks(4096))
            .enumerate()
        {
            if gc == wc {
                continue;
            }
            for (k, (&g, &want)) in gc.iter().zip(wc).enumerate() {
                let b = c * 4096 + k;
                if g != want {
                    let ok = pending.iter().any(|(o, data)| {
                        (*o as usize..*o as usize + data.len()).contains(&b)
                            && data[b - *o as usize] == g
                    });
                    assert!(ok, "iteration {iters}: byte {b} is {g:#x}, acknowledged value {want:#x}, not a pending write");
                }
            }
        }
        let r = vhdx::check(&img, false).unwrap();
        assert!(r.is_clean(), "iteration {iters}: {r:?}");
        // What we read is a valid state: continue from it.
        model[..SMALL as usize].copy_from_slice(&got);
        let v = Vhdx::open(&img, OpenOptions { read_only: true }).unwrap();
        size = v.size();
        drop(v);
        if iters % 25 == 0 {
            let out = common::run("qemu-img", &["check", common::p(&img)]);
            assert!(out.contains("No errors"), "{out}");
        }
    }
    eprintln!("{iters} kills, {acked_total} with acknowledged flushes, {replays} log replays");
    assert!(iters >= 100, "only {iters} iterations in the time bound");
    assert!(
        acked_total > iters / 10,
        "too few acknowledged flushes ({acked_total})"
    );
}
