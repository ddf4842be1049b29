//! Applying cycles on the replica: points read back as the primary's disks were at each
//! cut, an interrupted application leaves the previous point intact, bad input is refused
//! and changes nothing, retention drops the oldest points without breaking the others.

use replica::{CycleHeader, CycleWriter, ReplicaStore};
use sha2::{Digest, Sha256};
use std::path::Path;

const SIZE: u64 = 4 << 20;
const GRAIN: usize = 64 << 10;

/// Reads a point's disk through its VHDX chain.
fn read_point(s: &ReplicaStore, seq: u64, disk: usize) -> Vec<u8> {
    let p = s.point_paths(seq).unwrap()[disk].clone();
    let v = vhdx::Vhdx::open(&p, vhdx::OpenOptions { read_only: true }).unwrap();
    let mut b = vec![0u8; SIZE as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

fn sum(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// The "primary": two plain disks changed grain by grain; a cycle ships the given grains.
struct Primary {
    disks: Vec<Vec<u8>>,
    seq: u64,
}

impl Primary {
    fn change(&mut self, disk: usize, grain: usize, val: u8) {
        self.disks[disk][grain * GRAIN..(grain + 1) * GRAIN].fill(val);
    }
    fn cycle(&mut self, grains: &[(usize, usize)]) -> Vec<u8> {
        self.seq += 1;
        let h = CycleHeader {
            vm: "vm1".into(),
            seq: self.seq,
            cut_unix_ms: self.seq * 1000,
            disk_sizes: vec![SIZE, SIZE],
            partial: false,
            app_consistent: false,
        };
        let mut w = CycleWriter::new(Vec::new(), &h).unwrap();
        for &(d, g) in grains {
            w.add(
                d as u32,
                (g * GRAIN) as u64,
                &self.disks[d][g * GRAIN..(g + 1) * GRAIN],
            )
            .unwrap();
        }
        w.finish().unwrap()
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// Each point shows exactly the primary's disks at its cut (checksums), including zeroed
/// grains; older points keep showing their own state.
#[test]
fn points_match_the_primary_at_each_cut() {
    let d = tempfile::tempdir().unwrap();
    let mut s = ReplicaStore::create(d.path(), "vm1", &[SIZE, SIZE], 10).unwrap();
    let mut p = Primary {
        disks: vec![vec![0; SIZE as usize]; 2],
        seq: 0,
    };
    let mut expect = Vec::new();
    for round in 1..=4u8 {
        let mut shipped = Vec::new();
        for k in 0..5usize {
            let (disk, g) = (k % 2, (k * 7 + round as usize * 3) % 64);
            p.change(disk, g, round.wrapping_mul(31).wrapping_add(k as u8));
            shipped.push((disk, g));
        }
        if round == 3 {
            p.change(0, 5, 0);
            shipped.push((0, 5));
        }
        let c = p.cycle(&shipped);
        let pt = s.apply(&c[..]).unwrap();
        assert_eq!(pt.seq, round as u64);
        expect.push([sum(&p.disks[0]), sum(&p.disks[1])]);
    }
    let s = ReplicaStore::open(d.path()).unwrap();
    for (i, e) in expect.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(sum(&read_point(&s, seq, 0)), e[0], "point {seq} disk 0");
        assert_eq!(sum(&read_point(&s, seq, 1)), e[1], "point {seq} disk 1");
    }
}

/// A cycle interrupted half-way (fault after some blocks, then a "restart": the store is
/// reopened) leaves no trace: the previous point is intact, the next cycle applies.
#[test]
fn interrupted_apply_leaves_previous_point_intact() {
    let d = tempfile::tempdir().unwrap();
    let mut s = ReplicaStore::create(d.path(), "vm1", &[SIZE, SIZE], 10).unwrap();
    let mut p = Primary {
        disks: vec![vec![0; SIZE as usize]; 2],
        seq: 0,
    };
    p.change(0, 1, 1);
    s.apply(&p.cycle(&[(0, 1)])[..]).unwrap();
    let before = sum(&read_point(&s, 1, 0));
    let disks_before = p.disks.clone();
    for g in 0..20 {
        p.change(g % 2, g, 9);
    }
    let grains: Vec<_> = (0..20).map(|g| (g % 2, g)).collect();
    let c = p.cycle(&grains);
    let e = s.apply_with_fault(&c[..], 10).unwrap_err();
    assert!(e.to_string().contains("fault"), "{e}");
    drop(s);
    let mut s = ReplicaStore::open(d.path()).unwrap();
    assert_eq!(s.latest().seq, 1);
    assert_eq!(sum(&read_point(&s, 1, 0)), before);
    assert_eq!(sum(&read_point(&s, 1, 1)), sum(&disks_before[1]));
    assert!(
        !files(d.path()).iter().any(|f| f.starts_with("incoming")),
        "{:?}",
        files(d.path())
    );
    s.apply(&c[..]).unwrap();
    assert_eq!(sum(&read_point(&s, 2, 0)), sum(&p.disks[0]));
    assert_eq!(sum(&read_point(&s, 2, 1)), sum(&p.disks[1]));
}

/// Damaged, truncated, out-of-sequence, foreign-VM and wrong-geometry cycles are refused
/// with a clear message and change nothing on disk.
#[test]
fn bad_cycles_are_refused_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut s = ReplicaStore::create(d.path(), "vm1", &[SIZE, SIZE], 10).unwrap();
    let mut p = Primary {
        disks: vec![vec![0; SIZE as usize]; 2],
        seq: 0,
    };
    p.change(1, 3, 3);
    let good = p.cycle(&[(1, 3)]);
    let state = std::fs::read(d.path().join("replica.json")).unwrap();
    let listing = files(d.path());
    let mut damaged = good.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xFF;
    let e = s.apply(&damaged[..]).unwrap_err();
    assert!(e.to_string().contains("invalid replication cycle"), "{e}");
    let e = s.apply(&good[..good.len() - 3]).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    let mut other = Primary {
        disks: vec![vec![0; SIZE as usize]; 2],
        seq: 4,
    };
    let e = s.apply(&other.cycle(&[(0, 0)])[..]).unwrap_err();
    assert!(e.to_string().contains("does not follow"), "{e}");
    let h = CycleHeader {
        vm: "other".into(),
        seq: 1,
        cut_unix_ms: 0,
        disk_sizes: vec![SIZE, SIZE],
        partial: false,
        app_consistent: false,
    };
    let e = s
        .apply(&CycleWriter::new(Vec::new(), &h).unwrap().finish().unwrap()[..])
        .unwrap_err();
    assert!(e.to_string().contains("for VM"), "{e}");
    let h = CycleHeader {
        vm: "vm1".into(),
        seq: 1,
        cut_unix_ms: 0,
        disk_sizes: vec![SIZE],
        partial: false,
        app_consistent: false,
    };
    let e = s
        .apply(&CycleWriter::new(Vec::new(), &h).unwrap().finish().unwrap()[..])
        .unwrap_err();
    assert!(e.to_string().contains("disks"), "{e}");
    assert_eq!(std::fs::read(d.path().join("replica.json")).unwrap(), state);
    assert_eq!(files(d.path()), listing);
    s.apply(&good[..]).unwrap();
}

/// With room for 3 points, older points are dropped; the kept ones still show their
/// state, and the store reopens.
#[test]
fn retention_drops_oldest_points() {
    let d = tempfile::tempdir().unwrap();
    let mut s = ReplicaStore::create(d.path(), "vm1", &[SIZE, SIZE], 3).unwrap();
    let mut p = Primary {
        disks: vec![vec![0; SIZE as usize]; 2],
        seq: 0,
    };
    let mut expect = Vec::new();
    for r in 1..=6usize {
        p.change(r % 2, r, r as u8);
        p.change(0, 0, r as u8);
        s.apply(&p.cycle(&[(r % 2, r), (0, 0)])[..]).unwrap();
        expect.push([sum(&p.disks[0]), sum(&p.disks[1])]);
    }
    let s = ReplicaStore::open(d.path()).unwrap();
    let seqs: Vec<u64> = s.points().iter().map(|p| p.seq).collect();
    assert_eq!(seqs, vec![4, 5, 6]);
    for seq in 4..=6u64 {
        let e = &expect[seq as usize - 1];
        assert_eq!(sum(&read_point(&s, seq, 0)), e[0], "point {seq}");
        assert_eq!(sum(&read_point(&s, seq, 1)), e[1], "point {seq}");
    }
    assert!(files(d.path()).contains(&"base".to_string()));
}

/// A store over existing disks (reverse replication): point 0 is the existing content, a
/// cycle on top shows the existing content plus the shipped grains, the existing images
/// are not written; a disk of another size is refused and leaves no state file.
#[test]
fn store_over_existing_disks() {
    let d = tempfile::tempdir().unwrap();
    let mut p = Primary {
        disks: vec![vec![0; SIZE as usize]; 2],
        seq: 0,
    };
    let mut parents = Vec::new();
    for i in 0..2usize {
        for g in 0..64 {
            p.change(i, g, (g as u8).wrapping_mul(3).wrapping_add(i as u8 + 1));
        }
        let path = d.path().join(format!("old{i}.vhdx"));
        let v = vhdx::Vhdx::create(
            &path,
            &vhdx::CreateOptions {
                size: SIZE,
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&p.disks[i], 0).unwrap();
        v.close().unwrap();
        parents.push(path);
    }
    let before: Vec<String> = parents
        .iter()
        .map(|f| sum(&std::fs::read(f).unwrap()))
        .collect();
    let bad = d.path().join("bad");
    let small = d.path().join("small.vhdx");
    vhdx::Vhdx::create(
        &small,
        &vhdx::CreateOptions {
            size: SIZE / 2,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    assert!(
        ReplicaStore::create_over(&bad, "vm1", &[parents[0].clone(), small], &[SIZE, SIZE], 4)
            .is_err()
    );
    assert!(!bad.join("replica.json").exists());

    let sdir = d.path().join("store");
    let mut s = ReplicaStore::create_over(&sdir, "vm1", &parents, &[SIZE, SIZE], 4).unwrap();
    assert!(!s.initializing());
    assert!(s.points().is_empty());
    p.change(0, 5, 0xAA);
    p.change(1, 63, 0);
    let c = p.cycle(&[(0, 5), (1, 63)]);
    let pt = s.apply(&c[..]).unwrap();
    assert_eq!(pt.seq, 1);
    for disk in 0..2 {
        assert_eq!(
            sum(&read_point(&s, 1, disk)),
            sum(&p.disks[disk]),
            "disk {disk}"
        );
    }
    let after: Vec<String> = parents
        .iter()
        .map(|f| sum(&std::fs::read(f).unwrap()))
        .collect();
    assert_eq!(before, after, "the existing images were written");
}
