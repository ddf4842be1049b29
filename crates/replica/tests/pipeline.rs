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
            app_consistent: false,
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
        app_consistent: false,
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

/// Initial replication interrupted half way resumes, it does not restart: partial cycles of
/// 32 grains are cut, shipped and committed; one cycle is cut but never applied (the link
/// went down), then the primary "crashes" (trackers dropped without a commit) and the
/// replica store is reopened. The reopened tracker holds exactly the grains not yet
/// acknowledged; the rest of the copy ships only those (plus a grain the guest rewrote
/// after it was shipped), and the first complete cycle is a point equal to the disk.
#[test]
fn initial_replication_resumes_after_interruption() {
    const CHUNK: u64 = 32;
    let d = tempfile::tempdir().unwrap();
    let c = chain(d.path(), "a.vhdx");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut data = vec![0u8; SIZE as usize];
    for w in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    c.write_at(&data, 0, false).unwrap();
    let total = SIZE / tracking::GRAIN;
    let cbt = d.path().join("d0.cbt");
    let open = |c: &Arc<storage::DiskChain>| {
        let (t, r) = ChangeTracker::open(&cbt, SIZE).unwrap();
        tracking::attach(c, t.clone()).unwrap();
        (
            vec![TrackedDisk {
                chain: c.clone(),
                tracker: t,
            }],
            r,
        )
    };
    let (disks, _) = open(&c);
    disks[0].tracker.mark_all().unwrap();
    assert_eq!(tracking::dirty_total(&disks), total);
    let rdir = d.path().join("replica");
    let mut store = ReplicaStore::create(&rdir, "vm1", &[SIZE], 4).unwrap();
    let file = d.path().join("out.cycle");
    let mut shipped = 0u64;
    let mut seq = 0u64;
    let ship = |disks: &[TrackedDisk], store: &mut ReplicaStore, seq: &mut u64| {
        let cut = replica::cut_to_file(disks, "vm1", *seq + 1, CHUNK, &file).unwrap();
        let p = store.apply(std::fs::File::open(&file).unwrap()).unwrap();
        assert_eq!(p.seq, *seq + 1);
        replica::primary::commit(disks, p.seq).unwrap();
        *seq = p.seq;
        cut
    };
    for _ in 0..3 {
        let cut = ship(&disks, &mut store, &mut seq);
        assert!(cut.partial && cut.grains == CHUNK, "{cut:?}");
        shipped += cut.grains;
    }
    assert!(store.initializing() && store.points().is_empty());
    // The guest rewrites a grain that was already shipped: it goes again.
    data[..4096].fill(0x5A);
    c.write_at(&data[..4096], 0, false).unwrap();
    // A cycle cut but never applied (link down), then a crash of the primary.
    let lost = replica::cut_to_file(&disks, "vm1", seq + 1, CHUNK, &file).unwrap();
    assert!(lost.partial);
    let _ = std::fs::remove_file(&file);
    tracking::detach(&c);
    drop(disks);
    drop(store);
    let mut store = ReplicaStore::open(&rdir).unwrap();
    assert!(store.initializing());
    assert_eq!(
        store.latest().seq,
        seq,
        "the replica's base is at cycle {seq}"
    );
    let (disks, r) = open(&c);
    let left = total - shipped + 1;
    assert!(
        matches!(r, tracking::Resume::Resumed { dirty_grains, resync_required: false, .. } if dirty_grains == left),
        "resumed with {r:?}, expected {left} grains left"
    );
    loop {
        let cut = ship(&disks, &mut store, &mut seq);
        shipped += cut.grains;
        if !cut.partial {
            break;
        }
    }
    assert_eq!(
        shipped,
        total + 1,
        "the initial copy shipped {shipped} grains for a disk of {total} (restarted?)"
    );
    assert!(!store.initializing());
    let p = store.point_paths(seq).unwrap()[0].clone();
    let v = vhdx::Vhdx::open(&p, vhdx::OpenOptions { read_only: true }).unwrap();
    let mut b = vec![0u8; SIZE as usize];
    v.read_at(&mut b, 0).unwrap();
    assert!(b == data, "the first point differs from the disk");
    eprintln!("initial copy of {total} grains: interrupted after {} grains, resumed, {shipped} grains shipped in all", total - left + 1);
}
