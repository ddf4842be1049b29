//! Existing guests work with nothing new installed: Debian's own qemu-guest-agent.

use std::time::Duration;
use vireo_e2e::*;

/// A guest running Debian's qemu-ga (not ours) gets heartbeat, guest info, exec and a
/// graceful stop through the agent; KVP (a Vireo extension) is refused clearly.
#[test]
fn debian_qemu_guest_agent() {
    let h = Host::start();
    let disk = guest_disk_lite(h.dir.path(), 1, GuestAgent::QemuGa);
    h.ok(&[
        "vm",
        "new",
        "qga",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    h.ok(&["vm", "start", "qga"]);
    h.wait_heartbeat("qga");
    let v = h.wait_for("qga", Duration::from_secs(30), "guest info", |v| {
        v["guest"]["hostname"].is_string()
    });
    assert!(
        v["guest"]["agent"]
            .as_str()
            .unwrap_or("")
            .starts_with("qemu-ga"),
        "{v}"
    );
    assert_eq!(v["guest"]["hostname"], "vireo-guest");
    let o = h.vireo(&[
        "vm",
        "exec",
        "qga",
        "--",
        "sh",
        "-c",
        "echo hello from qemu-ga; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from qemu-ga\n");
    let e = h.fails(&["vm", "kvp", "qga", "list"]);
    assert!(e.contains("vireo-guest"), "{e}");
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&["vm", "stop", "qga", "--json"])).unwrap();
    assert_eq!(v["state"], "off");
    assert!(
        v["status_message"]
            .as_str()
            .unwrap_or("")
            .contains("guest agent"),
        "{v}"
    );
}
