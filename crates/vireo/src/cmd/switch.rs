//! `vireo switch ...`: virtual switches, port ACLs, mirroring, live capture and counters.
//! Ports are named `VM/NIC` (e.g. `web1/nic0`); `host` and `uplink` name the built-in ports.

use super::output;
use anyhow::{bail, Context};
use api::switch::*;
use api::Client;
use clap::{Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Switch type on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum TypeArg {
    /// VMs only.
    Private,
    /// VMs and the host (a TAP interface vsw-NAME).
    Internal,
    /// VMs and a host interface (--uplink).
    External,
}

/// ACL action.
#[derive(Clone, Copy, ValueEnum)]
pub enum ActionArg {
    /// Let matching frames pass.
    Allow,
    /// Drop matching frames.
    Deny,
}

/// ACL direction (seen from the VM).
#[derive(Clone, Copy, ValueEnum)]
pub enum DirectionArg {
    /// Frames delivered to the VM.
    In,
    /// Frames the VM sends.
    Out,
    /// Both.
    Both,
}

/// Mirror direction.
#[derive(Clone, Copy, ValueEnum)]
pub enum MirrorDirArg {
    /// Frames the source ports send.
    Ingress,
    /// Frames delivered to the source ports.
    Egress,
    /// Both.
    Both,
}

/// `vireo switch` commands.
#[derive(Subcommand)]
pub enum SwitchCommand {
    /// Create a switch (starts its vireo-switch process).
    New {
        /// Name.
        name: String,
        /// private, internal or external.
        #[arg(long = "type", value_enum)]
        switch_type: TypeArg,
        /// Host interface of an external switch.
        #[arg(long)]
        uplink: Option<String>,
        /// VLAN of the host interface (internal, or external with --share-host).
        #[arg(long)]
        host_vlan: Option<u16>,
        /// External: also give the host a vsw-NAME interface on the switch.
        #[arg(long)]
        share_host: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List switches.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a switch with its ports.
    Show {
        /// Name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a switch (refused while NICs are connected to it).
    Delete {
        /// Name.
        name: String,
    },
    /// Port ACLs.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Mirror ports' traffic to another port.
    Mirror {
        /// Switch.
        name: String,
        /// Source ports (VM/NIC, host, uplink).
        #[arg(long, num_args = 1.., required_unless_present = "off")]
        from: Vec<String>,
        /// Destination port.
        #[arg(long, required_unless_present = "off")]
        to: Option<String>,
        /// Direction copied.
        #[arg(long, value_enum, default_value = "both")]
        direction: MirrorDirArg,
        /// Turn mirroring off.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        off: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Capture a port's traffic to a pcap file (until --count frames, --duration or Ctrl-C).
    Capture {
        /// Switch.
        name: String,
        /// Port (VM/NIC, host, uplink).
        port: String,
        /// pcap file to write.
        file: PathBuf,
        /// Stop after this many frames (the file holds exactly this many).
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Per-port counters and drops by reason.
    Stats {
        /// Switch.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `vireo switch acl` commands.
#[derive(Subcommand)]
pub enum AclCommand {
    /// Append a rule to a port's ACL (most specific rule wins; deny wins ties).
    Add {
        /// Switch.
        name: String,
        /// Port (VM/NIC).
        port: String,
        /// allow or deny.
        #[arg(long, value_enum)]
        action: ActionArg,
        /// in, out or both (seen from the VM).
        #[arg(long, value_enum, default_value = "both")]
        direction: DirectionArg,
        /// Remote IP prefix, e.g. 10.0.0.0/8.
        #[arg(long, required_unless_present = "remote_mac")]
        remote: Option<String>,
        /// Remote MAC address.
        #[arg(long, conflicts_with = "remote")]
        remote_mac: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the ACLs of the switch's VM ports.
    List {
        /// Switch.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a port's rules (all, or --index N).
    Remove {
        /// Switch.
        name: String,
        /// Port (VM/NIC).
        port: String,
        /// Rule index as `acl list` shows it.
        #[arg(long)]
        index: Option<usize>,
    },
}

fn type_name(t: SwitchType) -> &'static str {
    match t {
        SwitchType::Private => "private",
        SwitchType::Internal => "internal",
        SwitchType::External => "external",
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

fn drops_text(c: &PortCounters) -> String {
    let parts: Vec<String> = c
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| {
            let r = serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{r}={n}")
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn print_switch(s: &SwitchInfo) {
    let mut items = vec![
        ("name", s.name.clone()),
        ("type", type_name(s.switch_type).into()),
        (
            "state",
            match s.state {
                SwitchState::Running => format!("running (pid {})", s.pid.unwrap_or(0)),
                SwitchState::Down => "down (vireod restarts it)".into(),
            },
        ),
    ];
    if let Some(u) = &s.uplink {
        items.push(("uplink", u.clone()));
    }
    if let Some(h) = &s.host_interface {
        items.push((
            "host interface",
            format!("{h} (VLAN {})", s.host_vlan.unwrap_or(1)),
        ));
    }
    if let Some(m) = &s.mirror {
        items.push((
            "mirror",
            format!("{} -> {}", m.sources.join(","), m.destination),
        ));
    }
    items.push(("restarts", s.restarts.to_string()));
    items.push((
        "nics",
        if s.nics.is_empty() {
            "-".into()
        } else {
            s.nics.join(", ")
        },
    ));
    output::fields(&items);
    if !s.ports.is_empty() {
        println!();
        print_ports(&s.ports);
    }
}

fn print_ports(ports: &[SwitchPortInfo]) {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            vec![
                p.port.clone(),
                if p.up { "up" } else { "down" }.into(),
                vlan_text(&p.vlan),
                p.counters.rx_packets.to_string(),
                p.counters.tx_packets.to_string(),
                drops_text(&p.counters),
            ]
        })
        .collect();
    output::table(&["PORT", "LINK", "VLAN", "RX", "TX", "DROPS"], &rows);
}

/// Records in a pcap file (complete ones only).
fn pcap_records(path: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    let data = std::fs::read(path)?;
    if data.len() < 24 {
        return Ok(Vec::new());
    }
    let le = matches!(
        &data[..4],
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]
    );
    let mut out = Vec::new();
    let mut off = 24usize;
    while off + 16 <= data.len() {
        let b = [data[off + 8], data[off + 9], data[off + 10], data[off + 11]];
        let len = if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        } as usize;
        let end = off + 16 + len;
        if end > data.len() {
            break;
        }
        out.push((off as u64, end as u64));
        off = end;
    }
    Ok(out)
}

async fn capture(
    client: &Client,
    name: &str,
    port: &str,
    file: PathBuf,
    count: Option<u64>,
    duration: Option<u64>,
) -> anyhow::Result<()> {
    let path = if file.is_absolute() {
        file
    } else {
        std::env::current_dir()?.join(file)
    };
    if count == Some(0) {
        bail!("--count must be at least 1");
    }
    let _: CaptureInfo = client
        .post(
            &format!("/v1/switches/{name}/capture"),
            &CaptureRequest {
                port: port.to_string(),
                path: path.clone(),
            },
        )
        .await?;
    eprintln!(
        "capturing {port} on {name} to {} ({})",
        path.display(),
        match (count, duration) {
            (Some(c), _) => format!("until {c} frames"),
            (None, Some(d)) => format!("for {d} s"),
            _ => "Ctrl-C stops".into(),
        }
    );
    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if let Some(c) = count {
            if pcap_records(&path).map(|r| r.len() as u64).unwrap_or(0) >= c {
                break;
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    let info: CaptureInfo = client
        .post(
            &format!("/v1/switches/{name}/capture/stop"),
            &serde_json::json!({ "port": port }),
        )
        .await?;
    let mut frames = info.frames.unwrap_or(0);
    if let Some(c) = count {
        // The switch may have written a few more while we looked: keep exactly `c`.
        let recs = pcap_records(&path).with_context(|| format!("reading {}", path.display()))?;
        if recs.len() as u64 > c {
            let end = recs[c as usize - 1].1;
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(end)?;
            frames = c;
        }
    }
    println!("{frames} frames written to {}", path.display());
    Ok(())
}

/// Runs a `vireo switch` command.
pub async fn run(client: &Client, cmd: SwitchCommand) -> anyhow::Result<()> {
    match cmd {
        SwitchCommand::New {
            name,
            switch_type,
            uplink,
            host_vlan,
            share_host,
            json,
        } => {
            let req = CreateSwitch {
                name,
                switch_type: match switch_type {
                    TypeArg::Private => SwitchType::Private,
                    TypeArg::Internal => SwitchType::Internal,
                    TypeArg::External => SwitchType::External,
                },
                uplink,
                host_vlan,
                share_host,
            };
            let s: SwitchInfo = client.post("/v1/switches", &req).await?;
            if json {
                output::json(&s)?;
            } else {
                print_switch(&s);
            }
        }
        SwitchCommand::List { json } => {
            let list: Vec<SwitchInfo> = client.get("/v1/switches").await?;
            if json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            type_name(s.switch_type).into(),
                            match s.state {
                                SwitchState::Running => "running".into(),
                                SwitchState::Down => "down".into(),
                            },
                            s.uplink
                                .clone()
                                .or_else(|| s.host_interface.clone())
                                .unwrap_or_else(|| "-".into()),
                            format!(
                                "{}/{}",
                                s.ports.iter().filter(|p| p.up).count(),
                                s.ports.len()
                            ),
                            s.nics.len().to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &["NAME", "TYPE", "STATE", "HOST IF", "PORTS UP", "NICS"],
                    &rows,
                );
            }
        }
        SwitchCommand::Show { name, json } => {
            let s: SwitchInfo = client.get(&format!("/v1/switches/{name}")).await?;
            if json {
                output::json(&s)?;
            } else {
                print_switch(&s);
            }
        }
        SwitchCommand::Delete { name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/switches/{name}")).await?;
            println!("deleted switch {name}");
        }
        SwitchCommand::Acl(a) => acl(client, a).await?,
        SwitchCommand::Mirror {
            name,
            from,
            to,
            direction,
            off,
            json,
        } => {
            let req: MirrorRequest = if off {
                None
            } else {
                Some(MirrorSpec {
                    sources: from,
                    destination: to.context("--to PORT is required")?,
                    direction: match direction {
                        MirrorDirArg::Ingress => MirrorDirection::Ingress,
                        MirrorDirArg::Egress => MirrorDirection::Egress,
                        MirrorDirArg::Both => MirrorDirection::Both,
                    },
                })
            };
            let s: SwitchInfo = client
                .put(&format!("/v1/switches/{name}/mirror"), &req)
                .await?;
            if json {
                output::json(&s)?;
            } else {
                print_switch(&s);
            }
        }
        SwitchCommand::Capture {
            name,
            port,
            file,
            count,
            duration,
        } => capture(client, &name, &port, file, count, duration).await?,
        SwitchCommand::Stats { name, json } => {
            let s: SwitchStats = client.get(&format!("/v1/switches/{name}/stats")).await?;
            if json {
                output::json(&s)?;
            } else {
                print_ports(&s.ports);
            }
        }
    }
    Ok(())
}

async fn acl(client: &Client, cmd: AclCommand) -> anyhow::Result<()> {
    match cmd {
        AclCommand::Add {
            name,
            port,
            action,
            direction,
            remote,
            remote_mac,
            json,
        } => {
            let rule = AclRule {
                action: match action {
                    ActionArg::Allow => AclAction::Allow,
                    ActionArg::Deny => AclAction::Deny,
                },
                direction: match direction {
                    DirectionArg::In => AclDirection::Inbound,
                    DirectionArg::Out => AclDirection::Outbound,
                    DirectionArg::Both => AclDirection::Both,
                },
                remote_ip: remote
                    .as_deref()
                    .map(|r| {
                        r.parse::<IpPrefix>()
                            .map_err(|e| anyhow::anyhow!("{e} in --remote (use e.g. 10.0.0.0/8)"))
                    })
                    .transpose()?,
                remote_mac: remote_mac
                    .as_deref()
                    .map(|m| {
                        m.parse::<Mac>()
                            .map_err(|e| anyhow::anyhow!("{e} in --remote-mac"))
                    })
                    .transpose()?,
            };
            let acl: PortAcl = client
                .post(&format!("/v1/switches/{name}/acl"), &AclAdd { port, rule })
                .await?;
            if json {
                output::json(&acl)?;
            } else {
                print_acls(&[acl]);
            }
        }
        AclCommand::List { name, json } => {
            let acls: Vec<PortAcl> = client.get(&format!("/v1/switches/{name}/acl")).await?;
            if json {
                output::json(&acls)?;
            } else {
                print_acls(&acls);
            }
        }
        AclCommand::Remove { name, port, index } => {
            let acl: PortAcl = client
                .post(
                    &format!("/v1/switches/{name}/acl/remove"),
                    &AclRemove { port, index },
                )
                .await?;
            print_acls(&[acl]);
        }
    }
    Ok(())
}

fn print_acls(acls: &[PortAcl]) {
    let mut rows = Vec::new();
    for a in acls {
        for (i, r) in a.rules.iter().enumerate() {
            rows.push(vec![
                a.port.clone(),
                i.to_string(),
                format!("{:?}", r.action).to_lowercase(),
                match r.direction {
                    AclDirection::Inbound => "in".into(),
                    AclDirection::Outbound => "out".into(),
                    AclDirection::Both => "both".into(),
                },
                r.remote_ip
                    .map(|p| p.to_string())
                    .or_else(|| r.remote_mac.map(|m| m.to_string()))
                    .unwrap_or_default(),
            ]);
        }
    }
    output::table(&["PORT", "#", "ACTION", "DIRECTION", "REMOTE"], &rows);
}
