//! `vireo vm nic ...`: a VM's network adapters and their switch port settings.

use super::output;
use super::vm::OnOff;
use anyhow::{bail, Context};
use api::switch::*;
use api::{Client, NicModel};
use clap::{Subcommand, ValueEnum};

/// NIC model on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum ModelArg {
    /// Synthetic adapter (virtio-net), both generations.
    Virtio,
    /// Legacy adapter (Intel e1000), generation 1 only.
    E1000,
}

/// `vireo vm nic` commands.
#[derive(Subcommand)]
pub enum NicCommand {
    /// Add a network adapter (hot-plugged when the VM runs).
    Add {
        /// VM name.
        vm: String,
        /// NIC name (default: the first free nicN).
        #[arg(long)]
        name: Option<String>,
        /// Switch to connect to.
        #[arg(long)]
        switch: Option<String>,
        /// MAC address (default: a unique generated 52:54:00:xx:xx:xx).
        #[arg(long)]
        mac: Option<String>,
        /// Model (default virtio; e1000 only on generation 1).
        #[arg(long, value_enum)]
        model: Option<ModelArg>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a NIC's switch or port settings (applied live on a running VM).
    Set(NicSet),
    /// List a VM's NICs.
    List {
        /// VM name.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a NIC (hot-unplugged when the VM runs).
    Remove {
        /// VM name.
        vm: String,
        /// NIC name.
        nic: String,
    },
}

/// `vireo vm nic set`.
#[derive(clap::Args)]
pub struct NicSet {
    /// VM name.
    vm: String,
    /// NIC name.
    nic: String,
    /// Connect to (or move to) this switch; `none` disconnects.
    #[arg(long)]
    switch: Option<String>,
    /// Access port on this VLAN (untagged).
    #[arg(long, conflicts_with = "trunk")]
    vlan: Option<u16>,
    /// Trunk port carrying these VLANs tagged, e.g. 10,20 or 100-110.
    #[arg(long)]
    trunk: Option<String>,
    /// Native (untagged) VLAN of the trunk.
    #[arg(long, requires = "trunk")]
    native: Option<u16>,
    /// Drop DHCP server messages the VM sends.
    #[arg(long, value_enum)]
    dhcp_guard: Option<OnOff>,
    /// Drop router advertisements and redirects the VM sends.
    #[arg(long, value_enum)]
    router_guard: Option<OnOff>,
    /// Allow the VM to send from other MAC addresses (default off).
    #[arg(long, value_enum)]
    mac_spoofing: Option<OnOff>,
    /// Maximum bandwidth each direction, e.g. 100M, 1G; 0 removes the limit.
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Burst (token bucket depth) in bytes; 0 uses the default (100 ms).
    #[arg(long)]
    burst: Option<u64>,
    /// Minimum bandwidth weight 1-100 on a congested port; 0 removes it.
    #[arg(long)]
    min_weight: Option<u32>,
    /// Private VLAN role: isolated, community:ID or promiscuous.
    #[arg(long)]
    isolation: Option<String>,
    /// Addresses the VM may use (ARP/ND/IP spoofing guard), repeatable; `none` clears.
    #[arg(long)]
    allowed_ip: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn nic_path(vm: &str, nic: Option<&str>) -> String {
    match nic {
        Some(n) => format!("/v1/vms/{vm}/nics/{n}"),
        None => format!("/v1/vms/{vm}/nics"),
    }
}

/// Parses `isolated`, `community:ID`, `promiscuous`.
pub fn parse_isolation(s: &str) -> anyhow::Result<PvlanMode> {
    match s {
        "isolated" => Ok(PvlanMode::Isolated),
        "promiscuous" | "none" | "off" => Ok(PvlanMode::Promiscuous),
        _ => match s.strip_prefix("community:").map(str::parse::<u16>) {
            Some(Ok(id)) if (1..=4094).contains(&id) => Ok(PvlanMode::Community { id }),
            _ => bail!(
                "invalid --isolation {s:?}: use isolated, community:ID (1-4094) or promiscuous"
            ),
        },
    }
}

fn vlan_text(v: &VlanMode) -> String {
    match v {
        VlanMode::Access { vlan } => format!("access {vlan}"),
        VlanMode::Trunk { allowed, native } => {
            let mut s = format!("trunk {}", format_vlan_list(allowed));
            if let Some(n) = native {
                s.push_str(&format!(" native {n}"));
            }
            s
        }
    }
}

/// One line describing a NIC's port security and QoS.
pub fn security_text(p: &NicPort) -> String {
    let mut parts = Vec::new();
    if p.security.mac_spoofing {
        parts.push("mac-spoofing".to_string());
    }
    if p.security.dhcp_guard {
        parts.push("dhcp-guard".into());
    }
    if p.security.router_guard {
        parts.push("router-guard".into());
    }
    if !p.security.allowed_ips.is_empty() {
        let ips: Vec<String> = p
            .security
            .allowed_ips
            .iter()
            .map(|i| i.to_string())
            .collect();
        parts.push(format!("allowed-ip {}", ips.join(",")));
    }
    match p.pvlan {
        PvlanMode::Promiscuous => {}
        PvlanMode::Isolated => parts.push("isolated".into()),
        PvlanMode::Community { id } => parts.push(format!("community:{id}")),
    }
    if let Some(b) = p.qos.max_bps {
        parts.push(format!("max {}", format_bps(b)));
    }
    if let Some(w) = p.qos.min_weight {
        parts.push(format!("weight {w}"));
    }
    if !p.acl.is_empty() {
        parts.push(format!("{} acl rule(s)", p.acl.len()));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// `100000000` -> `100M`.
pub fn format_bps(b: u64) -> String {
    for (d, u) in [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")] {
        if b >= d && (b / d) * d == b {
            return format!("{}{u}", b / d);
        }
    }
    b.to_string()
}

fn print_nics(nics: &[NicInfo]) {
    let rows: Vec<Vec<String>> = nics
        .iter()
        .map(|n| {
            vec![
                n.nic.name.clone(),
                n.nic.mac.clone(),
                match n.nic.model {
                    NicModel::Virtio => "virtio".into(),
                    NicModel::E1000 => "e1000".into(),
                },
                n.nic.switch.clone().unwrap_or_else(|| "-".into()),
                if n.connected { "up" } else { "down" }.into(),
                vlan_text(&n.nic.port.vlan),
                security_text(&n.nic.port),
            ]
        })
        .collect();
    output::table(
        &["NIC", "MAC", "MODEL", "SWITCH", "LINK", "VLAN", "SETTINGS"],
        &rows,
    );
}

/// Runs a `vireo vm nic` command.
pub async fn run(client: &Client, cmd: NicCommand) -> anyhow::Result<()> {
    match cmd {
        NicCommand::Add {
            vm,
            name,
            switch,
            mac,
            model,
            json,
        } => {
            let req = AddNic {
                name,
                switch,
                mac,
                model: model.map(|m| match m {
                    ModelArg::Virtio => NicModel::Virtio,
                    ModelArg::E1000 => NicModel::E1000,
                }),
            };
            let n: NicInfo = client.post(&nic_path(&vm, None), &req).await?;
            if json {
                output::json(&n)?;
            } else {
                print_nics(&[n]);
            }
        }
        NicCommand::Set(s) => {
            let vlan = match (&s.trunk, s.vlan) {
                (Some(t), _) => {
                    let mut allowed = parse_vlan_list(t).with_context(|| {
                        format!("invalid --trunk {t:?} (use e.g. 10,20,100-110)")
                    })?;
                    if allowed.is_empty() {
                        bail!("--trunk needs at least one VLAN, e.g. --trunk 10,20");
                    }
                    if let Some(n) = s.native {
                        if !(1..=4094).contains(&n) {
                            bail!("--native {n} is outside 1-4094");
                        }
                        // The native VLAN is carried untagged: it belongs to the trunk.
                        allowed.insert(n);
                    }
                    Some(VlanMode::Trunk {
                        allowed,
                        native: s.native,
                    })
                }
                (None, Some(v)) => {
                    if !(1..=4094).contains(&v) {
                        bail!("--vlan {v} is outside 1-4094");
                    }
                    Some(VlanMode::Access { vlan: v })
                }
                (None, None) => None,
            };
            let allowed_ips = if s.allowed_ip.is_empty() {
                None
            } else if s.allowed_ip.iter().any(|a| a == "none") {
                Some(Vec::new())
            } else {
                let mut v = Vec::new();
                for a in &s.allowed_ip {
                    v.push(a.parse::<IpPrefix>().map_err(|e| {
                        anyhow::anyhow!("{e} in --allowed-ip (use e.g. 10.0.0.5 or 10.0.0.0/24)")
                    })?);
                }
                Some(v)
            };
            let max_bps = match &s.max_bandwidth {
                Some(b) => Some(parse_bandwidth(b).map_err(anyhow::Error::msg)?),
                None => None,
            };
            if let Some(w) = s.min_weight {
                if w > 100 {
                    bail!("--min-weight {w} is outside 1-100 (0 removes it)");
                }
            }
            let patch = NicPatch {
                switch: s.switch.clone(),
                vlan,
                pvlan: s.isolation.as_deref().map(parse_isolation).transpose()?,
                mac_spoofing: s.mac_spoofing.map(Into::into),
                dhcp_guard: s.dhcp_guard.map(Into::into),
                router_guard: s.router_guard.map(Into::into),
                allowed_ips,
                max_bps,
                burst_bytes: s.burst,
                min_weight: s.min_weight,
            };
            if patch == NicPatch::default() {
                bail!("nothing to change: give --switch, --vlan, --trunk, a guard, a bandwidth or --isolation (see --help)");
            }
            let n: NicInfo = client.patch(&nic_path(&s.vm, Some(&s.nic)), &patch).await?;
            if s.json {
                output::json(&n)?;
            } else {
                print_nics(&[n]);
            }
        }
        NicCommand::List { vm, json } => {
            let nics: Vec<NicInfo> = client.get(&nic_path(&vm, None)).await?;
            if json {
                output::json(&nics)?;
            } else if nics.is_empty() {
                println!(
                    "VM {vm} has no NICs (add one with `vireo vm nic add {vm} --switch NAME`)"
                );
            } else {
                print_nics(&nics);
            }
        }
        NicCommand::Remove { vm, nic } => {
            let _: serde_json::Value = client.delete(&nic_path(&vm, Some(&nic))).await?;
            println!("removed {vm}/{nic}");
        }
    }
    Ok(())
}
