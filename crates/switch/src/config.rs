//! Switch and port configuration: the serde types the control API, the persisted switch
//! state and the dataplane share.
//!
//! Every type validates itself ([`SwitchConfig::validate`], [`PortConfig::validate`]) so
//! that a bad request changes nothing.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors from parsing or validating configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A MAC address string is malformed.
    #[error("invalid MAC address {0:?} (expected xx:xx:xx:xx:xx:xx)")]
    Mac(String),
    /// An IP prefix string is malformed.
    #[error("invalid IP prefix {0:?} (expected ADDR or ADDR/LEN)")]
    Prefix(String),
    /// A VLAN id is outside 1..=4094.
    #[error("VLAN id {0} is outside 1..=4094")]
    Vlan(u16),
    /// A trunk's native VLAN is not in its allowed list.
    #[error("native VLAN {0} is not in the trunk's allowed list")]
    NativeNotAllowed(u16),
    /// A port or switch name is empty, too long or has characters other than `[A-Za-z0-9_.-]`.
    #[error("invalid name {0:?} (1-64 characters of A-Z a-z 0-9 _ . -)")]
    Name(String),
    /// Two ports have the same name.
    #[error("port {0:?} already exists")]
    DuplicatePort(String),
    /// A port named in a setting does not exist.
    #[error("port {0:?} does not exist")]
    NoSuchPort(String),
    /// The MTU is outside 68..=9000.
    #[error("MTU {0} is outside 68..=9000")]
    Mtu(u32),
    /// A QoS setting is out of range.
    #[error("invalid QoS setting: {0}")]
    Qos(&'static str),
    /// A switch type and its ports or uplink do not fit together.
    #[error("{0}")]
    Type(String),
}

/// A MAC address; serialized as `xx:xx:xx:xx:xx:xx`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// True for group (multicast and broadcast) addresses.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
    /// True for ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
    /// True for 00:00:00:00:00:00.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConfigError::Mac(s.to_string());
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(err());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(err());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        Ok(Mac(m))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IP prefix (`10.0.0.0/24`, `fd00::/64`, or a bare address meaning a host prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct IpPrefix {
    /// The network address (host bits are masked off).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl IpPrefix {
    /// True if `ip` is inside the prefix (an IPv4 prefix never contains an IPv6 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConfigError::Prefix(s.to_string());
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if len > max {
            return Err(err());
        }
        let addr = match addr {
            IpAddr::V4(v) => {
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                IpAddr::V4((u32::from(v) & mask).into())
            }
            IpAddr::V6(v) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
                IpAddr::V6((u128::from(v) & mask).into())
            }
        };
        Ok(IpPrefix { addr, len })
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a VLAN id is in 1..=4094.
pub fn check_vlan(v: u16) -> Result<u16, ConfigError> {
    if (1..=4094).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::Vlan(v))
    }
}

/// Checks a switch or port name.
pub fn check_name(n: &str) -> Result<(), ConfigError> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Name(n.to_string()))
    }
}

/// Hyper-V-like switch types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchType {
    /// VM ports only.
    Private,
    /// VM ports plus one host TAP interface.
    Internal,
    /// VM ports plus an uplink bound to a host interface (AF_PACKET).
    External,
}

/// A port's 802.1Q mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum VlanMode {
    /// Untagged on the wire; all traffic belongs to `vlan`.
    Access {
        /// The port's VLAN.
        vlan: u16,
    },
    /// Tagged on the wire for every VLAN in `allowed`; `native` (if any) travels untagged.
    Trunk {
        /// VLANs the port carries; serialized as a range string (`"1,10-20"`), accepted as
        /// that or as a list of numbers.
        #[serde(with = "vlan_ranges")]
        allowed: BTreeSet<u16>,
        /// VLAN of untagged frames (must be in `allowed`).
        #[serde(default)]
        native: Option<u16>,
    },
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Access { vlan: 1 }
    }
}

impl VlanMode {
    /// Checks ids and that the native VLAN is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            VlanMode::Access { vlan } => check_vlan(*vlan).map(|_| ()),
            VlanMode::Trunk { allowed, native } => {
                for v in allowed {
                    check_vlan(*v)?;
                }
                if let Some(n) = native {
                    check_vlan(*n)?;
                    if !allowed.contains(n) {
                        return Err(ConfigError::NativeNotAllowed(*n));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Parses a VLAN list such as `"10,20,100-110"`.
pub fn parse_vlan_list(s: &str) -> Result<BTreeSet<u16>, ConfigError> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || ConfigError::Type(format!("invalid VLAN list element {part:?}"));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u16 = a.parse().map_err(|_| bad())?;
        let b: u16 = b.parse().map_err(|_| bad())?;
        if a > b {
            return Err(bad());
        }
        for v in a..=b {
            out.insert(check_vlan(v)?);
        }
    }
    Ok(out)
}

/// Formats a VLAN set as ranges (`"1,10-20"`).
pub fn format_vlan_list(set: &BTreeSet<u16>) -> String {
    let mut parts = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b += 1;
            it.next();
        }
        parts.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    parts.join(",")
}

mod vlan_ranges {
    use std::collections::BTreeSet;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(set: &BTreeSet<u16>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_vlan_list(set))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(BTreeSet<u16>),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<u16>, D::Error> {
        match Either::deserialize(d)? {
            Either::List(l) => Ok(l),
            Either::Text(t) => super::parse_vlan_list(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Private VLAN role of a port within its VLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum PvlanMode {
    /// Talks to every port (the default; also what an uplink usually is).
    #[default]
    Promiscuous,
    /// Talks to promiscuous ports and to ports of the same community.
    Community {
        /// Community id.
        id: u16,
    },
    /// Talks to promiscuous ports only.
    Isolated,
}

/// Port security settings (Hyper-V's names in brackets).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortSecurity {
    /// Allow source MACs other than the port's `mac` (MacAddressSpoofing). Off by default.
    pub mac_spoofing: bool,
    /// Drop DHCP server messages sent by this port (DhcpGuard).
    pub dhcp_guard: bool,
    /// Drop router advertisements and redirects sent by this port (RouterGuard).
    pub router_guard: bool,
    /// When non-empty: ARP and IPv4/IPv6 source addresses (and ND targets) from this port
    /// must be inside one of these prefixes (ARP/ND spoofing protection).
    pub allowed_ips: Vec<IpPrefix>,
}

/// ACL action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    /// Let the frame pass.
    Allow,
    /// Drop the frame.
    Deny,
}

/// Direction relative to the port's owner (the VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclDirection {
    /// Frames delivered to the port.
    Inbound,
    /// Frames sent by the port.
    Outbound,
    /// Both.
    Both,
}

/// One port ACL rule. A rule matches on the *remote* side: for outbound frames the
/// destination, for inbound frames the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// What to do on a match.
    pub action: AclAction,
    /// Which direction the rule applies to.
    pub direction: AclDirection,
    /// Remote MAC to match (exclusive with `remote_ip`).
    #[serde(default)]
    pub remote_mac: Option<Mac>,
    /// Remote IP prefix to match.
    #[serde(default)]
    pub remote_ip: Option<IpPrefix>,
}

/// Per-port QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QosConfig {
    /// Maximum bandwidth in bits per second, each direction (token bucket).
    pub max_bps: Option<u64>,
    /// Bucket depth in bytes (default: 100 ms at `max_bps`, at least 64 KiB).
    pub burst_bytes: Option<u64>,
    /// Relative weight (1..=100) for the fair share of a congested output port.
    pub min_weight: Option<u32>,
}

impl QosConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_bps == Some(0) {
            return Err(ConfigError::Qos("max_bps must be positive"));
        }
        if self.burst_bytes == Some(0) {
            return Err(ConfigError::Qos("burst_bytes must be positive"));
        }
        if let Some(w) = self.min_weight {
            if !(1..=100).contains(&w) {
                return Err(ConfigError::Qos("min_weight must be in 1..=100"));
            }
        }
        Ok(())
    }
}

/// A port's role on the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortRole {
    /// A VM NIC.
    #[default]
    Vm,
    /// The host's TAP interface (internal switch, or external switch shared with the host).
    Host,
    /// The uplink of an external switch.
    Uplink,
}

/// How a port's frames reach the switch process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backend {
    /// QEMU `-netdev stream,server=on` listens at `path`; the switch connects and reconnects.
    StreamConnect {
        /// Unix socket path QEMU listens on.
        path: String,
    },
    /// The switch listens at `path`; the peer (QEMU `server=off`, or a test peer) connects.
    StreamListen {
        /// Unix socket path the switch listens on.
        path: String,
    },
    /// A TAP interface (IFF_TAP | IFF_NO_PI), created if absent.
    Tap {
        /// Interface name.
        ifname: String,
    },
    /// A host interface opened with AF_PACKET in promiscuous mode.
    Packet {
        /// Interface name.
        ifname: String,
    },
}

/// Everything about one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Unique name on the switch (e.g. `vm1.nic0`).
    pub name: String,
    /// Role.
    #[serde(default)]
    pub role: PortRole,
    /// Backend.
    pub backend: Backend,
    /// The NIC's MAC address: the only source MAC allowed unless `security.mac_spoofing`.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// 802.1Q mode.
    #[serde(default)]
    pub vlan: VlanMode,
    /// Private VLAN role.
    #[serde(default)]
    pub pvlan: PvlanMode,
    /// Port security.
    #[serde(default)]
    pub security: PortSecurity,
    /// ACL rules.
    #[serde(default)]
    pub acl: Vec<AclRule>,
    /// QoS.
    #[serde(default)]
    pub qos: QosConfig,
    /// MACs pinned to this port (in every VLAN the port is a member of).
    #[serde(default)]
    pub static_macs: Vec<Mac>,
}

impl PortConfig {
    /// A VM port on VLAN 1 with defaults.
    pub fn new(name: &str, backend: Backend) -> Self {
        PortConfig {
            name: name.to_string(),
            role: PortRole::Vm,
            backend,
            mac: None,
            vlan: VlanMode::default(),
            pvlan: PvlanMode::default(),
            security: PortSecurity::default(),
            acl: Vec::new(),
            qos: QosConfig::default(),
            static_macs: Vec::new(),
        }
    }

    /// Checks the name, VLANs, QoS and ACL rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name(&self.name)?;
        self.vlan.validate()?;
        self.qos.validate()?;
        if let PvlanMode::Community { id } = self.pvlan {
            check_vlan(id)?;
        }
        for r in &self.acl {
            if r.remote_mac.is_some() == r.remote_ip.is_some() {
                return Err(ConfigError::Type(
                    "an ACL rule needs exactly one of remote_mac and remote_ip".into(),
                ));
            }
        }
        for m in &self.static_macs {
            if m.is_multicast() || m.is_zero() {
                return Err(ConfigError::Mac(m.to_string()));
            }
        }
        Ok(())
    }
}

/// Which direction of a source port is mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorDirection {
    /// Frames the source port sends into the switch.
    Ingress,
    /// Frames the switch delivers to the source port.
    Egress,
    /// Both.
    #[default]
    Both,
}

/// Port mirroring: copies of the sources' traffic go to `destination`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Destination port name (receives only mirrored traffic plus its normal traffic).
    pub destination: Option<String>,
    /// Source port names.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Direction mirrored.
    #[serde(default)]
    pub direction: MirrorDirection,
}

/// One extension enabled on a switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionConfig {
    /// Registered name.
    pub name: String,
    /// Enabled flag (a disabled extension stays in the order but sees no frames).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Extension-specific configuration.
    #[serde(default)]
    pub config: serde_json::Value,
}

fn yes() -> bool {
    true
}

fn default_mtu() -> u32 {
    9000
}

fn default_aging() -> u64 {
    300
}

/// A whole switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// Switch name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub switch_type: SwitchType,
    /// Host interface of an external switch.
    #[serde(default)]
    pub uplink: Option<String>,
    /// VLAN of the host port (internal, or external shared with the host); untagged on the TAP.
    #[serde(default)]
    pub host_vlan: Option<u16>,
    /// External switch: also give the host a TAP port on the switch (the host's address
    /// then belongs on that TAP, not on the uplink interface).
    #[serde(default)]
    pub share_host: bool,
    /// Largest L3 payload (MTU) accepted; frames above it are dropped (max 9000).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Seconds before a learned MAC is forgotten.
    #[serde(default = "default_aging")]
    pub fdb_aging_secs: u64,
    /// Extension pipeline, in order (empty: the built-in default pipeline).
    #[serde(default)]
    pub extensions: Vec<ExtensionConfig>,
    /// Mirror settings.
    #[serde(default)]
    pub mirror: MirrorConfig,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
}

impl SwitchConfig {
    /// A switch with no ports and defaults.
    pub fn new(name: &str, switch_type: SwitchType) -> Self {
        SwitchConfig {
            name: name.to_string(),
            switch_type,
            uplink: None,
            host_vlan: None,
            share_host: false,
            mtu: default_mtu(),
            fdb_aging_secs: default_aging(),
            extensions: Vec::new(),
            mirror: MirrorConfig::default(),
            ports: Vec::new(),
        }
    }

    /// Checks the switch and every port, unique port names, mirror ports and type rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name(&self.name)?;
        if !(68..=9000).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        if let Some(v) = self.host_vlan {
            check_vlan(v)?;
        }
        match (self.switch_type, &self.uplink) {
            (SwitchType::External, None) => {
                return Err(ConfigError::Type(
                    "an external switch needs an uplink".into(),
                ))
            }
            (SwitchType::Private | SwitchType::Internal, Some(_)) => {
                return Err(ConfigError::Type(
                    "only an external switch has an uplink".into(),
                ))
            }
            _ => {}
        }
        let mut names = BTreeSet::new();
        for p in &self.ports {
            p.validate()?;
            if !names.insert(p.name.as_str()) {
                return Err(ConfigError::DuplicatePort(p.name.clone()));
            }
            match (self.switch_type, p.role) {
                (SwitchType::Private, PortRole::Host | PortRole::Uplink)
                | (SwitchType::Internal, PortRole::Uplink) => {
                    return Err(ConfigError::Type(format!(
                        "a {:?} switch cannot have a {:?} port",
                        self.switch_type, p.role
                    )))
                }
                _ => {}
            }
        }
        for n in self.mirror.destination.iter().chain(&self.mirror.sources) {
            if !names.contains(n.as_str()) {
                return Err(ConfigError::NoSuchPort(n.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MACs and prefixes round-trip through their string forms; bad strings are refused.
    #[test]
    fn parse_strings() {
        let m: Mac = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<Mac>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<Mac>().is_err());
        let p: IpPrefix = "10.1.2.3/8".parse().unwrap();
        assert_eq!(p.to_string(), "10.0.0.0/8");
        assert!(p.contains("10.200.0.1".parse().unwrap()));
        assert!(!p.contains("11.0.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let h: IpPrefix = "fd00::5".parse().unwrap();
        assert_eq!(h.len, 128);
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        let z: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(z.contains("1.2.3.4".parse().unwrap()));
    }

    /// Port JSON uses tagged enums and defaults; unknown fields and bad VLANs are refused.
    #[test]
    fn port_json() {
        let p: PortConfig = serde_json::from_str(
            r#"{"name":"vm1.nic0","backend":{"kind":"stream_connect","path":"/run/x.sock"},
                "vlan":{"mode":"trunk","allowed":[10,20],"native":10}}"#,
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.role, PortRole::Vm);
        let bad = PortConfig {
            vlan: VlanMode::Trunk {
                allowed: [10].into(),
                native: Some(20),
            },
            ..p.clone()
        };
        assert_eq!(bad.validate(), Err(ConfigError::NativeNotAllowed(20)));
        let bad = PortConfig {
            vlan: VlanMode::Access { vlan: 4095 },
            ..p
        };
        assert_eq!(bad.validate(), Err(ConfigError::Vlan(4095)));
        assert!(serde_json::from_str::<PortConfig>(
            r#"{"name":"a","backend":{"kind":"tap","ifname":"t"},"bogus":1}"#
        )
        .is_err());
    }

    /// Switch validation enforces type rules and unique names.
    #[test]
    fn switch_rules() {
        let mut s = SwitchConfig::new("sw", SwitchType::Private);
        s.validate().unwrap();
        let host = PortConfig {
            role: PortRole::Host,
            ..PortConfig::new(
                "host",
                Backend::Tap {
                    ifname: "t0".into(),
                },
            )
        };
        s.ports.push(host.clone());
        assert!(matches!(s.validate(), Err(ConfigError::Type(_))));
        s.switch_type = SwitchType::Internal;
        s.validate().unwrap();
        s.ports.push(host);
        assert_eq!(s.validate(), Err(ConfigError::DuplicatePort("host".into())));
        let e = SwitchConfig::new("e", SwitchType::External);
        assert!(e.validate().is_err());
        let v = parse_vlan_list("1, 10-12,4094").unwrap();
        assert_eq!(format_vlan_list(&v), "1,10-12,4094");
        assert!(parse_vlan_list("0").is_err());
        assert!(parse_vlan_list("5-2").is_err());
        let t = VlanMode::Trunk {
            allowed: (1..=4094).collect(),
            native: Some(1),
        };
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(j, r#"{"mode":"trunk","allowed":"1-4094","native":1}"#);
        assert_eq!(serde_json::from_str::<VlanMode>(&j).unwrap(), t);
    }
}
