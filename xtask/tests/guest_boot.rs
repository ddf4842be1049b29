//! Real-QEMU (TCG) boot tests of the test-guest images, through `cargo xtask guest-test`.
//!
//! Each test runs one scenario of the binary in a child process (see `xtask/src/testcmd.rs`
//! for what each proves); they take a lock so only one guest boots at a time on a small
//! machine. `VIREO_GUEST_TIMEOUT` (seconds, default 240) bounds the wait for
//! `VIREO-GUEST-READY`; the marker itself is printed in 5-40 s depending on load.
//! Missing tools (QEMU, OVMF, mtools, ...) fail with a message naming scripts/setup.sh.
//! Scenarios that the end-to-end suite already boots are ignored in the CI suite (it has a
//! 30-minute budget on 2 cores); `cargo test -p xtask --test guest_boot -- --include-ignored`
//! runs them all.

use std::process::Command;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn scenario(name: &str) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let timeout = std::env::var("VIREO_GUEST_TIMEOUT").unwrap_or_else(|_| "240".into());
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["guest-test", "--scenario", name, "--timeout", &timeout])
        .output()
        .expect("running the xtask binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "scenario {name} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("PASS {name}")),
        "no PASS line for {name}"
    );
}

/// Generation 1 (pc, SeaBIOS, IDE, e1000) boots to READY, sees its disk, gets a DHCP lease,
/// and powers off on the ACPI power button.
#[test]
#[ignore = "covered end to end by vireo-e2e::lifecycle (gen 1 boot, ACPI power-off); run with --ignored after changing the image builder"]
fn gen1_boots_and_powers_off() {
    scenario("gen1");
}

/// Generation 2 (q35, OVMF with Microsoft keys, Secure Boot on, virtio-scsi) boots the
/// signed chain; the kernel reports Secure Boot enabled.
#[test]
#[ignore = "covered end to end by vireo-e2e::secure_boot; run with --ignored after changing the image builder"]
fn gen2_secure_boot() {
    scenario("gen2");
}

/// The generation 2 image written as VHDX holds the raw image's data and boots with
/// Secure Boot off.
#[test]
fn gen2_vhdx_without_secure_boot() {
    scenario("gen2-nosb-vhdx");
}

/// Debian's qemu-ga runs in the guest: guest-sync, host name, guest-shutdown.
#[test]
#[ignore = "covered end to end by vireo-e2e::qemu_ga; run with --ignored after changing the image builder"]
fn qemu_ga_agent() {
    scenario("qemu-ga");
}

/// The static vireo-guest agent runs in a Secure Boot guest and answers like qemu-ga.
#[test]
#[ignore = "covered end to end by vireo-e2e::lifecycle (gen 2, Secure Boot, vireo agent); run with --ignored after changing the image builder"]
fn vireo_agent() {
    scenario("vireo-agent");
}

/// The guest carries the network test programs (real `ip` with 802.1Q, iperf3, dnsmasq,
/// tcpdump, busybox ping/arping) and they work.
#[test]
fn net_tools() {
    scenario("net-tools");
}

/// Equal inputs hit the cache without touching it; a changed input rebuilds; bad options
/// are refused and leave nothing behind.
#[test]
fn cache_hits_and_rebuilds() {
    scenario("cache");
}
