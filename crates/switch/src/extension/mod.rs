//! The extension pipeline: an ordered list of capture, filter and forwarding extensions,
//! each a [`SwitchExtension`] trait object created by name from a [`Registry`] and enabled
//! per switch with its own JSON configuration.
//!
//! Like Hyper-V's extensible switch, a frame's ingress path runs capture extensions first,
//! then filters, then forwarding extensions; its egress path (once per output port) runs
//! them in the reverse order, so a capture extension sees frames exactly as they leave.
//!
//! ```text
//!  from port ──► [capture] ─► [filter…] ─► core: VLAN + FDB ─► [forwarding…] ─┐
//!                                                                               │ per output
//!  to port   ◄── [capture] ◄─ [filter…] ◄─ [forwarding…] ◄── core: tag/untag ◄─┘
//! ```
//!
//! The core (VLAN classification, FDB, VLAN membership of outputs) is not an extension:
//! no extension can make a frame leave a port outside its VLAN, except as a mirror copy.
//! All built-in features (guards, ACLs, QoS, PVLAN, mirror, capture) are extensions; see
//! [`builtin`].

use std::any::Any;
use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{ExtensionConfig, MirrorConfig, PortConfig};
use crate::counters::DropReason;
use crate::frame::Parsed;
use crate::PortId;

pub mod builtin;

/// Errors from building or configuring extensions.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionError {
    /// No extension is registered under this name.
    #[error("no extension named {0:?} is registered")]
    Unknown(String),
    /// The extension is listed twice.
    #[error("extension {0:?} is listed twice")]
    Duplicate(String),
    /// The extension refused its configuration.
    #[error("extension {name:?} refused its configuration: {reason}")]
    Config {
        /// Extension name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Where in the pipeline an extension sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtensionClass {
    /// Observes frames (first on ingress, last on egress); should not drop.
    Capture,
    /// May drop frames.
    Filter,
    /// May change the output port set and add mirror copies.
    Forwarding,
}

/// Outcome of a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Pass,
    /// Drop the frame, counting it under the reason.
    Drop(DropReason),
}

/// Time as the dataplane sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic nanoseconds (any origin).
    pub mono_ns: u64,
    /// Nanoseconds since the Unix epoch (for capture timestamps).
    pub unix_ns: u64,
}

/// A frame entering the switch.
#[derive(Debug, Clone, Copy)]
pub struct Ingress<'a> {
    /// Port it came from.
    pub port: PortId,
    /// That port's configuration.
    pub cfg: &'a PortConfig,
    /// The frame as received.
    pub frame: &'a [u8],
    /// Parsed fields.
    pub parsed: &'a Parsed,
    /// The VLAN the core classified it into.
    pub vlan: u16,
    /// Time.
    pub now: Now,
}

/// A frame about to leave through one port.
#[derive(Debug, Clone, Copy)]
pub struct Egress<'a> {
    /// Port it came from.
    pub from: PortId,
    /// Port it goes to.
    pub to: PortId,
    /// The output port's configuration.
    pub to_cfg: &'a PortConfig,
    /// The frame as it will be sent (tagged or not for this port).
    pub frame: &'a [u8],
    /// Parsed fields of the frame as received.
    pub parsed: &'a Parsed,
    /// Its VLAN.
    pub vlan: u16,
    /// Time.
    pub now: Now,
}

/// Read access to the switch's ports for forwarding extensions.
pub trait Ports {
    /// The configuration of a port, if it exists.
    fn get(&self, id: PortId) -> Option<&PortConfig>;
}

/// What an extension is told when ports or switch settings change.
#[derive(Debug)]
pub struct SwitchView<'a> {
    /// Every port with its id.
    pub ports: Vec<(PortId, &'a PortConfig)>,
    /// Mirror settings.
    pub mirror: &'a MirrorConfig,
}

/// A switch extension. All hooks have pass-through defaults; implement what you need.
pub trait SwitchExtension: Send {
    /// The name it is registered under.
    fn name(&self) -> &str;
    /// Its class (decides its place in the pipeline).
    fn class(&self) -> ExtensionClass;
    /// A frame entering from a port (after VLAN classification).
    fn ingress(&mut self, _ctx: &Ingress<'_>) -> Verdict {
        Verdict::Pass
    }
    /// Forwarding extensions: edit the output set `out` (removing is always honoured; ports
    /// added must be VLAN members or the core drops them) and add mirror copies to `mirror`.
    fn forward(
        &mut self,
        _ctx: &Ingress<'_>,
        _ports: &dyn Ports,
        _out: &mut Vec<PortId>,
        _mirror: &mut Vec<PortId>,
    ) {
    }
    /// A frame about to leave through a port.
    fn egress(&mut self, _ctx: &Egress<'_>) -> Verdict {
        Verdict::Pass
    }
    /// Ports or switch settings changed.
    fn reconfigure(&mut self, _view: &SwitchView<'_>) {}
    /// New extension configuration (from the control API).
    fn configure(&mut self, _config: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Status for `GET /extensions` (counters, active captures…).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Downcasting, for extensions with a typed control surface (capture).
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        None
    }
}

/// Builds an extension from its JSON configuration.
pub type Factory = fn(&serde_json::Value) -> Result<Box<dyn SwitchExtension>, String>;

/// Extensions by name.
#[derive(Clone, Default)]
pub struct Registry {
    factories: BTreeMap<String, Factory>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the built-in extensions.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        builtin::register(&mut r);
        r
    }

    /// Registers (or replaces) a factory.
    pub fn register(&mut self, name: &str, factory: Factory) {
        self.factories.insert(name.to_string(), factory);
    }

    /// Registered names.
    pub fn names(&self) -> Vec<String> {
        self.factories.keys().cloned().collect()
    }

    /// Builds the pipeline for a switch; an empty list means [`builtin::DEFAULT_PIPELINE`].
    pub fn build(&self, list: &[ExtensionConfig]) -> Result<Pipeline, ExtensionError> {
        let defaults: Vec<ExtensionConfig>;
        let list = if list.is_empty() {
            defaults = builtin::DEFAULT_PIPELINE
                .iter()
                .map(|n| ExtensionConfig {
                    name: n.to_string(),
                    enabled: true,
                    config: serde_json::Value::Null,
                })
                .collect();
            &defaults[..]
        } else {
            list
        };
        let mut stages: Vec<Stage> = Vec::new();
        for c in list {
            if stages.iter().any(|s| s.cfg.name == c.name) {
                return Err(ExtensionError::Duplicate(c.name.clone()));
            }
            let f = self
                .factories
                .get(&c.name)
                .ok_or_else(|| ExtensionError::Unknown(c.name.clone()))?;
            let ext = f(&c.config).map_err(|reason| ExtensionError::Config {
                name: c.name.clone(),
                reason,
            })?;
            stages.push(Stage {
                cfg: c.clone(),
                ext,
            });
        }
        stages.sort_by_key(|s| s.ext.class());
        Ok(Pipeline { stages })
    }
}

struct Stage {
    cfg: ExtensionConfig,
    ext: Box<dyn SwitchExtension>,
}

/// An extension as listed by the control API.
#[derive(Debug, Clone, Serialize)]
pub struct ExtensionInfo {
    /// Name.
    pub name: String,
    /// Class.
    pub class: ExtensionClass,
    /// Enabled.
    pub enabled: bool,
    /// Its configuration.
    pub config: serde_json::Value,
    /// Its status.
    pub status: serde_json::Value,
}

/// The ordered extensions of one switch.
#[derive(Default)]
pub struct Pipeline {
    stages: Vec<Stage>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.stages.iter().map(|s| &s.cfg.name))
            .finish()
    }
}

impl Pipeline {
    /// Runs ingress hooks in order; the first drop wins.
    pub fn ingress(&mut self, ctx: &Ingress<'_>) -> Verdict {
        for s in self.stages.iter_mut().filter(|s| s.cfg.enabled) {
            if let v @ Verdict::Drop(_) = s.ext.ingress(ctx) {
                return v;
            }
        }
        Verdict::Pass
    }

    /// Runs forwarding hooks in order.
    pub fn forward(
        &mut self,
        ctx: &Ingress<'_>,
        ports: &dyn Ports,
        out: &mut Vec<PortId>,
        mirror: &mut Vec<PortId>,
    ) {
        for s in self.stages.iter_mut().filter(|s| s.cfg.enabled) {
            s.ext.forward(ctx, ports, out, mirror);
        }
    }

    /// Runs egress hooks in reverse order; the first drop wins.
    pub fn egress(&mut self, ctx: &Egress<'_>) -> Verdict {
        for s in self.stages.iter_mut().rev().filter(|s| s.cfg.enabled) {
            if let v @ Verdict::Drop(_) = s.ext.egress(ctx) {
                return v;
            }
        }
        Verdict::Pass
    }

    /// Tells every extension about a configuration change.
    pub fn reconfigure(&mut self, view: &SwitchView<'_>) {
        for s in &mut self.stages {
            s.ext.reconfigure(view);
        }
    }

    /// Enables or disables an extension and optionally gives it a new configuration.
    pub fn set(
        &mut self,
        name: &str,
        enabled: Option<bool>,
        config: Option<serde_json::Value>,
    ) -> Result<(), ExtensionError> {
        let s = self
            .stages
            .iter_mut()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| ExtensionError::Unknown(name.to_string()))?;
        if let Some(c) = config {
            s.ext
                .configure(&c)
                .map_err(|reason| ExtensionError::Config {
                    name: name.to_string(),
                    reason,
                })?;
            s.cfg.config = c;
        }
        if let Some(e) = enabled {
            s.cfg.enabled = e;
        }
        Ok(())
    }

    /// The extension named `name`, downcast to `T`.
    pub fn get_mut<T: 'static>(&mut self, name: &str) -> Option<&mut T> {
        self.stages
            .iter_mut()
            .find(|s| s.cfg.name == name)?
            .ext
            .as_any_mut()?
            .downcast_mut::<T>()
    }

    /// The configuration list (for persisting).
    pub fn configs(&self) -> Vec<ExtensionConfig> {
        self.stages.iter().map(|s| s.cfg.clone()).collect()
    }

    /// Extensions with status, in pipeline order.
    pub fn list(&self) -> Vec<ExtensionInfo> {
        self.stages
            .iter()
            .map(|s| ExtensionInfo {
                name: s.cfg.name.clone(),
                class: s.ext.class(),
                enabled: s.cfg.enabled,
                config: s.cfg.config.clone(),
                status: s.ext.status(),
            })
            .collect()
    }
}
