//! Per-port counters: packets, bytes and drops by reason.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Malformed,
    /// Larger than the switch MTU allows.
    Mtu,
    /// Tag not allowed on the ingress port (or untagged on a trunk without native VLAN).
    Vlan,
    /// Source MAC (or ARP sender MAC) is not the port's MAC.
    MacSpoofing,
    /// DHCP server message from a port with DHCP guard.
    DhcpGuard,
    /// Router advertisement or redirect from a port with router guard.
    RouterGuard,
    /// ARP sender address not in the port's allowed IPs.
    ArpSpoofing,
    /// IPv4/IPv6 source address or ND target not in the port's allowed IPs.
    IpSpoofing,
    /// Denied by a port ACL.
    Acl,
    /// Over the port's maximum bandwidth.
    Qos,
    /// Output queue full (the peer does not read fast enough).
    QueueFull,
    /// Dropped by an extension for its own reason.
    Extension,
}

/// Counters of one port. "rx" is what the switch received from the port, "tx" what it
/// delivered to the port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Frames received from the port.
    pub rx_packets: u64,
    /// Bytes received from the port.
    pub rx_bytes: u64,
    /// Frames delivered to the port.
    pub tx_packets: u64,
    /// Bytes delivered to the port.
    pub tx_bytes: u64,
    /// Drops by reason (frames from or to this port).
    pub drops: BTreeMap<DropReason, u64>,
}

impl PortCounters {
    /// Counts a received frame.
    pub fn rx(&mut self, len: usize) {
        self.rx_packets += 1;
        self.rx_bytes += len as u64;
    }
    /// Counts a delivered frame.
    pub fn tx(&mut self, len: usize) {
        self.tx_packets += 1;
        self.tx_bytes += len as u64;
    }
    /// Counts a drop.
    pub fn drop(&mut self, reason: DropReason) {
        *self.drops.entry(reason).or_default() += 1;
    }
    /// Drops for one reason.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }
}
