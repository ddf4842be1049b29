//! Primary to replica through the real pieces: a served disk chain (`storage::DiskChain`)
//! with change tracking, a consistent capture while a writer runs, the cycle format, and
//! the replica store. Prints cycle figures (size, time, pause) for the record.

use nbd::Export;
use replica::{CycleHeader, CycleWriter, ReplicaStore};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::tracking::{self, ChangeTracker, TrackedDisk};

const SIZE: u64 = 16 << 20;

fn chain(dir: &std::path::Path, name: &str) -> Arc<storage::DiskChain> {
    let p = dir.join(name);
    vhdx::Vhdx::create(
        &p,
        &vhdx::CreateOptions {
            size: SIZE,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    Arc::new(storage::DiskChain::open(&p, false).unwrap())
}

/// Ships cycles from two tracked disks under a steady writer: after each applied cycle,
/// the replica's point holds on both disks a state where disk B never runs ahead of disk
/// A (consistency of the cut); after the writer stops, one more cycle makes the latest
/// point byte-identical to both disks; a tracker reopened after a "crash" (dropped without
/// commit) resumes with the unshipped grains instead of asking for a resync.
#[test]
fn tracked_disks_replicate_consistently() {
    let d = tempfile::tempdir().unwrap();
    let chains = [chain(d.path(), "a.vhdx"), chain(d.path(), "b.vhdx")];
    let disks: Vec<TrackedDisk> = chains
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (t, _) = ChangeTracker::open(&d.path().join(format!("d{i}.cbt")), SIZE).unwrap();
            tracking::attach(c, t.clone()).unwrap();
            TrackedDisk {
                chain: c.clone(),
                tracker: t,
            }
        })
        .collect();
    let rdir = d.path().join("replica");
    let mut store = ReplicaStore::create(&rdir, "vm1", &[SIZE, SIZE], 4).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, b, stop) = (chains[0].clone(), chains[1].clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let slot = n.wrapping_mul(2654435761) % (SIZE / 4096);
                let buf = n.to_le_bytes().repeat(512);
                a.write_at(&buf, slot * 4096, false).unwrap();
                b.write_at(&buf, slot * 4096, false).unwrap();
                if n & 63 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            n
        })
    };
    let ship = |store: &mut ReplicaStore, seq: u64| {
        let t0 = Instant::now();
        let mut blocks: BTreeMap<(usize, u64), Vec<u8>> = BTreeMap::new();
        let stats = tracking::capture(&disks, &mut |i, off, data| {
            blocks.insert((i, off), data.to_vec());
            Ok(())
        })
        .unwrap();
        let h = CycleHeader {
            vm: "vm1".into(),
            seq,
            cut_unix_ms: seq,
            disk_sizes: vec![SIZE, SIZE],
            partial: false,
        };
        let mut w = CycleWriter::new(Vec::new(), &h).unwrap();
        for ((i, off), data) in &blocks {
            w.add(*i as u32, *off, data).unwrap();
        }
        let plain = w.plain_bytes;
        let bytes = w.finish().unwrap();
        let t_capture = t0.elapsed();
        store.apply(&bytes[..]).unwrap();
        for t in &disks {
            t.tracker.commit(seq, false).unwrap();
        }
        eprintln!(
            "cycle {seq}: {} grains ({} reads, {} passes, I/O pause {:?}), {} KiB changed, {} KiB on the wire, capture+encode {:?}, total {:?}",
            stats.grains, stats.reads, stats.passes, stats.pause, plain >> 10, bytes.len() >> 10, t_capture, t0.elapsed()
        );
    };
    let read_point = |store: &ReplicaStore, seq: u64, disk: usize| {
        let p = store.point_paths(seq).unwrap()[disk].clone();
        let v = vhdx::Vhdx::open(&p, vhdx::OpenOptions { read_only: true }).unwrap();
        let mut b = vec![0u8; SIZE as usize];
        v.read_at(&mut b, 0).unwrap();
        b
    };
    for seq in 1..=5u64 {
        std::thread::sleep(Duration::from_millis(200));
        ship(&mut store, seq);
        let (a, b) = (read_point(&store, seq, 0), read_point(&store, seq, 1));
        for s in 0..(SIZE / 4096) as usize {
            let va = u64::from_le_bytes(a[s * 4096..s * 4096 + 8].try_into().unwrap());
            let vb = u64::from_le_bytes(b[s * 4096..s * 4096 + 8].try_into().unwrap());
            assert!(vb <= va, "point {seq} slot {s}: B {vb} ahead of A {va}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 100, "writer made {n} writes");
    // Changes after the last cycle, then a "crash": trackers dropped without a commit.
    chains[0].write_at(&[0xAB; 4096], 0, false).unwrap();
    for (c, t) in chains.iter().zip(&disks) {
        tracking::detach(c);
        let _ = t;
    }
    drop(disks);
    let disks: Vec<TrackedDisk> = chains
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (t, r) = ChangeTracker::open(&d.path().join(format!("d{i}.cbt")), SIZE).unwrap();
            assert!(
                matches!(
                    r,
                    tracking::Resume::Resumed {
                        resync_required: false,
                        ..
                    }
                ),
                "{r:?}"
            );
            tracking::attach(c, t.clone()).unwrap();
            TrackedDisk {
                chain: c.clone(),
                tracker: t,
            }
        })
        .collect();
    assert!(disks[0].tracker.dirty_grains() >= 1);
    let mut blocks = Vec::new();
    tracking::capture(&disks, &mut |i, off, data| {
        blocks.push((i, off, data.to_vec()));
        Ok(())
    })
    .unwrap();
    let h = CycleHeader {
        vm: "vm1".into(),
        seq: 6,
        cut_unix_ms: 6,
        disk_sizes: vec![SIZE, SIZE],
        partial: false,
    };
    let mut w = CycleWriter::new(Vec::new(), &h).unwrap();
    for (i, off, data) in &blocks {
        w.add(*i as u32, *off, data).unwrap();
    }
    store.apply(&w.finish().unwrap()[..]).unwrap();
    for (i, c) in chains.iter().enumerate() {
        let mut img = vec![0u8; SIZE as usize];
        c.read_at(&mut img, 0).unwrap();
        assert!(
            img == read_point(&store, 6, i),
            "disk {i}: latest point differs from the primary"
        );
    }
    eprintln!("writer made {n} 4 KiB writes per disk");
}
