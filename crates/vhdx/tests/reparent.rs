//! Removing an inner layer of a chain: children take over its data
//! (`pull_from_parent`) and are re-pointed at its parent (`set_parent`), through
//! the metadata log; a crash after the log entry is written but before it is
//! applied still opens with the new parent; QEMU reads the result identically.

mod common;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::*;
use vhdx::{CreateOptions, DiskType, ErrorKind, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

fn child(path: &Path, parent: &Path) -> Vhdx {
    Vhdx::create(
        path,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(parent.to_path_buf()),
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap()
}

fn ro(p: &Path) -> Vhdx {
    Vhdx::open(p, OpenOptions { read_only: true }).unwrap()
}

fn rw(p: &Path) -> Vhdx {
    Vhdx::open(p, OpenOptions { read_only: false }).unwrap()
}

fn write(v: &Vhdx, model: &mut [u8], off: u64, data: &[u8]) {
    v.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn zero(v: &Vhdx, model: &mut [u8], off: u64, len: u64) {
    v.write_zeroes(off, len).unwrap();
    model[off as usize..(off + len) as usize].fill(0);
}

/// base ← x ← {k1 ← g, k2}: x holds data, zeros and unaligned sectors over the
/// base; k1 and k2 overwrite parts of it. Returns the models of k1, k2 and g.
fn tree(d: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (base, x, k1, k2, g) = paths(d);
    let mut m = vec![0u8; SIZE as usize];
    let b = Vhdx::create(
        &base,
        &CreateOptions {
            size: SIZE,
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap();
    write(&b, &mut m, 0, &pattern(1, (8 * MIB) as usize));
    write(&b, &mut m, 20 * MIB, &pattern(2, MIB as usize));
    b.close().unwrap();
    let vx = child(&x, &base);
    write(&vx, &mut m, MIB + 512, &pattern(3, 3000)); // partial sectors
    write(&vx, &mut m, 4 * MIB, &pattern(4, (2 * MIB) as usize)); // whole blocks
    zero(&vx, &mut m, 7 * MIB, MIB); // hides base data (ZERO block)
    zero(&vx, &mut m, 20 * MIB + 4096, 8192); // partial zeros over base data
    write(&vx, &mut m, 12 * MIB + 100, &pattern(5, 10)); // tiny, unaligned
    vx.close().unwrap();
    let (mut m1, mut m2) = (m.clone(), m);
    let v1 = child(&k1, &x);
    write(&v1, &mut m1, 4 * MIB + 4096, &pattern(6, 4096)); // inside x's data
    write(&v1, &mut m1, 16 * MIB, &pattern(7, MIB as usize));
    v1.close().unwrap();
    let v2 = child(&k2, &x);
    zero(&v2, &mut m2, 4 * MIB, MIB);
    write(&v2, &mut m2, MIB, &pattern(8, 512));
    v2.close().unwrap();
    let mut mg = m1.clone();
    let vg = child(&g, &k1);
    write(&vg, &mut mg, 2 * MIB, &pattern(9, 65536));
    vg.close().unwrap();
    (m1, m2, mg)
}

fn paths(
    d: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    (
        d.join("base.vhdx"),
        d.join("x.avhdx"),
        d.join("k1.avhdx"),
        d.join("k2.avhdx"),
        d.join("g.avhdx"),
    )
}

/// Both children of `x` absorb it and point at `base`; `x` is deleted; every
/// image (including the grandchild `g`, linked to k1's unchanged DataWriteGuid)
/// reads as before, QEMU agrees after flattening, and running it again is a no-op.
#[test]
fn children_absorb_inner_layer() {
    let d = tempfile::tempdir().unwrap();
    let (base, x, k1, k2, g) = paths(d.path());
    let (m1, m2, mg) = tree(d.path());
    let guid1 = ro(&k1).data_write_guid();
    let no = AtomicBool::new(false);
    for k in [&k1, &k2] {
        assert!(vhdx::absorb_parent(k, &x, &|_, _| {}, &no).unwrap());
    }
    std::fs::remove_file(&x).unwrap();
    for (k, m) in [(&k1, &m1), (&k2, &m2), (&g, &mg)] {
        let v = ro(k);
        assert_eq!(fnv(&read_all(&v)), fnv(m), "{}", k.display());
    }
    let v1 = ro(&k1);
    assert_eq!(v1.chain()[1].path, base);
    assert_eq!(v1.data_write_guid(), guid1, "contents did not change");
    drop(v1);
    // Running again: the parent is no longer x, nothing happens.
    assert!(!vhdx::absorb_parent(&k1, &x, &|_, _| {}, &no).unwrap());
    // QEMU reads the same bytes once the chain is flattened into the grandchild.
    vhdx::merge_into_child(&g, &|_, _| {}, &no).unwrap();
    let out = run("qemu-img", &["check", p(&g)]);
    assert!(out.contains("No errors"), "{out}");
    let raw = d.path().join("g.raw");
    std::fs::write(&raw, &mg).unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", p(&g), p(&raw)],
    );
}

/// A crash right after the re-pointing log entry is written (before it is
/// applied): the next open replays it and finds the new parent; a crash in the
/// middle of the copy (no re-pointing yet) keeps the old parent and the same view.
#[test]
fn set_parent_survives_crash_after_log() {
    let d = tempfile::tempdir().unwrap();
    let (base, x, k1, _k2, g) = paths(d.path());
    let (m1, _m2, mg) = tree(d.path());
    // Crash half way through the copy: nothing re-pointed, view unchanged.
    let v = rw(&k1);
    v.pull_from_parent(0, 10 * MIB).unwrap();
    v.flush().unwrap();
    v.testing_abandon();
    let v = ro(&k1);
    assert_eq!(v.chain()[1].path, x);
    assert_eq!(fnv(&read_all(&v)), fnv(&m1));
    drop(v);
    // Finish the copy, then crash after the log entry of the re-pointing.
    let v = rw(&k1);
    v.pull_from_parent(0, SIZE).unwrap();
    let b = ro(&base);
    v.testing_stop_after_log();
    v.set_parent(&b).unwrap();
    v.testing_abandon();
    drop(b);
    std::fs::remove_file(&x).unwrap();
    // Read-only open applies the log in memory; read-write replays it.
    let v = ro(&k1);
    assert_eq!(v.chain()[1].path, base);
    assert_eq!(fnv(&read_all(&v)), fnv(&m1));
    drop(v);
    let v = rw(&k1);
    assert!(v.log_replayed());
    v.close().unwrap();
    assert_eq!(fnv(&read_all(&ro(&g))), fnv(&mg));
    vhdx::merge_into_child(&k1, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    let out = run("qemu-img", &["check", p(&k1)]);
    assert!(out.contains("No errors"), "{out}");
}

/// Bad re-pointing is refused and changes nothing: a loop, itself, a read-only
/// handle, a non-differencing image, a layer without a grandparent.
#[test]
fn set_parent_refusals() {
    let d = tempfile::tempdir().unwrap();
    let (base, x, k1, _k2, g) = paths(d.path());
    let (m1, _m2, _mg) = tree(d.path());
    let no = AtomicBool::new(false);
    // A loop: k1's own child (opened on top of the read-write k1) as its parent.
    let v = std::sync::Arc::new(rw(&k1));
    let gv = Vhdx::open_with_parents(
        &g,
        OpenOptions { read_only: true },
        std::slice::from_ref(&v),
    )
    .unwrap();
    let e = v.set_parent(&gv).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = v.set_parent(&v).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    drop(gv);
    drop(v);
    let e = ro(&k1).set_parent(&ro(&base)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    let b = rw(&base);
    let e = b.pull_from_parent(0, MIB).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    drop(b);
    // x's parent is the base, which has no parent to re-point x at.
    let e = vhdx::absorb_parent(&x, &base, &|_, _| {}, &no)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let v = ro(&k1);
    assert_eq!(v.chain()[1].path, x);
    assert_eq!(fnv(&read_all(&v)), fnv(&m1));
}
