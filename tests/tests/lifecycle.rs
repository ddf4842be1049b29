//! VM lifecycle on real guests booted from their disks through their firmware.

use std::time::{Duration, Instant};
use vireo_e2e::*;

const COUNTER: &str = "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $! > /run/counter.pid; echo started";

/// The guest's counter value, the counter's pid and the guest's uptime in seconds (the
/// guest's own clock, which stands still while the VM is saved). One line, written by one
/// `echo`; read again when it catches the counter between its file's truncation and its
/// write (an empty value).
fn counter(h: &Host, vm: &str) -> (u64, String, f64) {
    let mut last = String::new();
    for _ in 0..5 {
        let (code, out) = h.exec(
            vm,
            "echo \"counter=$(cat /run/counter) pid=$(cat /run/counter.pid) uptime=$(cut -d' ' -f1 /proc/uptime)\"",
        );
        assert_eq!(code, 0, "reading the counter failed: {out}");
        let field = |k: &str| {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or("")
                .to_string()
        };
        if let (Ok(n), Ok(up)) = (field("counter=").parse(), field("uptime=").parse()) {
            let pid = field("pid=");
            assert!(
                !pid.is_empty(),
                "no counter pid in the guest's answer {out:?}"
            );
            return (n, pid, up);
        }
        last = out;
        std::thread::sleep(Duration::from_millis(150));
    }
    panic!("the guest's counter could not be read: last answer {last:?}");
}

/// Checks that the counter process survived a save/restore and counted only while the guest
/// ran: its advance fits the guest's own clock (10 ticks a second at most), and the guest's
/// clock missed the time it spent saved. A load-proof check: a slow host stretches both.
fn assert_counter_resumed(
    before: (u64, String, f64),
    after: (u64, String, f64),
    wall: Duration,
    saved_for: Duration,
) {
    let ((b, pid_b, up_b), (a, pid_a, up_a)) = (before, after);
    assert_eq!(pid_b, pid_a, "the counter process survived save/restore");
    assert!(a >= b, "counter went back: {b} -> {a}");
    let guest_secs = up_a - up_b;
    println!(
        "counter {b} -> {a}; guest clock {guest_secs:.1} s; wall {:.1} s (saved {:.1} s)",
        wall.as_secs_f64(),
        saved_for.as_secs_f64()
    );
    assert!(
        (a - b) as f64 <= guest_secs * 10.0 + 10.0,
        "counter ran ahead of the guest's clock: {b} -> {a} in {guest_secs:.1} s of guest time"
    );
    assert!(
        guest_secs < wall.as_secs_f64() - saved_for.as_secs_f64() * 0.75,
        "the guest's clock ran while it was saved: {guest_secs:.1} s of guest time in {:.1} s",
        wall.as_secs_f64()
    );
}

/// Generation 1: boots from its IDE disk under SeaBIOS, heartbeat, guest info, exec with exit
/// status and streamed output, KVP both ways, pause/resume, save and restore with the guest's
/// state preserved, graceful stop through the agent.
#[test]
fn generation1_full_lifecycle() {
    let h = Host::start();
    let disk = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    h.ok(&[
        "vm",
        "new",
        "g1",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    let v = h.show("g1");
    assert_eq!(v["state"], "off");
    assert_eq!(v["heartbeat"], "no-contact");
    assert_eq!(v["generation"], 1);
    assert_eq!(v["disks"][0]["bus"], "ide");
    h.ok(&["vm", "start", "g1"]);
    let v = h.wait_heartbeat("g1");
    assert_eq!(v["state"], "running");
    assert_eq!(
        v["accel"], "tcg",
        "this machine's KVM has no VT-x: auto must choose TCG"
    );
    let v = h.wait_for("g1", Duration::from_secs(120), "guest info", |v| {
        v["guest"]["hostname"].is_string()
    });
    assert_eq!(v["guest"]["hostname"], "vireo-guest");
    assert!(v["guest"]["agent"]
        .as_str()
        .unwrap_or("")
        .starts_with("vireo-guest"));
    assert!(v["guest"]["kernel"].as_str().unwrap_or("").contains('.'));
    // The boot disk really is on IDE (ata_piix), not virtio.
    let (code, out) = h.exec(
        "g1",
        "ls /sys/bus/pci/drivers/ata_piix/ | grep -c 0000 ; cat /proc/cmdline",
    );
    assert_eq!(code, 0);
    assert!(
        out.lines().next().unwrap_or("0").trim() != "0",
        "no ata_piix device: {out}"
    );

    // exec: output and exit status come back.
    let o = h.vireo(&[
        "vm",
        "exec",
        "g1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    let (_, sum) = h.exec("g1", "head -c 1048576 /dev/zero | sha256sum");
    assert!(
        sum.starts_with("30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58"),
        "{sum}"
    );

    // KVP: host -> guest, guest -> host.
    h.ok(&["vm", "kvp", "g1", "set", "role", "web-frontend"]);
    let (_, val) = h.exec("g1", "cat /run/vireo/kvp/host/role");
    assert_eq!(val.trim(), "web-frontend");
    let (code, _) = h.exec("g1", "vireo-guest kvp set build 42");
    assert_eq!(code, 0);
    assert_eq!(h.ok(&["vm", "kvp", "g1", "get", "build"]).trim(), "42");
    let pools: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "kvp", "g1", "list", "--json"])).unwrap();
    assert_eq!(pools["host"]["role"], "web-frontend");
    assert_eq!(pools["guest"]["build"], "42");

    // Pause/resume.
    assert_eq!(h.show("g1")["state"], "running");
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "pause", "g1", "--json"])).unwrap();
    assert_eq!(v["state"], "paused");
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "resume", "g1", "--json"])).unwrap();
    assert_eq!(v["state"], "running");

    // Save and restore: the guest's counter keeps counting from where it was.
    assert_eq!(h.exec("g1", COUNTER).0, 0);
    std::thread::sleep(Duration::from_millis(800));
    let before = counter(&h, "g1");
    let t0 = Instant::now();
    assert!(before.0 > 0);
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "save", "g1", "--json"])).unwrap();
    assert_eq!(v["state"], "saved");
    assert!(v["worker"].is_null());
    let saved_for = Duration::from_secs(4);
    std::thread::sleep(saved_for);
    h.ok(&["vm", "start", "g1"]);
    h.wait_heartbeat("g1");
    let after = counter(&h, "g1");
    assert_counter_resumed(before, after, t0.elapsed(), saved_for);

    // Graceful stop through the agent.
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "stop", "g1", "--json"])).unwrap();
    assert_eq!(v["state"], "off");
    assert!(
        v["status_message"]
            .as_str()
            .unwrap_or("")
            .contains("gracefully"),
        "{v}"
    );
    assert_eq!(v["heartbeat"], "no-contact");
}

/// Generation 2: boots from its SCSI disk under UEFI with Secure Boot on (template trusting
/// the Microsoft UEFI CA that signed Debian's shim), heartbeat, KVP, save/restore, stop.
#[test]
fn generation2_secure_boot_lifecycle() {
    let h = Host::start();
    let disk = guest_disk(h.dir.path(), 2, GuestAgent::Vireo);
    h.ok(&[
        "vm",
        "new",
        "g2",
        "--generation",
        "2",
        "--memory",
        "512M",
        "--disk",
        disk.to_str().unwrap(),
        "--secure-boot",
        "on",
        "--secure-boot-template",
        "microsoft-uefi-ca",
    ]);
    let v = h.show("g2");
    assert_eq!(v["disks"][0]["bus"], "scsi");
    assert_eq!(v["secure_boot"], true);
    h.ok(&["vm", "start", "g2"]);
    h.wait_heartbeat("g2");
    // Secure Boot really is enforced in the guest, and the disk is on virtio-scsi.
    let (code, out) = h.exec("g2", "dmesg | grep -i 'secure boot enabled' | head -1; ls /sys/bus/virtio/drivers/virtio_scsi | grep -c virtio");
    assert_eq!(code, 0);
    assert!(
        out.to_lowercase().contains("secure boot enabled"),
        "guest kernel does not report Secure Boot: {out}"
    );
    h.ok(&["vm", "kvp", "g2", "set", "site", "dr-east"]);
    assert_eq!(
        h.exec("g2", "cat /run/vireo/kvp/host/site").1.trim(),
        "dr-east"
    );
    assert_eq!(h.exec("g2", "vireo-guest kvp set ready yes").0, 0);
    assert_eq!(h.ok(&["vm", "kvp", "g2", "get", "ready"]).trim(), "yes");

    assert_eq!(h.exec("g2", COUNTER).0, 0);
    std::thread::sleep(Duration::from_millis(800));
    let before = counter(&h, "g2");
    let t0 = Instant::now();
    h.ok(&["vm", "save", "g2"]);
    assert_eq!(h.show("g2")["state"], "saved");
    let saved_for = Duration::from_secs(4);
    std::thread::sleep(saved_for);
    h.ok(&["vm", "start", "g2"]);
    h.wait_heartbeat("g2");
    let after = counter(&h, "g2");
    assert_counter_resumed(before, after, t0.elapsed(), saved_for);

    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "stop", "g2", "--json"])).unwrap();
    assert_eq!(v["state"], "off");
}

/// A guest with no agent still runs (heartbeat no-contact), refuses exec with a clear error,
/// stops through the ACPI power button, and turn-off is immediate.
#[test]
fn no_agent_acpi_stop_and_timeout() {
    let h = Host::start();
    let disk = guest_disk_lite(h.dir.path(), 1, GuestAgent::None);
    h.ok(&[
        "vm",
        "new",
        "plain",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    h.ok(&["vm", "start", "plain"]);
    let log = h.show("plain")["console_log"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("VIREO-GUEST-READY")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "guest did not boot: {}",
            tail(&std::fs::read_to_string(&log).unwrap_or_default(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let v = h.show("plain");
    assert_eq!(v["state"], "running");
    assert_eq!(v["heartbeat"], "no-contact");
    let e = h.fails(&["vm", "exec", "plain", "--", "true"]);
    assert!(e.contains("agent"), "{e}");
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "stop", "plain", "--json", "--timeout", "60"])).unwrap();
    assert_eq!(v["state"], "off");
    assert!(
        v["status_message"].as_str().unwrap_or("").contains("ACPI"),
        "{v}"
    );

    // Turn-off of a running VM is immediate.
    h.ok(&["vm", "start", "plain"]);
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "turn-off", "plain", "--json"])).unwrap();
    assert_eq!(v["state"], "off");
}
