//! Virtual switch and VM NIC API types: switches vireod manages (one `vireo-switch` process
//! each), the port settings a VM NIC carries in its configuration, and the requests of
//! `vireo switch ...` and `vireo vm nic ...`.
//!
//! The port settings reuse the `switch` crate's configuration types ([`VlanMode`],
//! [`PortSecurity`], [`AclRule`], [`QosConfig`], ...) so that one definition serves the
//! dataplane, the switch process, vireod and the CLI.

use serde::{Deserialize, Serialize};
pub use switch::config::{format_vlan_list, parse_vlan_list};
pub use switch::config::{
    AclAction, AclDirection, AclRule, IpPrefix, Mac, MirrorDirection, PortRole, PortSecurity,
    PvlanMode, QosConfig, SwitchType, VlanMode,
};
pub use switch::{Backend, MirrorConfig, PortConfig, PortCounters, SwitchConfig};

/// A switch as vireod persists it (`STATE/switches/NAME/switch-spec.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    /// Name (1-64 characters of `A-Z a-z 0-9 _ . -`).
    pub name: String,
    /// private, internal or external.
    #[serde(rename = "type")]
    pub switch_type: SwitchType,
    /// Host interface of an external switch.
    #[serde(default)]
    pub uplink: Option<String>,
    /// VLAN of the host port (internal, or external shared with the host).
    #[serde(default)]
    pub host_vlan: Option<u16>,
    /// External switch: also give the host a TAP port on the switch.
    #[serde(default)]
    pub share_host: bool,
    /// Port mirroring, by `VM/NIC` (or `host`/`uplink`) names.
    #[serde(default)]
    pub mirror: Option<MirrorSpec>,
}

/// `POST /v1/switches`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSwitch {
    /// Name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub switch_type: SwitchType,
    /// Host interface (external only).
    #[serde(default)]
    pub uplink: Option<String>,
    /// Host port VLAN.
    #[serde(default)]
    pub host_vlan: Option<u16>,
    /// External: share the uplink with the host through a TAP port.
    #[serde(default)]
    pub share_host: bool,
}

/// Port mirroring between ports named `VM/NIC`, `host` or `uplink`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    /// Ports whose traffic is copied.
    pub sources: Vec<String>,
    /// Port receiving the copies.
    pub destination: String,
    /// Direction copied.
    #[serde(default)]
    pub direction: MirrorDirection,
}

/// `PUT /v1/switches/NAME/mirror`: `null` turns mirroring off.
pub type MirrorRequest = Option<MirrorSpec>;

/// Run state of a switch process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchState {
    /// The process answers on its control socket.
    Running,
    /// The process is not running (vireod respawns it).
    Down,
}

/// One port of a switch, as `vireo switch show/stats` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchPortInfo {
    /// `VM/NIC` for VM ports, else the switch's port name (`host`, `uplink`).
    pub port: String,
    /// The port's name inside the switch process.
    pub switch_port: String,
    /// Role.
    pub role: PortRole,
    /// Link up (QEMU socket connected, TAP/uplink open).
    pub up: bool,
    /// MAC address of the NIC.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// 802.1Q mode.
    pub vlan: VlanMode,
    /// Counters: packets, bytes and drops by reason.
    pub counters: PortCounters,
}

/// `GET /v1/switches/NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchInfo {
    /// Name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub switch_type: SwitchType,
    /// Uplink interface.
    pub uplink: Option<String>,
    /// Host port VLAN.
    pub host_vlan: Option<u16>,
    /// Shares the uplink with the host.
    pub share_host: bool,
    /// Host TAP interface (internal, or external shared with the host).
    pub host_interface: Option<String>,
    /// Process state.
    pub state: SwitchState,
    /// Process id.
    pub pid: Option<u32>,
    /// Times vireod respawned the process.
    pub restarts: u32,
    /// VM NICs configured on this switch (`VM/NIC`), running or not.
    pub nics: Vec<String>,
    /// Ports of the running switch (empty when down).
    pub ports: Vec<SwitchPortInfo>,
    /// Mirroring.
    pub mirror: Option<MirrorSpec>,
}

/// `GET /v1/switches/NAME/stats`: per-port counters and the extensions' own status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchStats {
    /// Switch.
    pub name: String,
    /// Ports with counters.
    pub ports: Vec<SwitchPortInfo>,
    /// Sum of every port's drops by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// `GET /v1/extensions` of the switch process (ACL hit counters, captures, ...).
    pub extensions: serde_json::Value,
}

/// `POST /v1/switches/NAME/acl`: appends a rule to a port's ACL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclAdd {
    /// `VM/NIC`.
    pub port: String,
    /// The rule.
    pub rule: AclRule,
}

/// `DELETE /v1/switches/NAME/acl`: removes a port's rules (all, or the one at `index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRemove {
    /// `VM/NIC`.
    pub port: String,
    /// Rule index as `acl list` shows it; `None`: every rule.
    #[serde(default)]
    pub index: Option<usize>,
}

/// One port's ACL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAcl {
    /// `VM/NIC`.
    pub port: String,
    /// Rules in order.
    pub rules: Vec<AclRule>,
}

/// `POST /v1/switches/NAME/capture`: starts a live capture of a port to a pcap file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// `VM/NIC`, `host` or `uplink`.
    pub port: String,
    /// pcap file (absolute; created or truncated by the switch).
    pub path: std::path::PathBuf,
}

/// A capture's state; `frames` is set when it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureInfo {
    /// Port.
    pub port: String,
    /// Frames written.
    #[serde(default)]
    pub frames: Option<u64>,
}

/// Port settings of a VM NIC: they live in the VM's configuration (they follow the VM) and
/// are pushed to the switch whenever the NIC is connected. Every field has a default, so
/// older configurations load.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NicPort {
    /// 802.1Q mode (default: access VLAN 1).
    pub vlan: VlanMode,
    /// Private VLAN role.
    pub pvlan: PvlanMode,
    /// MAC spoofing (default off: only the NIC's MAC may send), DHCP guard, router guard,
    /// allowed IPs.
    pub security: PortSecurity,
    /// ACL rules.
    pub acl: Vec<AclRule>,
    /// Maximum bandwidth and minimum weight.
    pub qos: QosConfig,
}

/// `POST /v1/vms/NAME/nics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AddNic {
    /// NIC name (default: the first free `nicN`).
    pub name: Option<String>,
    /// Switch to connect to.
    pub switch: Option<String>,
    /// MAC address (default: generated, unique on this host).
    pub mac: Option<String>,
    /// Model (default virtio).
    pub model: Option<crate::types::NicModel>,
}

/// `PATCH /v1/vms/NAME/nics/NIC`: every present field replaces the NIC's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NicPatch {
    /// Switch: a name connects (or moves) the NIC, `""` disconnects it.
    pub switch: Option<String>,
    /// 802.1Q mode.
    pub vlan: Option<VlanMode>,
    /// Private VLAN role.
    pub pvlan: Option<PvlanMode>,
    /// Allow MAC spoofing.
    pub mac_spoofing: Option<bool>,
    /// DHCP guard.
    pub dhcp_guard: Option<bool>,
    /// Router guard.
    pub router_guard: Option<bool>,
    /// Allowed IPs (empty: no check).
    pub allowed_ips: Option<Vec<IpPrefix>>,
    /// Maximum bandwidth in bit/s each direction; 0 removes the limit.
    pub max_bps: Option<u64>,
    /// Token bucket depth in bytes; 0: the default.
    pub burst_bytes: Option<u64>,
    /// Minimum bandwidth weight 1..=100; 0 removes it.
    pub min_weight: Option<u32>,
}

/// A NIC with where it is connected now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// VM.
    pub vm: String,
    /// The NIC's configuration.
    #[serde(flatten)]
    pub nic: crate::types::NicSpec,
    /// Link up on the switch (the switch is connected to QEMU's socket).
    pub connected: bool,
}

/// A port as the switch process lists it (`GET /v1/ports` of `vireo-switch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchPortStatus {
    /// Dataplane id.
    pub id: u32,
    /// Link up.
    pub up: bool,
    /// Configuration.
    pub config: PortConfig,
    /// Counters.
    pub counters: PortCounters,
}

/// Worker `POST /nics`: hot-plugs a NIC whose netdev is a `-netdev stream` server socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicHotplug {
    /// Device id (the NIC name); the netdev is `net-<id>`.
    pub id: String,
    /// MAC address.
    pub mac: String,
    /// Model.
    pub model: crate::types::NicModel,
    /// Machine generation (1: `pci.0`; 2: a free `hpN` root port).
    pub generation: u8,
    /// Socket QEMU listens on.
    pub socket: std::path::PathBuf,
}

/// The unix socket QEMU listens on for a NIC (`-netdev stream,server=on`), in the VM's run
/// directory.
pub fn nic_socket(run_dir: &std::path::Path, nic: &str) -> std::path::PathBuf {
    run_dir.join(format!("nic-{nic}.sock"))
}

/// Checks a NIC name: 1-15 characters of `A-Z a-z 0-9 - _`, starting with a letter.
pub fn check_nic_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 15
        && n.starts_with(|c: char| c.is_ascii_alphabetic())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid NIC name {n:?}: 1-15 letters, digits, - or _, starting with a letter"
        ))
    }
}

/// `switch` port name of a VM NIC: `VM.NIC`.
pub fn port_name(vm: &str, nic: &str) -> String {
    format!("{vm}.{nic}")
}

/// The host TAP interface name `vireo-switch` gives a switch (IFNAMSIZ: 15 characters).
pub fn host_ifname(switch: &str) -> String {
    let mut n = format!("vsw-{switch}");
    n.truncate(15);
    n
}

/// Parses a bandwidth such as `100M`, `1G`, `500k`, `2000000` (bit/s, decimal units).
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("bps")
        .or_else(|| t.strip_suffix("bit"))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'k' => 1_000,
                'm' => 1_000_000,
                'g' => 1_000_000_000,
                't' => 1_000_000_000_000,
                _ => return Err(format!("invalid bandwidth {s:?}: use e.g. 100M, 1G, 500k")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid bandwidth {s:?}: use e.g. 100M, 1G, 500k"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("invalid bandwidth {s:?}"));
    }
    Ok((n * mult as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("100M"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_bandwidth("500k"), Ok(500_000));
        assert_eq!(parse_bandwidth("20Mbit"), Ok(20_000_000));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("10X").is_err());
    }

    #[test]
    fn old_nic_config_loads_with_default_port() {
        let n: crate::types::NicSpec = serde_json::from_str(
            r#"{"name":"nic0","mac":"52:54:00:00:00:01","model":"virtio","switch":"lab"}"#,
        )
        .expect("old NicSpec");
        assert_eq!(n.port, NicPort::default());
        assert!(!n.port.security.mac_spoofing);
    }
}
