//! `vireo memory status`, and the memory lines of `vireo vm show`.

use super::output;
use api::memory::{MemoryStatus, VmMemory};
use api::units::format_size;
use api::Client;
use clap::Subcommand;

/// Dynamic memory commands.
#[derive(Subcommand)]
pub enum MemoryCommand {
    /// Per VM: assigned, demand, pressure, settings and the balancer's last decision; the
    /// host's free memory and reserve.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a memory command.
pub async fn run(client: &Client, cmd: MemoryCommand) -> anyhow::Result<()> {
    match cmd {
        MemoryCommand::Status { json } => {
            let s: MemoryStatus = client.get("/v1/memory").await?;
            if json {
                return output::json(&s);
            }
            let h = &s.host;
            output::fields(&[
                (
                    "host memory",
                    format!(
                        "{} (physical {}), {} available",
                        format_size(h.total),
                        format_size(h.physical_total),
                        format_size(h.available)
                    ),
                ),
                ("free for VMs", format_size(h.free_for_vms)),
                ("reserve", format_size(h.reserve)),
                (
                    "VM limit",
                    format!(
                        "{}{}",
                        format_size(h.vm_limit),
                        h.budget
                            .map(|b| format!(" (budget {})", format_size(b)))
                            .unwrap_or_default()
                    ),
                ),
                ("assigned to VMs", format_size(h.assigned)),
            ]);
            println!();
            let rows: Vec<Vec<String>> = s
                .vms
                .iter()
                .map(|v| {
                    let m = &v.memory;
                    vec![
                        v.name.clone(),
                        if m.dynamic { "dynamic" } else { "static" }.into(),
                        format_size(m.assigned),
                        m.demand.map(format_size).unwrap_or_else(|| "-".into()),
                        m.pressure_percent
                            .map(|p| format!("{p}%"))
                            .unwrap_or_else(|| "-".into()),
                        format!("{}..{}", format_size(m.minimum), format_size(m.maximum)),
                        format!("{}%", m.buffer_percent),
                        m.weight.to_string(),
                        m.last_decision
                            .as_ref()
                            .map(|d| format!("{} {}", format_size(d.target), d.reason))
                            .unwrap_or_else(|| "-".into()),
                        m.status.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAME", "MEMORY", "ASSIGNED", "DEMAND", "PRESSURE", "RANGE", "BUFFER",
                    "WEIGHT", "DECISION", "STATUS",
                ],
                &rows,
            );
            Ok(())
        }
    }
}

/// The memory lines of `vireo vm show`.
pub fn show_fields(m: &VmMemory) -> Vec<(&'static str, String)> {
    let mut f = vec![(
        "memory",
        if m.dynamic {
            format!(
                "dynamic: startup {}, minimum {}, maximum {}, buffer {}%, weight {}",
                format_size(m.startup),
                format_size(m.minimum),
                format_size(m.maximum),
                m.buffer_percent,
                m.weight
            )
        } else {
            format!("{} (static)", format_size(m.startup))
        },
    )];
    f.push((
        "memory assigned",
        format!(
            "{}{}",
            format_size(m.assigned),
            match (m.demand, m.pressure_percent) {
                (Some(d), Some(p)) => format!(", demand {} (pressure {p}%)", format_size(d)),
                _ => String::new(),
            }
        ),
    ));
    if let Some(d) = &m.last_decision {
        f.push((
            "memory decision",
            format!(
                "{} ({}), {} s ago",
                format_size(d.target),
                d.reason,
                d.age_ms / 1000
            ),
        ));
    }
    if let Some(s) = &m.status {
        f.push(("memory status", s.clone()));
    }
    f
}

/// Dynamic memory options of `vireo vm set`.
#[derive(clap::Args, Default)]
pub struct DynamicMemoryArgs {
    /// Dynamic memory on or off (only while the VM is off).
    #[arg(long, value_enum)]
    pub dynamic_memory: Option<super::vm::OnOff>,
    /// Startup RAM, e.g. 512M (same as --memory; only while the VM is off).
    #[arg(long, value_parser = api::units::parse_size)]
    pub startup: Option<u64>,
    /// Minimum RAM (may change while running).
    #[arg(long, value_parser = api::units::parse_size)]
    pub min: Option<u64>,
    /// Maximum RAM (may grow while running).
    #[arg(long, value_parser = api::units::parse_size)]
    pub max: Option<u64>,
    /// Memory buffer in percent of demand, 0-2000 (may change while running).
    #[arg(long)]
    pub buffer: Option<u32>,
    /// Memory weight 0-10000: priority when the host is short (may change while running).
    #[arg(long)]
    pub weight: Option<u32>,
}

impl DynamicMemoryArgs {
    /// Whether any option was given.
    pub fn any(&self) -> bool {
        self.dynamic_memory.is_some()
            || self.startup.is_some()
            || self.min.is_some()
            || self.max.is_some()
            || self.buffer.is_some()
            || self.weight.is_some()
    }
}

/// `vireo host set --memory-reserve/--memory-budget`.
pub async fn host_set(
    client: &Client,
    reserve: Option<u64>,
    budget: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    if reserve.is_none() && budget.is_none() {
        anyhow::bail!("nothing to change: give --memory-reserve or --memory-budget");
    }
    let h: api::memory::HostMemoryStatus = client
        .patch(
            "/v1/host/memory",
            &api::memory::HostMemoryPatch { reserve, budget },
        )
        .await?;
    if json {
        return output::json(&h);
    }
    output::fields(&[
        ("reserve", format_size(h.reserve)),
        (
            "VM limit",
            format!(
                "{}{}",
                format_size(h.vm_limit),
                h.budget
                    .map(|b| format!(" (budget {})", format_size(b)))
                    .unwrap_or_default()
            ),
        ),
        ("free for VMs", format_size(h.free_for_vms)),
    ]);
    Ok(())
}
