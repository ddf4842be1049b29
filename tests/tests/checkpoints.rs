//! Checkpoints on a real generation 1 guest whose second disk (IDE, 64 MiB, found by size) is a VHDX served
//! by the disk service: the guest writes checksummed patterns across checkpoint create, more
//! writes, apply, more writes, remove with live merge while the guest writes, and a kill -9
//! of the worker during the merge; every block reads back as its last acknowledged write, in
//! the guest (page cache dropped) and on the host through qemu-img (an independent reader).

use std::process::Command;
use std::time::{Duration, Instant};
use vireo_e2e::guest_io::*;
use vireo_e2e::vm_setup::{define_gen1_vm, DATA_64M};
use vireo_e2e::*;

const MIB: usize = 1 << 20;

fn job_state(h: &Host) -> (String, String) {
    let jobs: serde_json::Value =
        serde_json::from_str(&h.ok(&["job", "list", "--json"])).expect("job list json");
    let j = jobs
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    (
        j["id"].as_str().unwrap_or("").to_string(),
        j["state"].as_str().unwrap_or("").to_string(),
    )
}

/// The whole checkpoint life cycle with data verified at every step (see the module doc).
#[test]
fn checkpoint_apply_remove_live_merge_kill9() {
    let h = Host::start();
    let raw = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    // Checkpoints need every disk in VHDX: the raw test image is converted first.
    let data = define_gen1_vm(&h, "g1", &raw, h.dir.path(), "256M", DATA_64M).data;
    h.ok(&["vm", "start", "g1"]);
    h.wait_heartbeat("g1");

    // A: blocks 0..8 before the checkpoint.
    let a = write_random(&h, "g1", 0, 8);
    let cp = h.ok(&["checkpoint", "new", "g1", "cp1", "--type", "production"]);
    assert!(cp.contains("cp1"), "{cp}");
    let listed = h.ok(&["checkpoint", "list", "g1"]);
    assert!(
        listed.contains("cp1") && listed.contains("<- now"),
        "{listed}"
    );
    // B: overwrite block 0..2, new blocks 8..12, after the checkpoint.
    let b = write_random(&h, "g1", 0, 2);
    let b2 = write_random(&h, "g1", 8, 4);
    let now = read_sums(&h, "g1", 0, 12);
    assert_eq!(&now[..2], &b[..]);
    assert_eq!(&now[2..8], &a[2..]);
    assert_eq!(&now[8..], &b2[..]);

    // Apply cp1 while the VM runs: a production checkpoint turns it off and leaves it off;
    // A is back, B is gone. A checkpoint that does not exist changes nothing.
    let e = h.fails(&["checkpoint", "apply", "g1", "nope"]);
    assert!(e.contains("nope"), "{e}");
    assert_eq!(
        h.show("g1")["state"],
        "running",
        "a refused apply turned nothing off"
    );
    let out = h.ok(&["checkpoint", "apply", "g1", "cp1"]);
    assert!(out.contains("(off)"), "{out}");
    assert_eq!(h.show("g1")["state"], "off");
    h.ok(&["vm", "start", "g1"]);
    h.wait_heartbeat("g1");
    let now = read_sums(&h, "g1", 0, 12);
    assert_eq!(
        &now[..8],
        &a[..],
        "apply did not restore the checkpoint's data"
    );
    assert!(
        now[8..].iter().all(|s| s == ZERO_MIB_SHA256),
        "data written after the checkpoint survived apply"
    );

    // C: more writes on the applied state.
    let c = write_random(&h, "g1", 4, 4);

    // Remove cp1 with a live merge while the guest keeps writing blocks 20..52; kill -9 the
    // worker during the merge.
    let writer = "setsid sh -c 'for i in $(seq 20 51); do head -c 1048576 /dev/urandom > /tmp/w; \
        dd if=/tmp/w of=$D bs=1048576 seek=$i conv=fsync 2>/dev/null && sha256sum /tmp/w | cut -d\" \" -f1 >> /run/sums; done; touch /run/done' \
        </dev/null >/dev/null 2>&1 & echo started";
    let (code, out) = h.exec("g1", "rm -f /run/sums /run/done");
    assert_eq!(code, 0, "{out}");
    let (code, out) = h.exec("g1", &format!("{} export D; {writer}", find_disk(DISK_64M)));
    assert_eq!(code, 0, "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let removed = h.ok(&["checkpoint", "remove", "g1", "cp1"]);
    assert!(removed.contains("live merge job"), "{removed}");
    let (job, state_at_kill) = job_state(&h);
    let wpid = h.show("g1")["worker"]["pid"].as_i64().expect("worker pid") as i32;
    // SAFETY: plain kill(2).
    unsafe { libc::kill(wpid, libc::SIGKILL) };
    eprintln!("killed the worker with job {job} {state_at_kill}");
    h.wait_for("g1", Duration::from_secs(30), "worker replaced", |v| {
        v["worker"]["pid"]
            .as_i64()
            .is_some_and(|p| p as i32 != wpid)
    });
    let t = Instant::now();
    loop {
        let (_, st) = job_state(&h);
        if st == "done" {
            break;
        }
        assert!(st == "copying", "merge job ended as {st}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "merge did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    while h.exec("g1", "test -e /run/done").0 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest writer did not finish"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, sums) = h.exec("g1", "cat /run/sums");
    assert_eq!(code, 0);
    let w: Vec<String> = sums.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(w.len(), 32, "every guest write was acknowledged: {sums}");
    let listed = h.ok(&["checkpoint", "list", "g1", "--json"]);
    let tree: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        tree["checkpoints"].as_array().map(|a| a.len()),
        Some(0),
        "{listed}"
    );
    assert_eq!(
        tree["leaves"][1].as_str(),
        data.to_str(),
        "the data disk is the leaf again"
    );

    let mut expect: Vec<String> = vec![ZERO_MIB_SHA256.to_string(); 64];
    expect[..8].clone_from_slice(&a);
    expect[4..8].clone_from_slice(&c);
    expect[20..52].clone_from_slice(&w);
    assert_eq!(
        read_sums(&h, "g1", 0, 64),
        expect,
        "guest reads after the merge differ"
    );

    // Host side, with QEMU's own VHDX reader, after a clean stop.
    h.ok(&["vm", "turn-off", "g1"]);
    let raw = h.dir.path().join("data.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&data)
        .arg(&raw)
        .status()
        .expect("qemu-img (scripts/setup.sh installs qemu-utils)");
    assert!(st.success(), "qemu-img could not read the merged VHDX");
    let bytes = std::fs::read(&raw).unwrap();
    let host: Vec<String> = bytes.chunks(MIB).map(sha256_hex).collect();
    assert_eq!(
        host, expect,
        "qemu-img reads different data from the merged VHDX"
    );
}

/// A standard checkpoint saves memory and device state with the disks: applied while the VM
/// runs, the VM is turned off, reverted and resumed where the checkpoint was (a tmpfs file written before it is back,
/// one written after it is gone) with the disk data of that moment.
#[test]
fn standard_checkpoint_restores_memory_and_disk() {
    let h = Host::start();
    let raw = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    let boot = h.dir.path().join("boot.vhdx");
    h.ok(&[
        "disk",
        "convert",
        raw.to_str().unwrap(),
        boot.to_str().unwrap(),
    ]);
    let data = h.dir.path().join("data.vhdx");
    h.ok(&["disk", "new", data.to_str().unwrap(), "--size", "64M"]);
    h.ok(&[
        "vm",
        "new",
        "g1",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        boot.to_str().unwrap(),
        "--disk",
        data.to_str().unwrap(),
    ]);
    h.ok(&["vm", "start", "g1"]);
    h.wait_heartbeat("g1");
    let (code, out) = h.exec("g1", "echo before > /run/marker; echo ok");
    assert_eq!(code, 0, "{out}");
    let a = write_random(&h, "g1", 0, 2);
    let t = Instant::now();
    h.ok(&["checkpoint", "new", "g1", "std1"]);
    let (paused_ms, background) = standard_checkpoint_pause(&h);
    eprintln!(
        "standard checkpoint took {:?} (CLI round trip, includes the RAM save); vCPUs paused {paused_ms} ms",
        t.elapsed()
    );
    assert!(
        background,
        "the memory state was not saved in the background (QEMU background-snapshot)"
    );
    let (code, out) = h.exec("g1", "echo after > /run/marker2; echo ok");
    assert_eq!(code, 0, "{out}");
    write_random(&h, "g1", 0, 2);
    // Applied while running: turned off, reverted, and running again from the saved state.
    let out = h.ok(&["checkpoint", "apply", "g1", "std1"]);
    assert!(out.contains("running from its memory state"), "{out}");
    h.wait_heartbeat("g1");
    let (code, out) = h.exec(
        "g1",
        "cat /run/marker; test -e /run/marker2 && echo still-there; true",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("before") && !out.contains("still-there"),
        "memory state not restored: {out}"
    );
    assert_eq!(read_sums(&h, "g1", 0, 2), a, "disk not at the checkpoint");
    h.ok(&["vm", "turn-off", "g1"]);
}

/// The vCPU pause of the last standard checkpoint and whether RAM was saved in the
/// background, from the worker's log (`paused_ms=.. background=..`).
fn standard_checkpoint_pause(h: &Host) -> (u64, bool) {
    let mut last = None;
    for e in std::fs::read_dir(h.state_dir().join("run")).expect("run dir") {
        let log = e.expect("run entry").path().join("worker.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("standard checkpoint") && l.contains("total_ms="))
        {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(|v| v.trim_matches(|c: char| !c.is_alphanumeric()).to_string())
            };
            let ms = field("paused_ms=").and_then(|v| v.parse().ok());
            let bg = field("background=").is_some_and(|v| v == "true");
            if let Some(ms) = ms {
                last = Some((ms, bg));
            }
        }
    }
    last.expect("the worker logged no standard checkpoint")
}

/// sha256 of each MiB of a disk image (any chain), read on the host: `vireo disk convert`
/// flattens it into a standalone VHDX, which QEMU's own reader turns into raw bytes.
fn host_sums(h: &Host, image: &str, tag: &str) -> Vec<String> {
    let flat = h.dir.path().join(format!("{tag}.vhdx"));
    let raw = h.dir.path().join(format!("{tag}.raw"));
    h.ok(&["disk", "convert", image, flat.to_str().unwrap()]);
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&flat)
        .arg(&raw)
        .status()
        .expect("qemu-img (scripts/setup.sh installs qemu-utils)");
    assert!(st.success(), "qemu-img could not read {}", flat.display());
    let bytes = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(&raw);
    bytes.chunks(MIB).map(sha256_hex).collect()
}

/// Removing an inner checkpoint while the guest writes: tree a → b → c with guest-written
/// data at each step; b is removed while the VM runs on c and keeps writing (c's layer takes
/// over b's live). The guest then reads every block as last written; applying c and then a
/// gives back exactly the data of those moments (read on the host through QEMU's reader).
#[test]
fn remove_inner_checkpoint_while_running() {
    let h = Host::start();
    let raw = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    define_gen1_vm(&h, "g1", &raw, h.dir.path(), "256M", DATA_64M);
    h.ok(&["vm", "start", "g1"]);
    h.wait_heartbeat("g1");
    let mut now: Vec<String> = vec![ZERO_MIB_SHA256.to_string(); 64];
    let put = |now: &mut Vec<String>, at: usize, s: Vec<String>| {
        now[at..at + s.len()].clone_from_slice(&s);
    };
    put(&mut now, 0, write_random(&h, "g1", 0, 6));
    h.ok(&["checkpoint", "new", "g1", "a", "--type", "production"]);
    let at_a = now.clone();
    put(&mut now, 4, write_random(&h, "g1", 4, 6)); // overwrites a's 4..6, new 6..10
    h.ok(&["checkpoint", "new", "g1", "b", "--type", "production"]);
    put(&mut now, 8, write_random(&h, "g1", 8, 4)); // overwrites b's 8..10
    h.ok(&["checkpoint", "new", "g1", "c", "--type", "production"]);
    let at_c = now.clone();
    put(&mut now, 1, write_random(&h, "g1", 1, 2));

    // Remove b while the guest writes blocks 30..46.
    let writer = "setsid sh -c 'for i in $(seq 30 45); do head -c 1048576 /dev/urandom > /tmp/w; \
        dd if=/tmp/w of=$D bs=1048576 seek=$i conv=fsync 2>/dev/null && sha256sum /tmp/w | cut -d\" \" -f1 >> /run/sums; done; touch /run/done' \
        </dev/null >/dev/null 2>&1 & echo started";
    let (code, out) = h.exec(
        "g1",
        &format!(
            "rm -f /run/sums /run/done; {} export D; {writer}",
            find_disk(DISK_64M)
        ),
    );
    assert_eq!(code, 0, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let removed = h.ok(&["checkpoint", "remove", "g1", "b"]);
    assert!(removed.contains("merge job"), "{removed}");
    let t = Instant::now();
    loop {
        let (_, st) = job_state(&h);
        if st == "done" {
            break;
        }
        assert!(st == "copying", "merge job ended as {st}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "merge did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    while h.exec("g1", "test -e /run/done").0 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest writer did not finish"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, sums) = h.exec("g1", "cat /run/sums");
    assert_eq!(code, 0);
    let w: Vec<String> = sums.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(w.len(), 16, "every guest write was acknowledged: {sums}");
    put(&mut now, 30, w);
    let tree: serde_json::Value =
        serde_json::from_str(&h.ok(&["checkpoint", "list", "g1", "--json"])).unwrap();
    let cps = tree["checkpoints"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = cps.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["a", "c"], "{tree}");
    assert_eq!(cps[1]["parent"], cps[0]["id"], "c now hangs from a: {tree}");
    assert_eq!(
        read_sums(&h, "g1", 0, 64),
        now,
        "guest reads after removing b"
    );

    // Apply c, then a: the data of those moments, read on the host.
    h.ok(&["checkpoint", "apply", "g1", "c"]);
    let leaf = |h: &Host| -> String {
        let t: serde_json::Value =
            serde_json::from_str(&h.ok(&["checkpoint", "list", "g1", "--json"])).unwrap();
        t["leaves"][1].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(host_sums(&h, &leaf(&h), "at-c"), at_c, "apply c");
    h.ok(&["checkpoint", "apply", "g1", "a"]);
    assert_eq!(host_sums(&h, &leaf(&h), "at-a"), at_a, "apply a");
}
