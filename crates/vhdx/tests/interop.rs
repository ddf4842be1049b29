//! Interoperability with QEMU's VHDX driver, both directions.

mod common;
use common::*;
use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

/// Images made by `qemu-img create -f vhdx` (fixed and dynamic, several block and
/// sector sizes) and filled by `qemu-io` read back through our crate exactly as
/// QEMU's own conversion to raw reads them.
#[test]
fn qemu_written_images_read_back() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU writes only 512-byte logical sectors; vary what it can vary.
    let matrix: &[(&str, &str, &str)] = &[
        ("dynamic", "1M", "block_state_zero=on,log_size=1M"),
        ("dynamic", "8M", "block_state_zero=off,log_size=1M"),
        ("dynamic", "32M", "log_size=4M"),
        ("fixed", "1M", "log_size=1M"),
        ("fixed", "16M", "log_size=2M"),
        ("dynamic", "256M", "log_size=1M"),
    ];
    let ls = &512u32;
    for (i, (sub, bs, extra)) in matrix.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.vhdx"));
        let raw = dir.path().join(format!("q{i}.raw"));
        let opts = format!("subformat={sub},block_size={bs},{extra}");
        run(
            "qemu-img",
            &["create", "-q", "-f", "vhdx", "-o", &opts, p(&img), "40M"],
        );
        let writes = [
            "write -P 0x11 0 64k",
            "write -P 0x22 1048064 4096", // straddles a 1 MiB block boundary
            "write -P 0x33 33554432 2M",
            "write -P 0x44 40894464 1M", // last MiB
            "write -z 33554432 4096",
        ];
        let mut args = vec!["-f", "vhdx"];
        for w in &writes {
            args.push("-c");
            args.push(w);
        }
        args.push(p(&img));
        run("qemu-io", &args);
        run(
            "qemu-img",
            &["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&raw)],
        );
        let expect = std::fs::read(&raw).unwrap();
        let v = Vhdx::open(&img, OpenOptions { read_only: true }).unwrap();
        assert_eq!(v.logical_sector_size(), *ls);
        assert_eq!(v.size(), 40 << 20);
        assert_eq!(
            v.disk_type(),
            if *sub == "fixed" {
                DiskType::Fixed
            } else {
                DiskType::Dynamic
            }
        );
        let got = read_all(&v);
        assert_eq!(fnv(&got), fnv(&expect), "{sub} {bs} {extra}: data differs");
        assert_eq!(&got[..4], &[0x11; 4]);
        // Unaligned read across blocks.
        let mut b = vec![0u8; 5000];
        v.read_at(&mut b, 1048000).unwrap();
        assert_eq!(b, expect[1048000..1053000]);
        drop(v);
        // And we can write to QEMU's image; QEMU sees our writes.
        let v = Vhdx::open(&img, OpenOptions { read_only: false }).unwrap();
        let pat = pattern(i as u64, 300_000);
        v.write_at(&pat, 5_000_000).unwrap();
        v.close().unwrap();
        run("qemu-img", &["check", "-q", p(&img)]);
        let raw2 = dir.path().join(format!("q{i}b.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&raw2)],
        );
        let after = std::fs::read(&raw2).unwrap();
        assert_eq!(&after[5_000_000..5_300_000], &pat[..]);
        assert_eq!(&after[..5_000_000], &expect[..5_000_000]);
    }
}

/// Images written by our crate pass `qemu-img check` and `qemu-img compare`
/// against the raw image holding the same data.
#[test]
fn our_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU opens only 512-byte logical sectors; 4096 is covered by our own tests.
    let cases: &[(DiskType, u32, u32)] = &[
        (DiskType::Dynamic, 1 << 20, 512),
        (DiskType::Dynamic, 32 << 20, 4096),
        (DiskType::Fixed, 8 << 20, 512),
        (DiskType::Dynamic, 256 << 20, 4096),
    ];
    let ls = &512u32;
    for (i, (kind, bs, phys)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("o{i}.vhdx"));
        let raw = dir.path().join(format!("o{i}.raw"));
        let size = 100u64 << 20;
        let v = Vhdx::create(
            &img,
            &CreateOptions {
                size,
                disk_type: *kind,
                block_size: *bs,
                logical_sector_size: *ls,
                physical_sector_size: *phys,
                ..Default::default()
            },
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        for (k, (off, len)) in [
            (0u64, 4096usize),
            (1_048_000, 9000),
            (50 << 20, 3 << 20),
            (size - 8192, 8192),
            (7, 13),
        ]
        .iter()
        .enumerate()
        {
            let d = pattern(k as u64 + 100, *len);
            v.write_at(&d, *off).unwrap();
            model[*off as usize..*off as usize + len].copy_from_slice(&d);
        }
        v.write_zeroes(50 << 20, 1 << 20).unwrap();
        model[50 << 20..51 << 20].fill(0);
        assert_eq!(fnv(&read_all(&v)), fnv(&model));
        v.close().unwrap();
        std::fs::write(&raw, &model).unwrap();
        let out = run("qemu-img", &["check", p(&img)]);
        assert!(out.contains("No errors"), "{out}");
        run(
            "qemu-img",
            &["compare", "-f", "vhdx", "-F", "raw", p(&img), p(&raw)],
        );
        let info = run("qemu-img", &["info", "--output=json", p(&img)]);
        assert!(info.contains("\"virtual-size\": 104857600"), "{info}");
    }
}

/// A log we leave non-empty (process "killed" after writing the log entry and
/// before applying it) is replayed by `qemu-img check -r all`, and one left by
/// the same situation is replayed by our own open.
#[test]
fn unapplied_log_is_replayed_by_qemu_and_by_us() {
    let dir = tempfile::tempdir().unwrap();
    for replayer in ["qemu", "us"] {
        let img = dir.path().join(format!("log-{replayer}.vhdx"));
        let v = Vhdx::create(
            &img,
            &CreateOptions {
                size: 64 << 20,
                block_size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        v.write_at(&[0x5A; 8192], 3 << 20).unwrap();
        v.flush().unwrap();
        v.testing_stop_after_log();
        let d = pattern(9, 1 << 20);
        v.write_at(&d, 10 << 20).unwrap();
        v.flush().unwrap(); // writes the log entry, does not apply it
        v.testing_abandon();
        // The BAT on disk does not yet map block 10: the data is only reachable by replay.
        let (ok, msg) = try_run("qemu-img", &["info", p(&img)]);
        assert!(
            !ok && msg.contains("replay"),
            "qemu must see a dirty log: {msg}"
        );
        let ro = Vhdx::open(&img, OpenOptions { read_only: true }).unwrap();
        let mut b = vec![0u8; 1 << 20];
        ro.read_at(&mut b, 10 << 20).unwrap();
        assert_eq!(b, d, "read-only open applies the log in memory");
        drop(ro);
        if replayer == "qemu" {
            run("qemu-img", &["check", "-r", "all", p(&img)]);
        } else {
            let v = Vhdx::open(&img, OpenOptions { read_only: false }).unwrap();
            assert!(v.log_replayed());
            v.close().unwrap();
        }
        let raw = dir.path().join("r.raw");
        let _ = std::fs::remove_file(&raw);
        run(
            "qemu-img",
            &["convert", "-f", "vhdx", "-O", "raw", p(&img), p(&raw)],
        );
        let all = std::fs::read(&raw).unwrap();
        assert_eq!(&all[10 << 20..11 << 20], &d[..]);
        assert_eq!(&all[3 << 20..(3 << 20) + 8192], &[0x5A; 8192][..]);
        let out = run("qemu-img", &["check", p(&img)]);
        assert!(out.contains("No errors"), "{out}");
    }
}

/// Logs written by QEMU: `qemu-io` is SIGKILLed while allocating blocks until a
/// kill leaves a log with entries to replay; our replay (in memory for a
/// read-only open, in place for read-write) gives the same image as QEMU's own
/// `qemu-img check -r all` on a copy.
#[test]
fn qemu_written_log_is_replayed_by_us() {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    let start = Instant::now();
    let mut found = 0;
    let mut attempt = 0u64;
    while found < 3 && start.elapsed() < Duration::from_secs(40) {
        attempt += 1;
        let _ = std::fs::remove_file(&img);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                "block_size=1M",
                p(&img),
                "64M",
            ],
        );
        let mut child = std::process::Command::new("qemu-io")
            .args(["-f", "vhdx", "-c", "write -P 0x6b 0 64M", p(&img)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io: install qemu-utils (scripts/setup.sh)");
        std::thread::sleep(Duration::from_micros(
            50_000 + (attempt * 79_193) % 1_000_000,
        ));
        let _ = child.kill();
        let _ = child.wait();
        // Is there a log to replay? Read the current header and search the log.
        let f = std::fs::File::open(&img).unwrap();
        let mut hs = [None, None];
        for (i, off) in vhdx::header::HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; 4096];
            f.read_exact_at(&mut b, *off).unwrap();
            hs[i] = vhdx::header::Header::parse(&b);
        }
        let (_, h) = vhdx::header::select(hs).unwrap();
        if h.log_guid.is_zero() {
            continue;
        }
        let mut log = vec![0u8; h.log_length as usize];
        f.read_exact_at(&mut log, h.log_offset).unwrap();
        if vhdx::log::find_active(&log, h.log_guid).is_empty() {
            continue;
        }
        found += 1;
        let theirs = dir.path().join("theirs.vhdx");
        std::fs::copy(&img, &theirs).unwrap();
        run("qemu-img", &["check", "-q", "-r", "all", p(&theirs)]);
        let raw_theirs = dir.path().join("theirs.raw");
        let _ = std::fs::remove_file(&raw_theirs);
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "vhdx",
                "-O",
                "raw",
                p(&theirs),
                p(&raw_theirs),
            ],
        );
        let expect = std::fs::read(&raw_theirs).unwrap();
        let ro = Vhdx::open(&img, OpenOptions { read_only: true }).unwrap();
        assert_eq!(
            fnv(&read_all(&ro)),
            fnv(&expect),
            "in-memory replay of QEMU's log"
        );
        drop(ro);
        let rw = Vhdx::open(&img, OpenOptions { read_only: false }).unwrap();
        assert!(rw.log_replayed());
        assert_eq!(fnv(&read_all(&rw)), fnv(&expect), "replay of QEMU's log");
        rw.close().unwrap();
        let out = run("qemu-img", &["check", p(&img)]);
        assert!(out.contains("No errors"), "{out}");
        run(
            "qemu-img",
            &["compare", "-f", "vhdx", "-F", "vhdx", p(&img), p(&theirs)],
        );
    }
    assert!(
        found > 0,
        "no kill of qemu-io left a log to replay in {attempt} attempts"
    );
    eprintln!("{found} QEMU logs replayed in {attempt} attempts");
}
