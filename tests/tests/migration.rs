//! Live migration between vireod hosts in separate network namespaces (shared storage):
//! a generation 1 guest keeps a counter in memory and writes checksummed records to its
//! second disk while it moves A→B→A; refusals leave nothing behind; faults (cancel, link
//! cut during pre-copy and at switchover, kill -9 of the destination daemon) each leave
//! exactly one running copy, on the source, with the counter still counting and every disk
//! record verifying.

use std::time::{Duration, Instant};
use vireo_e2e::guest_io::*;
use vireo_e2e::multihost::{Cluster, NsHost};
use vireo_e2e::vm_setup::{define_gen1_vm, DATA_16M};
use vireo_e2e::*;

fn counter(h: &NsHost) -> u64 {
    let (code, out) = h.exec(
        "g",
        "cat /tmp/counter 2>/dev/null || echo 0; kill -0 $(cat /tmp/w.pid) && echo alive",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("alive"), "the writer died: {out:?}");
    out.lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out:?}"))
}

fn wait_counter_above(h: &NsHost, v: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = counter(h);
        if c > v {
            return c;
        }
        assert!(Instant::now() < deadline, "counter stuck at {c}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Defines and starts `g` on host 0 with a boot disk and a 16 MiB data disk, starts the writer.
fn start_guest(c: &Cluster) -> u64 {
    start_guest_on(c, None)
}

/// [`start_guest`], with a network adapter on `switch` when given.
fn start_guest_on(c: &Cluster, switch: Option<&str>) -> u64 {
    // Only a guest on a switch configures its network; the others boot the lite image
    // (a smaller initramfs for the BIOS to read under TCG).
    let boot = match switch {
        Some(_) => guest_disk(c.dir.path(), 1, GuestAgent::Vireo),
        None => guest_disk_lite(c.dir.path(), 1, GuestAgent::Vireo),
    };
    let data = c.dir.path().join("data.vhdx");
    let a = &c.hosts[0];
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
    if let Some(sw) = switch {
        a.ok(&["vm", "nic", "add", "g", "--switch", sw]);
    }
    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    let (code, out) = a.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    wait_counter_above(a, 3)
}

fn verify(h: &NsHost) -> u64 {
    let (code, out) = h.exec("g", RECORD_VERIFY);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK "), "disk verification failed: {out}");
    out.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn job(h: &NsHost, id: &str) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["job", "show", id, "--json"])).expect("job json")
}

fn wait_job(
    h: &NsHost,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let j = job(h, id);
        if pred(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {j:#}\n{}",
            tail(&h.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_final(j: &serde_json::Value) -> bool {
    matches!(
        j["phase"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

/// Exactly one copy, on `src`, running, counting; nothing left on `dst` (after its lease).
fn assert_on_source_only(src: &NsHost, dst: &NsHost, before: u64) -> u64 {
    assert_eq!(src.show("g")["state"], "running");
    let c = wait_counter_above(src, before);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dst.leftovers().is_empty() {
        assert!(
            Instant::now() < deadline,
            "destination kept {:?}\n{}",
            dst.leftovers(),
            tail(&dst.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        dst.vm_names().is_empty(),
        "the VM is defined on the destination too"
    );
    c
}

/// A→B→A with shared storage: the counter continues, the disk verifies, the source forgets
/// the VM only once the destination runs it.
#[test]
fn move_there_and_back() {
    let c = Cluster::start(2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    // Trust is confirmed per host; refused fingerprint changes nothing.
    let wrong = a.fails(&["host", "trust", &b.addr, "--fingerprint", &"AB".repeat(32)]);
    assert!(wrong.contains("not the confirmed"), "{wrong}");
    assert!(a.ok(&["host", "list", "--json"]).trim() == "[]");
    c.trust(0, 1);
    c.trust(1, 0);
    let listed = a.ok(&["host", "list"]);
    assert!(listed.contains(&b.addr), "{listed}");

    let c0 = start_guest(&c);
    let out = a.ok(&["vm", "move", "g", "--to", &b.addr, "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["phase"], "completed", "{j:#}");
    eprintln!(
        "A->B: {:.1} s, downtime {} ms, {} bytes",
        j["elapsed_secs"], j["downtime_ms"], j["memory_transferred"]
    );
    assert!(a.vm_names().is_empty(), "source still lists the VM");
    assert!(a.leftovers().is_empty(), "source left {:?}", a.leftovers());
    assert_eq!(b.show("g")["state"], "running");
    let c1 = wait_counter_above(b, c0);

    let out = b.ok(&[
        "vm",
        "move",
        "g",
        "--to",
        &a.addr,
        "--max-downtime",
        "300ms",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["phase"], "completed", "{j:#}");
    eprintln!(
        "B->A: {:.1} s, downtime {} ms",
        j["elapsed_secs"], j["downtime_ms"]
    );
    assert!(b.vm_names().is_empty());
    let c2 = wait_counter_above(a, c1);
    assert!(c2 > c1 && c1 > c0);
    let last = verify(a);
    assert!(last >= c2);
}

/// Refusals before anything moves, then three hosts: untrusted source, protocol version
/// mismatch, missing switch, too little memory, each with its reason and fix, the VM
/// untouched on the source and nothing on the destination. Then the guest, whose network
/// adapter is on an external switch `ext` of each host (uplinks bridged in the hub), moves
/// A→B→D while the hub pings it every 100 ms: after each move it answers through the new
/// host's switch, the counter continued and the disk verifies.
#[test]
fn refusals_then_three_hosts_with_ping() {
    let c = Cluster::start(
        4,
        &[&[], &[], &[("VIREO_TEST_PROTOCOL_VERSION", "99")], &[]],
    );
    let (a, b, old, d) = (&c.hosts[0], &c.hosts[1], &c.hosts[2], &c.hosts[3]);
    let uplink = c.vm_network();
    for h in [a, b] {
        h.ok(&[
            "switch", "new", "ext", "--type", "external", "--uplink", uplink,
        ]);
    }
    let c0 = start_guest_on(&c, Some("ext"));
    let (code, out) = a.exec(
        "g",
        "/sbin/ip addr add 10.88.0.10/24 dev eth0 && /sbin/ip link set eth0 up && echo up",
    );
    assert_eq!(code, 0, "{out}");
    hub_ping(&c, "on A");

    // Not trusted at all.
    let e = a.fails(&["vm", "move", "g", "--to", &b.addr]);
    assert!(e.contains("no trusted host"), "{e}");
    // A trusts B, B does not trust A: B refuses and logs it.
    c.trust(0, 1);
    let e = a.fails(&["vm", "move", "g", "--to", &b.addr]);
    assert!(e.contains("does not trust"), "{e}");
    assert!(b.log().contains("refused a request from an untrusted host"));
    let c1 = assert_on_source_only(a, b, c0);

    // Version mismatch.
    c.trust(0, 2);
    c.trust(2, 0);
    let e = a.fails(&["vm", "move", "g", "--to", &old.addr]);
    assert!(
        e.contains("protocol version mismatch") && e.contains("upgrade"),
        "{e}"
    );
    let c2 = assert_on_source_only(a, old, c1);

    // D has no switch `ext`.
    c.trust(0, 3);
    c.trust(3, 0);
    let e = a.fails(&["vm", "move", "g", "--to", &d.addr]);
    assert!(
        e.contains("no virtual switch named \"ext\"") && e.contains("vireo switch new"),
        "{e}"
    );
    let c2 = assert_on_source_only(a, d, c2);
    d.ok(&[
        "switch", "new", "ext", "--type", "external", "--uplink", uplink,
    ]);

    // Not enough memory on B.
    c.trust(1, 0);
    b.ok(&["host", "set", "--memory-budget", "64M"]);
    let e = a.fails(&["vm", "move", "g", "--to", &b.addr]);
    assert!(e.contains("memory"), "{e}");
    let c3 = assert_on_source_only(a, b, c2);
    assert!(c3 > c0);
    b.ok(&["host", "set", "--memory-budget", "0"]);

    // A→B→D under a continuous ping.
    c.trust(1, 3);
    c.trust(3, 1);
    let ping = c.pinger("10.88.0.10", 100);
    let mut n = c3;
    for (from, to, name) in [(a, b, "A->B"), (b, d, "B->D")] {
        let out = from.ok(&["vm", "move", "g", "--to", &to.addr, "--json"]);
        let j: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(j["phase"], "completed", "{name}: {j:#}");
        eprintln!(
            "{name}: {:.1} s, downtime {} ms",
            j["elapsed_secs"], j["downtime_ms"]
        );
        assert!(
            from.vm_names().is_empty(),
            "{name}: the source still lists g"
        );
        assert_eq!(to.show("g")["state"], "running");
        n = wait_counter_above(to, n);
        hub_ping(&c, name);
    }
    std::thread::sleep(Duration::from_secs(1));
    let p = ping.stop();
    eprintln!(
        "ping during A->B->D: {} sent, {} answered, longest gap {} ms",
        p.sent, p.received, p.longest_gap_ms
    );
    assert!(p.received * 2 > p.sent, "most pings went unanswered: {p:?}");
    let last = verify(d);
    assert!(last >= n);
}

/// The hub reaches the guest (10.88.0.10) within 30 s.
fn hub_ping(c: &Cluster, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.hub_ping("10.88.0.10") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest does not answer pings {when}"
        );
    }
}

/// Faults: cancel, link cut during pre-copy, link cut at switchover, kill -9 of the
/// destination daemon. After each, one running copy on the source, data verifies.
#[test]
fn faults_leave_vm_on_source() {
    let c = Cluster::start(2, &[&[("VIREO_TEST_HOLD_SWITCHOVER_MS", "4000")], &[]]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    c.trust(0, 1);
    c.trust(1, 0);
    let mut n = start_guest(&c);
    let slow = ["--bandwidth", "4M"];

    // Cancel during pre-copy.
    let id = a
        .ok(&[
            &["vm", "move", "g", "--to", &b.addr, "--no-wait"][..],
            &slow[..],
        ]
        .concat())
        .trim()
        .to_string();
    wait_job(a, &id, "memory phase", |j| {
        j["phase"] == "memory" && j["memory_transferred"].as_u64().unwrap_or(0) > 0
    });
    a.ok(&["job", "cancel", &id]);
    let j = wait_job(a, &id, "end", is_final);
    assert_eq!(j["phase"], "cancelled", "{j:#}");
    n = assert_on_source_only(a, b, n);

    // Link cut during pre-copy.
    let id = a
        .ok(&[
            &["vm", "move", "g", "--to", &b.addr, "--no-wait"][..],
            &slow[..],
        ]
        .concat())
        .trim()
        .to_string();
    wait_job(a, &id, "memory phase", |j| {
        j["memory_transferred"].as_u64().unwrap_or(0) > (1 << 20)
    });
    b.link(false);
    let j = wait_job(a, &id, "end", is_final);
    assert_eq!(j["phase"], "failed", "{j:#}");
    n = wait_counter_above(a, n);
    b.link(true);
    n = assert_on_source_only(a, b, n);

    // Link cut at switchover (the source holds the pre-switchover pause for 4 s).
    let id = a
        .ok(&["vm", "move", "g", "--to", &b.addr, "--no-wait"])
        .trim()
        .to_string();
    wait_job(a, &id, "switchover", |j| {
        j["phase"] == "switchover" || is_final(j)
    });
    b.link(false);
    let j = wait_job(a, &id, "end", is_final);
    assert_eq!(j["phase"], "failed", "{j:#}");
    n = wait_counter_above(a, n);
    b.link(true);
    n = assert_on_source_only(a, b, n);

    // kill -9 of the destination daemon during pre-copy; it cleans up when it comes back.
    let id = a
        .ok(&[
            &["vm", "move", "g", "--to", &b.addr, "--no-wait"][..],
            &slow[..],
        ]
        .concat())
        .trim()
        .to_string();
    wait_job(a, &id, "memory phase", |j| {
        j["memory_transferred"].as_u64().unwrap_or(0) > (1 << 20)
    });
    b.kill9();
    let j = wait_job(a, &id, "end", is_final);
    assert_eq!(j["phase"], "failed", "{j:#}");
    b.spawn();
    let n2 = assert_on_source_only(a, b, n);
    assert!(n2 > n);
    // The writer does not check dd's status: a write the guest saw fail would look like a
    // lost write to `verify`. The guest's kernel log tells the two apart.
    let (_, klog) = a.exec(
        "g",
        "dmesg 2>/dev/null | grep -iE 'error.*sd[a-z]|sd[a-z].*error' | tail -20; echo END",
    );
    let errors = klog.split("END").next().unwrap_or_default().trim();
    assert!(
        errors.is_empty(),
        "the guest saw disk I/O errors during the faults:\n{errors}"
    );
    verify(a);
}

/// The pid of a vireo-worker started by host `h` (its run directory is under h's state).
fn worker_pid(h: &NsHost) -> Option<i32> {
    let state = h.state_dir().display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains("vireo-worker") && cmd.contains(&state)).then_some(pid)
    })
}

/// Shared-nothing: a guest with a checkpoint (a two-layer VHDX chain per disk) keeps writing
/// checksummed records while its whole chains are copied A→B (`--include-storage
/// --destination-path`), then memory moves. On B the counter continued, every record
/// verifies (the last acknowledged write included), the checkpoint is there, and A's chain
/// files are gone. Then faults on the way back, each leaving the VM running on B only
/// with nothing on A: a destination path that cannot be written (refused before anything
/// moves), the link cut during the disk copy, and kill -9 + restart of B's daemon during
/// the disk copy.
#[test]
fn shared_nothing_move_and_faults() {
    let c = Cluster::start(2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    c.trust(0, 1);
    c.trust(1, 0);
    let src = c.dir.path().join("a-disks");
    std::fs::create_dir_all(&src).expect("source dir");
    let raw = guest_disk_lite(c.dir.path(), 1, GuestAgent::Vireo);
    define_gen1_vm(a, "g", &raw, &src, "256M", DATA_16M);
    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    let (code, out) = a.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    let c0 = wait_counter_above(a, 3);
    let cp = a.ok(&["checkpoint", "new", "g", "cp1", "--type", "production"]);
    assert!(cp.contains("cp1"), "{cp}");
    // A standard checkpoint too: its memory state file must move with the disks.
    let cp = a.ok(&["checkpoint", "new", "g", "cp2", "--type", "standard"]);
    assert!(cp.contains("cp2"), "{cp}");
    let c0 = wait_counter_above(a, c0);
    let before = files_in(&src);
    assert!(
        before.len() >= 6,
        "expected two chains of three files: {before:?}"
    );
    let mem_state = |h: &NsHost| -> std::path::PathBuf {
        let l: serde_json::Value =
            serde_json::from_str(&h.ok(&["checkpoint", "list", "g", "--json"])).expect("json");
        let m = l["checkpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == "cp2"))
            .and_then(|c| c["memory_state"].as_str())
            .unwrap_or_else(|| panic!("cp2 has no memory state: {l:#}"));
        std::path::PathBuf::from(m)
    };
    let state_a = mem_state(a);
    let state_bytes = std::fs::read(&state_a).expect("memory state on A");
    assert!(state_bytes.len() > 1 << 20, "memory state too small");
    let state_name = state_a
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();

    let dst = c.dir.path().join("b-disks");
    let out = a.ok(&[
        "vm",
        "move",
        "g",
        "--to",
        &b.addr,
        "--include-storage",
        "--destination-path",
        dst.to_str().unwrap(),
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["phase"], "completed", "{j:#}");
    eprintln!(
        "A->B shared-nothing: {:.1} s, downtime {} ms, disk {} bytes, memory {} bytes",
        j["elapsed_secs"], j["downtime_ms"], j["disk_transferred"], j["memory_transferred"]
    );
    assert!(a.vm_names().is_empty(), "source still lists the VM");
    assert!(a.leftovers().is_empty(), "source left {:?}", a.leftovers());
    assert!(
        files_in(&src).is_empty(),
        "the source's chain files stay: {:?}",
        files_in(&src)
    );
    let mut after = files_in(&dst);
    after.sort();
    let mut want = before.clone();
    want.push(state_name.clone());
    want.sort();
    assert_eq!(after, want, "the destination holds another set of files");
    assert_eq!(b.show("g")["state"], "running");
    let listed = b.ok(&["checkpoint", "list", "g"]);
    assert!(listed.contains("cp1"), "{listed}");
    // The standard checkpoint's memory state moved, byte for byte, and A's copy is gone.
    let state_b = mem_state(b);
    assert_eq!(state_b, dst.join(&state_name));
    assert!(
        std::fs::read(&state_b).expect("memory state on B") == state_bytes,
        "the memory state file differs on B"
    );
    assert!(!state_a.exists(), "A kept {}", state_a.display());
    let mut n = wait_counter_above(b, c0);
    // The data written before, during and after the copy verifies on B.
    let last = verify(b);
    assert!(last >= n, "last record {last} < counter {n}");
    let (code, out) = b.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    n = wait_counter_above(b, last);

    // Back to A into a path A cannot write: refused before anything moves.
    let e = b.fails(&[
        "vm",
        "move",
        "g",
        "--to",
        &a.addr,
        "--include-storage",
        "--destination-path",
        "/proc/vireo-no-such-dir",
    ]);
    assert!(e.contains("not writable"), "{e}");
    n = assert_on_source_only(b, a, n);

    // Link cut while the disks are being copied (slowed down so the cut lands there).
    let back = c.dir.path().join("a-back");
    let id = b
        .ok(&[
            "vm",
            "move",
            "g",
            "--to",
            &a.addr,
            "--include-storage",
            "--destination-path",
            back.to_str().unwrap(),
            "--bandwidth",
            "2M",
            "--no-wait",
        ])
        .trim()
        .to_string();
    wait_job(b, &id, "disk copy", |j| {
        j["phase"] == "copying_disks" && j["disk_transferred"].as_u64().unwrap_or(0) > (1 << 20)
    });
    a.link(false);
    let j = wait_job(b, &id, "end", is_final);
    assert_eq!(j["phase"], "failed", "{j:#}");
    n = wait_counter_above(b, n);
    a.link(true);
    n = assert_on_source_only(b, a, n);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files_in(&back).is_empty() {
        assert!(
            Instant::now() < deadline,
            "partial copies stay on A: {:?}",
            files_in(&back)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // kill -9 of the destination's worker (its QEMU waiting for the memory) during the disk
    // copy: the move fails, A removes what it received.
    let id = b
        .ok(&[
            "vm",
            "move",
            "g",
            "--to",
            &a.addr,
            "--include-storage",
            "--destination-path",
            back.to_str().unwrap(),
            "--bandwidth",
            "2M",
            "--no-wait",
        ])
        .trim()
        .to_string();
    wait_job(b, &id, "disk copy", |j| {
        j["phase"] == "copying_disks" && j["disk_transferred"].as_u64().unwrap_or(0) > (1 << 20)
    });
    let pid = worker_pid(a).unwrap_or_else(|| panic!("no incoming worker on A"));
    // SAFETY: kill(2) of a process this test's daemon started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let j = wait_job(b, &id, "end", is_final);
    assert_eq!(j["phase"], "failed", "{j:#}");
    n = assert_on_source_only(b, a, n);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files_in(&back).is_empty() {
        assert!(
            Instant::now() < deadline,
            "partial copies stay on A after its worker died: {:?}",
            files_in(&back)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // kill -9 of the source daemon during the disk copy, then restart: the VM stays on B,
    // running; A cleans up after its lease.
    let id = b
        .ok(&[
            "vm",
            "move",
            "g",
            "--to",
            &a.addr,
            "--include-storage",
            "--destination-path",
            back.to_str().unwrap(),
            "--bandwidth",
            "2M",
            "--no-wait",
        ])
        .trim()
        .to_string();
    wait_job(b, &id, "disk copy", |j| {
        j["phase"] == "copying_disks" && j["disk_transferred"].as_u64().unwrap_or(0) > (1 << 20)
    });
    b.kill9();
    b.spawn();
    n = assert_on_source_only(b, a, n);
    assert!(
        b.log().contains("interrupted by a daemon restart"),
        "{}",
        tail(&b.log(), 20)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files_in(&back).is_empty() {
        assert!(
            Instant::now() < deadline,
            "partial copies stay on A after the source restart: {:?}",
            files_in(&back)
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // The destination's file system fills up during the disk copy: a 4 MiB tmpfs as A's
    // destination path (A's daemon restarts to see the mount: `ip netns exec` gave it its
    // own mount namespace). The move fails, naming the cause; nothing stays on A.
    let full = c.dir.path().join("a-full");
    let _mount = SmallFs::mount(&full, "4m");
    a.kill9();
    a.spawn();
    let id = move_back(b, a, &full, &[]);
    let j = wait_job(b, &id, "end", is_final);
    assert_eq!(j["phase"], "failed", "{j:#}");
    let why = format!("{}\n{}", j["message"], a.log());
    assert!(
        why.contains("No space left") || why.contains("space"),
        "the failure does not name the full disk: {j:#}\n{}",
        tail(&a.log(), 20)
    );
    n = assert_on_source_only(b, a, n);
    wait_empty(&full, "after the disk-full failure");

    // Faults at switchover, the guest paused (B holds the migration there for 6 s):
    // `verified`: every disk verified and committed on A, B's disks not yet released;
    // `commit`: QEMU's migration completed (A holds the whole VM state), no commit yet.
    for (point, fault) in [
        ("verified", "link"),
        ("verified", "kill-source-worker"),
        ("commit", "kill-destination-worker"),
        ("commit", "link"),
    ] {
        b.hold(point, 6000);
        let id = move_back(b, a, &back, &[]);
        let held = format!("held at {point}");
        wait_job(b, &id, point, |j| {
            j["message"].as_str().is_some_and(|m| m.contains(&held)) || is_final(j)
        });
        match fault {
            "link" => a.link(false),
            "kill-source-worker" => {
                let pid = worker_pid(b).unwrap_or_else(|| panic!("no worker on B"));
                // SAFETY: kill(2) of a process this test's daemon started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            _ => {
                let pid = worker_pid(a).unwrap_or_else(|| panic!("no incoming worker on A"));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if fault == "link" {
            // A transient cut: back once A's lease has ended (it aborted by itself).
            std::thread::sleep(Duration::from_secs(11));
            a.link(true);
        }
        let j = wait_job(b, &id, "end", is_final);
        b.unhold();
        assert_eq!(j["phase"], "failed", "{point}/{fault}: {j:#}");
        eprintln!("{point}/{fault}: {}", j["message"]);
        n = assert_on_source_only(b, a, n);
        wait_empty(&back, &format!("after {point}/{fault}"));
        // The data written before the fault verifies on B, and the guest writes on.
        let last = verify(b);
        assert!(
            last >= n,
            "{point}/{fault}: last record {last} < counter {n}"
        );
        let (code, out) = b.exec("g", RECORD_WRITER);
        assert_eq!(code, 0, "{out}");
        n = wait_counter_above(b, last);
    }

    let mut now = files_in(&dst);
    now.sort();
    assert_eq!(now, want, "B's disk files changed");

    // The move back succeeds, but B's daemon is killed right after A confirmed the commit
    // (before B stopped its QEMU): the restarted B asks A, learns that A runs the VM, stops
    // its own copy, forgets the VM and removes its chain files. A runs g; the data verifies.
    b.hold("committed", 6000);
    let id = move_back(b, a, &back, &[]);
    wait_job(b, &id, "committed", |j| {
        j["message"]
            .as_str()
            .is_some_and(|m| m.contains("held at committed"))
            || is_final(j)
    });
    b.kill9();
    b.unhold();
    b.spawn();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !b.vm_names().is_empty() || !b.leftovers().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the restarted source keeps {:?} {:?}\n{}",
            b.vm_names(),
            b.leftovers(),
            tail(&b.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        b.log().contains("commit confirmed after a daemon restart"),
        "{}",
        tail(&b.log(), 20)
    );
    assert!(worker_pid(b).is_none(), "a worker still runs on B");
    assert_eq!(a.show("g")["state"], "running");
    assert!(
        files_in(&dst).is_empty(),
        "B's chain files stay: {:?}",
        files_in(&dst)
    );
    let mut moved = files_in(&back);
    moved.sort();
    assert_eq!(moved, want, "A holds another set of files");
    n = wait_counter_above(a, n);
    let last = verify(a);
    assert!(last >= n);
}

/// Starts a shared-nothing move of `g` from `from` to `to` into `dir`; returns the job id.
fn move_back(from: &NsHost, to: &NsHost, dir: &std::path::Path, extra: &[&str]) -> String {
    let d = dir.to_str().expect("utf-8 path");
    let args = [
        &[
            "vm",
            "move",
            "g",
            "--to",
            &to.addr,
            "--include-storage",
            "--destination-path",
            d,
            "--no-wait",
        ][..],
        extra,
    ]
    .concat();
    from.ok(&args).trim().to_string()
}

/// Waits (20 s at most) until `dir` holds no file.
fn wait_empty(dir: &std::path::Path, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files_in(dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "partial copies stay {when}: {:?}",
            files_in(dir)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A small tmpfs mounted for the test's lifetime (unmounted on drop, also on panic).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).expect("mount point");
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "vireo-full"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            o.status.success(),
            "mounting a tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
