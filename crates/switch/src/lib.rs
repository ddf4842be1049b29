//! The Vireo virtual switch library: everything a switch decides, nothing it does.
//!
//! It owns frame parsing ([`frame`]), the MAC table ([`fdb`]), 802.1Q policy ([`vlan`]),
//! private VLANs ([`pvlan`]), port security ([`guard`]), ACLs ([`acl`]), QoS mechanisms
//! ([`qos`]), pcap writing ([`capture`]), counters ([`counters`]), the configuration types
//! ([`config`]), the extension pipeline ([`extension`]) and the forwarding engine
//! ([`dataplane`]). It must not do I/O on ports, open sockets or know about VMs beyond a
//! port: the `vireo-switch` process owns the backends and the control API.

#![warn(missing_docs)]

pub mod acl;
pub mod capture;
pub mod config;
pub mod counters;
pub mod dataplane;
pub mod extension;
pub mod fdb;
pub mod frame;
pub mod guard;
pub mod pvlan;
pub mod qos;
pub mod vlan;

/// A port's index in the dataplane (stable while the port exists; reused after removal).
pub type PortId = u32;

pub use config::{
    AclAction, AclDirection, AclRule, Backend, ConfigError, ExtensionConfig, IpPrefix, Mac,
    MirrorConfig, MirrorDirection, PortConfig, PortRole, PortSecurity, PvlanMode, QosConfig,
    SwitchConfig, SwitchType, VlanMode,
};
pub use counters::{DropReason, PortCounters};
pub use dataplane::{Dataplane, DataplaneError, ErrorKind, PortStatus};
pub use extension::{ExtensionClass, ExtensionError, Now, Registry, SwitchExtension, Verdict};
