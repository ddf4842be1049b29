//! Application-consistent recovery points and a scheduled initial replication, between two
//! vireod hosts in network namespaces. The guest mounts an ext4 data disk and writes a
//! file that stays in its page cache (periodic write-back off): a crash-consistent point
//! cannot hold it, the application-consistent one (file systems frozen through the agent
//! for the cut, which flushes them) must. Read host-side from the replica's VHDX layers
//! with `debugfs`. Also: the initial replication waits for `--start-at`, the guest writes
//! again after the thaw, and bad settings are refused with nothing enabled. The initial
//! replication (throttled to 4 MiB/s, 40 MiB of random data on the file system) is cut off
//! half way by taking A's link down for 5 s: it resumes where it was (progress never goes
//! back) instead of starting over. The replica host is killed (-9) in the middle of
//! applying a cycle (its layers written, not yet a point): after its restart the
//! half-applied cycle is gone, the same cycle is applied again, and the new point holds
//! what the guest wrote. Network
//! adapters follow the replica: a test failover puts the copy's adapter on the test switch
//! (same MAC, refused for a missing switch with nothing created), an unplanned failover
//! connects it to the switch of the same name with the primary's VLAN, and the guest sees
//! its MAC.

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use vireo_e2e::replica_io::*;
use vireo_e2e::vm_setup::{define_gen1_vm, DATA_64M};
use vireo_e2e::*;

/// File `name` of the ext4 file system in the raw image bytes `img` (empty when absent).
fn ext4_file(img: &[u8], name: &str, scratch: &Path) -> Vec<u8> {
    let raw = scratch.join("point-fs.raw");
    std::fs::write(&raw, img).expect("writing the point's image");
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {name}")])
        .arg(&raw)
        .output()
        .expect("debugfs (e2fsprogs)");
    let _ = std::fs::remove_file(&raw);
    o.stdout
}

#[test]
fn application_consistent_point_and_scheduled_start() {
    let t0 = Instant::now();
    let env: &[(&str, &str)] = &[("VIREO_TEST_REPLICA_BUCKET_MS", "1")];
    let (c, rpath) = replica_pair(&[env, env]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let boot_raw = guest_disk_lite(c.dir.path(), 1, GuestAgent::Vireo);
    let disks = define_gen1_vm(a, "g", &boot_raw, c.dir.path(), "256M", DATA_64M);
    // The data disk holds an ext4 file system made host-side, with 40 MiB of random data
    // (so the initial replication takes several throttled chunks).
    let fs_raw = c.dir.path().join("data-fs.raw");
    let fs_dir = c.dir.path().join("data-fs");
    std::fs::create_dir_all(&fs_dir).unwrap();
    let o = Command::new("head")
        .args(["-c", "40M", "/dev/urandom"])
        .output()
        .expect("head");
    std::fs::write(fs_dir.join("seed.bin"), &o.stdout).unwrap();
    std::fs::write(&fs_raw, vec![0u8; 64 << 20]).unwrap();
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "appdata", "-d"])
        .arg(&fs_dir)
        .arg(&fs_raw)
        .output()
        .expect("mkfs.ext4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&disks.data).unwrap();
    a.ok(&[
        "disk",
        "convert",
        fs_raw.to_str().unwrap(),
        disks.data.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&fs_raw);
    // A network adapter on switch `prod`, VLAN 10; the same switch exists on B.
    for h in [a, b] {
        h.ok(&["switch", "new", "prod", "--type", "private"]);
    }
    b.ok(&["switch", "new", "testnet", "--type", "private"]);
    a.ok(&["vm", "nic", "add", "g", "--switch", "prod"]);
    a.ok(&["vm", "nic", "set", "g", "nic0", "--vlan", "10"]);
    let nics: serde_json::Value =
        serde_json::from_str(&a.ok(&["vm", "nic", "list", "g", "--json"])).unwrap();
    let mac = nics[0]["mac"].as_str().expect("nic0's MAC").to_string();

    // Refusals: nothing is enabled by them.
    let e = a.fails(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "continuous",
        "--app-consistent-every",
        "2s",
    ]);
    assert!(e.contains("too often") && e.contains("freezes"), "{e}");
    let e = a.fails(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "continuous",
        "--start-at",
        "tomorrow-ish",
    ]);
    assert!(e.contains("RFC 3339"), "{e}");
    assert!(status(a).is_empty(), "a refused enable left a record");

    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    // Mount the data disk; no periodic write-back, so a file written now stays in the
    // page cache until something flushes it.
    let (code, out) = a.exec(
        "g",
        r#"set -e
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
D=$(for d in /sys/block/sd* /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = 131072 ] && echo /dev/${d##*/}; done | head -1)
mkdir -p /mnt && mount -t ext4 $D /mnt && sync
head -c 3000 /dev/urandom | base64 > /mnt/app.txt
sha256sum /mnt/app.txt | cut -c1-64"#,
    );
    assert_eq!(code, 0, "{out}");
    let want = out.trim().to_string();
    assert_eq!(want.len(), 64, "{out}");

    // Scheduled start: enabled now, the initial replication waits 12 s.
    let out = a.ok(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "continuous",
        "--recovery-points",
        "24",
        "--app-consistent-every",
        "1h",
        "--start-at",
        "12s",
        "--bandwidth",
        "4M",
    ]);
    assert!(
        out.contains("application-consistent every 1h") && out.contains("starts by itself"),
        "{out}"
    );
    let enabled_at = Instant::now();
    let st = wait_status(a, "the scheduled state", 5, |v| v["state"] == "enabled");
    assert!(st["start_at_unix_ms"].as_u64().is_some(), "{st}");
    assert_eq!(st["bytes_shipped"], 0, "{st}");
    assert_eq!(st["app_consistent_every_secs"], 3600, "{st}");
    let table = a.ok(&["replica", "status"]);
    assert!(table.contains("starts "), "{table}");
    std::thread::sleep(std::time::Duration::from_secs(6));
    let st = wait_status(a, "still waiting", 2, |v| v["state"] == "enabled");
    assert_eq!(st["bytes_shipped"], 0, "started before its time: {st}");

    // The initial replication, cut off half way: A's link goes down for 5 s once some
    // chunks have landed; it resumes from where it was.
    let st = wait_status(a, "the initial replication under way", 60, |v| {
        v["initial_progress"].as_f64().is_some_and(|p| p >= 0.2)
    });
    let at_cut = st["initial_progress"].as_f64().unwrap();
    assert!(
        at_cut < 0.9,
        "the initial replication went too fast to interrupt: {st}"
    );
    a.link(false);
    let cut_at = Instant::now();
    let mut seen = vec![at_cut];
    while cut_at.elapsed().as_secs() < 5 {
        if let Some(p) = status(a)
            .first()
            .and_then(|v| v["initial_progress"].as_f64())
        {
            seen.push(p);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    a.link(true);
    let resumed = Instant::now();
    while resumed.elapsed().as_secs() < 120 {
        let v = status(a).first().cloned().unwrap_or_default();
        if let Some(p) = v["initial_progress"].as_f64() {
            seen.push(p);
        }
        if v["state"] == "replicating" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    println!("initial progress around the cut: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]),
        "the initial replication went back (restarted?): {seen:?}"
    );

    // Initial replication (crash-consistent), then the first application-consistent cut.
    let st = wait_status(a, "an application-consistent point", 180, |v| {
        v["state"] == "replicating" && v["last_app_consistent_unix_ms"].as_u64().is_some()
    });
    assert!(
        enabled_at.elapsed().as_secs() >= 11,
        "the initial replication did not wait for --start-at"
    );
    assert!(st["warning"].is_null(), "{st}");
    println!("primary: {st}");
    let rs = wait_status(
        b,
        "the application-consistent point on the replica",
        30,
        |v| {
            v["points"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["app_consistent"] == true))
        },
    );
    let points = rs["points"].as_array().cloned().unwrap_or_default();
    println!("replica points: {points:?}");
    let app = points
        .iter()
        .find(|p| p["app_consistent"] == true)
        .and_then(|p| p["id"].as_u64())
        .unwrap();
    let crash = points
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .filter(|&id| id < app)
        .max()
        .expect("a crash-consistent point before the application-consistent one");
    let table = b.ok(&["replica", "status"]);
    assert!(
        table.contains(&format!("{app}*")) && table.contains("application-consistent"),
        "{table}"
    );

    // Host-side: the crash-consistent point lacks the cached file, the
    // application-consistent one holds it whole.
    let store = rpath.join("g").join("store");
    let scratch = c.dir.path();
    let before = ext4_file(&point_data(&store, crash, scratch), "/app.txt", scratch);
    assert_ne!(
        sha256_hex(&before),
        want,
        "the crash-consistent point {crash} already held the file: the test proves nothing"
    );
    let got = ext4_file(&point_data(&store, app, scratch), "/app.txt", scratch);
    assert_eq!(
        sha256_hex(&got),
        want,
        "application-consistent point {app}: /app.txt ({} bytes) is not what the guest wrote",
        got.len()
    );

    // The guest was thawed: it writes and syncs again.
    let (code, out) = a.exec(
        "g",
        "echo after > /mnt/after.txt && sync && cat /mnt/after.txt",
    );
    assert_eq!((code, out.trim()), (0, "after"), "the guest stayed frozen");

    // kill -9 of the replica host mid-apply: no half-applied cycle, the cycle comes again.
    let latest = |v: &serde_json::Value| {
        v["points"]
            .as_array()
            .and_then(|p| p.iter().filter_map(|p| p["id"].as_u64()).max())
            .unwrap_or(0)
    };
    let before = latest(&status(b).into_iter().next().unwrap_or_default());
    b.hold("replica-apply", 30_000);
    let (code, out) = a.exec(
        "g",
        "dd if=/dev/urandom of=/mnt/blob bs=64k count=16 2>/dev/null && sync && sha256sum /mnt/blob | cut -c1-64",
    );
    assert_eq!(code, 0, "{out}");
    let blob_sum = out.trim().to_string();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let incoming = loop {
        let found = std::fs::read_dir(&store)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with("incoming-"))
            })
            .unwrap_or(None);
        if let Some(n) = found {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no cycle reached the apply on B:\n{}",
            tail(&b.log(), 30)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // The layers are written (held before the rename): strike.
    std::thread::sleep(std::time::Duration::from_millis(500));
    b.kill9();
    b.unhold();
    b.spawn();
    let rs = wait_status(b, "a point after the restart", 60, |v| latest(v) > before);
    let after = latest(&rs);
    assert!(
        !store.join(&incoming).exists(),
        "the half-applied {incoming} is still in the store"
    );
    let got = ext4_file(&point_data(&store, after, scratch), "/blob", scratch);
    assert_eq!(
        sha256_hex(&got),
        blob_sum,
        "point {after} after the restart lacks what the guest wrote (half-applied {incoming})"
    );
    println!("replica killed mid-apply ({incoming}); point {before} -> {after} after the restart");

    // Test failover: refused for a switch B does not have (nothing created), then on the
    // test switch with the primary's MAC.
    let e = b.fails(&["replica", "test-failover", "g", "--switch", "nosuch"]);
    assert!(
        e.contains("does not exist") && e.contains("switch new"),
        "{e}"
    );
    assert!(
        b.vm_names().iter().all(|n| n != "g-test"),
        "a refused test failover left a VM"
    );
    let out = b.ok(&["replica", "test-failover", "g", "--switch", "testnet"]);
    assert!(out.contains("on test switch testnet"), "{out}");
    let nics: serde_json::Value =
        serde_json::from_str(&b.ok(&["vm", "nic", "list", "g-test", "--json"])).unwrap();
    assert_eq!(nics[0]["switch"], "testnet", "{nics}");
    assert_eq!(nics[0]["mac"], mac.as_str(), "{nics}");
    b.ok(&["replica", "test-stop", "g"]);

    // Unplanned failover (the primary's VM is off): the adapter joins B's `prod` with VLAN 10.
    a.ok(&["replica", "disable", "g"]);
    a.ok(&["vm", "turn-off", "g"]);
    let out = b.ok(&["replica", "failover", "g"]);
    assert!(out.contains("on switch prod"), "{out}");
    let nics: serde_json::Value =
        serde_json::from_str(&b.ok(&["vm", "nic", "list", "g", "--json"])).unwrap();
    assert_eq!(nics[0]["switch"], "prod", "{nics}");
    assert_eq!(nics[0]["mac"], mac.as_str(), "{nics}");
    let vlan = nics[0]["port"]["vlan"].to_string();
    assert!(vlan.contains("10"), "VLAN of the primary not kept: {nics}");
    b.wait_heartbeat("g");
    let (code, out) = b.exec("g", "cat /sys/class/net/eth0/address");
    assert_eq!((code, out.trim()), (0, mac.as_str()), "the guest's adapter");
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
}
