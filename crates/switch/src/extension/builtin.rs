//! The built-in extensions: capture, the port-security guards, ACLs, QoS policing, private
//! VLANs and port mirroring.

use std::any::Any;
use std::collections::HashMap;
use std::io::Write;

use serde_json::json;

use super::{
    Egress, ExtensionClass, Ingress, Ports, Registry, SwitchExtension, SwitchView, Verdict,
};
use crate::acl::AclTable;
use crate::capture::PcapWriter;
use crate::config::{AclAction, AclDirection, MirrorDirection, PortConfig, QosConfig};
use crate::counters::DropReason;
use crate::frame::Parsed;
use crate::guard;
use crate::pvlan;
use crate::qos::TokenBucket;
use crate::PortId;

/// The pipeline a switch gets when its configuration lists no extensions.
pub const DEFAULT_PIPELINE: &[&str] = &[
    "capture",
    "mac-guard",
    "dhcp-guard",
    "router-guard",
    "ip-guard",
    "acl",
    "qos",
    "pvlan",
    "mirror",
];

/// Registers every built-in extension.
pub fn register(r: &mut Registry) {
    r.register("capture", |_| Ok(Box::new(Capture::default())));
    r.register("mac-guard", |_| {
        Ok(Box::new(Guard::new("mac-guard", guard::mac_spoofing)))
    });
    r.register("dhcp-guard", |_| {
        Ok(Box::new(Guard::new("dhcp-guard", guard::dhcp_guard)))
    });
    r.register("router-guard", |_| {
        Ok(Box::new(Guard::new("router-guard", guard::router_guard)))
    });
    r.register("ip-guard", |_| {
        Ok(Box::new(Guard::new("ip-guard", guard::ip_spoofing)))
    });
    r.register("acl", |_| Ok(Box::new(Acl::default())));
    r.register("qos", |_| Ok(Box::new(Qos::default())));
    r.register("pvlan", |_| Ok(Box::new(Pvlan)));
    r.register("mirror", |_| Ok(Box::new(Mirror::default())));
}

type GuardFn = fn(&PortConfig, &Parsed) -> Option<DropReason>;

/// A stateless port-security check run on every frame a port sends.
pub struct Guard {
    name: &'static str,
    check: GuardFn,
}

impl Guard {
    /// Wraps a check from [`crate::guard`].
    pub fn new(name: &'static str, check: GuardFn) -> Self {
        Guard { name, check }
    }
}

impl SwitchExtension for Guard {
    fn name(&self) -> &str {
        self.name
    }
    fn class(&self) -> ExtensionClass {
        ExtensionClass::Filter
    }
    fn ingress(&mut self, ctx: &Ingress<'_>) -> Verdict {
        match (self.check)(ctx.cfg, ctx.parsed) {
            Some(r) => Verdict::Drop(r),
            None => Verdict::Pass,
        }
    }
}

/// Live capture of ports to pcap streams: frames a port sends as received, frames it gets
/// as sent.
#[derive(Default)]
pub struct Capture {
    sinks: HashMap<PortId, PcapWriter<Box<dyn Write + Send>>>,
}

impl Capture {
    /// Starts capturing `port` into `sink` (replacing any capture of it).
    pub fn start(&mut self, port: PortId, sink: Box<dyn Write + Send>) -> std::io::Result<()> {
        let w = PcapWriter::new(sink)?;
        self.sinks.insert(port, w);
        Ok(())
    }

    /// Stops capturing `port`; returns the frames written, or `None` if it was not captured.
    pub fn stop(&mut self, port: PortId) -> Option<u64> {
        let mut w = self.sinks.remove(&port)?;
        if let Err(e) = w.flush() {
            tracing::warn!(port, error = %e, "flushing capture");
        }
        Some(w.frames())
    }

    /// Ports being captured and frames written so far.
    pub fn active(&self) -> Vec<(PortId, u64)> {
        let mut v: Vec<_> = self.sinks.iter().map(|(p, w)| (*p, w.frames())).collect();
        v.sort();
        v
    }

    fn record(&mut self, port: PortId, unix_ns: u64, frame: &[u8]) {
        if self.sinks.is_empty() {
            return;
        }
        if let Some(w) = self.sinks.get_mut(&port) {
            if let Err(e) = w.write_frame(unix_ns, frame) {
                tracing::warn!(port, error = %e, "capture write failed; stopping capture");
                self.sinks.remove(&port);
            }
        }
    }
}

impl SwitchExtension for Capture {
    fn name(&self) -> &str {
        "capture"
    }
    fn class(&self) -> ExtensionClass {
        ExtensionClass::Capture
    }
    fn ingress(&mut self, ctx: &Ingress<'_>) -> Verdict {
        self.record(ctx.port, ctx.now.unix_ns, ctx.frame);
        Verdict::Pass
    }
    fn egress(&mut self, ctx: &Egress<'_>) -> Verdict {
        self.record(ctx.to, ctx.now.unix_ns, ctx.frame);
        Verdict::Pass
    }
    fn reconfigure(&mut self, view: &SwitchView<'_>) {
        let live: Vec<PortId> = view.ports.iter().map(|(id, _)| *id).collect();
        let gone: Vec<PortId> = self
            .sinks
            .keys()
            .filter(|p| !live.contains(p))
            .copied()
            .collect();
        for p in gone {
            self.stop(p);
        }
    }
    fn status(&self) -> serde_json::Value {
        json!(self
            .active()
            .iter()
            .map(|(p, n)| json!({"port": p, "frames": n}))
            .collect::<Vec<_>>())
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// Port ACLs with hit counters.
#[derive(Default)]
pub struct Acl {
    tables: HashMap<PortId, (String, AclTable)>,
}

impl SwitchExtension for Acl {
    fn name(&self) -> &str {
        "acl"
    }
    fn class(&self) -> ExtensionClass {
        ExtensionClass::Filter
    }
    fn ingress(&mut self, ctx: &Ingress<'_>) -> Verdict {
        if self.tables.is_empty() {
            return Verdict::Pass;
        }
        let Some((_, t)) = self.tables.get_mut(&ctx.port) else {
            return Verdict::Pass;
        };
        match t.evaluate(
            AclDirection::Outbound,
            ctx.parsed.dst,
            ctx.parsed.l3.dst_ip(),
        ) {
            Some(AclAction::Deny) => Verdict::Drop(DropReason::Acl),
            _ => Verdict::Pass,
        }
    }
    fn egress(&mut self, ctx: &Egress<'_>) -> Verdict {
        if self.tables.is_empty() {
            return Verdict::Pass;
        }
        let Some((_, t)) = self.tables.get_mut(&ctx.to) else {
            return Verdict::Pass;
        };
        match t.evaluate(
            AclDirection::Inbound,
            ctx.parsed.src,
            ctx.parsed.l3.src_ip(),
        ) {
            Some(AclAction::Deny) => Verdict::Drop(DropReason::Acl),
            _ => Verdict::Pass,
        }
    }
    fn reconfigure(&mut self, view: &SwitchView<'_>) {
        let mut next = HashMap::new();
        for (id, cfg) in &view.ports {
            if cfg.acl.is_empty() {
                continue;
            }
            let table = match self.tables.remove(id) {
                Some((name, t)) if name == cfg.name && t.rules() == cfg.acl.as_slice() => t,
                _ => AclTable::new(cfg.acl.clone()),
            };
            next.insert(*id, (cfg.name.clone(), table));
        }
        self.tables = next;
    }
    fn status(&self) -> serde_json::Value {
        let m: serde_json::Map<String, serde_json::Value> = self
            .tables
            .values()
            .map(|(name, t)| (name.clone(), json!(t.stats())))
            .collect();
        serde_json::Value::Object(m)
    }
}

/// Maximum-bandwidth policing per port, each direction.
#[derive(Default)]
pub struct Qos {
    buckets: HashMap<PortId, (QosConfig, TokenBucket, TokenBucket)>,
}

impl SwitchExtension for Qos {
    fn name(&self) -> &str {
        "qos"
    }
    fn class(&self) -> ExtensionClass {
        ExtensionClass::Filter
    }
    fn ingress(&mut self, ctx: &Ingress<'_>) -> Verdict {
        if self.buckets.is_empty() {
            return Verdict::Pass;
        }
        let Some(e) = self.buckets.get_mut(&ctx.port) else {
            return Verdict::Pass;
        };
        if e.1.admit(ctx.frame.len(), ctx.now.mono_ns) {
            Verdict::Pass
        } else {
            Verdict::Drop(DropReason::Qos)
        }
    }
    fn egress(&mut self, ctx: &Egress<'_>) -> Verdict {
        if self.buckets.is_empty() {
            return Verdict::Pass;
        }
        let Some(e) = self.buckets.get_mut(&ctx.to) else {
            return Verdict::Pass;
        };
        if e.2.admit(ctx.frame.len(), ctx.now.mono_ns) {
            Verdict::Pass
        } else {
            Verdict::Drop(DropReason::Qos)
        }
    }
    fn reconfigure(&mut self, view: &SwitchView<'_>) {
        let mut next = HashMap::new();
        for (id, cfg) in &view.ports {
            let Some(rate) = cfg.qos.max_bps else {
                continue;
            };
            let entry = match self.buckets.remove(id) {
                Some(e) if e.0 == cfg.qos => e,
                _ => {
                    let burst = cfg
                        .qos
                        .burst_bytes
                        .unwrap_or(TokenBucket::default_burst(rate));
                    (
                        cfg.qos,
                        TokenBucket::new(rate, burst, 0),
                        TokenBucket::new(rate, burst, 0),
                    )
                }
            };
            next.insert(*id, entry);
        }
        self.buckets = next;
    }
}

/// Private VLAN forwarding rules.
pub struct Pvlan;

impl SwitchExtension for Pvlan {
    fn name(&self) -> &str {
        "pvlan"
    }
    fn class(&self) -> ExtensionClass {
        ExtensionClass::Forwarding
    }
    fn forward(
        &mut self,
        ctx: &Ingress<'_>,
        ports: &dyn Ports,
        out: &mut Vec<PortId>,
        _mirror: &mut Vec<PortId>,
    ) {
        let from = ctx.cfg.pvlan;
        out.retain(|p| {
            ports
                .get(*p)
                .is_some_and(|c| pvlan::may_forward(from, c.pvlan))
        });
    }
}

/// Port mirroring: copies of the sources' frames go to the destination port.
#[derive(Default)]
pub struct Mirror {
    destination: Option<PortId>,
    sources: Vec<PortId>,
    direction: MirrorDirection,
}

impl SwitchExtension for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }
    fn class(&self) -> ExtensionClass {
        ExtensionClass::Forwarding
    }
    fn forward(
        &mut self,
        ctx: &Ingress<'_>,
        _ports: &dyn Ports,
        out: &mut Vec<PortId>,
        mirror: &mut Vec<PortId>,
    ) {
        let Some(dst) = self.destination else { return };
        if ctx.port == dst || mirror.contains(&dst) {
            return;
        }
        let ingress = self.direction != MirrorDirection::Egress && self.sources.contains(&ctx.port);
        let egress = self.direction != MirrorDirection::Ingress
            && out.iter().any(|p| self.sources.contains(p));
        if (ingress || egress) && !out.contains(&dst) {
            mirror.push(dst);
        }
    }
    fn reconfigure(&mut self, view: &SwitchView<'_>) {
        let id = |n: &String| {
            view.ports
                .iter()
                .find(|(_, c)| &c.name == n)
                .map(|(i, _)| *i)
        };
        self.destination = view.mirror.destination.as_ref().and_then(id);
        self.sources = view.mirror.sources.iter().filter_map(id).collect();
        self.direction = view.mirror.direction;
    }
}
