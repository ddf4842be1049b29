//! Initial replication without the network copy, with real files: an export of a served
//! disk (read while a writer runs) carried to the replica host (`seed::import`), or an
//! existing copy there (`seed::import_existing`); the store is created over the seed and
//! a checksum compare ships only what changed since (bytes counted); the first point is
//! byte-identical to the primary's disk.

mod common;

use common::{noise, read_chain, read_image, sha};
use nbd::Export;
use replica::{resync, seed, ReplicaStore};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use storage::tracking::{self, ChangeTracker, TrackedDisk};

const SIZE: u64 = 24 << 20;
const MIB: u64 = 1 << 20;

/// A served disk: 16 MiB of data, the last 8 MiB never written (zeros).
fn served(dir: &Path) -> Arc<storage::DiskChain> {
    let p = dir.join("primary.vhdx");
    let v = vhdx::Vhdx::create(
        &p,
        &vhdx::CreateOptions {
            size: SIZE,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    v.write_at(&noise(11, (16 * MIB) as usize), 0).unwrap();
    v.close().unwrap();
    Arc::new(storage::DiskChain::open(&p, false).unwrap())
}

fn export(c: &storage::DiskChain, dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let written =
        seed::export_image(SIZE, |o, b| c.read_at(b, o), &dir.join("disk0.vhdx")).unwrap();
    seed::save_meta(
        dir,
        seed::EXPORT_META,
        &seed::ExportMeta {
            format_version: seed::EXPORT_VERSION,
            vm: "vm1".into(),
            disk_sizes: vec![SIZE],
            files: vec!["disk0.vhdx".into()],
            started_unix_ms: 1,
        },
    )
    .unwrap();
    written
}

/// Tracking attached, store over the seed, compare, ship until a complete cycle; returns
/// (differing MiBs, plain bytes shipped, the point's bytes).
fn seed_and_ship(
    d: &Path,
    c: &Arc<storage::DiskChain>,
    seeds: &[PathBuf],
    during: impl FnOnce(),
) -> (u64, u64, Vec<u8>) {
    let (t, _) = ChangeTracker::open(&d.join("d0.cbt"), SIZE).unwrap();
    tracking::attach(c, t.clone()).unwrap();
    let disks = vec![TrackedDisk {
        chain: c.clone(),
        tracker: t,
    }];
    let rdir = d.join("store");
    let mut store = ReplicaStore::create_resync_over(&rdir, "vm1", seeds, &[SIZE], 4).unwrap();
    let remote = resync::sums_of_images(&store.point_paths(0).unwrap()).unwrap();
    let st = resync::mark_differences(&disks, &remote).unwrap();
    during();
    let file = d.join("out.cycle");
    let mut plain = 0;
    loop {
        let seq = store.latest().seq + 1;
        let cut = replica::cut_to_file(&disks, "vm1", seq, 64, &file).unwrap();
        store.apply(std::fs::File::open(&file).unwrap()).unwrap();
        replica::primary::commit(&disks, seq).unwrap();
        plain += cut.plain_bytes;
        if !cut.partial {
            let img = read_image(&store.point_paths(seq).unwrap()[0]);
            tracking::detach(c);
            return (st.differing_blocks, plain, img);
        }
    }
}

/// Export carried on "removable media": the export holds only the 16 MiB of data (zeros
/// unallocated); after import, 3 MiB written on the primary since the export are the only
/// data shipped, and the point equals the disk.
#[test]
fn export_import_ships_only_changes_since_the_export() {
    let d = tempfile::tempdir().unwrap();
    let c = served(d.path());
    let media = d.path().join("media");
    let written = export(&c, &media);
    assert_eq!(written, 16 * MIB);
    // The primary runs on: 2 MiB at 4 MiB and 1 MiB in the zero area.
    c.write_at(&noise(12, (2 * MIB) as usize), 4 * MIB, false)
        .unwrap();
    c.write_at(&noise(13, MIB as usize), 20 * MIB, false)
        .unwrap();
    let seed_dir = d.path().join("replica-host").join("seed");
    let (m, copied) = seed::import(&media, "vm1", &seed_dir).unwrap();
    assert_eq!(m.disk_sizes, vec![SIZE]);
    // The data plus the VHDX's own metadata (log, BAT, headers), less than the disk.
    assert!((16 * MIB..SIZE).contains(&copied), "{copied}");
    let (_, seeds) = seed::seed_paths(&seed_dir).unwrap();
    let (differing, plain, img) = seed_and_ship(d.path(), &c, &seeds, || ());
    assert_eq!(differing, 3);
    assert_eq!(
        plain,
        3 * MIB,
        "shipped {plain} plain bytes for 3 changed MiB"
    );
    assert_eq!(sha(&img), sha(&read_chain(&c)));
    eprintln!("export/import: {written} bytes exported, {copied} imported, {plain} plain bytes shipped for a {SIZE}-byte disk");
}

/// An export read while the guest writes (not consistent) and an existing copy recorded
/// in place: the compare (with writes going on during it) still yields a point equal to
/// the disk, and far less than the disk is shipped.
#[test]
fn fuzzy_export_and_existing_copy_converge() {
    let d = tempfile::tempdir().unwrap();
    let c = served(d.path());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let slot = n.wrapping_mul(2654435761) % 64;
                let buf = n.to_le_bytes().repeat(512);
                c.write_at(&buf, slot * 4096, false).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let media = d.path().join("media");
    export(&c, &media);
    // The existing copy is the export's image, recorded in place (never written).
    let copy = media.join("disk0.vhdx");
    let before = sha(&read_image(&copy));
    let seed_dir = d.path().join("replica-host").join("seed");
    let m = seed::import_existing(std::slice::from_ref(&copy), "vm1", &seed_dir).unwrap();
    assert_eq!(m.disk_sizes, vec![SIZE]);
    let (_, seeds) = seed::seed_paths(&seed_dir).unwrap();
    let (differing, plain, img) = seed_and_ship(d.path(), &c, &seeds, move || {
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    });
    assert!(
        differing <= 1,
        "{differing} MiB differed (the writer touches the first 256 KiB)"
    );
    assert!(plain <= 2 * MIB, "{plain}");
    assert_eq!(
        sha(&img),
        sha(&read_chain(&c)),
        "the point differs from the disk"
    );
    assert_eq!(
        sha(&read_image(&copy)),
        before,
        "the existing copy was written"
    );
}

/// Bad imports are refused and leave no seed: another VM's export, an incomplete export
/// (no metadata), a missing disk file, a second import over a seed.
#[test]
fn bad_imports_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let c = served(d.path());
    let media = d.path().join("media");
    export(&c, &media);
    let seed_dir = d.path().join("seed");
    let e = seed::import(&media, "other", &seed_dir).unwrap_err();
    assert!(e.to_string().contains("not \"other\""), "{e}");
    assert!(!seed_dir.exists());
    let e = seed::import(d.path(), "vm1", &seed_dir).unwrap_err();
    assert!(e.to_string().contains("no complete export"), "{e}");
    assert!(!seed_dir.exists());
    let broken = d.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(media.join("export.json"), broken.join("export.json")).unwrap();
    let e = seed::import(&broken, "vm1", &seed_dir).unwrap_err();
    assert!(e.to_string().contains("disk0.vhdx is missing"), "{e}");
    assert!(!seed_dir.exists());
    seed::import(&media, "vm1", &seed_dir).unwrap();
    let e = seed::import(&media, "vm1", &seed_dir).unwrap_err();
    assert!(e.to_string().contains("already holds a seed"), "{e}");
    assert!(seed::seed_paths(&seed_dir).is_ok());
}
