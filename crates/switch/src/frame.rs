//! Ethernet frame parsing: just the fields the switch decides on.
//!
//! [`parse`] reads an Ethernet II frame (optionally one 802.1Q tag) and the L3/L4 fields that
//! the guards and ACLs need (ARP, IPv4, IPv6, ICMPv6 neighbour discovery, DHCP over UDP),
//! without copying. [`push_tag`] and [`strip_tag`] rewrite a frame in place.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Mac;

/// EtherType of an 802.1Q tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Length of an untagged Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Length of an 802.1Q tag.
pub const VLAN_HLEN: usize = 4;

/// Errors from [`parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is shorter than an Ethernet header (or its tag).
    #[error("frame of {len} bytes is shorter than its Ethernet header")]
    Short {
        /// Length of the frame.
        len: usize,
    },
}

/// An 802.1Q tag control information field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    /// Priority code point (0..=7).
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN id (0 means a priority-only tag).
    pub vid: u16,
}

/// ICMPv6 message types the guards look at.
pub mod icmpv6 {
    /// Router solicitation.
    pub const ROUTER_SOLICIT: u8 = 133;
    /// Router advertisement.
    pub const ROUTER_ADVERT: u8 = 134;
    /// Neighbour solicitation.
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    /// Neighbour advertisement.
    pub const NEIGHBOR_ADVERT: u8 = 136;
    /// Redirect.
    pub const REDIRECT: u8 = 137;
}

/// The L4 part of an IP packet, as far as the switch cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// UDP with its ports; `dhcp_op` is the BOOTP op field for DHCPv4 ports (1 request, 2 reply).
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// BOOTP op byte when the ports are 67/68 and the payload holds it.
        dhcp_op: Option<u8>,
        /// DHCPv6 message type when the ports are 546/547.
        dhcp6_type: Option<u8>,
    },
    /// TCP with its ports.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMPv4 with type and code.
    Icmp {
        /// ICMP type.
        ty: u8,
        /// ICMP code.
        code: u8,
    },
    /// ICMPv6 with type and, for NS/NA/redirect, the target address.
    Icmpv6 {
        /// ICMPv6 type.
        ty: u8,
        /// Target address of a neighbour solicitation/advertisement or redirect.
        target: Option<Ipv6Addr>,
    },
    /// Anything else (or a fragment).
    Other(u8),
}

/// The L3 part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    /// ARP for IPv4 over Ethernet.
    Arp {
        /// Operation (1 request, 2 reply).
        op: u16,
        /// Sender hardware address.
        sha: Mac,
        /// Sender protocol address.
        spa: Ipv4Addr,
        /// Target protocol address.
        tpa: Ipv4Addr,
    },
    /// IPv4.
    Ipv4 {
        /// Source address.
        src: Ipv4Addr,
        /// Destination address.
        dst: Ipv4Addr,
        /// L4 summary.
        l4: L4,
    },
    /// IPv6 (extension headers are not walked: the L4 is the first next-header).
    Ipv6 {
        /// Source address.
        src: Ipv6Addr,
        /// Destination address.
        dst: Ipv6Addr,
        /// L4 summary.
        l4: L4,
    },
    /// Another EtherType, or a truncated L3 header.
    Other,
}

impl L3 {
    /// Source IP address, if the frame carries one (ARP: sender protocol address).
    pub fn src_ip(&self) -> Option<IpAddr> {
        match *self {
            L3::Arp { spa, .. } => Some(IpAddr::V4(spa)),
            L3::Ipv4 { src, .. } => Some(IpAddr::V4(src)),
            L3::Ipv6 { src, .. } => Some(IpAddr::V6(src)),
            L3::Other => None,
        }
    }
    /// Destination IP address, if the frame carries one (ARP: target protocol address).
    pub fn dst_ip(&self) -> Option<IpAddr> {
        match *self {
            L3::Arp { tpa, .. } => Some(IpAddr::V4(tpa)),
            L3::Ipv4 { dst, .. } => Some(IpAddr::V4(dst)),
            L3::Ipv6 { dst, .. } => Some(IpAddr::V6(dst)),
            L3::Other => None,
        }
    }
}

/// A parsed view of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Destination MAC.
    pub dst: Mac,
    /// Source MAC.
    pub src: Mac,
    /// The 802.1Q tag, if the frame carries one.
    pub tag: Option<VlanTag>,
    /// The EtherType after the tag.
    pub ethertype: u16,
    /// Offset of the L3 header.
    pub l3_offset: usize,
    /// L3 summary.
    pub l3: L3,
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

fn mac_at(b: &[u8], off: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[off..off + 6]);
    Mac(m)
}

fn v4_at(b: &[u8], off: usize) -> Option<Ipv4Addr> {
    let s = b.get(off..off + 4)?;
    Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
}

fn v6_at(b: &[u8], off: usize) -> Option<Ipv6Addr> {
    let s: [u8; 16] = b.get(off..off + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(s))
}

/// Parses a frame. Only a frame too short for its Ethernet header is an error; truncated or
/// unknown L3/L4 headers give [`L3::Other`] / [`L4::Other`].
pub fn parse(b: &[u8]) -> Result<Parsed, FrameError> {
    if b.len() < ETH_HLEN {
        return Err(FrameError::Short { len: b.len() });
    }
    let dst = mac_at(b, 0);
    let src = mac_at(b, 6);
    let mut ethertype = be16(b, 12).unwrap_or(0);
    let mut off = ETH_HLEN;
    let mut tag = None;
    if ethertype == ETH_P_8021Q {
        if b.len() < ETH_HLEN + VLAN_HLEN {
            return Err(FrameError::Short { len: b.len() });
        }
        let tci = be16(b, 14).unwrap_or(0);
        tag = Some(VlanTag {
            pcp: (tci >> 13) as u8,
            dei: tci & 0x1000 != 0,
            vid: tci & 0x0fff,
        });
        ethertype = be16(b, 16).unwrap_or(0);
        off += VLAN_HLEN;
    }
    let l3 = parse_l3(ethertype, &b[off..]);
    Ok(Parsed {
        dst,
        src,
        tag,
        ethertype,
        l3_offset: off,
        l3,
    })
}

fn parse_l3(ethertype: u16, p: &[u8]) -> L3 {
    match ethertype {
        ETH_P_ARP => parse_arp(p).unwrap_or(L3::Other),
        ETH_P_IPV4 => parse_ipv4(p).unwrap_or(L3::Other),
        ETH_P_IPV6 => parse_ipv6(p).unwrap_or(L3::Other),
        _ => L3::Other,
    }
}

fn parse_arp(p: &[u8]) -> Option<L3> {
    // htype 1, ptype 0x0800, hlen 6, plen 4
    if be16(p, 0)? != 1 || be16(p, 2)? != ETH_P_IPV4 || *p.get(4)? != 6 || *p.get(5)? != 4 {
        return None;
    }
    if p.len() < 28 {
        return None;
    }
    Some(L3::Arp {
        op: be16(p, 6)?,
        sha: mac_at(p, 8),
        spa: v4_at(p, 14)?,
        tpa: v4_at(p, 24)?,
    })
}

fn parse_ipv4(p: &[u8]) -> Option<L3> {
    let vihl = *p.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || p.len() < ihl {
        return None;
    }
    let src = v4_at(p, 12)?;
    let dst = v4_at(p, 16)?;
    let proto = p[9];
    let frag = be16(p, 6)? & 0x1fff;
    let l4 = if frag != 0 {
        L4::Other(proto)
    } else {
        parse_l4(proto, &p[ihl..], false)
    };
    Some(L3::Ipv4 { src, dst, l4 })
}

fn parse_ipv6(p: &[u8]) -> Option<L3> {
    if *p.first()? >> 4 != 6 || p.len() < 40 {
        return None;
    }
    let src = v6_at(p, 8)?;
    let dst = v6_at(p, 24)?;
    let l4 = parse_l4(p[6], &p[40..], true);
    Some(L3::Ipv6 { src, dst, l4 })
}

fn parse_l4(proto: u8, p: &[u8], v6: bool) -> L4 {
    match proto {
        17 => {
            let (Some(sport), Some(dport)) = (be16(p, 0), be16(p, 2)) else {
                return L4::Other(proto);
            };
            let is_dhcp4 = matches!((sport, dport), (67, 68) | (68, 67) | (67, 67));
            let is_dhcp6 = matches!((sport, dport), (546, 547) | (547, 546) | (547, 547));
            L4::Udp {
                sport,
                dport,
                dhcp_op: if is_dhcp4 { p.get(8).copied() } else { None },
                dhcp6_type: if is_dhcp6 { p.get(8).copied() } else { None },
            }
        }
        6 => match (be16(p, 0), be16(p, 2)) {
            (Some(sport), Some(dport)) => L4::Tcp { sport, dport },
            _ => L4::Other(proto),
        },
        1 if !v6 => match (p.first(), p.get(1)) {
            (Some(&ty), Some(&code)) => L4::Icmp { ty, code },
            _ => L4::Other(proto),
        },
        58 if v6 => match p.first() {
            Some(&ty) => {
                let target = match ty {
                    icmpv6::NEIGHBOR_SOLICIT | icmpv6::NEIGHBOR_ADVERT | icmpv6::REDIRECT => {
                        v6_at(p, 8)
                    }
                    _ => None,
                };
                L4::Icmpv6 { ty, target }
            }
            None => L4::Other(proto),
        },
        _ => L4::Other(proto),
    }
}

/// Inserts an 802.1Q tag after the source MAC. The frame must be untagged and at least
/// [`ETH_HLEN`] long (the caller has parsed it).
pub fn push_tag(frame: &mut Vec<u8>, tag: VlanTag) {
    let tci = (u16::from(tag.pcp & 7) << 13) | (u16::from(tag.dei) << 12) | (tag.vid & 0x0fff);
    let t = ETH_P_8021Q.to_be_bytes();
    let c = tci.to_be_bytes();
    frame.splice(12..12, [t[0], t[1], c[0], c[1]]);
}

/// Removes the 802.1Q tag of a tagged frame (one that [`parse`] found a tag in).
pub fn strip_tag(frame: &mut Vec<u8>) {
    if frame.len() >= ETH_HLEN + VLAN_HLEN && be16(frame, 12) == Some(ETH_P_8021Q) {
        frame.drain(12..16);
    }
}

/// Adds `data` to a ones'-complement sum.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Finishes a checksum the sender left partial (Linux `CHECKSUM_PARTIAL`, virtio
/// `NEEDS_CSUM`): the 16-bit field at `start + offset` holds the pseudo-header sum and the
/// checksum covers `frame[start..]`. Returns false (changing nothing) if out of bounds.
pub fn complete_partial_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let field = start + offset;
    if start >= frame.len() || field + 2 > frame.len() {
        return false;
    }
    let sum = !csum_fold(csum_add(0, &frame[start..]));
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Splits a TCP frame larger than its MSS (a GSO/TSO/GRO super-frame) into frames carrying
/// at most `mss` payload bytes each, with IPv4 ids, lengths, sequence numbers, flags and all
/// checksums fixed up, handing each to `out`. Works for IPv4 and for IPv6 without extension
/// headers, tagged or not. Returns the number of segments, or `None` (emitting nothing) when
/// the frame is not such TCP.
pub fn segment_tcp(frame: &[u8], mss: usize, out: &mut dyn FnMut(&[u8])) -> Option<usize> {
    let p = parse(frame).ok()?;
    let l3 = p.l3_offset;
    let (v4, iphl) = match p.l3 {
        L3::Ipv4 {
            l4: L4::Tcp { .. }, ..
        } => (true, usize::from(frame[l3] & 0x0f) * 4),
        L3::Ipv6 {
            l4: L4::Tcp { .. }, ..
        } => (false, 40),
        _ => return None,
    };
    let l4 = l3 + iphl;
    let thl = usize::from(*frame.get(l4 + 12)? >> 4) * 4;
    if thl < 20 || frame.len() < l4 + thl || mss == 0 {
        return None;
    }
    let hdr_end = l4 + thl;
    // the IP length says where the payload ends (frames may carry Ethernet padding)
    let ip_end = if v4 {
        l3 + usize::from(be16(frame, l3 + 2)?)
    } else {
        l3 + 40 + usize::from(be16(frame, l3 + 4)?)
    };
    let ip_end = ip_end.min(frame.len());
    if ip_end < hdr_end {
        return None;
    }
    let payload = &frame[hdr_end..ip_end];
    let seq0 = u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().ok()?);
    let id0 = if v4 { be16(frame, l3 + 4)? } else { 0 };
    let flags0 = frame[l4 + 13];
    let n = payload.len().div_ceil(mss).max(1);
    let mut seg = Vec::with_capacity(hdr_end + mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        seg.clear();
        seg.extend_from_slice(&frame[..hdr_end]);
        seg.extend_from_slice(chunk);
        let tcp_len = thl + chunk.len();
        if v4 {
            let total = (iphl + tcp_len) as u16;
            seg[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            seg[l3 + 4..l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = !csum_fold(csum_add(0, &seg[l3..l3 + iphl]));
            seg[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[l3 + 4..l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut fl = flags0;
        if i + 1 < n {
            fl &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if i > 0 {
            fl &= !0x80; // CWR only on the first
        }
        seg[l4 + 13] = fl;
        seg[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let mut sum = if v4 {
            csum_add(0, &seg[l3 + 12..l3 + 20])
        } else {
            csum_add(0, &seg[l3 + 8..l3 + 40])
        };
        sum = csum_add(sum, &[0, 6]);
        sum = csum_add(sum, &(tcp_len as u32).to_be_bytes());
        sum = csum_add(sum, &seg[l4..]);
        let c = !csum_fold(sum);
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        out(&seg);
    }
    Some(n)
}

/// Verifies the IPv4 header and TCP/UDP checksum of a frame (for tests and diagnostics).
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Ok(p) = parse(frame) else { return false };
    let l3 = p.l3_offset;
    let (pseudo, l4, proto, end) = match p.l3 {
        L3::Ipv4 { .. } => {
            let ihl = usize::from(frame[l3] & 0x0f) * 4;
            if csum_fold(csum_add(0, &frame[l3..l3 + ihl])) != 0xffff {
                return false;
            }
            let end = l3 + usize::from(be16(frame, l3 + 2).unwrap_or(0));
            (
                csum_add(0, &frame[l3 + 12..l3 + 20]),
                l3 + ihl,
                frame[l3 + 9],
                end,
            )
        }
        L3::Ipv6 { .. } => {
            let end = l3 + 40 + usize::from(be16(frame, l3 + 4).unwrap_or(0));
            (
                csum_add(0, &frame[l3 + 8..l3 + 40]),
                l3 + 40,
                frame[l3 + 6],
                end,
            )
        }
        _ => return false,
    };
    let end = end.min(frame.len());
    let mut sum = csum_add(pseudo, &[0, proto]);
    sum = csum_add(sum, &((end - l4) as u32).to_be_bytes());
    sum = csum_add(sum, &frame[l4..end]);
    csum_fold(sum) == 0xffff
}

#[cfg(test)]
pub(crate) mod build {
    //! Frame builders for tests.
    use super::*;

    pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0, 1, 8, 0, 6, 4];
        p.extend_from_slice(&op.to_be_bytes());
        p.extend_from_slice(&sha.0);
        p.extend_from_slice(&spa.octets());
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&tpa.octets());
        eth(Mac::BROADCAST, sha, ETH_P_ARP, &p)
    }

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        let total = (20 + l4.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.push(next);
        p.push(255);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A: Mac = Mac([2, 0, 0, 0, 0, 1]);

    /// ARP requests parse into sender/target addresses.
    #[test]
    fn parses_arp() {
        let f = arp(1, A, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let p = parse(&f).unwrap();
        assert_eq!(p.dst, Mac::BROADCAST);
        assert_eq!(
            p.l3,
            L3::Arp {
                op: 1,
                sha: A,
                spa: Ipv4Addr::new(10, 0, 0, 1),
                tpa: Ipv4Addr::new(10, 0, 0, 2)
            }
        );
    }

    /// A DHCP offer (UDP 67 -> 68, BOOTP op 2) is recognised.
    #[test]
    fn parses_dhcp_reply() {
        let mut bootp = vec![2u8, 1, 6, 0];
        bootp.resize(240, 0);
        let ip = ipv4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::BROADCAST,
            17,
            &udp(67, 68, &bootp),
        );
        let f = eth(Mac::BROADCAST, A, ETH_P_IPV4, &ip);
        let p = parse(&f).unwrap();
        match p.l3 {
            L3::Ipv4 {
                l4:
                    L4::Udp {
                        sport: 67,
                        dport: 68,
                        dhcp_op: Some(2),
                        ..
                    },
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Tags are pushed and stripped byte-exactly, and parse sees the inner EtherType.
    #[test]
    fn tag_roundtrip() {
        let f0 = eth(Mac::BROADCAST, A, ETH_P_IPV4, &[0x45; 30]);
        let mut f = f0.clone();
        push_tag(
            &mut f,
            VlanTag {
                pcp: 5,
                dei: false,
                vid: 100,
            },
        );
        let p = parse(&f).unwrap();
        assert_eq!(
            p.tag,
            Some(VlanTag {
                pcp: 5,
                dei: false,
                vid: 100
            })
        );
        assert_eq!(p.ethertype, ETH_P_IPV4);
        assert_eq!(p.l3_offset, 18);
        strip_tag(&mut f);
        assert_eq!(f, f0);
    }

    /// ICMPv6 neighbour advertisements expose their target.
    #[test]
    fn parses_nd_target() {
        let tgt: Ipv6Addr = "fe80::1".parse().unwrap();
        let mut icmp = vec![136u8, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&tgt.octets());
        let f = eth(
            Mac::BROADCAST,
            A,
            ETH_P_IPV6,
            &ipv6(tgt, "ff02::1".parse().unwrap(), 58, &icmp),
        );
        match parse(&f).unwrap().l3 {
            L3::Ipv6 {
                l4:
                    L4::Icmpv6 {
                        ty: 136,
                        target: Some(t),
                    },
                ..
            } => assert_eq!(t, tgt),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Short or garbage frames never panic.
    #[test]
    fn short_frames() {
        assert!(parse(&[0; 13]).is_err());
        let mut t = vec![0u8; 15];
        t[12] = 0x81;
        assert!(parse(&t).is_err()); // tagged but short
        for n in 14..80 {
            let _ = parse(&vec![0x86; n]);
            let _ = parse(&vec![0x08; n]);
        }
    }

    fn tcp_frame(payload_len: usize, v6: bool) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18 | 0x01; // PSH ACK FIN
        tcp.extend((0..payload_len).map(|i| (i * 7) as u8));
        if v6 {
            let ip = ipv6(
                "fd00::1".parse().unwrap(),
                "fd00::2".parse().unwrap(),
                6,
                &tcp,
            );
            eth(A, A, ETH_P_IPV6, &ip)
        } else {
            let mut ip = ipv4(
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 0, 2),
                6,
                &tcp,
            );
            let c = !csum_fold(csum_add(0, &ip[..20]));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            eth(A, A, ETH_P_IPV4, &ip)
        }
    }

    /// A 10000-byte TCP super-frame splits into MSS-sized segments whose payloads
    /// concatenate to the original, each with valid checksums, FIN/PSH only on the last.
    #[test]
    fn segments_tcp() {
        for v6 in [false, true] {
            let f = tcp_frame(10_000, v6);
            let mut segs = Vec::new();
            let n = segment_tcp(&f, 1448, &mut |s| segs.push(s.to_vec())).unwrap();
            assert_eq!(n, 7);
            let hl = if v6 { 14 + 40 + 20 } else { 14 + 20 + 20 };
            let mut payload = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(l4_checksum_ok(s), "segment {i} checksum (v6={v6})");
                assert!(s.len() <= hl + 1448);
                let l4 = hl - 20;
                let seq = u32::from_be_bytes(s[l4 + 4..l4 + 8].try_into().unwrap());
                assert_eq!(seq, 1000 + (i * 1448) as u32);
                let fin = s[l4 + 13] & 1 != 0;
                assert_eq!(fin, i == n - 1);
                payload.extend_from_slice(&s[hl..]);
            }
            assert_eq!(payload, f[hl..].to_vec());
        }
        let mut none = 0;
        assert!(segment_tcp(&[0u8; 20], 1000, &mut |_| none += 1).is_none());
        assert_eq!(none, 0);
    }

    /// A partial checksum (pseudo-header sum seeded in the field) is completed correctly.
    #[test]
    fn completes_partial_checksum() {
        let mut f = tcp_frame(333, false);
        let l4 = 14 + 20;
        // seed the field as Linux does for CHECKSUM_PARTIAL
        let mut sum = csum_add(0, &f[14 + 12..14 + 20]);
        sum = csum_add(sum, &[0, 6]);
        sum = csum_add(sum, &((f.len() - l4) as u32).to_be_bytes());
        f[l4 + 16..l4 + 18].copy_from_slice(&csum_fold(sum).to_be_bytes());
        assert!(!l4_checksum_ok(&f));
        assert!(complete_partial_checksum(&mut f, l4, 16));
        assert!(l4_checksum_ok(&f));
        assert!(!complete_partial_checksum(&mut f, 10_000, 16));
    }

    proptest::proptest! {
        /// Parsing, checksum completion and segmentation never panic on arbitrary bytes, and
        /// segmentation never emits a frame longer than its input.
        #[test]
        fn arbitrary_bytes_never_panic(
            mut b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            start in 0usize..500,
            off in 0usize..40,
            mss in 1usize..300,
        ) {
            let _ = parse(&b);
            let n = b.len();
            let _ = segment_tcp(&b, mss, &mut |s| assert!(s.len() <= n));
            let _ = l4_checksum_ok(&b);
            complete_partial_checksum(&mut b, start, off);
        }
    }
}
