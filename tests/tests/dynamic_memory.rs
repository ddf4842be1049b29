//! Dynamic memory with real guests under TCG: virtio-balloon and virtio-mem driven by vireod's
//! balancer. One host and two VMs are reused across the assertions to keep wall time short.
//!
//! The guest's memory load writes 8 MiB files to a tmpfs only while the guest has more than
//! 64 MiB available (like a program growing its working set): it never forces the guest into
//! OOM by itself, so any OOM would be the balancer's fault. The host memory budget
//! (`vireo host set --memory-budget`) makes host pressure testable on a big machine.

use std::time::{Duration, Instant};
use vireo_e2e::*;

const MIB: u64 = 1 << 20;

/// Guest script: `sh /tmp/load.sh MIB` grows a tmpfs file set to MIB mebibytes, politely.
const LOAD_SCRIPT: &str = r#"mkdir -p /mnt/load
grep -q ' /mnt/load ' /proc/mounts || mount -t tmpfs -o size=4G tmpfs /mnt/load
cat > /tmp/load.sh <<'EOF'
target=$1; i=0; rm -f /tmp/load.done
while [ $((i*8)) -lt $target ]; do
  avail=$(awk '/MemAvailable/{print int($2/1024)}' /proc/meminfo)
  if [ "$avail" -gt 64 ]; then
    dd if=/dev/zero of=/mnt/load/f$i bs=1M count=8 2>/dev/null || { echo fail > /tmp/load.done; exit 1; }
    i=$((i+1))
  else
    usleep 300000
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

fn stop_load(h: &Host, vm: &str) {
    let (code, _) = h.exec(vm, "pkill -f load.sh; sleep 0.2; rm -rf /mnt/load/*; sync");
    assert_eq!(code, 0);
}

fn no_oom(h: &Host, vm: &str) {
    let (code, out) = h.exec(vm, "dmesg | grep -ci 'out of memory\\|oom-kill' || true");
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "0", "{vm}: the guest hit OOM");
}

fn wait_mem(
    h: &Host,
    vm: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, f64) {
    let t0 = Instant::now();
    let v = h.wait_for(vm, Duration::from_secs(secs), what, |v| pred(&v["memory"]));
    (v["memory"].clone(), t0.elapsed().as_secs_f64())
}

/// Waits for the guest agent; TCG boots through the NBD disk path can take minutes on a
/// loaded 2-core machine.
fn boot(h: &Host, vm: &str) {
    h.wait_for(vm, Duration::from_secs(400), "heartbeat ok", |v| {
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

/// Settings are validated with clear errors; a guest load grows the VM through virtio-mem up
/// to its maximum without OOM and the memory returns when the load stops; two VMs under a
/// small host budget share it by weight above their minimums without crossing it; a VM whose
/// agent is killed keeps its memory and says why.
#[test]
#[ignore = "open bug: the guest load does not raise the reported demand, so the VM never grows (see docs/dynamic-memory.md); run with --ignored"]
fn dynamic_memory_end_to_end() {
    let h = Host::start();
    let dir = h.dir.path();
    let disk_a = guest_disk(dir, 1, GuestAgent::Vireo);
    let disk_b = dir.join("b.img");
    std::fs::copy(&disk_a, &disk_b).expect("copying the guest disk");
    new_vm(&h, "a", &disk_a);
    new_vm(&h, "b", &disk_b);

    // --- Settings: bad combinations are refused and change nothing.
    let before = h.show("a")["memory"].clone();
    for (args, needle) in [
        (
            &["--dynamic-memory", "on", "--min", "300M", "--max", "1G"][..],
            "minimum",
        ),
        (
            &["--dynamic-memory", "on", "--min", "128M", "--max", "200M"][..],
            "maximum",
        ),
        (&["--dynamic-memory", "on", "--max", "100T"][..], "host"),
        (
            &["--dynamic-memory", "on", "--max", "1G", "--weight", "20000"][..],
            "weight",
        ),
        (
            &["--dynamic-memory", "on", "--max", "1G", "--buffer", "5000"][..],
            "buffer",
        ),
        (
            &["--dynamic-memory", "on", "--max", "1000001K"][..],
            "2 MiB",
        ),
    ] {
        let mut full = vec!["vm", "set", "a"];
        full.extend_from_slice(args);
        let e = h.fails(&full);
        assert!(e.contains(needle), "{args:?}: expected {needle:?} in {e}");
    }
    assert_eq!(
        h.show("a")["memory"],
        before,
        "a refused change altered the VM"
    );
    let e = h.fails(&["host", "set", "--memory-reserve", "100T"]);
    assert!(e.contains("reserve"), "{e}");

    for (vm, weight) in [("a", "7500"), ("b", "2500")] {
        h.ok(&[
            "vm",
            "set",
            vm,
            "--dynamic-memory",
            "on",
            "--startup",
            "256M",
            "--min",
            "128M",
            "--max",
            "640M",
            "--buffer",
            "20",
            "--weight",
            weight,
        ]);
    }
    let m = mem(&h, "a");
    assert_eq!(
        (
            u(&m, "startup"),
            u(&m, "minimum"),
            u(&m, "maximum"),
            u(&m, "weight")
        ),
        (256 * MIB, 128 * MIB, 640 * MIB, 7500)
    );

    // --- One VM: idle guest gives memory back, load grows it to its maximum via virtio-mem.
    h.ok(&["vm", "start", "a"]);
    boot(&h, "a");
    let (m, _) = wait_mem(&h, "a", 60, "idle guest shrinks below startup", |m| {
        m["demand"].is_u64() && u(m, "assigned") < 200 * MIB
    });
    eprintln!("idle: {m}");
    assert_eq!(m["demand_source"], "agent");
    // Live changes: buffer/weight/minimum yes, maximum may grow, startup and on/off not.
    h.ok(&["vm", "set", "a", "--buffer", "25"]);
    h.ok(&["vm", "set", "a", "--buffer", "20"]);
    let e = h.fails(&["vm", "set", "a", "--dynamic-memory", "off"]);
    assert!(e.contains("running"), "{e}");
    let e = h.fails(&["vm", "set", "a", "--max", "512M"]);
    assert!(e.contains("maximum"), "{e}");
    let e = h.fails(&["vm", "set", "a", "--startup", "512M"]);
    assert!(e.contains("running"), "{e}");

    start_load(&h, "a", 900);
    let (m, grow_s) = wait_mem(&h, "a", 120, "VM grows to its maximum", |m| {
        u(m, "assigned") >= 638 * MIB
    });
    eprintln!("grown to maximum in {grow_s:.1} s: {m}");
    assert_eq!(m["last_decision"]["reason"], "at-maximum", "{m}");
    let (_, total) = h.exec("a", "awk '/MemTotal/{print int($2/1024)}' /proc/meminfo");
    let total: u64 = total.trim().parse().unwrap_or(0);
    assert!(
        total > 256,
        "guest MemTotal {total} MiB: virtio-mem memory not hot-added"
    );
    let (_, loaded) = h.exec("a", "du -sm /mnt/load | cut -f1");
    let loaded: u64 = loaded.trim().parse().unwrap_or(0);
    assert!(loaded > 400, "the load holds {loaded} MiB only");
    no_oom(&h, "a");

    stop_load(&h, "a");
    let (m, back_s) = wait_mem(&h, "a", 60, "memory returns when the load stops", |m| {
        u(m, "assigned") <= 256 * MIB
    });
    eprintln!(
        "memory back to {} MiB in {back_s:.1} s",
        u(&m, "assigned") / MIB
    );
    let (m, back2_s) = wait_mem(&h, "a", 60, "back near the minimum", |m| {
        u(m, "assigned") < 200 * MIB
    });
    eprintln!(
        "memory back to {} MiB in {:.1} s",
        u(&m, "assigned") / MIB,
        back_s + back2_s
    );

    // --- Two VMs under a 768 MiB budget: shared by weight above the minimums.
    h.ok(&["host", "set", "--memory-budget", "768M"]);
    h.ok(&["vm", "start", "b"]);
    boot(&h, "b");
    wait_mem(&h, "b", 60, "b reports", |m| m["demand"].is_u64());
    start_load(&h, "a", 900);
    start_load(&h, "b", 900);
    let status = || -> serde_json::Value {
        serde_json::from_str(&h.ok(&["memory", "status", "--json"])).expect("memory status JSON")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settled = 0;
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline && settled < 5 {
        let s = status();
        let host = &s["host"];
        assert!(
            u(host, "assigned") <= u(host, "vm_limit"),
            "VMs hold more than the host limit: {host}"
        );
        let got = |n: &str| {
            s["vms"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == n))
                .map(|v| u(v, "assigned"))
                .unwrap_or(0)
        };
        let (a, b) = (got("a"), got("b"));
        // Converged: the budget is used up and a is above b.
        if a + b + 16 * MIB >= 768 * MIB && a > b {
            settled += 1;
        } else {
            settled = 0;
        }
        last = s;
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("under pressure: {last:#}");
    assert!(
        settled >= 5,
        "the VMs did not settle on the budget: {last:#}"
    );
    let (a, b) = (u(&mem(&h, "a"), "assigned"), u(&mem(&h, "b"), "assigned"));
    let ratio = (a - 128 * MIB) as f64 / (b.max(129 * MIB) - 128 * MIB) as f64;
    eprintln!(
        "a {} MiB, b {} MiB: above-minimum ratio {ratio:.2} (weights 3:1)",
        a / MIB,
        b / MIB
    );
    assert!(
        (2.0..=4.5).contains(&ratio),
        "ratio {ratio:.2} is not near 3"
    );
    no_oom(&h, "a");
    no_oom(&h, "b");

    // --- b's agent is killed: its memory is kept and the status says why.
    let (code, _) = h.exec(
        "b",
        "echo AGENT=none > /etc/vireo-guest.conf; (sleep 1; killall vireo-guest) >/dev/null 2>&1 &",
    );
    assert_eq!(code, 0);
    let held = u(&mem(&h, "b"), "assigned");
    stop_load(&h, "a");
    let (m, _) = wait_mem(&h, "b", 40, "b's report goes stale", |m| {
        m["last_decision"]["reason"] == "stale-demand"
    });
    let why = m["status"].as_str().unwrap_or("");
    assert!(why.contains("agent"), "status does not say why: {m}");
    for _ in 0..5 {
        let m = mem(&h, "b");
        assert!(
            u(&m, "assigned") + 8 * MIB >= held,
            "b was shrunk blindly from {held} to {}",
            u(&m, "assigned")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = h.ok(&["memory", "status"]);
    assert!(out.contains("stale-demand"), "{out}");
    h.ok(&["vm", "turn-off", "a"]);
    h.ok(&["vm", "turn-off", "b"]);
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
    assert_eq!(h.show("big")["state"], "off");
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["memory", "status", "--json"])).expect("JSON");
    assert_eq!(v["host"]["vm_limit"], 128 * MIB);
}
