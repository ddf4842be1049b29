//! `vireo host ...`

use super::output;
use api::units::format_size;
use api::{Client, HostInfo};
use clap::Subcommand;

/// Host commands.
#[derive(Subcommand)]
pub enum HostCommand {
    /// Show the host: accelerator (and why), QEMU, memory, VMs.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change host settings: the memory reserve and budget of dynamic memory.
    Set {
        /// Memory never handed to VMs, e.g. 2G (0: the default, 10 % of host memory, 1-8 GiB).
        #[arg(long, value_parser = api::units::parse_size)]
        memory_reserve: Option<u64>,
        /// The most all VMs together may hold, e.g. 16G (0: host memory minus the reserve).
        #[arg(long, value_parser = api::units::parse_size)]
        memory_budget: Option<u64>,
        /// Live migrations (in and out) this host runs at the same time (1-16).
        #[arg(long)]
        max_migrations: Option<u32>,
        /// Hosts allowed to replicate VMs to this host (trusted hosts' names or addresses, `*`: any).
        #[arg(long, num_args = 1..)]
        allow_replica_from: Option<Vec<String>>,
        /// Directory for the replicas this host keeps.
        #[arg(long)]
        replica_path: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Trust another host for live migration (both hosts trust each other).
    Trust {
        /// The other host's `vireod --listen` address, ADDR:PORT.
        address: String,
        /// Its certificate fingerprint as `vireo host show` prints it there (else asked).
        #[arg(long)]
        fingerprint: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hosts this host trusts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a host.
    Untrust {
        /// Its name or address.
        name: String,
    },
}

/// Runs a host command.
pub async fn run(client: &Client, cmd: HostCommand) -> anyhow::Result<()> {
    match cmd {
        HostCommand::Set {
            memory_reserve,
            memory_budget,
            max_migrations,
            allow_replica_from,
            replica_path,
            json,
        } => {
            if allow_replica_from.is_some() || replica_path.is_some() {
                super::replica::host_set(client, allow_replica_from, replica_path, json).await?;
                if memory_reserve.is_none() && memory_budget.is_none() && max_migrations.is_none() {
                    return Ok(());
                }
            }
            if let Some(n) = max_migrations {
                super::migrate::set(client, n, json).await?;
                if memory_reserve.is_none() && memory_budget.is_none() {
                    return Ok(());
                }
            }
            super::memory::host_set(client, memory_reserve, memory_budget, json).await
        }
        HostCommand::Trust {
            address,
            fingerprint,
            json,
        } => super::migrate::trust(client, address, fingerprint, json).await,
        HostCommand::List { json } => super::migrate::list(client, json).await,
        HostCommand::Untrust { name } => super::migrate::untrust(client, name).await,
        HostCommand::Show { json } => {
            let h: HostInfo = client.get("/v1/host").await?;
            if json {
                return output::json(&h);
            }
            output::fields(&[
                ("hostname", h.hostname.clone()),
                ("version", h.version.clone()),
                ("state dir", h.state_dir.display().to_string()),
                (
                    "accelerator",
                    format!("{} ({})", accel_name(h.accel), h.accel_reason),
                ),
                ("qemu", h.qemu.clone()),
                ("cpus", h.cpus.to_string()),
                (
                    "memory",
                    format!(
                        "{} total, {} available",
                        format_size(h.memory_total),
                        format_size(h.memory_available)
                    ),
                ),
                (
                    "vms",
                    format!("{} defined, {} running", h.vms_defined, h.vms_running),
                ),
                ("vireod rss", format_size(h.daemon_rss)),
                (
                    "fingerprint",
                    h.fingerprint.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "listen",
                    h.listen
                        .clone()
                        .unwrap_or_else(|| "- (vireod --listen ADDR:PORT)".into()),
                ),
            ]);
            Ok(())
        }
    }
}

/// Accelerator name.
pub fn accel_name(a: api::Accel) -> &'static str {
    match a {
        api::Accel::Kvm => "kvm",
        api::Accel::Tcg => "tcg",
    }
}
