//! A real QEMU 7.2 NIC on a switch port: proves the `-netdev stream` handshake direction
//! (QEMU is the server, the switch connects), the framing both ways, and that a restarted
//! switch reconnects to a running QEMU by itself.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn marker_frame(text: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x77]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(text);
    f.resize(60, 0);
    f
}

fn dump_has(path: &std::path::Path, text: &[u8]) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(frames) = switch::capture::read_pcap(&data) else {
        return false;
    };
    frames
        .iter()
        .any(|(_, f)| f.windows(text.len()).any(|w| w == text))
}

fn wait_for(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU (`-netdev stream,server=on`) + e1000 on a gen-1 `pc` machine booting from the
/// network: its iPXE DHCP frames reach a peer port through the switch; a frame from the
/// peer reaches QEMU's NIC (recorded by QEMU's own `filter-dump`); after the switch is
/// killed and restarted it reconnects to the same QEMU and both directions work again.
#[test]
fn qemu_stream_netdev_both_ways_and_reconnect() {
    require("qemu-system-x86_64");
    let mut sw = Switch::start(json!({"name": format!("q{}", tag()), "type": "private"}));
    let dir = sw.dir.path().to_path_buf();
    let vm_sock = dir.join("vm.sock");
    let dump = dir.join("qemu-dump.pcap");
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-m", "64", "-boot", "n"])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-parallel",
            "none",
        ])
        .arg("-netdev")
        .arg(format!(
            "stream,id=n0,server=on,addr.type=unix,addr.path={}",
            vm_sock.display()
        ))
        .args(["-device", "e1000,netdev=n0,mac=52:54:00:12:34:56"])
        .arg("-object")
        .arg(format!(
            "filter-dump,id=d0,netdev=n0,file={}",
            dump.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu");
    let _qemu = Qemu(qemu);
    wait_for("QEMU's socket", Duration::from_secs(10), || {
        vm_sock.exists()
    });

    let peer_sock = dir.join("peer.sock");
    let mut peer = StreamPeer::listen(&peer_sock);
    sw.ok(
        "POST",
        "/v1/ports",
        Some(json!({"name": "peer", "backend": {"kind": "stream_connect", "path": peer_sock}})),
    );
    sw.ok(
        "POST",
        "/v1/ports",
        Some(
            json!({"name": "vm", "backend": {"kind": "stream_connect", "path": vm_sock},
        "mac": "52:54:00:12:34:56"}),
        ),
    );
    peer.accept();
    sw.wait_up("vm");

    // QEMU -> switch -> peer
    let f = peer.recv_until(Duration::from_secs(60), |f| {
        f.len() >= 14 && f[6..12] == VM_MAC
    });
    let f = f.expect("no frame from the QEMU NIC");
    assert!(f.len() >= 60, "QEMU frame {} bytes", f.len());
    // peer -> switch -> QEMU
    peer.send(&marker_frame(b"vireo-marker-1"));
    wait_for("marker 1 in QEMU's dump", Duration::from_secs(10), || {
        dump_has(&dump, b"vireo-marker-1")
    });

    // the switch dies and comes back: it reconnects to QEMU by itself
    sw.kill();
    sw.spawn(None);
    peer.accept();
    sw.wait_up("vm");
    peer.send(&marker_frame(b"vireo-marker-2"));
    wait_for("marker 2 in QEMU's dump", Duration::from_secs(10), || {
        dump_has(&dump, b"vireo-marker-2")
    });
    let c = sw.counters("vm");
    assert!(c["tx_packets"].as_u64().unwrap() >= 1, "{c}");
}
