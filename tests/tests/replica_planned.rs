//! Replica, planned and test failover between two vireod hosts in network namespaces; a
//! generation 1 guest writes checksummed 4 KiB records to its data disk on host A, which
//! replicates it (continuous mode) to host B. One guest, two hosts, these checks:
//! - test failover `--point OLD` on B while the guest keeps writing: the test copy boots,
//!   its data disk is byte-identical to recovery point OLD (not the latest), replication
//!   goes on meanwhile (B keeps applying cycles), `test-stop` removes the copy and leaves
//!   the points; a point that does not exist is refused;
//! - planned failover A -> B while the guest writes: the last record the guest wrote on A
//!   (read host-side from A's disk after the failover) is on B, the whole data disk
//!   matches, and replication is reversed: B ships only the blocks changed since the
//!   failover (bytes counted) and A's latest point equals B's disk byte for byte;
//! - planned failover back B -> A: the VM runs on A with B's last write, and replication
//!   is reversed again (A -> B).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vireo_e2e::multihost::{Cluster, NsHost};
use vireo_e2e::replica_io::*;
use vireo_e2e::*;

const FIND_DISK: &str = r#"D=$(for d in /sys/block/sd* /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = 32768 ] && echo /dev/${d##*/}; done | head -1)"#;

/// Starts the record writer in the guest (`/tmp/counter` holds the last record written).
fn writer() -> String {
    format!(
        r#"cat > /tmp/w.sh <<'EOS'
{FIND_DISK}
i=$(cat /tmp/counter 2>/dev/null || echo ${{BASE:-0}})
while true; do
  i=$((i+1))
  head -c 4000 /dev/urandom > /tmp/r
  s=$(sha256sum /tmp/r | cut -c1-64)
  {{ cat /tmp/r; printf '%s %s\n' "$i" "$s"; }} > /tmp/rec
  dd if=/tmp/rec of=$D bs=4096 seek=$((i % 64)) count=1 conv=sync,fsync 2>/dev/null
  echo $i > /tmp/counter
  sleep 0.05
done
EOS
BASE=$1 setsid sh /tmp/w.sh >/dev/null 2>&1 &
echo $! > /tmp/w.pid; echo started"#
    )
}

/// Stops the writer; prints the last record and the data disk's sha256.
fn stop_and_sum() -> String {
    format!(
        "kill $(cat /tmp/w.pid); sleep 0.3; sync; cat /tmp/counter; {FIND_DISK}; dd if=$D bs=1M count=16 2>/dev/null | sha256sum | cut -c1-64"
    )
}

/// Prints the data disk's sha256.
fn sum() -> String {
    format!("{FIND_DISK}; dd if=$D bs=1M count=16 2>/dev/null | sha256sum | cut -c1-64")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Waits for the status row of VM `g` in `role` matching `pred`.
fn wait_row(
    h: &NsHost,
    role: &str,
    what: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_status(h, what, secs, |v| v["role"] == role && pred(v))
}

/// The store directory of VM `g` under a host's replica path (`store`, or `store-<ms>`
/// after a reverse replication into a directory that had one).
fn store_of(rpath: &Path) -> std::path::PathBuf {
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(rpath.join("g").join("replica-vm.json")).expect("replica-vm.json"),
    )
    .expect("replica record");
    rpath
        .join("g")
        .join(rec["store"].as_str().unwrap_or("store"))
}

fn points(row: &serde_json::Value) -> Vec<u64> {
    row["points"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

fn two_lines(out: &str) -> (u64, String) {
    let mut l = out.lines();
    let n = l
        .next()
        .and_then(|x| x.trim().parse().ok())
        .expect("counter");
    (n, l.next().expect("sum").trim().to_string())
}

#[test]
#[ignore = "green (537-673 s under load 9-15, 2026-11-28) but over the CI budget until folded into the replica test: run with --ignored"]
fn test_failover_planned_failover_and_reverse() {
    let t0 = Instant::now();
    let env: &[(&str, &str)] = &[("VIREO_TEST_REPLICA_BUCKET_MS", "1")];
    let c = Cluster::start(2, &[env, env]);
    c.trust(0, 1);
    c.trust(1, 0);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let scratch = c.dir.path();
    let (ra, rb) = (scratch.join("replicas-a"), scratch.join("replicas-b"));
    a.ok(&[
        "host",
        "set",
        "--allow-replica-from",
        "10.77.0.2",
        "--replica-path",
        ra.to_str().unwrap(),
    ]);
    b.ok(&[
        "host",
        "set",
        "--allow-replica-from",
        "10.77.0.1",
        "--replica-path",
        rb.to_str().unwrap(),
    ]);
    let boot_raw = guest_disk(scratch, 1, GuestAgent::Vireo);
    let boot = scratch.join("boot.vhdx");
    a.ok(&[
        "disk",
        "convert",
        boot_raw.to_str().unwrap(),
        boot.to_str().unwrap(),
    ]);
    let data = scratch.join("data.vhdx");
    a.ok(&["disk", "new", data.to_str().unwrap(), "--size", "16M"]);
    a.ok(&[
        "vm",
        "new",
        "g",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        boot.to_str().unwrap(),
        "--disk",
        data.to_str().unwrap(),
    ]);
    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    let (code, out) = a.exec("g", &writer());
    assert_eq!(code, 0, "{out}");
    a.ok(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "continuous",
        "--recovery-points",
        "24",
        "--start",
    ]);
    wait_row(
        a,
        "primary",
        "initial replication and two cycles",
        180,
        |v| v["state"] == "replicating" && v["cycles"].as_u64().unwrap_or(0) >= 2,
    );

    // Link cut during cycles: replication catches up with the changed blocks only, and
    // the point after it holds whole records.
    let before = wait_row(a, "primary", "status", 10, |_| true);
    let shipped0 = before["bytes_shipped"].as_u64().unwrap_or(0);
    a.link(false);
    std::thread::sleep(Duration::from_secs(6));
    a.link(true);
    let t_up = now_ms();
    let after = wait_row(
        a,
        "primary",
        "replication after the link came back",
        120,
        |v| v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_up + 1000 && v["last_error"].is_null(),
    );
    let delta = after["bytes_shipped"].as_u64().unwrap_or(0) - shipped0;
    assert!(
        delta < 4 << 20,
        "catching up after the cut shipped {delta} bytes (a full resync?)"
    );
    let row = wait_row(b, "replica", "a point after the cut", 60, |v| {
        v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_up + 1000
    });
    let id = *points(&row).last().expect("point");
    let max = check_records(&point_data(&store_of(&rb), id, scratch));
    println!("link cut 6 s: caught up with {delta} bytes; point {id} valid (records up to {max})");

    // Test failover on an older point while the guest writes and cycles continue.
    let row = wait_row(b, "replica", "three recovery points", 90, |v| {
        points(v).len() >= 3
    });
    let ids = points(&row);
    let old = ids[ids.len() - 2];
    let store_b = store_of(&rb);
    let old_img = point_data(&store_b, old, scratch);
    let old_max = check_records(&old_img);
    let old_sum = sha256_hex(&old_img);
    let e = b.fails(&["replica", "test-failover", "g", "--point", "999999"]);
    assert!(e.contains("no recovery point 999999"), "{e}");
    let out = b.ok(&["replica", "test-failover", "g", "--point", &old.to_string()]);
    println!("{out}");
    assert!(
        out.contains("g-test") && out.contains("replication continues"),
        "{out}"
    );
    let cycles_before = row["cycles"].as_u64().unwrap_or(0);
    b.wait_heartbeat("g-test");
    let (code, out) = b.exec("g-test", &sum());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        old_sum,
        "the test copy is not point {old} (records up to {old_max})"
    );
    let row = wait_row(b, "replica", "cycles while the test copy runs", 60, |v| {
        v["cycles"].as_u64().unwrap_or(0) > cycles_before + 2
    });
    assert!(
        row["failover"].as_str().unwrap_or("").contains("test copy"),
        "{row}"
    );
    assert!(b.show("g-test")["nics"]
        .as_array()
        .map(|n| n.is_empty())
        .unwrap_or(true));
    let out = b.ok(&["replica", "test-stop", "g"]);
    assert!(out.contains("removed the test copy"), "{out}");
    assert!(!b.vm_names().contains(&"g-test".to_string()));
    assert!(
        !rb.join("g").join(format!("test-{old}")).exists(),
        "test layers left"
    );
    let after = wait_row(b, "replica", "a cycle after test-stop", 60, |v| {
        v["cycles"].as_u64().unwrap_or(0) > row["cycles"].as_u64().unwrap_or(0)
            && v["failover"].is_null()
    });
    println!("test failover on point {old} (records up to {old_max}) ok; replica: {after}");

    // Planned failover A -> B while the guest writes.
    let e = b.fails(&["replica", "failover", "g", "--planned"]);
    assert!(e.contains("not replicated from this host"), "{e}");
    let out = a.ok(&["replica", "failover", "g", "--planned"]);
    println!("{out}");
    assert!(
        out.contains("zero data loss") && out.contains("replication reversed"),
        "{out}"
    );
    let a_img = raw_image(&data, scratch);
    let last_on_a = check_records(&a_img);
    let a_sum = sha256_hex(&a_img);
    assert!(
        last_on_a > old_max,
        "the writer did not run on A: {last_on_a}"
    );
    b.wait_heartbeat("g");
    let (code, out) = b.exec("g", &sum());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        a_sum,
        "B's disk differs from A's after the planned failover (A's last record {last_on_a})"
    );
    println!("planned failover: A's last record {last_on_a} is on B, data disk identical");

    // Reverse replication B -> A: only what changes on B goes back.
    let rev = wait_row(b, "primary", "reverse replication", 120, |v| {
        v["state"] == "replicating"
            && v["cycles"].as_u64().unwrap_or(0) >= 1
            && v["last_error"].is_null()
    });
    println!("reverse: {rev}");
    assert!(
        !a.vm_names().contains(&"g".to_string()),
        "A still defines g"
    );
    let (code, out) = b.exec(
        "g",
        &format!(
            "{}; echo $?",
            writer().replace("$1", &last_on_a.to_string())
        ),
    );
    assert_eq!(code, 0, "{out}");
    std::thread::sleep(Duration::from_secs(3));
    let (code, out) = b.exec("g", &stop_and_sum());
    assert_eq!(code, 0, "{out}");
    let (last_on_b, b_sum) = two_lines(&out);
    assert!(
        last_on_b > last_on_a,
        "B's writer: {last_on_b} <= {last_on_a}"
    );
    let t_stop = now_ms();
    let row = wait_row(
        a,
        "replica",
        "A's point after B's writer stopped",
        90,
        |v| v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_stop + 500,
    );
    let id = *points(&row).last().expect("point");
    let store_a = store_of(&ra);
    let img = point_data(&store_a, id, scratch);
    assert_eq!(
        sha256_hex(&img),
        b_sum,
        "A's point {id} differs from B's disk"
    );
    assert_eq!(check_records(&img), last_on_b);
    let rev = wait_row(b, "primary", "reverse bytes", 10, |_| true);
    let shipped = rev["bytes_shipped"].as_u64().unwrap_or(0);
    let total = std::fs::metadata(&boot_raw).map(|m| m.len()).unwrap_or(0) + (16 << 20);
    println!("reverse replication shipped {shipped} bytes for disks of {total} bytes");
    assert!(
        shipped < total / 8,
        "reverse replication shipped {shipped} of {total} bytes"
    );

    // Planned failover back B -> A, and replication reversed again.
    let out = b.ok(&["replica", "failover", "g", "--planned"]);
    println!("{out}");
    assert!(out.contains("replication reversed"), "{out}");
    a.wait_heartbeat("g");
    let (code, out) = a.exec("g", &sum());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        b_sum,
        "A's disk after the failover back differs from B's"
    );
    wait_row(a, "primary", "replication A -> B again", 120, |v| {
        v["state"] == "replicating"
            && v["cycles"].as_u64().unwrap_or(0) >= 1
            && v["last_error"].is_null()
    });
    a.ok(&["vm", "turn-off", "g"]);
    println!(
        "replica_planned e2e wall time: {:.0}s",
        t0.elapsed().as_secs_f64()
    );
}
