//! Storage live migration on a real generation 1 guest: its disks (boot VHDX and a 64 MiB
//! data VHDX with a checkpoint, so the chain has two layers) move to another directory
//! with `vireo vm move-storage` while the guest writes a checksummed pattern. Afterwards
//! every MiB reads back as its last write in the guest (page cache dropped) and on the new
//! files (read on the host by `vireo disk convert`, an independent reader of the chain), the
//! old files are gone and the VM configuration, `disks.json` and the checkpoint tree name
//! the new files. A cancelled move leaves everything on the old path, the VM running.

use std::time::{Duration, Instant};
use vireo_e2e::guest_io::*;
use vireo_e2e::vm_setup::{define_gen1_vm, DATA_64M};
use vireo_e2e::*;

/// Starts a guest writer over MiB 16..48 in the background; sums go to /run/sums.
fn start_writer(h: &Host) {
    let writer = "setsid sh -c 'for i in $(seq 16 47); do head -c 1048576 /dev/urandom > /tmp/w; \
        dd if=/tmp/w of=$D bs=1048576 seek=$i conv=fsync 2>/dev/null && sha256sum /tmp/w | cut -d\" \" -f1 >> /run/sums; done; touch /run/done' \
        </dev/null >/dev/null 2>&1 & echo started";
    let (code, out) = h.exec("g1", "rm -f /run/sums /run/done");
    assert_eq!(code, 0, "{out}");
    let (code, out) = h.exec("g1", &format!("{} export D; {writer}", find_disk(DISK_64M)));
    assert_eq!(code, 0, "{out}");
}

fn wait_writer(h: &Host) -> Vec<String> {
    let t = Instant::now();
    while h.exec("g1", "test -e /run/done").0 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest writer did not finish"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (code, out) = h.exec("g1", "cat /run/sums");
    assert_eq!(code, 0, "{out}");
    let sums: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(sums.len(), 32, "{out}");
    sums
}

#[test]
fn move_storage_while_guest_writes_then_cancelled_move() {
    let h = Host::start();
    let src = h.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let raw = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    define_gen1_vm(&h, "g1", &raw, &src, "256M", DATA_64M);
    h.ok(&["vm", "start", "g1"]);
    h.wait_heartbeat("g1");

    // A: MiB 0..8 before a checkpoint; B: MiB 4..8 after it (in the leaf).
    let mut want = write_random(&h, "g1", 0, 8);
    h.ok(&["checkpoint", "new", "g1", "cp1", "--type", "production"]);
    want.splice(4..8, write_random(&h, "g1", 4, 4));
    let before = files_in(&src);
    assert_eq!(before.len(), 4, "two chains of two layers: {before:?}");

    // Refusals change nothing.
    let file = h.dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("sub");
    let e = h.fails(&[
        "vm",
        "move-storage",
        "g1",
        "--path",
        under_file.to_str().unwrap(),
    ]);
    assert!(!e.is_empty());
    assert_eq!(files_in(&src), before, "a refused move changed the source");
    let e = h.fails(&["vm", "move-storage", "g1", "--path", src.to_str().unwrap()]);
    assert!(e.contains("already has"), "{e}");

    // Move while the guest writes MiB 16..48.
    let dst = h.dir.path().join("dst");
    start_writer(&h);
    std::thread::sleep(Duration::from_millis(300));
    let out = h.ok(&["vm", "move-storage", "g1", "--path", dst.to_str().unwrap()]);
    assert!(out.contains("moved"), "{out}");
    let w = wait_writer(&h);
    want.resize(16, String::new());
    want.extend(w);
    let now = read_sums(&h, "g1", 0, 48);
    for (i, (a, b)) in now.iter().zip(&want).enumerate() {
        if (8..16).contains(&i) {
            continue;
        }
        assert_eq!(a, b, "MiB {i} differs in the guest after the move");
    }
    // Old files gone, new ones named everywhere.
    assert!(
        files_in(&src).is_empty(),
        "old files left: {:?}",
        files_in(&src)
    );
    assert_eq!(files_in(&dst).len(), 4, "{:?}", files_in(&dst));
    let v = h.show("g1");
    for d in v["disks"].as_array().expect("disks") {
        let p = d["path"].as_str().unwrap_or("");
        assert!(
            p.starts_with(dst.to_str().unwrap()),
            "config still names {p}"
        );
    }
    let cps = h.ok(&["checkpoint", "list", "g1", "--json"]);
    assert!(!cps.contains(src.to_str().unwrap()), "{cps}");
    let jobs = h.ok(&["job", "list", "--json"]);
    assert!(
        jobs.contains("move-storage") && jobs.contains("done"),
        "{jobs}"
    );

    // A cancelled move: throttled, cancelled while copying; nothing changes.
    let dst2 = h.dir.path().join("dst2");
    let id = h
        .ok(&[
            "vm",
            "move-storage",
            "g1",
            "--path",
            dst2.to_str().unwrap(),
            "--bandwidth",
            "2M",
            "--no-wait",
        ])
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(1500));
    h.ok(&["job", "cancel", &id]);
    let t = Instant::now();
    loop {
        let j: serde_json::Value =
            serde_json::from_str(&h.ok(&["job", "show", &id, "--json"])).expect("job json");
        match j["state"].as_str().unwrap_or("") {
            "cancelled" => break,
            "copying" => {}
            s => panic!("cancelled move ended as {s}: {j}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cancel did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        files_in(&dst2).is_empty(),
        "partial files left: {:?}",
        files_in(&dst2)
    );
    assert_eq!(files_in(&dst).len(), 4);
    assert_eq!(h.show("g1")["state"].as_str(), Some("running"));
    let now = read_sums(&h, "g1", 0, 48);
    for (i, (a, b)) in now.iter().zip(&want).enumerate() {
        if !(8..16).contains(&i) {
            assert_eq!(a, b, "MiB {i} differs after the cancelled move");
        }
    }

    // The new files on the host, read by an independent reader once the VM is off.
    h.ok(&["vm", "turn-off", "g1"]);
    let leaf = files_in(&dst)
        .into_iter()
        .find(|f| f.starts_with("data") && f.ends_with(".avhdx"))
        .expect("data leaf in dst");
    let out = h.dir.path().join("data.raw");
    h.ok(&[
        "disk",
        "convert",
        dst.join(&leaf).to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    let chunk = h.dir.path().join("chunk");
    for i in (0..48).filter(|i| !(8..16).contains(i)) {
        std::fs::write(&chunk, &bytes[i << 20..(i + 1) << 20]).unwrap();
        assert_eq!(
            sha256_file(&chunk),
            want[i],
            "MiB {i} differs on the new files"
        );
    }
}
