//! The daemon and the workers can die without any VM noticing.

use std::time::Duration;
use vireo_e2e::*;

fn boot_id(h: &Host, vm: &str) -> String {
    let (code, out) = h.exec(vm, "cat /proc/sys/kernel/random/boot_id");
    assert_eq!(code, 0, "{out}");
    out.trim().to_string()
}

/// kill -9 of vireod while two VMs run, then restart: every VM is still running, listed with
/// its state, controllable, and the guest saw nothing (same boot, its counter kept going).
/// Then kill -9 of a worker: vireod notices, reports it, and a new worker re-attaches.
#[test]
fn kill9_daemon_and_worker() {
    let mut h = Host::start();
    let d1 = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    let d2 = guest_disk_lite(h.dir.path(), 1, GuestAgent::None);
    h.ok(&[
        "vm",
        "new",
        "a",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        d1.to_str().unwrap(),
    ]);
    h.ok(&[
        "vm",
        "new",
        "b",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        d2.to_str().unwrap(),
    ]);
    h.ok(&["vm", "start", "a"]);
    h.ok(&["vm", "start", "b"]);
    h.ok(&["vm", "pause", "b"]);
    h.wait_heartbeat("a");
    let boot = boot_id(&h, "a");
    assert_eq!(
        h.exec(
            "a",
            "setsid sh -c 'while :; do cut -d\" \" -f1 /proc/uptime >> /run/ticks; sleep 0.2; done' </dev/null >/dev/null 2>&1 &"
        )
        .0,
        0
    );
    let qemu_a = h.show("a")["worker"]["qemu_pid"].clone();

    h.kill_daemon();
    std::thread::sleep(Duration::from_secs(2));
    h.restart_daemon();

    let list: serde_json::Value = serde_json::from_str(&h.ok(&["vm", "list", "--json"])).unwrap();
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("a".into(), "running".into()),
            ("b".into(), "paused".into())
        ]
    );
    let v = h.wait_heartbeat("a");
    assert_eq!(v["worker"]["qemu_pid"], qemu_a, "same QEMU process");
    assert_eq!(boot_id(&h, "a"), boot, "the guest did not reboot");
    // The guest's loop never stalled for long (ticks every 0.2 s, no gap over 2 s).
    let (_, ticks) = h.exec("a", "cat /run/ticks");
    let t: Vec<f64> = ticks
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(t.len() > 5, "{ticks}");
    let max_gap = t.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    assert!(max_gap < 2.0, "guest loop stalled for {max_gap} s");
    // Still controllable.
    h.ok(&["vm", "resume", "b"]);
    assert_eq!(h.show("b")["state"], "running");

    // kill -9 the worker of a.
    let wpid = h.show("a")["worker"]["pid"].as_i64().expect("worker pid") as i32;
    // SAFETY: plain kill(2).
    unsafe { libc::kill(wpid, libc::SIGKILL) };
    let v = h.wait_for("a", Duration::from_secs(20), "worker replaced", |v| {
        v["worker"]["restarts"] == 1
            && v["worker"]["pid"]
                .as_i64()
                .is_some_and(|p| p as i32 != wpid)
    });
    assert!(
        v["status_message"]
            .as_str()
            .unwrap_or("")
            .contains("worker"),
        "{v}"
    );
    assert_eq!(v["worker"]["qemu_pid"], qemu_a);
    h.wait_heartbeat("a");
    assert_eq!(boot_id(&h, "a"), boot);
    h.ok(&["vm", "stop", "a"]);
    h.ok(&["vm", "turn-off", "b"]);
    assert_eq!(h.show("a")["state"], "off");
}
