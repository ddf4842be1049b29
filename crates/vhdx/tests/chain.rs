//! Differencing chains, merge in both directions, resize, compact, check, convert, locks.

mod common;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::*;
use vhdx::{CreateOptions, DiskType, ErrorKind, ExtentState, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn dynamic(path: &Path, size: u64, bs: u32) -> Vhdx {
    Vhdx::create(
        path,
        &CreateOptions {
            size,
            block_size: bs,
            ..Default::default()
        },
    )
    .unwrap()
}

fn child(path: &Path, parent: &Path) -> Vhdx {
    Vhdx::create(
        path,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(parent.to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn ro(p: &Path) -> Vhdx {
    Vhdx::open(p, OpenOptions { read_only: true }).unwrap()
}

fn write(v: &Vhdx, model: &mut [u8], off: u64, data: &[u8]) {
    v.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// A child reads its parent's data where it has none, its own where it wrote
/// (including unaligned writes inside partially present blocks), survives reopen,
/// and reports the chain; `qemu-img compare` agrees after merging.
#[test]
fn differencing_reads_merge_into_parent() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = (d.path().join("base.vhdx"), d.path().join("top.vhdx"));
    let mut model = vec![0u8; (24 * MIB) as usize];
    let b = dynamic(&base, 24 * MIB, MIB as u32);
    write(&b, &mut model, 0, &pattern(1, 3 * MIB as usize));
    write(&b, &mut model, 10 * MIB, &pattern(2, 100_000));
    b.close().unwrap();
    let c = child(&top, &base);
    assert_eq!(c.disk_type(), DiskType::Differencing);
    write(&c, &mut model, 4096, &pattern(3, 4096));
    write(&c, &mut model, 10 * MIB + 777, &pattern(4, 1000)); // unaligned, inside parent data
    write(&c, &mut model, 20 * MIB, &pattern(5, MIB as usize)); // whole block
    c.write_zeroes(2 * MIB, MIB).unwrap(); // hides parent data
    model[(2 * MIB) as usize..(3 * MIB) as usize].fill(0);
    assert_eq!(fnv(&read_all(&c)), fnv(&model));
    let st = c.block_status(0, 24 * MIB).unwrap();
    assert!(st.iter().any(|e| e.state == ExtentState::FromParent));
    assert!(st
        .iter()
        .any(|e| e.state == ExtentState::Data && e.off == 4096));
    c.close().unwrap();
    let c = ro(&top);
    assert_eq!(fnv(&read_all(&c)), fnv(&model), "after reopen");
    let chain = c.chain();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].path, base);
    drop(c);
    let target = vhdx::merge(&top, None, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(target, base);
    let m = ro(&base);
    assert_eq!(
        fnv(&read_all(&m)),
        fnv(&model),
        "merged parent shows the child's view"
    );
    drop(m);
    let raw = d.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", p(&base), p(&raw)],
    );
    // The child now refers to a parent that changed: refused, clearly.
    let e = Vhdx::open(&top, OpenOptions { read_only: true })
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Chain);
    assert!(e.to_string().contains("has changed"), "{e}");
}

/// Three-level chain: merge the top into the grandparent with `into`, and merge
/// a chain into its child (dropping the base), which QEMU then reads as a plain
/// dynamic disk.
#[test]
fn merge_into_ancestor_and_into_child() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        d.path().join("a.vhdx"),
        d.path().join("b.vhdx"),
        d.path().join("c.vhdx"),
    );
    let mut model = vec![0u8; (16 * MIB) as usize];
    let va = dynamic(&a, 16 * MIB, MIB as u32);
    write(&va, &mut model, 0, &pattern(10, 5 * MIB as usize));
    va.close().unwrap();
    let vb = child(&b, &a);
    write(&vb, &mut model, MIB + 512, &pattern(11, 5000));
    vb.unmap(3 * MIB, MIB).unwrap();
    model[(3 * MIB) as usize..(4 * MIB) as usize].fill(0);
    vb.close().unwrap();
    let vc = child(&c, &b);
    write(&vc, &mut model, 8 * MIB, &pattern(12, 3 * MIB as usize));
    write(&vc, &mut model, MIB + 1024, &pattern(13, 512));
    vc.close().unwrap();
    assert_eq!(fnv(&read_all(&ro(&c))), fnv(&model));

    // Reverse: c absorbs b and a, becomes standalone.
    let c2 = d.path().join("c2.vhdx");
    std::fs::copy(&c, &c2).unwrap();
    vhdx::merge_into_child(&c2, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    let v = ro(&c2);
    assert_eq!(v.disk_type(), DiskType::Dynamic);
    assert!(v.parent().is_none());
    assert_eq!(fnv(&read_all(&v)), fnv(&model));
    drop(v);
    let raw = d.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    let out = run("qemu-img", &["check", p(&c2)]);
    assert!(out.contains("No errors"), "{out}");
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", p(&c2), p(&raw)],
    );

    // Forward into the grandparent, twice (a resumed merge is idempotent).
    for _ in 0..2 {
        vhdx::merge(&c, Some(&a), &|_, _| {}, &AtomicBool::new(false)).unwrap();
    }
    assert_eq!(fnv(&read_all(&ro(&a))), fnv(&model));
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", p(&a), p(&raw)],
    );
    // A cancelled merge stops with Cancelled.
    let e = vhdx::merge(&c, Some(&a), &|_, _| {}, &AtomicBool::new(true))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
}

/// Missing parents and parent loops are refused with clear errors.
#[test]
fn missing_parent_and_loop() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = (d.path().join("p.vhdx"), d.path().join("loop.vhdx"));
    dynamic(&base, 8 * MIB, MIB as u32).close().unwrap();
    child(&top, &base).close().unwrap();
    std::fs::rename(&base, d.path().join("elsewhere.vhdx")).unwrap();
    let e = Vhdx::open(&top, OpenOptions { read_only: true })
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Chain);
    assert!(e.to_string().contains("not found"), "{e}");
    std::os::unix::fs::symlink(&top, &base).unwrap();
    let e = Vhdx::open(&top, OpenOptions { read_only: true })
        .err()
        .unwrap();
    assert!(e.to_string().contains("loops"), "{e}");
}

/// Grow and shrink keep data; shrinking over data is refused and changes nothing;
/// QEMU agrees with the result.
#[test]
fn resize_grow_and_shrink() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("r.vhdx");
    let v = dynamic(&img, 10 * MIB, MIB as u32);
    let data = pattern(20, 3 * MIB as usize);
    v.write_at(&data, 0).unwrap();
    v.write_at(&[7u8; 4096], 9 * MIB).unwrap();
    v.resize(64 * MIB).unwrap();
    assert_eq!(v.size(), 64 * MIB);
    v.write_at(&[9u8; 4096], 60 * MIB).unwrap();
    let e = v.resize(8 * MIB).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(v.size(), 64 * MIB);
    v.unmap(9 * MIB, 55 * MIB).unwrap();
    v.resize(5 * MIB - 4096).unwrap();
    v.resize(6 * MIB).unwrap();
    let mut b = vec![0u8; 3 * MIB as usize];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, data);
    v.close().unwrap();
    let out = run("qemu-img", &["check", p(&img)]);
    assert!(out.contains("No errors"), "{out}");
    let info = run("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 6 * MIB)),
        "{info}"
    );
    let mut model = vec![0u8; (6 * MIB) as usize];
    model[..data.len()].copy_from_slice(&data);
    assert_eq!(fnv(&read_all(&ro(&img))), fnv(&model));
}

/// Compact releases zero and unmapped blocks, moves blocks into holes and
/// truncates; data and QEMU's view are unchanged.
#[test]
fn compact_reclaims_space() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("c.vhdx");
    let v = dynamic(&img, 40 * MIB, MIB as u32);
    let mut model = vec![0u8; (40 * MIB) as usize];
    for i in 0..40u64 {
        write(&v, &mut model, i * MIB, &pattern(i, MIB as usize));
    }
    for i in (0..40u64).step_by(2) {
        v.unmap(i * MIB, MIB).unwrap();
        model[(i * MIB) as usize..((i + 1) * MIB) as usize].fill(0);
    }
    v.write_at(&vec![0u8; MIB as usize], 5 * MIB).unwrap(); // zero-filled, still allocated
    model[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
    v.close().unwrap();
    let before = std::fs::metadata(&img).unwrap().len();
    let s = vhdx::compact(&img, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    let after = std::fs::metadata(&img).unwrap().len();
    assert!(s.zero_blocks >= 1 && s.moved_blocks > 0, "{s:?}");
    assert!(after <= before - 20 * MIB, "{before} -> {after}");
    assert_eq!(fnv(&read_all(&ro(&img))), fnv(&model));
    let out = run("qemu-img", &["check", p(&img)]);
    assert!(out.contains("No errors"), "{out}");
    let r = vhdx::check(&img, false).unwrap();
    assert!(r.is_clean() && r.leaked_bytes == 0, "{r:?}");
}

/// Check finds a BAT entry pointing outside the file without changing the file;
/// repair clears it and QEMU then reports no errors.
#[test]
fn check_and_repair() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("k.vhdx");
    let v = dynamic(&img, 16 * MIB, MIB as u32);
    v.write_at(&[1u8; 4096], 0).unwrap();
    v.write_at(&[2u8; 4096], 2 * MIB).unwrap();
    v.close().unwrap();
    // BAT at 3 MiB: entry 2 -> far beyond the end of the file.
    let mut bytes = std::fs::read(&img).unwrap();
    let at = (3 * MIB + 16) as usize;
    bytes[at..at + 8].copy_from_slice(&((1u64 << 40) | 6).to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let e = Vhdx::open(&img, OpenOptions { read_only: true })
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let r = vhdx::check(&img, false).unwrap();
    assert!(
        !r.is_clean() && r.errors[0].contains("BAT entry 2"),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        bytes,
        "check without repair changes nothing"
    );
    let r = vhdx::check(&img, true).unwrap();
    assert!(!r.repaired.is_empty(), "{r:?}");
    assert!(vhdx::check(&img, false).unwrap().is_clean());
    let out = run("qemu-img", &["check", p(&img)]);
    assert!(out.contains("No errors"), "{out}");
    let v = ro(&img);
    let mut b = [0u8; 4096];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1u8; 4096]);
}

/// raw -> vhdx -> raw and vhdx -> qcow2 -> vhdx keep every byte.
#[test]
fn convert_roundtrips() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("in.raw");
    let mut model = vec![0u8; (12 * MIB) as usize + 512];
    model[..MIB as usize].copy_from_slice(&pattern(30, MIB as usize));
    model[(7 * MIB) as usize..(7 * MIB) as usize + 3000].copy_from_slice(&pattern(31, 3000));
    std::fs::write(&raw, &model).unwrap();
    let never = AtomicBool::new(false);
    let v1 = d.path().join("a.vhdx");
    vhdx::convert(&raw, &v1, &Default::default(), &|_, _| {}, &never).unwrap();
    assert_eq!(fnv(&read_all(&ro(&v1))), fnv(&model));
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", p(&v1), p(&raw)],
    );
    let q = d.path().join("b.qcow2");
    vhdx::convert(&v1, &q, &Default::default(), &|_, _| {}, &never).unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(&q), p(&raw)],
    );
    let v2 = d.path().join("c.vhdx");
    let opts = vhdx::ConvertOptions {
        format: None,
        vhdx: CreateOptions {
            disk_type: DiskType::Fixed,
            block_size: MIB as u32,
            ..Default::default()
        },
    };
    vhdx::convert(&q, &v2, &opts, &|_, _| {}, &never).unwrap();
    assert_eq!(ro(&v2).disk_type(), DiskType::Fixed);
    let back = d.path().join("out.raw");
    vhdx::convert(&v2, &back, &Default::default(), &|_, _| {}, &never).unwrap();
    assert_eq!(fnv(&std::fs::read(&back).unwrap()), fnv(&model));
    // Existing destination: refused, untouched.
    let e = vhdx::convert(&raw, &back, &Default::default(), &|_, _| {}, &never)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

/// Two writers never open one file; readers share.
#[test]
fn locking() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("l.vhdx");
    let v = dynamic(&img, 8 * MIB, MIB as u32);
    let e = Vhdx::open(&img, OpenOptions { read_only: false })
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        Vhdx::open(&img, OpenOptions { read_only: true })
            .err()
            .unwrap()
            .kind(),
        ErrorKind::Busy
    );
    drop(v);
    let r1 = ro(&img);
    let _r2 = ro(&img);
    assert_eq!(
        Vhdx::open(&img, OpenOptions { read_only: false })
            .err()
            .unwrap()
            .kind(),
        ErrorKind::Busy
    );
    assert_eq!(
        r1.write_at(&[0u8; 512], 0).err().unwrap().kind(),
        ErrorKind::ReadOnly
    );
}

/// Unmap turns whole blocks UNMAPPED and returns their space to the file system.
#[test]
fn unmap_releases_space() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("u.vhdx");
    let v = dynamic(&img, 64 * MIB, MIB as u32);
    v.write_at(&pattern(40, (32 * MIB) as usize), 0).unwrap();
    v.flush().unwrap();
    let used = v.disk_usage().unwrap();
    v.unmap(0, 32 * MIB).unwrap();
    v.flush().unwrap();
    assert!(v.disk_usage().unwrap() + 30 * MIB < used);
    let st = v.block_status(0, 64 * MIB).unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].state, ExtentState::Unmapped);
    let mut b = vec![1u8; 4096];
    v.read_at(&mut b, 5 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Space is reused by the next write to the same block.
    let len = v.file_size().unwrap();
    v.write_at(&[3u8; 4096], 5 * MIB).unwrap();
    assert_eq!(v.file_size().unwrap(), len);
}

/// One handle shared by 8 threads writing (allocating) and reading disjoint
/// regions concurrently, on dynamic and differencing images: every thread reads
/// back exactly its own data, and the image checks clean after reopen.
#[test]
fn concurrent_io_on_one_handle() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("cb.vhdx");
    let b = dynamic(&base, 32 * MIB, MIB as u32);
    b.write_at(&pattern(77, (32 * MIB) as usize), 0).unwrap();
    b.close().unwrap();
    let diff = d.path().join("cd.vhdx");
    child(&diff, &base).close().unwrap();
    let dyn_img = d.path().join("cdyn.vhdx");
    dynamic(&dyn_img, 32 * MIB, MIB as u32).close().unwrap();
    for img in [&dyn_img, &diff] {
        let v = std::sync::Arc::new(Vhdx::open(img, OpenOptions { read_only: false }).unwrap());
        let before = read_all(&v);
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let v = v.clone();
                std::thread::spawn(move || {
                    let region = t * 4 * MIB; // 4 MiB per thread, straddling blocks
                    let mut model = vec![0u8; (4 * MIB) as usize];
                    v.read_at(&mut model, region).unwrap();
                    let mut x = t + 1;
                    for k in 0..200u64 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let len = 512 * (1 + (x >> 33) % 128);
                        let off = ((x >> 13) % (4 * MIB - len)) / 512 * 512;
                        let data = pattern(t * 1000 + k, len as usize);
                        v.write_at(&data, region + off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        let mut back = vec![0u8; len as usize];
                        v.read_at(&mut back, region + off).unwrap();
                        assert_eq!(back, data);
                        if k % 50 == 0 {
                            v.flush().unwrap();
                        }
                    }
                    let mut all = vec![0u8; (4 * MIB) as usize];
                    v.read_at(&mut all, region).unwrap();
                    assert_eq!(fnv(&all), fnv(&model), "thread {t}");
                    model
                })
            })
            .collect();
        let mut expect = Vec::new();
        for h in handles {
            expect.extend(h.join().unwrap());
        }
        assert_eq!(expect.len(), before.len());
        let v = std::sync::Arc::try_unwrap(v).ok().unwrap();
        v.close().unwrap();
        assert_eq!(fnv(&read_all(&ro(img))), fnv(&expect));
        assert!(vhdx::check(img, false).unwrap().is_clean());
    }
}
