//! Checksum resync with real files: VHDX images served by `storage::DiskChain` with
//! change tracking on the primary, the replica store's layers on the other side. Proves
//! that only the blocks whose checksums differ are shipped (plain bytes counted in the
//! cycles) and that the resulting point is byte-identical to the primary's disk.

mod common;

use common::{noise, read_chain, read_image, sha};
use nbd::Export;
use replica::{resync, ReplicaStore, SUM_BLOCK};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use storage::tracking::{self, ChangeTracker, Resume, TrackedDisk};

const SIZE: u64 = 32 << 20;
const MIB: u64 = 1 << 20;

fn image(p: &Path, data: &[u8]) {
    let v = vhdx::Vhdx::create(
        p,
        &vhdx::CreateOptions {
            size: SIZE,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    v.write_at(data, 0).unwrap();
    v.flush().unwrap();
    v.close().unwrap();
}

fn tracked(c: &Arc<storage::DiskChain>, cbt: &Path) -> (Vec<TrackedDisk>, Resume) {
    let (t, r) = ChangeTracker::open(cbt, SIZE).unwrap();
    tracking::attach(c, t.clone()).unwrap();
    (
        vec![TrackedDisk {
            chain: c.clone(),
            tracker: t,
        }],
        r,
    )
}

/// Ships cycles (at most `chunk` grains each, partial while more are changed) until a
/// complete one is applied; returns (plain bytes shipped, wire bytes, last seq).
fn ship_all(
    disks: &[TrackedDisk],
    store: &mut ReplicaStore,
    file: &PathBuf,
    chunk: u64,
) -> (u64, u64, u64) {
    let (mut plain, mut wire) = (0, 0);
    loop {
        let seq = store.latest().seq + 1;
        let cut = replica::cut_to_file(disks, "vm1", seq, chunk, file).unwrap();
        let p = store.apply(std::fs::File::open(file).unwrap()).unwrap();
        assert_eq!(p.seq, seq);
        replica::primary::commit(disks, seq).unwrap();
        plain += cut.plain_bytes;
        wire += cut.bytes;
        if !cut.partial {
            return (plain, wire, seq);
        }
    }
}

/// Reverse after an unplanned failover: the old primary's disk (the base of a new store
/// on its host) and the new primary's disk both changed since the last common point. The
/// compare marks exactly the MiBs that differ (changed on either side); a write made
/// after the compare is caught by tracking; only those blocks ship (partial cycles into
/// the base, then a complete one) and the first point equals the new primary's disk.
#[test]
fn reverse_resync_ships_only_differing_blocks() {
    let d = tempfile::tempdir().unwrap();
    let common = noise(0xC0FFEE, SIZE as usize);
    let (newp, oldp) = (d.path().join("new.vhdx"), d.path().join("old.vhdx"));
    image(&newp, &common);
    image(&oldp, &common);
    // The new primary ran on after the failover: 4 MiB at 3 MiB, a 4 KiB write at 20 MiB.
    let c = Arc::new(storage::DiskChain::open(&newp, false).unwrap());
    c.write_at(&noise(1, (4 * MIB) as usize), 3 * MIB, false)
        .unwrap();
    c.write_at(&[0x77u8; 4096], 20 * MIB + 8192, false).unwrap();
    // The old primary wrote blocks that never reached the replica: 2 MiB at 10 MiB,
    // one of them overlapping nothing the new side changed.
    {
        let v = vhdx::Vhdx::open(&oldp, vhdx::OpenOptions { read_only: false }).unwrap();
        v.write_at(&noise(2, (2 * MIB) as usize), 10 * MIB).unwrap();
        v.write_at(&[0x55u8; 512], 3 * MIB + 4096).unwrap();
        v.flush().unwrap();
        v.close().unwrap();
    }
    let old_before = sha(&read_image(&oldp));
    // Tracking first, then the compare.
    let (disks, r) = tracked(&c, &d.path().join("d0.cbt"));
    assert_eq!(r, Resume::Created);
    let rdir = d.path().join("store");
    let mut store =
        ReplicaStore::create_resync_over(&rdir, "vm1", std::slice::from_ref(&oldp), &[SIZE], 4)
            .unwrap();
    assert!(store.initializing());
    let remote = resync::sums_of_images(&store.point_paths(store.latest().seq).unwrap()).unwrap();
    let remote = replica::Sums::decode(&remote.encode()).unwrap();
    let st = resync::mark_differences(&disks, &remote).unwrap();
    // 3..7 MiB (new side), 10..12 (old side), 20 (new side).
    assert_eq!(st.blocks, SIZE / MIB);
    assert_eq!(st.differing_blocks, 7, "{st:?}");
    assert_eq!(st.differing_bytes, 7 * MIB);
    // The guest writes a block that compared equal: tracking has it.
    c.write_at(&[0x99u8; 4096], 30 * MIB, false).unwrap();
    let file = d.path().join("out.cycle");
    let (plain, wire, seq) = ship_all(&disks, &mut store, &file, 32);
    let grain = tracking::GRAIN;
    assert_eq!(
        plain,
        7 * MIB + grain,
        "shipped {plain} plain bytes for 7 differing MiB and one grain written after the compare"
    );
    assert!(!store.initializing());
    let point = read_image(&store.point_paths(seq).unwrap()[0]);
    assert_eq!(
        sha(&point),
        sha(&read_chain(&c)),
        "the point differs from the primary"
    );
    assert_eq!(
        sha(&read_image(&oldp)),
        old_before,
        "the old primary's image was written"
    );
    eprintln!(
        "reverse resync: {} of {} MiB differed, {plain} plain bytes / {wire} wire bytes shipped for a {} MiB disk",
        st.differing_blocks,
        st.blocks,
        SIZE / MIB
    );
}

/// A primary whose tracking file is damaged after a crash (writes it recorded are lost):
/// the tracker reopens flagged `resync_required`; the compare against the replica's
/// latest point marks only the blocks written meanwhile, clears the flag (persisted), and
/// one complete cycle makes the next point byte-identical to the disk.
#[test]
fn untrusted_tracker_resyncs_by_checksums() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.vhdx");
    image(&p, &noise(7, SIZE as usize));
    let c = Arc::new(storage::DiskChain::open(&p, false).unwrap());
    let cbt = d.path().join("d0.cbt");
    let (disks, _) = tracked(&c, &cbt);
    disks[0].tracker.mark_all().unwrap();
    let rdir = d.path().join("store");
    let mut store = ReplicaStore::create(&rdir, "vm1", &[SIZE], 4).unwrap();
    let file = d.path().join("out.cycle");
    let (full, _, _) = ship_all(&disks, &mut store, &file, u64::MAX);
    assert_eq!(full, SIZE);
    // Writes the tracker records, then a crash that damages its file.
    c.write_at(&noise(8, 8192), 5 * MIB + 100, false).unwrap();
    c.write_at(&noise(9, (2 * MIB) as usize), 12 * MIB, false)
        .unwrap();
    tracking::detach(&c);
    drop(disks);
    let mut f = std::fs::read(&cbt).unwrap();
    f[20] ^= 0xFF;
    std::fs::write(&cbt, &f).unwrap();
    let (disks, r) = tracked(&c, &cbt);
    assert!(matches!(r, Resume::Reset { .. }), "{r:?}");
    assert!(disks[0].tracker.resync_required());
    assert_eq!(tracking::dirty_total(&disks), 0, "the lost marks are gone");
    let remote = resync::sums_of_images(&store.point_paths(store.latest().seq).unwrap()).unwrap();
    let st = resync::mark_differences(&disks, &remote).unwrap();
    assert_eq!(st.differing_blocks, 3, "{st:?}");
    assert!(!disks[0].tracker.resync_required());
    let (plain, wire, seq) = ship_all(&disks, &mut store, &file, u64::MAX);
    assert_eq!(plain, 3 * MIB, "shipped {plain} bytes for 3 differing MiB");
    assert_eq!(
        sha(&read_image(&store.point_paths(seq).unwrap()[0])),
        sha(&read_chain(&c))
    );
    // The cleared flag is in the file.
    tracking::detach(&c);
    drop(disks);
    let (_, r) = tracked(&c, &cbt);
    assert!(
        matches!(
            r,
            Resume::Resumed {
                resync_required: false,
                dirty_grains: 0,
                ..
            }
        ),
        "{r:?}"
    );
    eprintln!(
        "resync after an untrusted tracker: {} of {} MiB differed, {plain} plain / {wire} wire bytes (full copy: {full})",
        st.differing_blocks, st.blocks
    );
}

/// Sums of a replica with other disk sizes are refused and nothing is marked.
#[test]
fn resync_refuses_other_disks() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.vhdx");
    image(&p, &noise(3, SIZE as usize));
    let c = Arc::new(storage::DiskChain::open(&p, false).unwrap());
    let (disks, _) = tracked(&c, &d.path().join("d0.cbt"));
    let other = replica::Sums {
        block: SUM_BLOCK,
        disks: vec![resync::DiskSums {
            size: SIZE / 2,
            sums: vec![[0u8; 32]; (SIZE / 2 / SUM_BLOCK) as usize],
        }],
    };
    let e = resync::mark_differences(&disks, &other).unwrap_err();
    assert!(e.to_string().contains("disks differ"), "{e}");
    assert_eq!(tracking::dirty_total(&disks), 0);
}
