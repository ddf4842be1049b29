//! The forwarding engine: given a frame from a port, decide which ports it leaves through
//! and in what form. Pure: no I/O, time passed in; the switch process calls
//! [`Dataplane::process`] for every received frame and writes what the sink is handed.
//!
//! Per frame:
//! 1. count it; drop if it has no Ethernet header or exceeds the MTU;
//! 2. classify its VLAN from the ingress port's mode and its tag ([`crate::vlan::classify`]);
//! 3. run the ingress hooks of the extension pipeline (guards, ACLs, QoS…);
//! 4. learn its source MAC; look up its destination in the FDB, or flood to every port of
//!    the VLAN for broadcast, multicast and unknown unicast;
//! 5. run the forwarding hooks (PVLAN, mirror), then drop every output that is not a member
//!    of the VLAN (isolation does not depend on extensions);
//! 6. per output: tag or untag for that port, run the egress hooks, hand it to the sink.

use std::collections::HashMap;

use serde::Serialize;

use crate::config::{
    ConfigError, MirrorConfig, PortConfig, PortRole, SwitchConfig, SwitchType, VlanMode,
};
use crate::counters::{DropReason, PortCounters};
use crate::extension::{
    Egress, ExtensionError, Ingress, Now, Pipeline, Ports, Registry, SwitchView, Verdict,
};
use crate::fdb::{Fdb, FdbRow};
use crate::frame::{self, VlanTag, ETH_HLEN, VLAN_HLEN};
use crate::vlan::{self, EgressTag};
use crate::PortId;

/// Most dynamic MAC entries one switch learns.
pub const FDB_MAX_ENTRIES: usize = 16384;

/// Errors from dataplane configuration calls.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[source] ConfigError),
    /// An extension could not be built or configured.
    #[error("extension pipeline")]
    Extension(#[source] ExtensionError),
    /// No such port.
    #[error("port {0:?} does not exist")]
    NoSuchPort(String),
    /// A port with that name exists.
    #[error("port {0:?} already exists")]
    PortExists(String),
}

/// Coarse error classes for callers that map errors to statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input.
    Invalid,
    /// Missing object.
    NotFound,
    /// Object exists.
    Exists,
}

impl DataplaneError {
    /// The error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DataplaneError::Config(_)
            | DataplaneError::Extension(ExtensionError::Config { .. })
            | DataplaneError::Extension(ExtensionError::Duplicate(_)) => ErrorKind::Invalid,
            DataplaneError::Extension(ExtensionError::Unknown(_)) => ErrorKind::NotFound,
            DataplaneError::NoSuchPort(_) => ErrorKind::NotFound,
            DataplaneError::PortExists(_) => ErrorKind::Exists,
        }
    }
}

impl From<ConfigError> for DataplaneError {
    fn from(e: ConfigError) -> Self {
        DataplaneError::Config(e)
    }
}

impl From<ExtensionError> for DataplaneError {
    fn from(e: ExtensionError) -> Self {
        DataplaneError::Extension(e)
    }
}

/// A port as the dataplane holds it.
#[derive(Debug, Clone)]
pub struct PortSlot {
    /// Configuration.
    pub cfg: PortConfig,
    /// Counters.
    pub counters: PortCounters,
    /// Link up (the backend is connected).
    pub up: bool,
}

/// A port's state for listings.
#[derive(Debug, Clone, Serialize)]
pub struct PortStatus {
    /// Dataplane id.
    pub id: PortId,
    /// Link up.
    pub up: bool,
    /// Configuration.
    pub config: PortConfig,
    /// Counters.
    pub counters: PortCounters,
}

#[derive(Debug, Default)]
struct PortTable {
    slots: Vec<Option<PortSlot>>,
}

impl Ports for PortTable {
    fn get(&self, id: PortId) -> Option<&PortConfig> {
        self.slots.get(id as usize)?.as_ref().map(|s| &s.cfg)
    }
}

impl PortTable {
    fn slot(&self, id: PortId) -> Option<&PortSlot> {
        self.slots.get(id as usize)?.as_ref()
    }
    fn slot_mut(&mut self, id: PortId) -> Option<&mut PortSlot> {
        self.slots.get_mut(id as usize)?.as_mut()
    }
}

/// The forwarding engine of one switch.
pub struct Dataplane {
    name: String,
    switch_type: SwitchType,
    uplink: Option<String>,
    host_vlan: Option<u16>,
    share_host: bool,
    mtu: u32,
    aging_secs: u64,
    mirror: MirrorConfig,
    ports: PortTable,
    names: HashMap<String, PortId>,
    fdb: Fdb,
    pipeline: Pipeline,
    out: Vec<PortId>,
    mirrors: Vec<PortId>,
    untagged: Vec<u8>,
    tagged: Vec<u8>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("name", &self.name)
            .field("ports", &self.names)
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Builds a switch from its configuration (ports start with link down).
    pub fn new(cfg: &SwitchConfig, registry: &Registry) -> Result<Self, DataplaneError> {
        cfg.validate()?;
        let pipeline = registry.build(&cfg.extensions)?;
        let mut dp = Dataplane {
            name: cfg.name.clone(),
            switch_type: cfg.switch_type,
            uplink: cfg.uplink.clone(),
            host_vlan: cfg.host_vlan,
            share_host: cfg.share_host,
            mtu: cfg.mtu,
            aging_secs: cfg.fdb_aging_secs,
            mirror: cfg.mirror.clone(),
            ports: PortTable::default(),
            names: HashMap::new(),
            fdb: Fdb::new(cfg.fdb_aging_secs, FDB_MAX_ENTRIES),
            pipeline,
            out: Vec::new(),
            mirrors: Vec::new(),
            untagged: Vec::with_capacity(9100),
            tagged: Vec::with_capacity(9100),
        };
        for p in &cfg.ports {
            dp.insert_port(p.clone());
        }
        dp.reconfigure();
        Ok(dp)
    }

    /// The switch configuration as it is now (what the switch process persists).
    pub fn config(&self) -> SwitchConfig {
        let mut ports: Vec<(PortId, PortConfig)> = self
            .ports
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as PortId, s.cfg.clone())))
            .collect();
        ports.sort_by_key(|(i, _)| *i);
        SwitchConfig {
            name: self.name.clone(),
            switch_type: self.switch_type,
            uplink: self.uplink.clone(),
            host_vlan: self.host_vlan,
            share_host: self.share_host,
            mtu: self.mtu,
            fdb_aging_secs: self.aging_secs,
            extensions: self.pipeline.configs(),
            mirror: self.mirror.clone(),
            ports: ports.into_iter().map(|(_, c)| c).collect(),
        }
    }

    fn insert_port(&mut self, cfg: PortConfig) -> PortId {
        let id = match self.ports.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.ports.slots.push(None);
                self.ports.slots.len() - 1
            }
        } as PortId;
        for v in vlan::members(&cfg.vlan) {
            for m in &cfg.static_macs {
                self.fdb.add_static(v, *m, id);
            }
        }
        self.names.insert(cfg.name.clone(), id);
        self.ports.slots[id as usize] = Some(PortSlot {
            cfg,
            counters: PortCounters::default(),
            up: false,
        });
        id
    }

    fn reconfigure(&mut self) {
        let view = SwitchView {
            ports: self
                .ports
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i as PortId, &s.cfg)))
                .collect(),
            mirror: &self.mirror,
        };
        self.pipeline.reconfigure(&view);
    }

    fn check_with(&self, cfg: &PortConfig, replacing: Option<&str>) -> Result<(), DataplaneError> {
        let mut sc = self.config();
        sc.ports.retain(|p| Some(p.name.as_str()) != replacing);
        sc.ports.push(cfg.clone());
        sc.validate()?;
        Ok(())
    }

    /// Adds a port (link down until [`Dataplane::set_link`]).
    pub fn add_port(&mut self, cfg: PortConfig) -> Result<PortId, DataplaneError> {
        if self.names.contains_key(&cfg.name) {
            return Err(DataplaneError::PortExists(cfg.name));
        }
        self.check_with(&cfg, None)?;
        let id = self.insert_port(cfg);
        self.reconfigure();
        Ok(id)
    }

    /// Replaces a port's configuration, keeping its id, link state and counters. Learned
    /// MACs of the port are forgotten (its VLANs may have changed).
    pub fn update_port(&mut self, cfg: PortConfig) -> Result<PortId, DataplaneError> {
        let id = *self
            .names
            .get(&cfg.name)
            .ok_or_else(|| DataplaneError::NoSuchPort(cfg.name.clone()))?;
        self.check_with(&cfg, Some(&cfg.name))?;
        self.fdb.flush_port(id);
        for v in vlan::members(&cfg.vlan) {
            for m in &cfg.static_macs {
                self.fdb.add_static(v, *m, id);
            }
        }
        if let Some(s) = self.ports.slot_mut(id) {
            s.cfg = cfg;
        }
        self.reconfigure();
        Ok(id)
    }

    /// Removes a port; mirror settings naming it are cleared.
    pub fn remove_port(&mut self, name: &str) -> Result<PortConfig, DataplaneError> {
        let id = self
            .names
            .remove(name)
            .ok_or_else(|| DataplaneError::NoSuchPort(name.to_string()))?;
        self.fdb.flush_port(id);
        let slot = self.ports.slots[id as usize].take();
        if self.mirror.destination.as_deref() == Some(name) {
            self.mirror.destination = None;
        }
        self.mirror.sources.retain(|s| s != name);
        self.reconfigure();
        slot.map(|s| s.cfg)
            .ok_or_else(|| DataplaneError::NoSuchPort(name.to_string()))
    }

    /// Sets the mirror configuration.
    pub fn set_mirror(&mut self, m: MirrorConfig) -> Result<(), DataplaneError> {
        let mut sc = self.config();
        sc.mirror = m.clone();
        sc.validate()?;
        self.mirror = m;
        self.reconfigure();
        Ok(())
    }

    /// Sets the switch MTU and FDB aging time.
    pub fn set_settings(
        &mut self,
        mtu: Option<u32>,
        aging: Option<u64>,
    ) -> Result<(), DataplaneError> {
        let mut sc = self.config();
        if let Some(m) = mtu {
            sc.mtu = m;
        }
        sc.validate()?;
        self.mtu = sc.mtu;
        if let Some(a) = aging {
            self.aging_secs = a;
            self.fdb.set_aging(a);
        }
        Ok(())
    }

    /// Marks a port's link up or down; going down forgets its learned MACs.
    pub fn set_link(&mut self, id: PortId, up: bool) {
        if let Some(s) = self.ports.slot_mut(id) {
            s.up = up;
        }
        if !up {
            // keep static entries: re-add after flush
            self.fdb.flush_port(id);
            if let Some(s) = self.ports.slot(id) {
                let cfg = s.cfg.clone();
                for v in vlan::members(&cfg.vlan) {
                    for m in &cfg.static_macs {
                        self.fdb.add_static(v, *m, id);
                    }
                }
            }
        }
    }

    /// The id of a named port.
    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.names.get(name).copied()
    }

    /// A port by id.
    pub fn port(&self, id: PortId) -> Option<&PortSlot> {
        self.ports.slot(id)
    }

    /// All ports with status, by id.
    pub fn ports(&self) -> Vec<PortStatus> {
        self.ports
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref().map(|s| PortStatus {
                    id: i as PortId,
                    up: s.up,
                    config: s.cfg.clone(),
                    counters: s.counters.clone(),
                })
            })
            .collect()
    }

    /// The FDB as rows with port names.
    pub fn fdb(&self, now_ns: u64) -> Vec<(FdbRow, String)> {
        self.fdb
            .rows(now_ns)
            .into_iter()
            .map(|r| {
                let n = self
                    .ports
                    .slot(r.port)
                    .map(|s| s.cfg.name.clone())
                    .unwrap_or_default();
                (r, n)
            })
            .collect()
    }

    /// Ages the FDB.
    pub fn age(&mut self, now_ns: u64) {
        self.fdb.age(now_ns);
    }

    /// The extension pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The extension pipeline, for enabling/configuring extensions and typed control.
    pub fn pipeline_mut(&mut self) -> &mut Pipeline {
        &mut self.pipeline
    }

    /// Counts a drop the I/O layer decided (e.g. [`DropReason::QueueFull`]).
    pub fn count_drop(&mut self, id: PortId, reason: DropReason) {
        if let Some(s) = self.ports.slot_mut(id) {
            s.counters.drop(reason);
        }
    }

    /// Forwards one frame received on port `from`. `sink(port, bytes)` is called for each
    /// copy to send and returns false if it could not queue it (counted as
    /// [`DropReason::QueueFull`]).
    pub fn process(
        &mut self,
        from: PortId,
        frame: &[u8],
        now: Now,
        sink: &mut dyn FnMut(PortId, &[u8]) -> bool,
    ) {
        self.process_inner(from, frame, now, false, sink)
    }

    /// Like [`Dataplane::process`] for a TCP super-frame (GSO/GRO) that the I/O layer will
    /// pass on whole or segment per output port: it is exempt from the MTU check.
    pub fn process_super_frame(
        &mut self,
        from: PortId,
        frame: &[u8],
        now: Now,
        sink: &mut dyn FnMut(PortId, &[u8]) -> bool,
    ) {
        self.process_inner(from, frame, now, true, sink)
    }

    fn process_inner(
        &mut self,
        from: PortId,
        frame: &[u8],
        now: Now,
        super_frame: bool,
        sink: &mut dyn FnMut(PortId, &[u8]) -> bool,
    ) {
        let mtu = self.mtu as usize;
        let Some(slot) = self
            .ports
            .slots
            .get_mut(from as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        slot.counters.rx(frame.len());
        let parsed = match frame::parse(frame) {
            Ok(p) => p,
            Err(_) => {
                slot.counters.drop(DropReason::Malformed);
                return;
            }
        };
        let hdr = if parsed.tag.is_some() {
            ETH_HLEN + VLAN_HLEN
        } else {
            ETH_HLEN
        };
        if frame.len() > mtu + hdr && !super_frame {
            slot.counters.drop(DropReason::Mtu);
            return;
        }
        let Some(vid) = vlan::classify(&slot.cfg.vlan, parsed.tag.map(|t| t.vid)) else {
            slot.counters.drop(DropReason::Vlan);
            return;
        };
        let ports = &mut self.ports;
        let Some(from_slot) = ports.slot(from) else {
            return;
        };
        let ictx = Ingress {
            port: from,
            cfg: &from_slot.cfg,
            frame,
            parsed: &parsed,
            vlan: vid,
            now,
        };
        if let Verdict::Drop(r) = self.pipeline.ingress(&ictx) {
            if let Some(s) = ports.slot_mut(from) {
                s.counters.drop(r);
            }
            return;
        }
        self.fdb.learn(vid, parsed.src, from, now.mono_ns);

        // outputs
        self.out.clear();
        self.mirrors.clear();
        let known = if parsed.dst.is_multicast() {
            None
        } else {
            self.fdb.lookup(vid, parsed.dst, now.mono_ns)
        };
        match known {
            Some(p) if p == from => return,
            Some(p) => self.out.push(p),
            None => {
                for (i, s) in ports.slots.iter().enumerate() {
                    if let Some(s) = s {
                        if i as PortId != from && s.up && vlan::is_member(&s.cfg.vlan, vid) {
                            self.out.push(i as PortId);
                        }
                    }
                }
            }
        }
        self.pipeline
            .forward(&ictx, &*ports, &mut self.out, &mut self.mirrors);
        // isolation is enforced here, whatever the extensions did
        self.out.retain(|&p| {
            p != from
                && ports
                    .slot(p)
                    .is_some_and(|s| s.up && vlan::is_member(&s.cfg.vlan, vid))
        });
        self.out.dedup();
        if self.out.is_empty() && self.mirrors.is_empty() {
            return;
        }

        // render lazily: untagged and tagged variants
        let pcp = parsed.tag.map(|t| t.pcp).unwrap_or(0);
        let (mut have_u, mut have_t) = (false, false);
        let outs = std::mem::take(&mut self.out);
        let mirrors = std::mem::take(&mut self.mirrors);
        for (&p, is_mirror) in outs
            .iter()
            .map(|p| (p, false))
            .chain(mirrors.iter().map(|p| (p, true)))
        {
            let Some(slot) = ports.slot(p) else { continue };
            if !slot.up {
                continue;
            }
            let tag = if is_mirror {
                // mirror copies keep the VLAN visible unless it is the port's untagged VLAN
                vlan::egress(&slot.cfg.vlan, vid).unwrap_or(EgressTag::Tagged)
            } else {
                match vlan::egress(&slot.cfg.vlan, vid) {
                    Some(t) => t,
                    None => continue,
                }
            };
            let bytes: &[u8] = match tag {
                // an untagged frame leaving untagged goes out as received: no copy
                EgressTag::Untagged if parsed.tag.is_none() => frame,
                EgressTag::Untagged => {
                    if !have_u {
                        self.untagged.clear();
                        self.untagged.extend_from_slice(frame);
                        frame::strip_tag(&mut self.untagged);
                        have_u = true;
                    }
                    &self.untagged
                }
                EgressTag::Tagged => {
                    if !have_t {
                        self.tagged.clear();
                        self.tagged.extend_from_slice(frame);
                        frame::strip_tag(&mut self.tagged);
                        frame::push_tag(
                            &mut self.tagged,
                            VlanTag {
                                pcp,
                                dei: false,
                                vid,
                            },
                        );
                        have_t = true;
                    }
                    &self.tagged
                }
            };
            {
                // mirror copies pass the destination's egress hooks too (its capture, ACL
                // and QoS apply to everything delivered to it)
                let ectx = Egress {
                    from,
                    to: p,
                    to_cfg: &slot.cfg,
                    frame: bytes,
                    parsed: &parsed,
                    vlan: vid,
                    now,
                };
                if let Verdict::Drop(r) = self.pipeline.egress(&ectx) {
                    if let Some(s) = ports.slot_mut(p) {
                        s.counters.drop(r);
                    }
                    continue;
                }
            }
            let ok = sink(p, bytes);
            if let Some(s) = ports.slot_mut(p) {
                if ok {
                    s.counters.tx(bytes.len());
                } else {
                    s.counters.drop(DropReason::QueueFull);
                }
            }
        }
        self.out = outs;
        self.mirrors = mirrors;
    }

    /// The role-based defaults for a new port: the host port of a switch with a host VLAN
    /// goes into that VLAN.
    pub fn default_vlan_for(&self, role: PortRole) -> VlanMode {
        match (role, self.host_vlan) {
            (PortRole::Host, Some(v)) => VlanMode::Access { vlan: v },
            _ => VlanMode::default(),
        }
    }

    /// Switch name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
#[path = "dataplane_tests.rs"]
mod tests;
