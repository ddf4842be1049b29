//! Real Linux networking through `vireo-switch`: namespaces joined by veth pairs whose root
//! ends are AF_PACKET ports, TAP ports, and QEMU-like stream peers. Run as root.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn two_vlans(t: &str) -> (Switch, Vec<Netns>, Vec<Link>) {
    let ns: Vec<Netns> = (1..=3)
        .map(|i| Netns::new(&format!("vsw{t}n{i}")))
        .collect();
    let mut links = Vec::new();
    let mut ports = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        let outer = format!("vsw{t}o{i}");
        n.veth("eth0", &outer, Some(&format!("10.77.0.{}/24", i + 1)));
        let vlan = if i < 2 { 10 } else { 20 };
        ports.push(packet_port(&format!("p{i}"), &outer, access(vlan)));
        links.push(Link(outer));
    }
    let sw = Switch::start(json!({"name": format!("t{t}"), "type": "private", "ports": ports}));
    (sw, ns, links)
}

/// Ping works between two namespaces on VLAN 10 and never reaches a namespace on VLAN 20
/// in the same IP subnet; the VLAN 20 port's counters show no frame delivered; 8900-byte
/// pings pass at MTU 9000.
#[test]
fn same_vlan_pings_other_vlan_isolated() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    assert!(
        ns[0].exec_ok("busybox ping -w 4 -c 3 -i 0.2 -W 2 10.77.0.2"),
        "same VLAN ping failed\n{}",
        sw.log()
    );
    assert!(
        !ns[0].exec_ok("busybox ping -w 4 -c 2 -i 0.2 -W 1 10.77.0.3"),
        "ping crossed VLANs"
    );
    let c2 = sw.counters("p2");
    assert_eq!(c2["tx_packets"], 0, "VLAN 20 port got frames: {c2}");
    let c1 = sw.counters("p1");
    assert!(c1["tx_packets"].as_u64().unwrap() >= 3, "{c1}");
    // FDB learned both VLAN 10 MACs
    let fdb = sw.ok("GET", "/v1/fdb", None);
    let learned: Vec<_> = fdb
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["vlan"] == 10)
        .collect();
    assert!(learned.len() >= 2, "{fdb}");
    // jumbo frames (MTU 9000) cross the switch
    for (i, n) in ns.iter().enumerate().take(2) {
        sh(&format!("ip link set vsw{t}o{i} mtu 9000"));
        n.exec("ip link set eth0 mtu 9000");
    }
    assert!(
        ns[0].exec_ok("busybox ping -w 4 -c 2 -s 8900 10.77.0.2"),
        "jumbo ping failed"
    );
    // moving p2 into VLAN 10 at run time makes it reachable
    sw.ok("PATCH", "/v1/ports/p2", Some(json!({"vlan": access(10)})));
    // (the failed attempts above left a FAILED neighbour entry behind)
    ns[0].exec("ip neigh flush dev eth0");
    let ok = (0..3).any(|_| ns[0].exec_ok("busybox ping -w 3 -c 2 10.77.0.3"));
    assert!(ok, "after VLAN change: {}", sw.ok("GET", "/v1/ports", None));
}

/// A trunk stream port sees VLAN 10 traffic tagged with VID 10 (read by a QEMU-like peer),
/// and a tagged reply from the peer reaches the access port untagged (the namespace learns
/// the peer's MAC from its ARP reply).
#[test]
fn trunk_tags_on_the_wire() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    let sock = sw.dir.path().join("trunk.sock");
    let mut peer = StreamPeer::listen(&sock);
    sw.ok(
        "POST",
        "/v1/ports",
        Some(
            json!({"name": "trunk", "backend": {"kind": "stream_connect", "path": sock},
                    "vlan": {"mode": "trunk", "allowed": "10,20"}}),
        ),
    );
    peer.accept();
    sw.wait_up("trunk");
    let _ = ns[0].exec_ok("busybox ping -w 4 -c 1 -W 1 10.77.0.9");
    let arp = peer
        .recv_until(Duration::from_secs(5), |f| {
            f.len() >= 18 && f[12..14] == [0x81, 0x00] && f[16..18] == [0x08, 0x06]
        })
        .expect("no tagged ARP on the trunk");
    let vid = u16::from_be_bytes([arp[14], arp[15]]) & 0xfff;
    assert_eq!(vid, 10);
    let ns_mac = &arp[6..12];
    // ARP reply for 10.77.0.9 from 02:00:00:00:00:09, tagged VID 10
    let me = [2u8, 0, 0, 0, 0, 9];
    let mut f = Vec::new();
    f.extend_from_slice(ns_mac);
    f.extend_from_slice(&me);
    f.extend_from_slice(&[0x81, 0x00, 0x00, 10, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&me);
    f.extend_from_slice(&[10, 77, 0, 9]);
    f.extend_from_slice(ns_mac);
    f.extend_from_slice(&[10, 77, 0, 1]);
    let _ = ns[0].exec_ok("busybox ping -w 4 -c 1 -W 1 10.77.0.9");
    peer.send(&f);
    std::thread::sleep(Duration::from_millis(300));
    let neigh = ns[0].exec("ip neigh show 10.77.0.9");
    assert!(
        neigh.contains("02:00:00:00:00:09"),
        "reply not delivered untagged: {neigh}"
    );
    // the same reply tagged for VLAN 30 (not allowed on the trunk) is dropped and counted
    f[15] = 30;
    peer.send(&f);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sw.counters("trunk")["drops"]["vlan"], 1);
}

/// MAC spoofing protection drops a namespace whose MAC is not the port's, counts the
/// drops, and switching spoofing on at run time lets it through.
#[test]
fn mac_spoofing_is_dropped_and_counted() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    sw.ok(
        "PATCH",
        "/v1/ports/p0",
        Some(json!({"mac": "52:54:00:00:00:01"})),
    );
    assert!(!ns[0].exec_ok("busybox ping -w 4 -c 2 -i 0.2 -W 1 10.77.0.2"));
    let d = sw.counters("p0")["drops"]["mac_spoofing"]
        .as_u64()
        .unwrap_or(0);
    assert!(d >= 2, "{}", sw.counters("p0"));
    sw.ok("PATCH", "/v1/ports/p0", Some(json!({"mac_spoofing": true})));
    assert!(ns[0].exec_ok("busybox ping -w 4 -c 2 -i 0.2 -W 2 10.77.0.2"));
}

/// Bad requests are refused with a clear error and change nothing (also on disk).
#[test]
fn bad_requests_change_nothing() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, _ns, _links) = two_vlans(&t);
    let before = std::fs::read(sw.run_dir().join("switch.json")).unwrap();
    let (st, v) = sw.api("PATCH", "/v1/ports/p0", Some(json!({"vlan": access(5000)})));
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("5000"), "{v}");
    let (st, _) = sw.api(
        "POST",
        "/v1/ports",
        Some(packet_port("p0", "nonexistent1", access(1))),
    );
    assert_eq!(st, 409);
    let (st, v) = sw.api(
        "POST",
        "/v1/ports",
        Some(packet_port("px", "nonexistent0", access(1))),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["kind"], "io");
    let (st, _) = sw.api("DELETE", "/v1/ports/nope", None);
    assert_eq!(st, 404);
    let (st, _) = sw.api("PATCH", "/v1/ports/p0", Some(json!({"bogus": 1})));
    assert!(st == 400 || st == 422, "{st}");
    let (st, _) = sw.api("PUT", "/v1/mirror", Some(json!({"destination": "nope"})));
    assert_eq!(st, 400);
    assert_eq!(sw.ok("GET", "/v1/ports", None).as_array().unwrap().len(), 3);
    let after = std::fs::read(sw.run_dir().join("switch.json")).unwrap();
    assert_eq!(before, after, "persisted state changed");
}

/// A live capture of a port writes a pcap holding the pinged frames in both directions,
/// which `tcpdump -r` opens and decodes.
#[test]
fn capture_writes_pcap() {
    require("ip");
    require("busybox");
    require("tcpdump");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    let out = sw.dir.path().join("p1.pcap");
    sw.ok("POST", "/v1/ports/p1/capture", Some(json!({"path": out})));
    assert!(ns[0].exec_ok("busybox ping -w 4 -c 3 -i 0.2 -W 2 10.77.0.2"));
    let stopped = sw.ok("DELETE", "/v1/ports/p1/capture", None);
    let data = std::fs::read(&out).unwrap();
    let frames = switch::capture::read_pcap(&data).expect("pcap readable");
    assert_eq!(frames.len() as u64, stopped["frames"].as_u64().unwrap());
    let icmp = |ty: u8| {
        frames
            .iter()
            .filter(|(_, f)| f.len() > 34 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == ty)
            .count()
    };
    assert_eq!(icmp(8), 3, "echo requests delivered to p1");
    assert_eq!(icmp(0), 3, "echo replies sent by p1");
    assert_eq!(&data[0..4], &0xa1b2c3d4u32.to_le_bytes());
    // tcpdump reads the file: one line per frame, the echo requests and replies decoded
    let text = sh(&format!("tcpdump -r {} -n -e 2>/dev/null", out.display()));
    assert_eq!(text.lines().count(), frames.len(), "{text}");
    assert_eq!(text.matches("ICMP echo request").count(), 3, "{text}");
    assert_eq!(text.matches("ICMP echo reply").count(), 3, "{text}");
}

/// Port mirroring copies a source port's traffic to a destination in another VLAN.
#[test]
fn mirror_to_port() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    sw.ok(
        "PUT",
        "/v1/mirror",
        Some(json!({"destination": "p2", "sources": ["p0"]})),
    );
    let cap = sw.dir.path().join("m.pcap");
    sw.ok("POST", "/v1/ports/p2/capture", Some(json!({"path": cap})));
    assert!(ns[0].exec_ok("busybox ping -w 4 -c 3 -i 0.2 -W 2 10.77.0.2"));
    sw.ok("DELETE", "/v1/ports/p2/capture", None);
    let frames = switch::capture::read_pcap(&std::fs::read(&cap).unwrap()).unwrap();
    // mirrored copies carry the VLAN 10 tag (p2 is access VLAN 20)
    let tagged_icmp = frames
        .iter()
        .filter(|(_, f)| {
            f.len() > 38 && f[12..16] == [0x81, 0, 0, 10] && f[16..18] == [8, 0] && f[27] == 1
        })
        .count();
    assert!(
        tagged_icmp >= 6,
        "got {tagged_icmp} mirrored ICMP frames of {}",
        frames.len()
    );
    // ns3 (VLAN 20) still cannot talk to VLAN 10
    assert!(!ns[2].exec_ok("busybox ping -w 4 -c 1 -W 1 10.77.0.1"));
}

/// DHCP guard: dnsmasq serving from a guarded port hands out no lease; unguarded, the
/// client gets an address from the pool.
#[test]
fn dhcp_guard_blocks_rogue_server() {
    require("dnsmasq");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    let lease = sw.dir.path().join("leases");
    let pid = sw.dir.path().join("dnsmasq.pid");
    ns[1].exec(&format!(
        "dnsmasq --port=0 --interface=eth0 --bind-interfaces --dhcp-range=10.77.0.100,10.77.0.150,1m \
         --dhcp-leasefile={} --pid-file={} --no-resolv --no-hosts",
        lease.display(),
        pid.display()
    ));
    let _kill = Killer(pid.clone());
    sw.ok("PATCH", "/v1/ports/p1", Some(json!({"dhcp_guard": true})));
    let script = sw.dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"LEASE $ip\"\nexit 0\n",
    )
    .unwrap();
    sh(&format!("chmod +x {}", script.display()));
    let cmd = format!(
        "busybox udhcpc -i eth0 -n -q -f -t 3 -T 1 -s {}",
        script.display()
    );
    assert!(!ns[0].exec_ok(&cmd), "got a lease through DHCP guard");
    let g = sw.counters("p1")["drops"]["dhcp_guard"]
        .as_u64()
        .unwrap_or(0);
    assert!(g >= 1, "{}", sw.counters("p1"));
    sw.ok("PATCH", "/v1/ports/p1", Some(json!({"dhcp_guard": false})));
    let out = ns[0].exec(&cmd);
    assert!(out.contains("LEASE 10.77.0.1"), "no lease: {out}");
}

struct Killer(std::path::PathBuf);
impl Drop for Killer {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(&self.0) {
            let _ = sh_ok(&format!("kill {}", p.trim()));
        }
    }
}

/// QoS maximum bandwidth: iperf3 TCP through a port limited to 20 Mbit/s measures within
/// a generous band around the limit, and clearly above it with the limit removed.
#[test]
fn qos_max_bandwidth_limits_iperf3() {
    require("iperf3");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    ns[1].exec("iperf3 -s -D -1 -p 5301");
    sw.ok(
        "PATCH",
        "/v1/ports/p0",
        Some(json!({"qos": {"max_bps": 20_000_000}})),
    );
    let out = ns[0].exec("iperf3 -c 10.77.0.2 -p 5301 -t 3 -J");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    assert!(bps > 5e6 && bps < 30e6, "limited to 20M, measured {bps}");
    assert!(sw.counters("p0")["drops"]["qos"].as_u64().unwrap_or(0) > 0);
    sw.ok("PATCH", "/v1/ports/p0", Some(json!({"qos": {}})));
    ns[1].exec("iperf3 -s -D -1 -p 5302");
    let out = ns[0].exec("iperf3 -c 10.77.0.2 -p 5302 -t 2 -J");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let free = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    assert!(free > 40e6, "unlimited measured {free}");
}

/// A TAP port: the switch creates the interface; moved into a namespace it carries pings
/// and TCP (iperf3, both directions) to a veth-attached namespace on the same VLAN.
#[test]
fn tap_port_carries_traffic() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    let tap = format!("vsw{t}t");
    let _l = Link(tap.clone());
    sw.ok(
        "POST",
        "/v1/ports",
        Some(json!({"name": "tap", "backend": {"kind": "tap", "ifname": tap}, "vlan": access(10)})),
    );
    let tns = Netns::new(&format!("vsw{t}tn"));
    sh(&format!("ip link set {tap} netns {}", tns.name));
    sh(&format!(
        "ip -n {} addr add 10.77.0.9/24 dev {tap}",
        tns.name
    ));
    sh(&format!("ip -n {} link set {tap} up", tns.name));
    assert!(
        tns.exec_ok("busybox ping -w 4 -c 3 -i 0.2 -W 2 10.77.0.1"),
        "{}",
        sw.log()
    );
    assert!(!tns.exec_ok("busybox ping -w 4 -c 1 -W 1 10.77.0.3"));
    // TCP both ways: super-frames from the veth side are segmented for the TAP, and the
    // TAP's frames go out through AF_PACKET; a bad checksum or size would stall the stream
    require("iperf3");
    for reverse in ["", "-R"] {
        tns.exec("iperf3 -s -D -1 -p 5303");
        std::thread::sleep(Duration::from_millis(300));
        let out = ns[0].exec(&format!("iperf3 -c 10.77.0.9 -p 5303 -t 1 -J {reverse}"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap();
        assert!(bytes > 1_000_000, "TCP {reverse} moved only {bytes} bytes");
    }
    drop(ns);
}

/// The switch survives being killed: a restart on the same run dir restores every port
/// (including ones added through the API), reconnects to stream peers on its own, and
/// forwards again.
#[test]
fn restart_restores_ports_and_reconnects() {
    require("ip");
    require("busybox");
    let t = tag();
    let (mut sw, ns, _links) = two_vlans(&t);
    let sock = sw.dir.path().join("vm.sock");
    let mut peer = StreamPeer::listen(&sock);
    sw.ok(
        "POST",
        "/v1/ports",
        Some(json!({"name": "vm", "backend": {"kind": "stream_connect", "path": sock}, "vlan": access(10)})),
    );
    peer.accept();
    sw.kill();
    // new switch process: no --config, state comes from the run dir
    sw.spawn(None);
    peer.accept();
    sw.wait_up("vm");
    let ports = sw.ok("GET", "/v1/ports", None);
    assert_eq!(ports.as_array().unwrap().len(), 4);
    let _ = ns[0].exec_ok("busybox ping -w 4 -c 1 -W 1 10.77.0.9");
    let f = peer.recv_until(Duration::from_secs(5), |f| {
        f.len() >= 14 && f[12..14] == [8, 6]
    });
    assert!(f.is_some(), "no ARP after restart");
    assert!(ns[0].exec_ok("busybox ping -w 4 -c 2 -i 0.2 -W 2 10.77.0.2"));
}

/// Minimum-bandwidth weights: two namespaces flood UDP at a slow stream peer (the
/// congested output); once backlogged, the peer receives the two sources in about the
/// ratio of their `min_weight` (75:25).
#[test]
fn min_weight_shares_a_congested_port() {
    require("ip");
    require("python3");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    let sock = sw.dir.path().join("slow.sock");
    let mut peer = StreamPeer::listen(&sock);
    let sink_mac = "02:00:00:00:00:50";
    sw.ok(
        "POST",
        "/v1/ports",
        Some(
            json!({"name": "slow", "backend": {"kind": "stream_connect", "path": sock},
                    "vlan": access(10), "static_macs": [sink_mac]}),
        ),
    );
    peer.accept();
    sw.wait_up("slow");
    sw.ok(
        "PATCH",
        "/v1/ports/p0",
        Some(json!({"qos": {"min_weight": 75}})),
    );
    sw.ok(
        "PATCH",
        "/v1/ports/p1",
        Some(json!({"qos": {"min_weight": 25}})),
    );
    let macs: Vec<[u8; 6]> = ns[..2]
        .iter()
        .map(|n| mac_bytes(n.exec("cat /sys/class/net/eth0/address").trim()))
        .collect();
    let blast = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nd=b'x'*1000\nwhile True:\n  try: s.sendto(d,('10.77.0.50',9))\n  except OSError: pass\n";
    let mut kids = Vec::new();
    for n in &ns[..2] {
        n.exec(&format!(
            "ip neigh replace 10.77.0.50 lladdr {sink_mac} dev eth0"
        ));
        kids.push(
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &n.name, "timeout", "90", "python3", "-c", blast,
                ])
                .spawn()
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut counts = [0usize; 2];
    let mut seen = 0usize;
    let t0 = std::time::Instant::now();
    // a slow reader: skip what queued FIFO before the backlog formed (socket and write
    // buffer, under 1000 frames), then count 3000 frames by source
    while seen < 4500 && t0.elapsed() < Duration::from_secs(60) {
        let Some(f) = peer.recv_until(Duration::from_millis(500), |_| true) else {
            continue;
        };
        seen += 1;
        std::thread::sleep(Duration::from_micros(300));
        if seen <= 1500 {
            continue;
        }
        for (i, m) in macs.iter().enumerate() {
            if f[6..12] == m[..] {
                counts[i] += 1;
            }
        }
    }
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    assert!(seen == 4500, "the sources stalled: {seen} frames in 60 s");
    assert!(
        counts[1] > 100,
        "too few frames from the light source: {counts:?}"
    );
    let ratio = counts[0] as f64 / counts[1] as f64;
    eprintln!("weights 75:25 -> frames {counts:?}, ratio {ratio:.2}");
    assert!(
        (2.0..4.5).contains(&ratio),
        "weights 75:25 gave {counts:?} (ratio {ratio:.2})"
    );
}

/// ARP spoofing protection and port ACLs on a live port: with `allowed_ips` set, the
/// namespace pings from its allowed address but not from another one (dropped as
/// `arp_spoofing`); an outbound deny rule for one peer blocks it and counts hits while
/// another peer stays reachable.
#[test]
fn ip_guard_and_acl() {
    require("ip");
    require("busybox");
    let t = tag();
    let (sw, ns, _links) = two_vlans(&t);
    sw.ok("PATCH", "/v1/ports/p2", Some(json!({"vlan": access(10)})));
    sw.ok(
        "PATCH",
        "/v1/ports/p0",
        Some(json!({"allowed_ips": ["10.77.0.1/32"]})),
    );
    assert!(ns[0].exec_ok("busybox ping -w 4 -c 2 10.77.0.2"));
    ns[0].exec("ip addr del 10.77.0.1/24 dev eth0");
    ns[0].exec("ip addr add 10.77.0.7/24 dev eth0");
    ns[1].exec("ip neigh flush dev eth0");
    assert!(
        !ns[0].exec_ok("busybox ping -w 2 -c 2 10.77.0.2"),
        "spoofed source got through"
    );
    let d = sw.counters("p0")["drops"]["arp_spoofing"]
        .as_u64()
        .unwrap_or(0);
    assert!(d >= 1, "{}", sw.counters("p0"));
    ns[0].exec("ip addr del 10.77.0.7/24 dev eth0");
    ns[0].exec("ip addr add 10.77.0.1/24 dev eth0");
    sw.ok(
        "PATCH",
        "/v1/ports/p0",
        Some(json!({"allowed_ips": [], "acl": [
            {"action": "deny", "direction": "outbound", "remote_ip": "10.77.0.2/32"}]})),
    );
    assert!(
        !ns[0].exec_ok("busybox ping -w 2 -c 2 10.77.0.2"),
        "ACL did not block"
    );
    ns[0].exec("ip neigh flush dev eth0");
    assert!(
        (0..3).any(|_| ns[0].exec_ok("busybox ping -w 3 -c 2 10.77.0.3")),
        "unrelated peer blocked"
    );
    assert!(sw.counters("p0")["drops"]["acl"].as_u64().unwrap_or(0) >= 2);
    let ext = sw.ok("GET", "/v1/extensions", None);
    let acl = ext
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "acl")
        .unwrap();
    assert!(
        acl["status"]["p0"][0]["hits"].as_u64().unwrap() >= 2,
        "{acl}"
    );
    // disabling the acl extension at run time lets the traffic through
    sw.ok(
        "PATCH",
        "/v1/extensions/acl",
        Some(json!({"enabled": false})),
    );
    assert!((0..3).any(|_| ns[0].exec_ok("busybox ping -w 3 -c 2 10.77.0.2")));
}

/// Hot-unplug: deleting a stream port disconnects its peer (the QEMU side sees EOF) and
/// the port is gone from the list and from the persisted state.
#[test]
fn unplug_disconnects_peer() {
    let mut sw = Switch::start(json!({"name": format!("u{}", tag()), "type": "private"}));
    let sock = sw.dir.path().join("vm.sock");
    let mut peer = StreamPeer::listen(&sock);
    sw.ok(
        "POST",
        "/v1/ports",
        Some(json!({"name": "vm", "backend": {"kind": "stream_connect", "path": sock}})),
    );
    peer.accept();
    sw.wait_up("vm");
    let (st, _) = sw.api("DELETE", "/v1/ports/vm", None);
    assert_eq!(st, 204);
    assert!(
        peer.recv_until(Duration::from_secs(2), |_| true).is_none(),
        "peer still fed"
    );
    assert!(peer.is_closed(), "peer not disconnected");
    assert_eq!(sw.ok("GET", "/v1/ports", None).as_array().unwrap().len(), 0);
    sw.kill();
    sw.spawn(None);
    assert_eq!(sw.ok("GET", "/v1/ports", None).as_array().unwrap().len(), 0);
    // a port with an empty path gets one under the run dir, returned in the answer
    let p = sw.ok(
        "POST",
        "/v1/ports",
        Some(json!({"name": "vm2", "backend": {"kind": "stream_listen", "path": ""}})),
    );
    let path = p["config"]["backend"]["path"].as_str().unwrap().to_string();
    assert!(path.ends_with("/ports/vm2.sock"), "{path}");
    assert!(std::path::Path::new(&path).exists());
}

/// Switch types: an external switch gets an `uplink` port on its interface (trunk of all
/// VLANs, native 1) and, shared with the host, a `host` TAP port in `host_vlan`; a VM's
/// VLAN 20 frame leaves the uplink tagged 20 (seen in a capture of the uplink), and
/// untagged wire traffic (native VLAN 1) does not reach the VM.
#[test]
fn external_switch_uplink_and_host_port() {
    require("ip");
    require("busybox");
    let t = tag();
    let wire = Netns::new(&format!("vsw{t}w"));
    let outer = format!("vsw{t}up");
    wire.veth("eth0", &outer, Some("10.79.0.1/24"));
    let _l = Link(outer.clone());
    let name = format!("e{t}");
    let host_if = format!("vsw-{name}");
    let _h = Link(host_if.clone());
    let sw = Switch::start(json!({"name": name, "type": "external", "uplink": outer,
                                  "share_host": true, "host_vlan": 10}));
    let ports = sw.ok("GET", "/v1/ports", None);
    let by = |n: &str| {
        ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["config"]["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by("uplink")["config"]["role"], "uplink");
    assert_eq!(
        by("uplink")["config"]["vlan"],
        json!({"mode": "trunk", "allowed": "1-4094", "native": 1})
    );
    assert_eq!(by("host")["config"]["vlan"], access(10));
    assert!(
        std::path::Path::new(&format!("/sys/class/net/{host_if}")).exists(),
        "no host TAP"
    );
    let sock = sw.dir.path().join("vm.sock");
    let mut peer = StreamPeer::listen(&sock);
    sw.ok("POST", "/v1/ports", Some(json!({"name": "vm", "backend": {"kind": "stream_connect", "path": sock}, "vlan": access(20)})));
    peer.accept();
    sw.wait_up("vm");
    let cap = sw.dir.path().join("uplink.pcap");
    sw.ok(
        "POST",
        "/v1/ports/uplink/capture",
        Some(json!({"path": cap})),
    );
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x20, 0x88, 0xb5]);
    f.extend_from_slice(b"vlan-20-marker");
    f.resize(60, 0);
    peer.send(&f);
    // untagged traffic from the wire (ARP broadcasts, native VLAN 1)
    let _ = wire.exec_ok("busybox ping -w 2 -c 2 10.79.0.9");
    std::thread::sleep(Duration::from_millis(300));
    sw.ok("DELETE", "/v1/ports/uplink/capture", None);
    let frames = switch::capture::read_pcap(&std::fs::read(&cap).unwrap()).unwrap();
    let tagged = frames
        .iter()
        .find(|(_, fr)| fr.windows(14).any(|w| w == b"vlan-20-marker"))
        .expect("marker frame not sent on the uplink");
    assert_eq!(
        &tagged.1[12..16],
        &[0x81, 0x00, 0x00, 20],
        "not tagged 20 on the uplink"
    );
    assert!(sw.counters("uplink")["rx_packets"].as_u64().unwrap() >= 1);
    let got = peer.recv_until(Duration::from_millis(500), |_| true);
    assert!(
        got.is_none(),
        "native-VLAN wire traffic reached the VLAN 20 VM: {got:?}"
    );
}

/// The uplink of an external switch carries the native VLAN untagged in both directions: a
/// namespace behind the uplink veth (like a host on the physical LAN) pings a namespace on
/// a trunk port's native VLAN and fetches 1 MiB over TCP from it (SHA-256 compared), while
/// an access port on VLAN 10 in the same subnet stays unreachable from the wire.
#[test]
fn uplink_native_vlan_reaches_trunk_port() {
    require("ip");
    require("busybox");
    let t = tag();
    let wire = Netns::new(&format!("vsw{t}w"));
    let up = format!("vsw{t}up");
    wire.veth("eth0", &up, Some("10.81.0.100/24"));
    let _lu = Link(up.clone());
    let vm = Netns::new(&format!("vsw{t}c"));
    let vm_out = format!("vsw{t}c0");
    vm.veth("eth0", &vm_out, Some("10.81.0.3/24"));
    let _lc = Link(vm_out.clone());
    let other = Netns::new(&format!("vsw{t}a"));
    let other_out = format!("vsw{t}a0");
    other.veth("eth0", &other_out, Some("10.81.0.1/24"));
    let _la = Link(other_out.clone());
    let sw = Switch::start(
        json!({"name": format!("u{t}"), "type": "external", "uplink": up,
        "ports": [
            packet_port("c", &vm_out, json!({"mode": "trunk", "allowed": "1,10,20", "native": 1})),
            packet_port("a", &other_out, access(10)),
        ]}),
    );
    assert!(
        wire.exec_ok("busybox ping -w 6 -c 3 -i 0.2 -W 2 10.81.0.3"),
        "the wire namespace cannot reach the trunk port's native VLAN over the uplink\n{}\n{}",
        serde_json::to_string_pretty(&sw.ok("GET", "/v1/ports", None)).unwrap(),
        sw.log()
    );
    let www = sw.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(www.join("blob"), &blob).unwrap();
    // httpd daemonizes; dropping the namespace kills it
    vm.exec(&format!("busybox httpd -p 8080 -h {}", www.display()));
    let got = sw.dir.path().join("got");
    let fetched = (0..20).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        wire.exec_ok(&format!(
            "timeout 30 busybox wget -q -O {} http://10.81.0.3:8080/blob",
            got.display()
        ))
    });
    assert!(fetched, "TCP over the uplink failed\n{}", sw.log());
    let rx = std::fs::read(&got).unwrap();
    assert_eq!(rx.len(), blob.len());
    assert!(rx == blob, "data fetched over the uplink differs");
    assert!(
        !wire.exec_ok("busybox ping -w 3 -c 2 -W 1 10.81.0.1"),
        "untagged wire traffic reached an access port on VLAN 10"
    );
    assert_eq!(sw.counters("a")["tx_packets"], 0);
}

/// Hostile frames from a VM port never crash the switch process: empty frames, runts,
/// a 64 KiB frame, broken, reserved-VID and double 802.1Q tags, then a flood of 40 000
/// frames from random source MACs. Afterwards the process is alive, its MAC table holds at
/// most `FDB_MAX_ENTRIES` entries, malformed frames are counted, and two namespaces on the
/// same switch still ping each other.
#[test]
fn hostile_frames_never_crash_the_process() {
    require("ip");
    require("busybox");
    let t = tag();
    let (mut sw, ns, _links) = two_vlans(&t);
    let sock = sw.dir.path().join("evil.sock");
    let mut peer = StreamPeer::listen(&sock);
    sw.ok(
        "POST",
        "/v1/ports",
        Some(
            json!({"name": "evil", "backend": {"kind": "stream_connect", "path": sock},
                    "vlan": {"mode": "trunk", "allowed": "10,20", "native": 10}}),
        ),
    );
    peer.accept();
    sw.wait_up("evil");
    let src = [2u8, 0, 0, 0, 0, 0x66];
    let hdr = |ty: &[u8]| {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(ty);
        f
    };
    for n in 0..14 {
        peer.send(&vec![0xffu8; n]);
    }
    let mut big = hdr(&[0x08, 0x00]);
    big.resize(65_000, 0x45);
    peer.send(&big);
    for ty in [
        &[0x81, 0x00][..],                                         // tag cut short
        &[0x81, 0x00, 0x0f, 0xff, 0x08, 0x00],                     // VID 4095 (reserved)
        &[0x81, 0x00, 0x00, 10, 0x81, 0x00, 0x00, 20, 0x08, 0x00], // double tag
        &[0x88, 0xa8, 0x00, 10, 0x81, 0x00, 0x00, 20, 0x08, 0x00], // 802.1ad outer tag
        &[0x81, 0x00, 0x00, 10],                                   // tag and nothing after it
        &[0x08, 0x00, 0x45, 0x00],                                 // IPv4 header cut short
        &[0x86, 0xdd, 0x60],                                       // IPv6 header cut short
        &[0x08, 0x06, 0x00, 0x01],                                 // ARP cut short
    ] {
        let mut f = hdr(ty);
        f.resize(f.len().max(20), 0);
        peer.send(&f);
    }
    // a flood of random unicast source MACs (xorshift), untagged (native VLAN 10)
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut burst = Vec::new();
    for i in 0..40_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        let mut f = vec![
            2,
            0,
            0,
            0,
            0,
            0x77,
            b[0] & 0xfe,
            b[1],
            b[2],
            b[3],
            b[4],
            b[5],
        ];
        f.extend_from_slice(&[0x88, 0xb5]);
        f.resize(60, 0);
        burst.extend_from_slice(&(f.len() as u32).to_be_bytes());
        burst.extend_from_slice(&f);
        if i % 1000 == 999 {
            peer.send_raw(&burst);
            burst.clear();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sw.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the switch process died: {}",
        sw.log()
    );
    let c = sw.counters("evil");
    assert!(
        c["drops"]["malformed"].as_u64().unwrap_or(0) >= 14,
        "runts not counted as malformed: {c}"
    );
    let fdb = sw.ok("GET", "/v1/fdb", None);
    let n = fdb.as_array().unwrap().len();
    assert!(
        n <= switch::dataplane::FDB_MAX_ENTRIES,
        "MAC table grew to {n} entries"
    );
    assert!(n >= 1000, "the flood was not learned at all ({n} entries)");
    assert!(
        ns[0].exec_ok("busybox ping -w 6 -c 2 -i 0.2 -W 2 10.77.0.2"),
        "forwarding broken after the hostile frames: {}",
        sw.log()
    );
}
