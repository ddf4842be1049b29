//! Secure Boot templates decide which boot loaders the firmware runs.

use std::time::Duration;
use vireo_e2e::*;

/// Debian's shim is signed by the Microsoft UEFI CA: with the `microsoft-windows` template
/// (Windows PCA only) the firmware refuses it and `vireo vm show` says so; switching the VM
/// to `microsoft-uefi-ca` makes it boot.
#[test]
fn template_decides_boot() {
    let h = Host::start();
    let disk = guest_disk(h.dir.path(), 2, GuestAgent::Vireo);
    h.ok(&[
        "vm",
        "new",
        "sb",
        "--generation",
        "2",
        "--disk",
        disk.to_str().unwrap(),
        "--secure-boot",
        "on",
        "--secure-boot-template",
        "microsoft-windows",
    ]);
    h.ok(&["vm", "start", "sb"]);
    let v = h.wait_for("sb", Duration::from_secs(240), "firmware refusal", |v| {
        v["status_message"]
            .as_str()
            .unwrap_or("")
            .contains("firmware refused the boot loader")
    });
    assert_eq!(v["heartbeat"], "no-contact");
    let text = h.ok(&["vm", "show", "sb"]);
    assert!(text.contains("firmware refused the boot loader"), "{text}");
    h.ok(&["vm", "turn-off", "sb"]);
    // Hardware settings change only while off.
    h.ok(&[
        "vm",
        "set",
        "sb",
        "--secure-boot-template",
        "microsoft-uefi-ca",
    ]);
    h.ok(&["vm", "start", "sb"]);
    let v = h.wait_heartbeat("sb");
    assert!(v["status_message"].is_null(), "{v}");
    h.ok(&["vm", "turn-off", "sb"]);
}
