//! Port security checks: MAC spoofing, DHCP guard, router guard, ARP/ND spoofing.
//!
//! Each check is a pure function of the port's configuration and the parsed frame it sent,
//! returning the drop reason when the frame must not enter the switch. The built-in
//! extensions in [`crate::extension::builtin`] call them.

use std::net::IpAddr;

use crate::config::{IpPrefix, PortConfig};
use crate::counters::DropReason;
use crate::frame::{icmpv6, Parsed, L3, L4};

/// MAC spoofing protection: with a port MAC set and spoofing off, the source MAC and the ARP
/// sender MAC must be the port's MAC.
pub fn mac_spoofing(cfg: &PortConfig, f: &Parsed) -> Option<DropReason> {
    let mac = cfg.mac?;
    if cfg.security.mac_spoofing {
        return None;
    }
    if f.src != mac {
        return Some(DropReason::MacSpoofing);
    }
    if let L3::Arp { sha, .. } = f.l3 {
        if sha != mac {
            return Some(DropReason::MacSpoofing);
        }
    }
    None
}

/// DHCP guard: drops DHCPv4 server messages (UDP from port 67 with BOOTP op 2 or to port 68)
/// and DHCPv6 server messages (UDP from 547 to 546).
pub fn dhcp_guard(cfg: &PortConfig, f: &Parsed) -> Option<DropReason> {
    if !cfg.security.dhcp_guard {
        return None;
    }
    let l4 = match f.l3 {
        L3::Ipv4 { l4, .. } | L3::Ipv6 { l4, .. } => l4,
        _ => return None,
    };
    match l4 {
        L4::Udp {
            sport: 67,
            dport,
            dhcp_op,
            ..
        } if dport == 68 || dhcp_op == Some(2) => Some(DropReason::DhcpGuard),
        L4::Udp {
            sport: 547,
            dport: 546,
            ..
        } => Some(DropReason::DhcpGuard),
        _ => None,
    }
}

/// Router guard: drops ICMPv6 router advertisements and redirects, and ICMPv4 redirects and
/// router advertisements.
pub fn router_guard(cfg: &PortConfig, f: &Parsed) -> Option<DropReason> {
    if !cfg.security.router_guard {
        return None;
    }
    match f.l3 {
        L3::Ipv6 {
            l4:
                L4::Icmpv6 {
                    ty: icmpv6::ROUTER_ADVERT | icmpv6::REDIRECT,
                    ..
                },
            ..
        } => Some(DropReason::RouterGuard),
        L3::Ipv4 {
            l4: L4::Icmp { ty: 5 | 9, .. },
            ..
        } => Some(DropReason::RouterGuard),
        _ => None,
    }
}

fn allowed(list: &[IpPrefix], ip: IpAddr) -> bool {
    // Only families listed are checked.
    let family_listed = list.iter().any(|p| p.addr.is_ipv4() == ip.is_ipv4());
    !family_listed || list.iter().any(|p| p.contains(ip))
}

/// ARP/ND/IP spoofing protection against the port's allowed IPs. Only address families that
/// appear in the list are checked; the unspecified address (DHCP discover, ARP probe, DAD)
/// is always allowed as a source.
pub fn ip_spoofing(cfg: &PortConfig, f: &Parsed) -> Option<DropReason> {
    let list = &cfg.security.allowed_ips;
    if list.is_empty() {
        return None;
    }
    match f.l3 {
        L3::Arp { spa, .. } => {
            (!spa.is_unspecified() && !allowed(list, spa.into())).then_some(DropReason::ArpSpoofing)
        }
        L3::Ipv4 { src, .. } => {
            (!src.is_unspecified() && !allowed(list, src.into())).then_some(DropReason::IpSpoofing)
        }
        L3::Ipv6 { src, l4, .. } => {
            if !src.is_unspecified() && !allowed(list, src.into()) {
                return Some(DropReason::IpSpoofing);
            }
            if let L4::Icmpv6 {
                ty: icmpv6::NEIGHBOR_ADVERT,
                target: Some(t),
            } = l4
            {
                if !allowed(list, t.into()) {
                    return Some(DropReason::IpSpoofing);
                }
            }
            None
        }
        L3::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::{Backend, Mac};
    use crate::frame::{build::*, parse, ETH_P_IPV4, ETH_P_IPV6};

    const VM: Mac = Mac([0x52, 0x54, 0, 0, 0, 1]);
    const EVIL: Mac = Mac([0x52, 0x54, 0, 0, 0, 0x66]);

    fn port() -> PortConfig {
        let mut p = PortConfig::new("p", Backend::Tap { ifname: "t".into() });
        p.mac = Some(VM);
        p
    }

    /// Spoofed source MACs and ARP sender MACs are dropped unless spoofing is allowed.
    #[test]
    fn mac() {
        let mut p = port();
        let ok = arp(
            1,
            VM,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        assert_eq!(mac_spoofing(&p, &parse(&ok).unwrap()), None);
        let bad = arp(
            1,
            EVIL,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        assert_eq!(
            mac_spoofing(&p, &parse(&bad).unwrap()),
            Some(DropReason::MacSpoofing)
        );
        // right Ethernet source, wrong ARP sender
        let mut inner = bad.clone();
        inner[6..12].copy_from_slice(&VM.0);
        assert_eq!(
            mac_spoofing(&p, &parse(&inner).unwrap()),
            Some(DropReason::MacSpoofing)
        );
        p.security.mac_spoofing = true;
        assert_eq!(mac_spoofing(&p, &parse(&bad).unwrap()), None);
    }

    /// DHCP offers are dropped under DHCP guard, client requests are not.
    #[test]
    fn dhcp() {
        let mut p = port();
        p.security.dhcp_guard = true;
        let mut bootp = vec![2u8, 1, 6, 0];
        bootp.resize(240, 0);
        let offer = eth(
            Mac::BROADCAST,
            VM,
            ETH_P_IPV4,
            &ipv4(
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::BROADCAST,
                17,
                &udp(67, 68, &bootp),
            ),
        );
        assert_eq!(
            dhcp_guard(&p, &parse(&offer).unwrap()),
            Some(DropReason::DhcpGuard)
        );
        bootp[0] = 1;
        let discover = eth(
            Mac::BROADCAST,
            VM,
            ETH_P_IPV4,
            &ipv4(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                17,
                &udp(68, 67, &bootp),
            ),
        );
        assert_eq!(dhcp_guard(&p, &parse(&discover).unwrap()), None);
        p.security.dhcp_guard = false;
        assert_eq!(dhcp_guard(&p, &parse(&offer).unwrap()), None);
    }

    /// Router advertisements are dropped under router guard.
    #[test]
    fn router() {
        let mut p = port();
        p.security.router_guard = true;
        let ra = eth(
            Mac::BROADCAST,
            VM,
            ETH_P_IPV6,
            &ipv6(
                "fe80::1".parse().unwrap(),
                "ff02::1".parse().unwrap(),
                58,
                &[134, 0, 0, 0],
            ),
        );
        assert_eq!(
            router_guard(&p, &parse(&ra).unwrap()),
            Some(DropReason::RouterGuard)
        );
        let rs = eth(
            Mac::BROADCAST,
            VM,
            ETH_P_IPV6,
            &ipv6(
                "fe80::1".parse().unwrap(),
                "ff02::2".parse().unwrap(),
                58,
                &[133, 0, 0, 0],
            ),
        );
        assert_eq!(router_guard(&p, &parse(&rs).unwrap()), None);
    }

    /// ARP and IP sources outside the allowed list are dropped; unlisted families pass.
    #[test]
    fn ips() {
        let mut p = port();
        p.security.allowed_ips = vec!["10.0.0.5".parse().unwrap()];
        let good = arp(
            1,
            VM,
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        let bad = arp(
            2,
            VM,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 9),
        );
        let probe = arp(1, VM, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(ip_spoofing(&p, &parse(&good).unwrap()), None);
        assert_eq!(
            ip_spoofing(&p, &parse(&bad).unwrap()),
            Some(DropReason::ArpSpoofing)
        );
        assert_eq!(ip_spoofing(&p, &parse(&probe).unwrap()), None);
        let ip = eth(
            Mac::BROADCAST,
            VM,
            ETH_P_IPV4,
            &ipv4(
                Ipv4Addr::new(10, 0, 0, 6),
                Ipv4Addr::new(10, 0, 0, 1),
                17,
                &udp(1, 2, &[]),
            ),
        );
        assert_eq!(
            ip_spoofing(&p, &parse(&ip).unwrap()),
            Some(DropReason::IpSpoofing)
        );
        let v6 = eth(
            Mac::BROADCAST,
            VM,
            ETH_P_IPV6,
            &ipv6(
                "fe80::9".parse().unwrap(),
                "ff02::1".parse().unwrap(),
                17,
                &udp(1, 2, &[]),
            ),
        );
        assert_eq!(
            ip_spoofing(&p, &parse(&v6).unwrap()),
            None,
            "IPv6 not listed"
        );
        p.security.allowed_ips.push("fe80::1/128".parse().unwrap());
        assert_eq!(
            ip_spoofing(&p, &parse(&v6).unwrap()),
            Some(DropReason::IpSpoofing)
        );
    }
}
