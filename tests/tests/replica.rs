//! Replica between two vireod hosts in network namespaces: a generation 1 guest writes
//! checksummed 4 KiB records to its data disk while host A replicates it (continuous mode)
//! to host B. Proves: refusals (host not allowed, untrusted host, VM not replicated, commit
//! without a failover); the initial replication completes and cycles follow; a recovery point cut
//! while the guest writes holds only whole, valid records (crash-consistent); after the
//! writer stops, the latest point is byte-identical to the primary's disk at that cut
//! (read host-side from the VHDX chain); unplanned failover after kill -9 of A's vireod,
//! worker and QEMU and a cut link starts the VM on B from the latest point with every
//! record valid and nothing older than the verified cut; the choice is revised to an
//! older point (the guest holds exactly that point's records) and back; commit, after which
//! the point layers are merged into g's disks live and deleted; then A comes back with
//! its diverged copy and `vireo replica reverse` on B replicates back by a checksum
//! resync: only the differing MiBs are shipped and A's point equals B's data disk;
//! a 6 s link cut during cycles is caught up without a full resync;
//! a test failover on an older point while cycles go on (no network adapter, test-stop
//! removes it); a planned failover home B -> A while the guest writes (A's point equals
//! B's whole data disk at the cut: zero loss), g runs on A and replication is reversed; A
//! merges the layers under g (the guest's data disk is B's before and after).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use vireo_e2e::guest_io::RECORD_WRITER;
use vireo_e2e::multihost::{Cluster, NsHost};
use vireo_e2e::replica_io::*;
use vireo_e2e::vm_setup::{define_gen1_vm, DATA_16M};
use vireo_e2e::*;

/// Record checks inside the guest (after a failover): every record's checksum and slot;
/// prints `OK <max seq> <records>`.
const CHECK: &str = r#"D=$(for d in /sys/block/sd* /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = 32768 ] && echo /dev/${d##*/}; done | head -1)
max=0; n=0; bad=""
for k in $(seq 0 63); do
  dd if=$D of=/tmp/b bs=4096 skip=$k count=1 2>/dev/null
  t=$(dd if=/tmp/b bs=1 skip=4000 2>/dev/null | tr -d '\000')
  [ -z "$t" ] && continue
  seq=${t%% *}; sum=${t#* }
  got=$(head -c 4000 /tmp/b | sha256sum | cut -c1-64)
  [ "$got" = "$sum" ] || bad="$bad sum@$k"
  [ $((seq % 64)) -eq $k ] || bad="$bad slot@$k"
  [ $seq -gt $max ] && max=$seq
  n=$((n+1))
done
if [ -z "$bad" ]; then echo "OK $max $n"; else echo "BAD$bad"; fi"#;

fn kill_all(h: &NsHost) {
    h.kill9();
    if let Ok(rd) = std::fs::read_dir(h.state_dir().join("run")) {
        for e in rd.flatten() {
            for f in ["worker.pid", "qemu.pid"] {
                if let Some(pid) = std::fs::read_to_string(e.path().join(f))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

#[test]
fn replicate_verify_and_unplanned_failover() {
    let t0 = Instant::now();
    let env: &[(&str, &str)] = &[("VIREO_TEST_REPLICA_BUCKET_MS", "1")];
    let c = Cluster::start(2, &[env, env]);
    c.trust(0, 1);
    c.trust(1, 0);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let boot_raw = guest_disk(c.dir.path(), 1, GuestAgent::Vireo);
    define_gen1_vm(a, "g", &boot_raw, c.dir.path(), "256M", DATA_16M);

    // Refusals: B allows no replicas yet; nothing is replicated; nothing to commit.
    let e = a.fails(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "continuous",
    ]);
    assert!(e.contains("does not accept replicas"), "{e}");
    let e = a.fails(&[
        "replica",
        "enable",
        "g",
        "--to",
        "10.77.0.9:7443",
        "--interval",
        "continuous",
    ]);
    assert!(e.contains("is not trusted"), "{e}");
    let e = b.fails(&["replica", "failover", "nosuch"]);
    assert!(
        e.contains("no replicas") || e.contains("not replicated"),
        "{e}"
    );
    let rpath = c.dir.path().join("replicas");
    b.ok(&[
        "host",
        "set",
        "--allow-replica-from",
        "10.77.0.1",
        "--replica-path",
        rpath.to_str().unwrap(),
    ]);
    let e = b.fails(&["replica", "failover", "nosuch"]);
    assert!(e.contains("not replicated to this host"), "{e}");
    let e = a.fails(&["replica", "failover", "nosuch", "--planned"]);
    assert!(e.contains("not replicated"), "{e}");

    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    let (code, out) = a.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    // The writer has written before replication starts (a fast initial replication would
    // otherwise cut its points before the first record).
    wait_records(a, 2);
    let out = a.ok(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "continuous",
        "--recovery-points",
        "4",
        "--start",
    ]);
    assert!(out.contains("enabled"), "{out}");
    let e = b.fails(&["replica", "commit", "g"]);
    assert!(
        e.contains("not replicated") || e.contains("has not failed over"),
        "{e}"
    );

    // Initial replication, then cycles.
    let st = wait_status(a, "initial replication and two cycles", 180, |v| {
        v["state"] == "replicating" && v["cycles"].as_u64().unwrap_or(0) >= 2
    });
    println!("primary after initial replication: {st}");
    let rpo = st["rpo_last_hour_secs"]
        .as_f64()
        .expect("achieved RPO over the last hour");
    assert!(rpo > 0.0, "{st}");
    let e = b.fails(&["replica", "commit", "g"]);
    assert!(e.contains("has not failed over"), "{e}");
    let store = rpath.join("g").join("store");

    // A point cut while the guest writes: only whole, valid records.
    let rs = wait_status(b, "a recovery point", 60, |v| {
        !v["points"].as_array().map(|p| p.is_empty()).unwrap_or(true)
    });
    let id = rs["points"].as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap();
    let img = point_data(&store, id, c.dir.path());
    let max_mid = check_records(&img);
    println!("point {id} (guest writing): records up to {max_mid}, all valid");

    // Stop the writer; the next cut equals the primary's disk byte for byte.
    let (code, out) = a.exec(
        "g",
        "kill $(cat /tmp/w.pid); sleep 0.3; sync; cat /tmp/counter; D=$(for d in /sys/block/sd* /sys/block/vd*; do [ \"$(cat $d/size 2>/dev/null)\" = 32768 ] && echo /dev/${d##*/}; done | head -1); dd if=$D bs=1M count=16 2>/dev/null | sha256sum | cut -c1-64",
    );
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    let stopped_at: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("counter");
    let primary_sum = lines.next().expect("sum").trim().to_string();
    let t_stop = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let rs = wait_status(b, "a point cut after the writer stopped", 90, |v| {
        v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_stop + 500
    });
    let id = rs["points"].as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap();
    let img = point_data(&store, id, c.dir.path());
    assert_eq!(
        sha256_hex(&img),
        primary_sum,
        "point {id} differs from the primary's data disk at the cut"
    );
    // The kill may land between a record's write and the counter's update: the record
    // one past the counter is then on disk (and in the point).
    let last = check_records(&img);
    assert!(
        last == stopped_at || last == stopped_at + 1,
        "point {id}: last record {last}, the writer's counter {stopped_at}"
    );
    println!("point {id} == primary (record {last}); status on B: {rs}");
    let text = b.ok(&["replica", "status"]);
    assert!(text.contains("replica") && text.contains("g"), "{text}");

    // The writer runs again. Test failover on an older point while cycles continue: the
    // copy has no network adapter, replication goes on, test-stop removes it and its layers.
    let (code, out) = a.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");

    // Link cut for 6 s during cycles: replication catches up with the changed blocks
    // only (no full resync), and the point after it holds whole, valid records.
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let shipped0 = wait_status(a, "status", 10, |_| true)["bytes_shipped"]
        .as_u64()
        .unwrap_or(0);
    a.link(false);
    std::thread::sleep(Duration::from_secs(6));
    a.link(true);
    let t_up = now_ms();
    let after = wait_status(a, "replication after the link came back", 120, |v| {
        v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_up + 1000 && v["last_error"].is_null()
    });
    let delta = after["bytes_shipped"].as_u64().unwrap_or(0) - shipped0;
    assert!(
        delta < 4 << 20,
        "catching up after the cut shipped {delta} bytes (a full resync?)"
    );
    let row = wait_status(b, "a point after the cut", 60, |v| {
        v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_up + 1000
    });
    let id = row["points"].as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap();
    let max = check_records(&point_data(&store, id, c.dir.path()));
    println!("link cut 6 s: caught up with {delta} bytes; point {id} valid (records up to {max})");

    let row = wait_status(b, "two recovery points", 60, |v| {
        v["points"].as_array().is_some_and(|p| p.len() >= 2)
    });
    let ids: Vec<u64> = row["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let old = ids[ids.len() - 2];
    let e = b.fails(&["replica", "test-failover", "g", "--point", "999999"]);
    assert!(e.contains("no recovery point 999999"), "{e}");
    let out = b.ok(&["replica", "test-failover", "g", "--point", &old.to_string()]);
    println!("{out}");
    assert!(
        out.contains("g-test") && out.contains("replication continues"),
        "{out}"
    );
    assert!(b.show("g-test")["nics"]
        .as_array()
        .map(|n| n.is_empty())
        .unwrap_or(true));
    let cycles_before = row["cycles"].as_u64().unwrap_or(0);
    let row = wait_status(b, "cycles while the test copy runs", 60, |v| {
        v["cycles"].as_u64().unwrap_or(0) > cycles_before + 2
    });
    assert!(
        row["failover"].as_str().unwrap_or("").contains("test copy"),
        "{row}"
    );
    let out = b.ok(&["replica", "test-stop", "g"]);
    assert!(out.contains("removed the test copy"), "{out}");
    assert!(!b.vm_names().contains(&"g-test".to_string()));
    assert!(
        !rpath.join("g").join(format!("test-{old}")).exists(),
        "test layers left"
    );
    println!("test failover on point {old} while cycles went on: ok");

    // Unplanned: host A dies (daemon, worker, QEMU) and its link goes.
    std::thread::sleep(Duration::from_secs(2));
    kill_all(a);
    a.link(false);
    let out = b.ok(&["replica", "failover", "g"]);
    println!("{out}");
    assert!(out.contains("started VM g"), "{out}");
    b.wait_heartbeat("g");
    let (code, out) = b.exec("g", CHECK);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK "), "records after failover: {out}");
    let max: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        max >= stopped_at,
        "the failed-over VM lost records: max {max} < verified {stopped_at}"
    );
    // The choice stays revisable until commit: an older point (its records are exactly
    // those of that point, read host-side), then the latest again.
    let row = status(b).into_iter().find(|v| v["vm"] == "g").unwrap();
    let ids: Vec<u64> = row["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    assert!(ids.len() >= 2, "one recovery point only: {row}");
    let (older, latest) = (ids[ids.len() - 2], ids[ids.len() - 1]);
    let want_max = check_records(&point_data(&store, older, c.dir.path()));
    let out = b.ok(&["replica", "failover", "g", "--point", &older.to_string()]);
    assert!(
        out.contains("choice revised") && out.contains("started VM g"),
        "{out}"
    );
    b.wait_heartbeat("g");
    let (code, out) = b.exec("g", CHECK);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().take(2).collect::<Vec<_>>(),
        ["OK", want_max.to_string().as_str()],
        "the VM on the older point {older}: {out}"
    );
    let out = b.ok(&["replica", "failover", "g", "--point", &latest.to_string()]);
    assert!(out.contains("choice revised"), "{out}");
    b.wait_heartbeat("g");
    let (code, out) = b.exec("g", CHECK);
    assert_eq!(code, 0, "{out}");
    let max_again: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert_eq!(max_again, max, "back on the latest point {latest}: {out}");
    println!(
        "failover revised: point {older} (records up to {want_max}), then {latest} (up to {max})"
    );
    let e = b.fails(&["replica", "test-stop", "g"]);
    assert!(e.contains("no test failover"), "{e}");
    let out = b.ok(&["replica", "commit", "g"]);
    assert!(out.contains("committed"), "{out}");
    let e = b.fails(&["replica", "commit", "g"]);
    assert!(e.contains("already committed"), "{e}");
    let e = b.fails(&["replica", "cancel-failover", "g"]);
    assert!(e.contains("cannot be cancelled"), "{e}");
    let e = b.fails(&["replica", "test-failover", "g"]);
    assert!(e.contains("is committed"), "{e}");
    // After the commit the recovery-point layers under g's disks are merged into them
    // (live) and their files deleted: the chain is the failover leaf on the store's base.
    let st = wait_status(b, "the point layers merged after the commit", 120, |v| {
        v["role"] == "replica"
            && v["failover"]
                .as_str()
                .is_some_and(|f| f.contains("layers are merged"))
    });
    assert!(
        st["points"].as_array().is_some_and(|p| p.is_empty()),
        "{st}"
    );
    let left: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("p-"))
        .collect();
    assert!(
        left.is_empty(),
        "point layers left after the merge: {left:?}"
    );
    assert!(store.join("base").join("disk1.vhdx").exists());
    let (code, out) = b.exec("g", CHECK);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().take(2).collect::<Vec<_>>(),
        ["OK", max.to_string().as_str()],
        "g's records after the layers were merged: {out}"
    );
    println!("after commit: {}", st["failover"]);

    // Reverse after the unplanned failover: A comes back; its copy of g (off) diverged
    // (records written after the last shipped cycle), B's g runs on and writes. Only the
    // MiBs whose checksums differ cross the wire, and A's point equals B's disk.
    let e = b.fails(&["replica", "reverse", "nosuch"]);
    assert!(e.contains("not replicated to this host"), "{e}");
    a.link(true);
    a.spawn();
    let rpath_a = c.dir.path().join("replicas-a");
    a.ok(&[
        "host",
        "set",
        "--allow-replica-from",
        "10.77.0.2",
        "--replica-path",
        rpath_a.to_str().unwrap(),
    ]);
    let (code, out) = b.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    // B's records written before the reverse are untracked: only the compare finds them
    // (so at least the data disk's first MiB differs).
    wait_records(b, 2);
    let out = b.ok(&["replica", "reverse", "g"]);
    println!("{out}");
    assert!(out.contains("replication reversed"), "{out}");
    let e = b.fails(&["replica", "reverse", "g"]);
    assert!(e.contains("already reversed"), "{e}");
    let st = wait_status(b, "reverse replication after the resync", 180, |v| {
        v["role"] == "primary"
            && v["state"] == "replicating"
            && v["cycles"].as_u64().unwrap_or(0) >= 1
    });
    println!("B after the reverse resync: {st}");
    let blocks = st["resync_blocks"].as_u64().expect("resync figures");
    let differing = st["resync_differing_blocks"]
        .as_u64()
        .expect("resync figures");
    assert!(
        blocks >= 16 && differing >= 1 && differing * 4 < blocks,
        "{differing} of {blocks} MiB differed: a full copy, not a resync?"
    );
    let shipped = st["bytes_shipped"].as_u64().unwrap_or(u64::MAX);
    assert!(
        shipped < (differing + 4) << 20,
        "{shipped} bytes shipped for {differing} differing MiB"
    );
    let (code, out) = b.exec(
        "g",
        "kill $(cat /tmp/w.pid); sleep 0.3; sync; cat /tmp/counter; D=$(for d in /sys/block/sd* /sys/block/vd*; do [ \"$(cat $d/size 2>/dev/null)\" = 32768 ] && echo /dev/${d##*/}; done | head -1); dd if=$D bs=1M count=16 2>/dev/null | sha256sum | cut -c1-64",
    );
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    let b_stopped: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("counter");
    let b_sum = lines.next().expect("sum").trim().to_string();
    let t_stop = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let rs = wait_status(a, "a reverse point cut after B's writer stopped", 90, |v| {
        v["role"] == "replica" && v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_stop + 500
    });
    let id = rs["points"].as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap();
    let img = point_data(&rpath_a.join("g").join("store"), id, c.dir.path());
    assert_eq!(
        sha256_hex(&img),
        b_sum,
        "A's reverse point {id} differs from B's data disk"
    );
    // Every record valid; B's writer restarted its count after the failover boot, so
    // slots it did not reach still hold A's older (higher-numbered) records.
    let max_rev = check_records(&img);
    assert!(max_rev >= b_stopped, "{max_rev} < {b_stopped}");
    println!(
        "reverse after unplanned failover: {differing} of {blocks} MiB differed, {shipped} bytes shipped; A's point {id} == B (record {b_stopped})"
    );

    // Planned failover home B -> A while B's guest writes: B's whole data disk at the
    // final cut is A's point (zero loss), g runs on A, replication is reversed (A -> B).
    let (code, out) = b.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let e = a.fails(&["replica", "failover", "g", "--planned"]);
    assert!(e.contains("not replicated from this host"), "{e}");
    let out = b.ok(&["replica", "failover", "g", "--planned"]);
    println!("{out}");
    assert!(
        out.contains("zero data loss") && out.contains("replication reversed"),
        "{out}"
    );
    let home: u64 = out
        .lines()
        .find(|l| l.contains("(zero data loss)"))
        .and_then(|l| l.split("from point ").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the point of the planned failover");
    let b_dir = std::fs::read_dir(rpath.join("g"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("failover-"))
        })
        .expect("B's failover layers");
    let b_img = raw_image(&b_dir.join("disk1.avhdx"), c.dir.path());
    let b_last = check_records(&b_img);
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.show("g")["state"] != "running" {
        assert!(
            Instant::now() < deadline,
            "g does not run on A: {}",
            a.show("g")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The planned failover commits: A merges the layers under g (point `home`, the
    // store's base over A's old disks) into g's disks while g runs. The guest reads its
    // whole data disk: B's at the planned failover, before and after the merge.
    let a_sum = |h: &NsHost| {
        h.wait_heartbeat("g");
        let (code, out) = h.exec(
            "g",
            "D=$(for d in /sys/block/sd* /sys/block/vd*; do [ \"$(cat $d/size 2>/dev/null)\" = 32768 ] && echo /dev/${d##*/}; done | head -1); dd if=$D bs=1M count=16 2>/dev/null | sha256sum | cut -c1-64",
        );
        assert_eq!(code, 0, "{out}");
        out.trim().to_string()
    };
    assert_eq!(
        a_sum(a),
        sha256_hex(&b_img),
        "g's data disk on A differs from B's at the planned failover to point {home} (B's last record {b_last})"
    );
    let st = wait_status(
        a,
        "A's point layers merged after the planned failover",
        120,
        |v| {
            v["role"] == "replica"
                && v["failover"]
                    .as_str()
                    .is_some_and(|f| f.contains("layers are merged"))
        },
    );
    let a_store = rpath_a.join("g").join("store");
    let left: Vec<String> = std::fs::read_dir(&a_store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("p-") || n == "base")
        .collect();
    assert!(
        left.is_empty(),
        "layers left in A's store after the merge: {left:?}"
    );
    assert_eq!(
        a_sum(a),
        sha256_hex(&b_img),
        "g's data disk on A changed when its layers were merged"
    );
    println!("A after the planned failover home: {}", st["failover"]);
    let st = wait_status(a, "replication A -> B again", 120, |v| {
        v["role"] == "primary"
            && v["state"] == "replicating"
            && v["cycles"].as_u64().unwrap_or(0) >= 1
            && v["last_error"].is_null()
    });
    println!(
        "planned failover home: point {home} == B's disk (record {b_last}); A -> B again: {st}"
    );
    a.ok(&["vm", "turn-off", "g"]);
    println!("replica e2e wall time: {:.0}s", t0.elapsed().as_secs_f64());
    let _ = PathBuf::new();
}
