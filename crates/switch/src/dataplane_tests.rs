use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;
use crate::config::{Backend, Mac, PvlanMode};
use crate::frame::{build::*, parse, push_tag, ETH_P_IPV4};

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}

fn port(name: &str, vlan: VlanMode) -> PortConfig {
    let mut p = PortConfig::new(
        name,
        Backend::Tap {
            ifname: name.into(),
        },
    );
    p.vlan = vlan;
    p
}

fn access(v: u16) -> VlanMode {
    VlanMode::Access { vlan: v }
}

fn switch(ports: Vec<PortConfig>) -> Dataplane {
    let mut c = SwitchConfig::new("sw", SwitchType::Private);
    c.ports = ports;
    let mut dp = Dataplane::new(&c, &Registry::with_builtins()).unwrap();
    for i in 0..c.ports.len() {
        dp.set_link(i as PortId, true);
    }
    dp
}

fn run(dp: &mut Dataplane, from: PortId, f: &[u8]) -> Vec<(PortId, Vec<u8>)> {
    let mut out = Vec::new();
    dp.process(from, f, Now::default(), &mut |p, b| {
        out.push((p, b.to_vec()));
        true
    });
    out
}

fn ping(src: u8, dst: Mac) -> Vec<u8> {
    eth(
        dst,
        mac(src),
        ETH_P_IPV4,
        &ipv4(
            Ipv4Addr::new(10, 0, 0, src),
            Ipv4Addr::new(10, 0, 0, 99),
            1,
            &[8, 0, 0, 0],
        ),
    )
}

/// Broadcast floods within the VLAN only; learned unicast goes to one port.
#[test]
fn flood_and_learn() {
    let mut dp = switch(vec![
        port("a", access(10)),
        port("b", access(10)),
        port("c", access(20)),
        port("d", access(10)),
    ]);
    let out = run(&mut dp, 0, &ping(1, Mac::BROADCAST));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![1, 3]);
    // b answers a: a is known now
    let out = run(&mut dp, 1, &ping(2, mac(1)));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0]);
    // a to b: known
    let out = run(&mut dp, 0, &ping(1, mac(2)));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![1]);
    let st = dp.ports();
    assert_eq!(st[0].counters.rx_packets, 2);
    assert_eq!(st[1].counters.tx_packets, 2);
    assert_eq!(st[2].counters.tx_packets, 0, "other VLAN saw nothing");
}

/// Trunk ports get frames tagged (native untagged) and access ports untagged.
#[test]
fn trunk_tagging() {
    let trunk = VlanMode::Trunk {
        allowed: [1, 10, 20].into(),
        native: Some(1),
    };
    let mut dp = switch(vec![
        port("a", access(10)),
        port("t", trunk),
        port("n", access(1)),
    ]);
    let out = run(&mut dp, 0, &ping(1, Mac::BROADCAST));
    assert_eq!(out.len(), 1);
    let p = parse(&out[0].1).unwrap();
    assert_eq!(p.tag.map(|t| t.vid), Some(10));
    // tagged frame from the trunk in VLAN 10 reaches the access port untagged
    let mut f = ping(5, Mac::BROADCAST);
    push_tag(
        &mut f,
        VlanTag {
            pcp: 3,
            dei: false,
            vid: 10,
        },
    );
    let out = run(&mut dp, 1, &f);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 0);
    assert_eq!(out[0].1, ping(5, Mac::BROADCAST));
    // untagged from the trunk is native VLAN 1
    let out = run(&mut dp, 1, &ping(6, Mac::BROADCAST));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![2]);
    // a VLAN the trunk does not carry is dropped and counted
    let mut f = ping(5, Mac::BROADCAST);
    push_tag(
        &mut f,
        VlanTag {
            pcp: 0,
            dei: false,
            vid: 30,
        },
    );
    assert!(run(&mut dp, 1, &f).is_empty());
    assert_eq!(dp.ports()[1].counters.drops_for(DropReason::Vlan), 1);
    // a guest on an access port cannot inject tags
    let mut f = ping(1, Mac::BROADCAST);
    push_tag(
        &mut f,
        VlanTag {
            pcp: 0,
            dei: false,
            vid: 20,
        },
    );
    assert!(run(&mut dp, 0, &f).is_empty());
}

/// Spoofed MACs are dropped and counted, and never learned.
#[test]
fn mac_spoofing_drop() {
    let mut a = port("a", access(1));
    a.mac = Some(mac(1));
    let mut dp = switch(vec![a, port("b", access(1))]);
    assert!(run(&mut dp, 0, &ping(66, Mac::BROADCAST)).is_empty());
    assert_eq!(dp.ports()[0].counters.drops_for(DropReason::MacSpoofing), 1);
    assert_eq!(
        run(&mut dp, 1, &ping(2, mac(66))).len(),
        1,
        "flooded: not learned"
    );
    assert_eq!(run(&mut dp, 0, &ping(1, Mac::BROADCAST)).len(), 1);
}

/// Isolated PVLAN ports reach only promiscuous ports.
#[test]
fn pvlan_isolated() {
    let mut i1 = port("i1", access(1));
    i1.pvlan = PvlanMode::Isolated;
    let mut i2 = port("i2", access(1));
    i2.pvlan = PvlanMode::Isolated;
    let up = port("up", access(1));
    let mut dp = switch(vec![i1, i2, up]);
    let out = run(&mut dp, 0, &ping(1, Mac::BROADCAST));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![2]);
}

/// Mirror destinations get copies of a source's frames in both directions.
#[test]
fn mirror_copies() {
    let mut dp = switch(vec![
        port("a", access(1)),
        port("b", access(1)),
        port("m", access(2)),
    ]);
    dp.set_mirror(MirrorConfig {
        destination: Some("m".into()),
        sources: vec!["a".into()],
        direction: crate::config::MirrorDirection::Both,
    })
    .unwrap();
    let out = run(&mut dp, 0, &ping(1, Mac::BROADCAST));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![1, 2]);
    // the copy to m (VLAN 2 access) carries the VLAN 1 tag
    assert_eq!(parse(&out[1].1).unwrap().tag.map(|t| t.vid), Some(1));
    let out = run(&mut dp, 1, &ping(2, mac(1)));
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0, 2]);
    assert!(dp
        .set_mirror(MirrorConfig {
            destination: Some("zz".into()),
            ..Default::default()
        })
        .is_err());
}

/// Jumbo frames pass up to the MTU, and one byte more is dropped.
#[test]
fn mtu() {
    let mut dp = switch(vec![port("a", access(1)), port("b", access(1))]);
    let f = eth(Mac::BROADCAST, mac(1), ETH_P_IPV4, &vec![0x45; 9000]);
    assert_eq!(run(&mut dp, 0, &f).len(), 1);
    let f = eth(Mac::BROADCAST, mac(1), ETH_P_IPV4, &vec![0x45; 9001]);
    assert!(run(&mut dp, 0, &f).is_empty());
    assert_eq!(dp.ports()[0].counters.drops_for(DropReason::Mtu), 1);
}

/// Bad port updates are refused and change nothing.
#[test]
fn bad_update_changes_nothing() {
    let mut dp = switch(vec![port("a", access(1))]);
    let before = dp.config();
    assert!(dp.update_port(port("a", access(5000))).is_err());
    assert!(dp.add_port(port("a", access(2))).is_err());
    assert!(dp.update_port(port("nope", access(2))).is_err());
    assert!(dp.remove_port("nope").is_err());
    assert_eq!(dp.config(), before);
}

/// ACL deny drops and counts, on both directions.
#[test]
fn acl_deny() {
    use crate::config::{AclAction, AclDirection, AclRule};
    let mut a = port("a", access(1));
    a.acl.push(AclRule {
        action: AclAction::Deny,
        direction: AclDirection::Outbound,
        remote_mac: None,
        remote_ip: Some("10.0.0.99/32".parse().unwrap()),
    });
    let mut dp = switch(vec![a, port("b", access(1))]);
    assert!(run(&mut dp, 0, &ping(1, Mac::BROADCAST)).is_empty());
    assert_eq!(dp.ports()[0].counters.drops_for(DropReason::Acl), 1);
    let st = dp.pipeline().list();
    let acl = st.iter().find(|e| e.name == "acl").unwrap();
    assert_eq!(acl.status["a"][0]["hits"], 1);
}

fn vlan_mode() -> impl Strategy<Value = VlanMode> {
    prop_oneof![
        (1u16..5).prop_map(|v| VlanMode::Access { vlan: v }),
        (prop::collection::btree_set(1u16..5, 1..4), any::<bool>()).prop_map(|(allowed, n)| {
            let native = if n {
                allowed.iter().next().copied()
            } else {
                None
            };
            VlanMode::Trunk { allowed, native }
        }),
    ]
}

fn pvlan_mode() -> impl Strategy<Value = PvlanMode> {
    prop_oneof![
        Just(PvlanMode::Promiscuous),
        Just(PvlanMode::Isolated),
        (1u16..3).prop_map(|id| PvlanMode::Community { id }),
    ]
}

#[derive(Debug, Clone)]
struct Input {
    from: usize,
    src: u8,
    dst: Option<u8>,
    tag: Option<u16>,
}

fn input(nports: usize) -> impl Strategy<Value = Input> {
    (
        0..nports,
        1u8..6,
        prop::option::of(1u8..6),
        prop::option::of(0u16..6),
    )
        .prop_map(|(from, src, dst, tag)| Input {
            from,
            src,
            dst,
            tag,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// VLAN isolation is absolute: under random port modes (access/trunk/native, PVLAN,
    /// links up or down) and random frames (tags, MACs), every copy that leaves a port is
    /// one that port would classify into the same VLAN the frame entered in, the ingress
    /// port was a member of that VLAN, no frame returns to its sender, and PVLAN rules hold.
    #[test]
    fn vlan_isolation_is_absolute(
        modes in prop::collection::vec((vlan_mode(), pvlan_mode(), any::<bool>()), 2..6),
        inputs in prop::collection::vec(input(6), 1..40),
    ) {
        let n = modes.len();
        let mut c = SwitchConfig::new("sw", SwitchType::Private);
        for (i, (m, pv, _)) in modes.iter().enumerate() {
            let mut p = port(&format!("p{i}"), m.clone());
            p.pvlan = *pv;
            c.ports.push(p);
        }
        let mut dp = Dataplane::new(&c, &Registry::with_builtins()).unwrap();
        for (i, (_, _, up)) in modes.iter().enumerate() {
            dp.set_link(i as PortId, *up || i % 2 == 0);
        }
        for inp in inputs {
            let from = inp.from % n;
            let dst = inp.dst.map(mac).unwrap_or(Mac::BROADCAST);
            let mut f = ping(inp.src, dst);
            if let Some(t) = inp.tag {
                push_tag(&mut f, VlanTag { pcp: 1, dei: false, vid: t });
            }
            let in_vlan = vlan::classify(&modes[from].0, inp.tag);
            let out = run(&mut dp, from as PortId, &f);
            if in_vlan.is_none() {
                prop_assert!(out.is_empty());
                continue;
            }
            let v = in_vlan.unwrap_or(0);
            let mut seen = BTreeSet::new();
            for (p, bytes) in out {
                let p = p as usize;
                prop_assert!(p != from, "hairpin");
                prop_assert!(seen.insert(p), "duplicate copy");
                let parsed = parse(&bytes).unwrap();
                let out_vlan = vlan::classify(&modes[p].0, parsed.tag.map(|t| t.vid));
                prop_assert_eq!(out_vlan, Some(v), "left port {} in another VLAN", p);
                prop_assert!(crate::pvlan::may_forward(modes[from].1, modes[p].1));
                prop_assert_eq!(parsed.src, mac(inp.src));
            }
        }
    }
}

/// Hostile frames: runts, oversize frames, broken and double 802.1Q tags are dropped and
/// counted, never forwarded across VLANs, and never panic the dataplane.
#[test]
fn hostile_frames_are_dropped_and_counted() {
    let trunk = VlanMode::Trunk {
        allowed: [10, 20].into(),
        native: None,
    };
    let mut dp = switch(vec![
        port("a10", access(10)),
        port("b10", access(10)),
        port("c20", access(20)),
        port("t", trunk),
    ]);
    // runts: 0..=13 bytes carry no Ethernet header
    for n in 0..14usize {
        let f = vec![0xffu8; n];
        for from in 0..4 {
            assert!(
                run(&mut dp, from, &f).is_empty(),
                "runt of {n} bytes forwarded"
            );
        }
    }
    assert_eq!(
        dp.ports()[0].counters.drops_for(DropReason::Malformed),
        14,
        "every runt is counted as malformed"
    );
    // a tag header cut short (TPID and nothing after it)
    let mut cut = eth(Mac::BROADCAST, mac(1), ETH_P_IPV4, &[]);
    cut.truncate(12);
    cut.extend_from_slice(&[0x81, 0x00, 0x00]);
    assert!(run(&mut dp, 3, &cut).is_empty());
    // oversize: 64 KiB of payload on an access port and on the trunk
    let big = eth(Mac::BROADCAST, mac(1), ETH_P_IPV4, &vec![0x45; 65_000]);
    assert!(run(&mut dp, 0, &big).is_empty());
    assert!(run(&mut dp, 3, &big).is_empty());
    assert_eq!(dp.ports()[0].counters.drops_for(DropReason::Mtu), 1);
    // a VLAN 20 tag arriving on a VLAN 10 access port never reaches VLAN 20
    let mut tagged20 = ping(1, Mac::BROADCAST);
    push_tag(
        &mut tagged20,
        VlanTag {
            pcp: 0,
            dei: false,
            vid: 20,
        },
    );
    for (p, _) in run(&mut dp, 0, &tagged20) {
        assert_ne!(p, 2, "tagged frame from an access port leaked into VLAN 20");
    }
    // double tags (QinQ 0x88a8 outer and 0x8100 twice): the inner tag is payload; the outer
    // VLAN decides, and frames leave only on its members
    for outer_tpid in [0x8100u16, 0x88a8] {
        let mut f = ping(2, Mac::BROADCAST);
        push_tag(
            &mut f,
            VlanTag {
                pcp: 0,
                dei: false,
                vid: 20,
            },
        );
        push_tag(
            &mut f,
            VlanTag {
                pcp: 0,
                dei: false,
                vid: 10,
            },
        );
        f[12..14].copy_from_slice(&outer_tpid.to_be_bytes());
        for (p, out) in run(&mut dp, 3, &f) {
            assert_ne!(p, 2, "double-tagged frame for VLAN 10 reached VLAN 20");
            assert!(out.len() <= f.len(), "output grew");
        }
    }
    // reserved VLAN ids 0 (priority tag) and 4095 on the trunk
    for vid in [0u16, 4095] {
        let mut f = ping(3, Mac::BROADCAST);
        push_tag(
            &mut f,
            VlanTag {
                pcp: 7,
                dei: true,
                vid,
            },
        );
        for (p, _) in run(&mut dp, 3, &f) {
            assert!(p != 3, "frame reflected to its input");
        }
    }
    // the switch still forwards normally afterwards
    assert_eq!(run(&mut dp, 0, &ping(1, Mac::BROADCAST)).len(), 2);
}

/// A flood of random source MACs fills the MAC table only up to its bound; MACs learned
/// before the flood keep their entries and unicast to them still goes to one port.
#[test]
fn source_mac_flood_keeps_fdb_bounded() {
    let mut dp = switch(vec![
        port("a", access(1)),
        port("b", access(1)),
        port("c", access(1)),
    ]);
    run(&mut dp, 1, &ping(2, Mac::BROADCAST)); // learn mac(2) on port 1
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..(FDB_MAX_ENTRIES * 3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        let src = Mac([b[0] & 0xfe, b[1], b[2], b[3], b[4], b[5]]); // unicast sources
        let f = eth(mac(2), src, ETH_P_IPV4, &[0u8; 46]);
        let out = run(&mut dp, 0, &f);
        assert!(
            out.iter().all(|(p, _)| *p == 1),
            "unicast to mac(2) left on {out:?}"
        );
    }
    let n = dp.fdb(0).len();
    assert!(n <= FDB_MAX_ENTRIES, "FDB holds {n} entries");
    assert!(
        n >= FDB_MAX_ENTRIES / 2,
        "the flood was not learned at all ({n})"
    );
    let out = run(&mut dp, 2, &ping(3, mac(2)));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes on any port never panic, never come back out of their input port,
    /// and never leave bigger than MTU plus one tag.
    #[test]
    fn arbitrary_bytes_never_panic(
        from in 0u32..3,
        bytes in proptest::collection::vec(any::<u8>(), 0..1600),
    ) {
        let trunk = VlanMode::Trunk { allowed: [1, 2].into(), native: Some(1) };
        let mut dp = switch(vec![port("a", access(1)), port("b", access(2)), port("t", trunk)]);
        for (p, out) in run(&mut dp, from, &bytes) {
            prop_assert_ne!(p, from);
            prop_assert!(out.len() <= 9000 + ETH_HLEN + VLAN_HLEN);
        }
    }
}
