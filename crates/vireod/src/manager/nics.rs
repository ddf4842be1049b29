//! VM NICs and their switch ports: `vireo vm nic ...` and the VM-aware side of
//! `vireo switch ...`.
//!
//! A NIC's port settings live in the VM's configuration ([`api::switch::NicPort`]). While a
//! VM runs, every NIC is a `-netdev stream,server=on` socket in its run directory, connected
//! or not. [`Manager::reconcile_switches`] makes each switch's VM ports match the running
//! VMs: it adds a port (the switch connects to QEMU's socket), replaces one whose settings
//! changed (live, the link stays up), and removes ports of NICs that stopped, moved or were
//! removed. It runs after every change and on every supervision pass, so a vireod restart, a
//! respawned switch or a VM that powered itself off all converge without extra code.
//!
//! Mirroring is kept by vireod in `VM/NIC` terms and pushed to the switch with the ports.

use super::{lock, Manager};
use crate::error::{ApiError, ApiResult};
use api::switch::*;
use api::{Generation, NicModel, NicSpec, VmSpec, VmState};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use uuid::Uuid;

/// A desired VM port: its switch, `VM/NIC` and configuration.
struct Wanted {
    switch: String,
    label: String,
    cfg: PortConfig,
}

fn gen_mac(taken: &BTreeSet<String>) -> String {
    // 52:54:00 is QEMU's OUI; the rest random (from the clock and a counter) and unique.
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    loop {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut x = t
            ^ SEQ
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(std::process::id()) << 32;
        // splitmix64 finaliser
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let m = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (x >> 16) as u8,
            (x >> 8) as u8,
            x as u8
        );
        if !taken.contains(&m) {
            return m;
        }
    }
}

/// The switch-side configuration of a VM NIC.
fn port_config(vm: &str, run_dir: &std::path::Path, nic: &NicSpec) -> PortConfig {
    let mut p = PortConfig::new(
        &port_name(vm, &nic.name),
        Backend::StreamConnect {
            path: nic_socket(run_dir, &nic.name)
                .to_string_lossy()
                .into_owned(),
        },
    );
    p.mac = nic.mac.parse().ok();
    p.vlan = nic.port.vlan.clone();
    p.pvlan = nic.port.pvlan;
    p.security = nic.port.security.clone();
    p.acl = nic.port.acl.clone();
    p.qos = nic.port.qos;
    p
}

/// Splits `VM/NIC`.
fn split_port(port: &str) -> ApiResult<(&str, &str)> {
    port.split_once('/').ok_or_else(|| {
        ApiError::invalid(format!(
            "invalid port {port:?}: name a VM NIC as VM/NIC, e.g. web1/nic0 (see `vireo vm nic list VM`)"
        ))
    })
}

fn switch_err(sw: &str, e: api::ClientError) -> ApiError {
    match e {
        api::ClientError::Api { body, .. } => ApiError {
            kind: body.kind,
            message: format!("switch {sw}: {}", body.error),
        },
        other => ApiError::failed(format!(
            "switch {sw} did not answer ({other}); vireod restarts a dead switch within a second, try again"
        )),
    }
}

impl Manager {
    pub(super) fn vm_by_name(&self, name: &str) -> ApiResult<(Uuid, VmSpec)> {
        let (uuid, _) = self.find(name)?;
        Ok((uuid, self.spec(&uuid)?))
    }

    pub(super) fn save_spec(&self, uuid: &Uuid, spec: VmSpec) -> ApiResult<()> {
        api::validate::check_spec(&spec, &|p| p.is_file())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        self.store.save(&spec)?;
        if let Some(e) = lock(&self.vms).get_mut(uuid) {
            e.spec = spec;
        }
        Ok(())
    }

    /// Whether a VM has (or is about to have) a QEMU whose NIC sockets the switches use.
    fn nics_live(&self, uuid: &Uuid) -> bool {
        let starting = lock(&self.vms)
            .get(uuid)
            .is_some_and(|e| e.transient == Some(VmState::Starting));
        starting || self.qemu_pid(uuid).is_some()
    }

    async fn port_up(&self, switch: &str, port: &str) -> bool {
        if self.switches.pid(switch).is_none() {
            return false;
        }
        self.switches
            .client(switch)
            .get::<SwitchPortStatus>(&format!("/v1/ports/{port}"))
            .await
            .map(|p| p.up)
            .unwrap_or(false)
    }

    fn nic_info(&self, vm: &str, nic: NicSpec, connected: bool) -> NicInfo {
        NicInfo {
            vm: vm.to_string(),
            nic,
            connected,
        }
    }

    /// The NICs of a VM.
    pub async fn nic_list(&self, vm: &str) -> ApiResult<Vec<NicInfo>> {
        let (uuid, spec) = self.vm_by_name(vm)?;
        let live = self.qemu_pid(&uuid).is_some();
        let mut out = Vec::new();
        for n in spec.nics {
            let connected = match (&n.switch, live) {
                (Some(sw), true) => self.port_up(sw, &port_name(vm, &n.name)).await,
                _ => false,
            };
            out.push(self.nic_info(vm, n, connected));
        }
        Ok(out)
    }

    /// Adds a NIC (hot-plugs it into a running VM).
    pub async fn nic_add(&self, vm: &str, req: AddNic) -> ApiResult<NicInfo> {
        let (uuid, op) = self.find(vm)?;
        let _g = op.lock().await;
        let mut spec = self.spec(&uuid)?;
        let name = match req.name {
            Some(n) => n,
            None => (0..)
                .map(|i| format!("nic{i}"))
                .find(|n| !spec.nics.iter().any(|x| &x.name == n))
                .unwrap_or_else(|| "nic0".into()),
        };
        check_nic_name(&name).map_err(ApiError::invalid)?;
        if spec.nics.iter().any(|n| n.name == name) {
            return Err(ApiError::conflict(format!(
                "VM {vm} already has a NIC named {name} (see `vireo vm nic list {vm}`)"
            )));
        }
        let model = req.model.unwrap_or(NicModel::Virtio);
        if model == NicModel::E1000 && spec.generation == Generation::Gen2 {
            return Err(ApiError::invalid(format!(
                "generation 2 VMs have no legacy network adapter (e1000): use --model virtio for {vm}/{name}"
            )));
        }
        if let Some(sw) = &req.switch {
            self.switches.spec(sw)?;
        }
        let taken: BTreeSet<String> = lock(&self.vms)
            .values()
            .flat_map(|e| e.spec.nics.iter().map(|n| n.mac.to_ascii_lowercase()))
            .collect();
        let mac = match req.mac {
            Some(m) => {
                let m = m.to_ascii_lowercase();
                api::validate::check_mac(&m)
                    .map_err(|e| ApiError::invalid(format!("invalid MAC {m:?}: {e}")))?;
                if taken.contains(&m) {
                    return Err(ApiError::conflict(format!(
                        "MAC {m} is already used by another NIC on this host; leave --mac out to get a unique one"
                    )));
                }
                m
            }
            None => gen_mac(&taken),
        };
        let nic = NicSpec {
            name: name.clone(),
            mac,
            model,
            switch: req.switch,
            port: NicPort::default(),
        };
        spec.nics.push(nic.clone());
        api::validate::check_spec(&spec, &|p| p.is_file())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        if self.qemu_pid(&uuid).is_some() {
            let client = self.running_worker(vm, &uuid).await?;
            let req = NicHotplug {
                id: name.clone(),
                mac: nic.mac.clone(),
                model,
                generation: spec.generation.into(),
                socket: nic_socket(&self.run_dir(&uuid), &name),
            };
            client
                .with_timeout(Duration::from_secs(30))
                .post::<_, serde_json::Value>("/nics", &req)
                .await?;
        }
        self.save_spec(&uuid, spec)?;
        drop(_g);
        self.reconcile_switches().await;
        let connected = match &nic.switch {
            Some(sw) if self.qemu_pid(&uuid).is_some() => {
                self.wait_up(sw, &port_name(vm, &name)).await
            }
            _ => false,
        };
        Ok(self.nic_info(vm, nic, connected))
    }

    async fn wait_up(&self, sw: &str, port: &str) -> bool {
        for _ in 0..40 {
            if self.port_up(sw, port).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Changes a NIC's switch or port settings; a running VM gets them at once.
    pub async fn nic_set(&self, vm: &str, nic: &str, p: NicPatch) -> ApiResult<NicInfo> {
        let (uuid, op) = self.find(vm)?;
        let _g = op.lock().await;
        let mut spec = self.spec(&uuid)?;
        let n = spec
            .nics
            .iter_mut()
            .find(|n| n.name == nic)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "VM {vm} has no NIC {nic:?} (see `vireo vm nic list {vm}`)"
                ))
            })?;
        if let Some(sw) = &p.switch {
            if sw.is_empty() || sw == "none" {
                n.switch = None;
            } else {
                self.switches.spec(sw)?;
                n.switch = Some(sw.clone());
            }
        }
        if let Some(v) = p.vlan {
            n.port.vlan = v;
        }
        if let Some(v) = p.pvlan {
            n.port.pvlan = v;
        }
        if let Some(v) = p.mac_spoofing {
            n.port.security.mac_spoofing = v;
        }
        if let Some(v) = p.dhcp_guard {
            n.port.security.dhcp_guard = v;
        }
        if let Some(v) = p.router_guard {
            n.port.security.router_guard = v;
        }
        if let Some(v) = p.allowed_ips {
            n.port.security.allowed_ips = v;
        }
        if let Some(v) = p.max_bps {
            n.port.qos.max_bps = (v > 0).then_some(v);
        }
        if let Some(v) = p.burst_bytes {
            n.port.qos.burst_bytes = (v > 0).then_some(v);
        }
        if let Some(v) = p.min_weight {
            n.port.qos.min_weight = (v > 0).then_some(v);
        }
        let cfg = port_config(vm, &self.run_dir(&uuid), n);
        cfg.validate()
            .map_err(|e| ApiError::invalid(format!("invalid port settings for {vm}/{nic}: {e}")))?;
        let n = n.clone();
        self.save_spec(&uuid, spec)?;
        drop(_g);
        self.reconcile_switches().await;
        let connected = match &n.switch {
            Some(sw) if self.qemu_pid(&uuid).is_some() => {
                self.wait_up(sw, &port_name(vm, nic)).await
            }
            _ => false,
        };
        Ok(self.nic_info(vm, n, connected))
    }

    /// Removes a NIC (hot-unplugs it from a running VM).
    pub async fn nic_remove(&self, vm: &str, nic: &str) -> ApiResult<()> {
        let (uuid, op) = self.find(vm)?;
        let _g = op.lock().await;
        let mut spec = self.spec(&uuid)?;
        let before = spec.nics.len();
        spec.nics.retain(|n| n.name != nic);
        if spec.nics.len() == before {
            return Err(ApiError::not_found(format!(
                "VM {vm} has no NIC {nic:?} (see `vireo vm nic list {vm}`)"
            )));
        }
        if self.qemu_pid(&uuid).is_some() {
            let client = self.running_worker(vm, &uuid).await?;
            client
                .with_timeout(Duration::from_secs(30))
                .delete::<serde_json::Value>(&format!("/nics/{nic}"))
                .await?;
        }
        self.save_spec(&uuid, spec)?;
        drop(_g);
        self.reconcile_switches().await;
        Ok(())
    }

    /// Every VM NIC configured on each switch: `switch -> [(VM/NIC)]`.
    fn nics_by_switch(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in lock(&self.vms).values() {
            for n in &e.spec.nics {
                if let Some(sw) = &n.switch {
                    out.entry(sw.clone())
                        .or_default()
                        .push(format!("{}/{}", e.spec.name, n.name));
                }
            }
        }
        out
    }

    /// `VM.NIC` port names to `VM/NIC` labels.
    fn port_labels(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for e in lock(&self.vms).values() {
            for n in &e.spec.nics {
                out.insert(
                    port_name(&e.spec.name, &n.name),
                    format!("{}/{}", e.spec.name, n.name),
                );
            }
        }
        out
    }

    /// The ports every switch should have now.
    fn wanted_ports(&self) -> Vec<Wanted> {
        let vms: Vec<(Uuid, VmSpec)> = lock(&self.vms)
            .iter()
            .map(|(u, e)| (*u, e.spec.clone()))
            .collect();
        let mut out = Vec::new();
        for (uuid, spec) in vms {
            if !self.nics_live(&uuid) {
                continue;
            }
            let run_dir = self.run_dir(&uuid);
            for n in &spec.nics {
                if let Some(sw) = &n.switch {
                    out.push(Wanted {
                        switch: sw.clone(),
                        label: format!("{}/{}", spec.name, n.name),
                        cfg: port_config(&spec.name, &run_dir, n),
                    });
                }
            }
        }
        out
    }

    /// Makes every running switch's VM ports and mirror match the VMs' configurations.
    pub async fn reconcile_switches(&self) {
        let _sync = self.switches.sync.lock().await;
        let wanted = self.wanted_ports();
        let mut current: BTreeMap<String, Vec<SwitchPortStatus>> = BTreeMap::new();
        for spec in self.switches.specs() {
            if self.switches.pid(&spec.name).is_none() {
                continue;
            }
            match self
                .switches
                .client(&spec.name)
                .get::<Vec<SwitchPortStatus>>("/v1/ports")
                .await
            {
                Ok(p) => {
                    current.insert(spec.name.clone(), p);
                }
                Err(e) => tracing::debug!(switch = %spec.name, "listing ports: {e}"),
            }
        }
        // Removals first, everywhere: a NIC moving between switches is let go by the old
        // switch before the new one connects.
        for (sw, ports) in &current {
            let client = self.switches.client(sw);
            for p in ports.iter().filter(|p| p.config.role == PortRole::Vm) {
                let keep = wanted
                    .iter()
                    .any(|w| &w.switch == sw && w.cfg.name == p.config.name);
                if !keep {
                    match client
                        .delete::<serde_json::Value>(&format!("/v1/ports/{}", p.config.name))
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(switch = %sw, port = %p.config.name, "port removed")
                        }
                        Err(e) => {
                            tracing::warn!(switch = %sw, port = %p.config.name, "removing port: {e}")
                        }
                    }
                }
            }
        }
        for w in &wanted {
            let Some(ports) = current.get(&w.switch) else {
                continue;
            };
            let client = self.switches.client(&w.switch);
            let existing = ports.iter().find(|p| p.config.name == w.cfg.name);
            let r = match existing {
                Some(p) if p.config == w.cfg => continue,
                Some(_) => client
                    .put::<_, serde_json::Value>(&format!("/v1/ports/{}", w.cfg.name), &w.cfg)
                    .await
                    .map(|_| "updated"),
                None => client
                    .post::<_, serde_json::Value>("/v1/ports", &w.cfg)
                    .await
                    .map(|_| "added"),
            };
            match r {
                Ok(what) => tracing::info!(switch = %w.switch, port = %w.label, "port {what}"),
                Err(e) => {
                    tracing::warn!(switch = %w.switch, port = %w.label, "configuring port: {e}")
                }
            }
        }
        // Mirroring, by the ports that exist now.
        for spec in self.switches.specs() {
            if !current.contains_key(&spec.name) {
                continue;
            }
            let client = self.switches.client(&spec.name);
            let Ok(ports) = client.get::<Vec<SwitchPortStatus>>("/v1/ports").await else {
                continue;
            };
            let names: BTreeSet<String> = ports.into_iter().map(|p| p.config.name).collect();
            let resolve = |label: &str| -> Option<String> {
                let n = label.replace('/', ".");
                names.contains(&n).then_some(n)
            };
            let want = match &spec.mirror {
                Some(m) => match resolve(&m.destination) {
                    Some(dest) => MirrorConfig {
                        destination: Some(dest),
                        sources: m.sources.iter().filter_map(|s| resolve(s)).collect(),
                        direction: m.direction,
                    },
                    None => MirrorConfig::default(),
                },
                None => MirrorConfig::default(),
            };
            let have = client.get::<MirrorConfig>("/v1/mirror").await;
            if have.as_ref().ok() != Some(&want) {
                if let Err(e) = client
                    .put::<_, serde_json::Value>("/v1/mirror", &want)
                    .await
                {
                    tracing::warn!(switch = %spec.name, "setting the mirror: {e}");
                }
            }
        }
    }

    /// Supervision: respawns dead switches and converges ports.
    pub async fn supervise_switches(&self) {
        {
            let _sync = self.switches.sync.lock().await;
            self.switches.supervise().await;
        }
        self.reconcile_switches().await;
    }

    /// Creates a switch.
    pub async fn switch_create(&self, req: CreateSwitch) -> ApiResult<SwitchInfo> {
        let name = req.name.clone();
        self.switches.create(req).await?;
        self.switch_show(&name).await
    }

    /// All switches.
    pub async fn switch_list(&self) -> ApiResult<Vec<SwitchInfo>> {
        let mut out = Vec::new();
        for s in self.switches.specs() {
            out.push(self.switch_show(&s.name).await?);
        }
        Ok(out)
    }

    async fn switch_ports(&self, name: &str) -> ApiResult<Vec<SwitchPortInfo>> {
        if self.switches.pid(name).is_none() {
            return Ok(Vec::new());
        }
        let ports: Vec<SwitchPortStatus> = self
            .switches
            .client(name)
            .get("/v1/ports")
            .await
            .map_err(|e| switch_err(name, e))?;
        let labels = self.port_labels();
        Ok(ports
            .into_iter()
            .map(|p| SwitchPortInfo {
                port: labels
                    .get(&p.config.name)
                    .cloned()
                    .unwrap_or_else(|| p.config.name.clone()),
                switch_port: p.config.name,
                role: p.config.role,
                up: p.up,
                mac: p.config.mac,
                vlan: p.config.vlan,
                counters: p.counters,
            })
            .collect())
    }

    /// One switch.
    pub async fn switch_show(&self, name: &str) -> ApiResult<SwitchInfo> {
        let spec = self.switches.spec(name)?;
        let pid = self.switches.pid(name);
        let host_interface = (spec.switch_type == SwitchType::Internal || spec.share_host)
            .then(|| host_ifname(name));
        Ok(SwitchInfo {
            ports: self.switch_ports(name).await.unwrap_or_default(),
            nics: self.nics_by_switch().remove(name).unwrap_or_default(),
            name: spec.name,
            switch_type: spec.switch_type,
            uplink: spec.uplink,
            host_vlan: spec.host_vlan,
            share_host: spec.share_host,
            host_interface,
            state: if pid.is_some() {
                SwitchState::Running
            } else {
                SwitchState::Down
            },
            pid,
            restarts: self.switches.restarts(name),
            mirror: spec.mirror,
        })
    }

    /// Deletes a switch that no NIC uses.
    pub async fn switch_delete(&self, name: &str) -> ApiResult<()> {
        self.switches.spec(name)?;
        if let Some(nics) = self.nics_by_switch().remove(name) {
            let first = nics.first().cloned().unwrap_or_default();
            let (vm, nic) = first.split_once('/').unwrap_or((&first, ""));
            return Err(ApiError::wrong_state(format!(
                "switch {name} still has NICs connected: {}; disconnect them first (`vireo vm nic set {vm} {nic} --switch none` or `vireo vm nic remove {vm} {nic}`)",
                nics.join(", ")
            )));
        }
        let _sync = self.switches.sync.lock().await;
        self.switches.delete(name).await
    }

    /// Counters of every port and the extensions' status.
    pub async fn switch_stats(&self, name: &str) -> ApiResult<SwitchStats> {
        self.switches.spec(name)?;
        if self.switches.pid(name).is_none() {
            return Err(ApiError::failed(format!(
                "switch {name} is not running; vireod restarts it within a second, try again"
            )));
        }
        let ports = self.switch_ports(name).await?;
        let extensions = self
            .switches
            .client(name)
            .get::<serde_json::Value>("/v1/extensions")
            .await
            .map_err(|e| switch_err(name, e))?;
        let mut drops = BTreeMap::new();
        for p in &ports {
            for (reason, n) in &p.counters.drops {
                let key = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("{reason:?}"));
                *drops.entry(key).or_insert(0) += n;
            }
        }
        Ok(SwitchStats {
            name: name.to_string(),
            ports,
            drops,
            extensions,
        })
    }

    /// Finds the VM NIC `VM/NIC` on switch `sw`.
    fn nic_on_switch(&self, sw: &str, port: &str) -> ApiResult<(Uuid, String)> {
        self.switches.spec(sw)?;
        let (vm, nic) = split_port(port)?;
        let (uuid, spec) = self.vm_by_name(vm)?;
        let n = spec.nics.iter().find(|n| n.name == nic).ok_or_else(|| {
            ApiError::not_found(format!(
                "VM {vm} has no NIC {nic:?} (see `vireo vm nic list {vm}`)"
            ))
        })?;
        if n.switch.as_deref() != Some(sw) {
            return Err(ApiError::invalid(format!(
                "{port} is not on switch {sw} (connect it with `vireo vm nic set {vm} {nic} --switch {sw}`)"
            )));
        }
        Ok((uuid, nic.to_string()))
    }

    async fn edit_acl(
        &self,
        sw: &str,
        port: &str,
        f: impl FnOnce(&mut Vec<AclRule>) -> ApiResult<()>,
    ) -> ApiResult<PortAcl> {
        let (uuid, nic) = self.nic_on_switch(sw, port)?;
        let op = lock(&self.vms)
            .get(&uuid)
            .map(|e| e.op_lock.clone())
            .ok_or_else(|| ApiError::not_found("the VM was deleted"))?;
        let g = op.lock().await;
        let mut spec = self.spec(&uuid)?;
        let vm = spec.name.clone();
        let n = spec
            .nics
            .iter_mut()
            .find(|n| n.name == nic)
            .ok_or_else(|| ApiError::not_found("the NIC was removed"))?;
        f(&mut n.port.acl)?;
        port_config(&vm, &self.run_dir(&uuid), n)
            .validate()
            .map_err(|e| ApiError::invalid(format!("invalid ACL rule: {e}")))?;
        let rules = n.port.acl.clone();
        self.save_spec(&uuid, spec)?;
        drop(g);
        self.reconcile_switches().await;
        Ok(PortAcl {
            port: port.to_string(),
            rules,
        })
    }

    /// Appends an ACL rule to a port.
    pub async fn switch_acl_add(&self, sw: &str, req: AclAdd) -> ApiResult<PortAcl> {
        let rule = req.rule;
        self.edit_acl(sw, &req.port, move |acl| {
            acl.push(rule);
            Ok(())
        })
        .await
    }

    /// Removes one or every ACL rule of a port.
    pub async fn switch_acl_remove(&self, sw: &str, req: AclRemove) -> ApiResult<PortAcl> {
        let port = req.port.clone();
        self.edit_acl(sw, &req.port, move |acl| match req.index {
            None => {
                acl.clear();
                Ok(())
            }
            Some(i) if i < acl.len() => {
                acl.remove(i);
                Ok(())
            }
            Some(i) => Err(ApiError::not_found(format!(
                "{port} has no ACL rule {i} (see `vireo switch acl list`)"
            ))),
        })
        .await
    }

    /// The ACLs of every VM port on a switch.
    pub fn switch_acl_list(&self, sw: &str) -> ApiResult<Vec<PortAcl>> {
        self.switches.spec(sw)?;
        let mut out = Vec::new();
        for e in lock(&self.vms).values() {
            for n in &e.spec.nics {
                if n.switch.as_deref() == Some(sw) {
                    out.push(PortAcl {
                        port: format!("{}/{}", e.spec.name, n.name),
                        rules: n.port.acl.clone(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.port.cmp(&b.port));
        Ok(out)
    }

    /// Sets (or with `None` clears) port mirroring.
    pub async fn switch_mirror(&self, sw: &str, m: MirrorRequest) -> ApiResult<SwitchInfo> {
        let mut spec = self.switches.spec(sw)?;
        if let Some(m) = &m {
            if m.sources.is_empty() {
                return Err(ApiError::invalid(
                    "name at least one source port: --from VM/NIC",
                ));
            }
            for p in m.sources.iter().chain(std::iter::once(&m.destination)) {
                if p == "host" || p == "uplink" {
                    continue;
                }
                self.nic_on_switch(sw, p)?;
            }
            if m.sources.contains(&m.destination) {
                return Err(ApiError::invalid(
                    "the mirror destination cannot also be a source",
                ));
            }
        }
        spec.mirror = m;
        self.switches.save_spec(spec)?;
        self.reconcile_switches().await;
        self.switch_show(sw).await
    }

    fn switch_port_of(&self, sw: &str, port: &str) -> ApiResult<String> {
        if port == "host" || port == "uplink" {
            self.switches.spec(sw)?;
            return Ok(port.to_string());
        }
        self.nic_on_switch(sw, port)?;
        Ok(port.replace('/', "."))
    }

    /// Starts a live capture of a port to a pcap file.
    pub async fn switch_capture_start(
        &self,
        sw: &str,
        req: CaptureRequest,
    ) -> ApiResult<CaptureInfo> {
        let p = self.switch_port_of(sw, &req.port)?;
        if !req.path.is_absolute() {
            return Err(ApiError::invalid("the capture file path must be absolute"));
        }
        let _: serde_json::Value = self
            .switches
            .client(sw)
            .post(
                &format!("/v1/ports/{p}/capture"),
                &serde_json::json!({ "path": req.path }),
            )
            .await
            .map_err(|e| switch_err(sw, e))?;
        Ok(CaptureInfo {
            port: req.port,
            frames: None,
        })
    }

    /// Stops a capture; answers the frames written.
    pub async fn switch_capture_stop(&self, sw: &str, port: &str) -> ApiResult<CaptureInfo> {
        let p = self.switch_port_of(sw, port)?;
        let v: serde_json::Value = self
            .switches
            .client(sw)
            .delete(&format!("/v1/ports/{p}/capture"))
            .await
            .map_err(|e| switch_err(sw, e))?;
        Ok(CaptureInfo {
            port: port.to_string(),
            frames: v.get("frames").and_then(|f| f.as_u64()),
        })
    }
}
