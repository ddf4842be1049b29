//! `vireo host trust|list|untrust`, `vireo host set --max-migrations`, `vireo vm move` and
//! migration jobs (`vireo job show|cancel mig-...`).

use super::output;
use anyhow::bail;
use api::migration::{
    HostSettings, HostSettingsPatch, MigrationJobInfo, MigrationPhase, MoveRequest, PeerInfo,
    TrustRequest, TrustResponse,
};
use api::units::{format_size, parse_size};
use api::Client;
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

/// `vireo vm move` arguments.
#[derive(Args)]
pub struct MoveArgs {
    /// VM name.
    pub name: String,
    /// Destination host: a trusted host's name or ADDR:PORT (see `vireo host list`).
    #[arg(long)]
    pub to: String,
    /// Copy the disks (whole chain, checkpoints included) to the destination.
    #[arg(long)]
    pub include_storage: bool,
    /// Directory for the copied disks on the destination (with --include-storage).
    #[arg(long)]
    pub destination_path: Option<std::path::PathBuf>,
    /// Bandwidth limit per second, e.g. 500M (default: unlimited).
    #[arg(long, value_parser = parse_size)]
    pub bandwidth: Option<u64>,
    /// Longest acceptable pause at switchover, e.g. 300ms.
    #[arg(long, default_value = "300ms", value_parser = parse_ms)]
    pub max_downtime: u64,
    /// Return at once with the job id instead of following it.
    #[arg(long)]
    pub no_wait: bool,
    /// Print the job as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else {
        (t, 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a duration like 300ms or 2s"))
}

/// `vireo host trust ADDR:PORT [--fingerprint F] [--yes]`.
pub async fn trust(
    client: &Client,
    address: String,
    fingerprint: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let mut req = TrustRequest {
        address: address.clone(),
        fingerprint: fingerprint.clone(),
    };
    let mut r: TrustResponse = client.post("/v1/host/trust", &req).await?;
    if !r.trusted {
        eprintln!(
            "host {} at {} (vireod {}, protocol {}) presents certificate\n  {}",
            r.peer.name,
            r.peer.address,
            r.peer.version,
            r.peer.protocol_version,
            r.peer.fingerprint
        );
        if !std::io::stdin().is_terminal() {
            bail!(
                "not trusted: confirm the fingerprint with `vireo host trust {address} --fingerprint {}` after checking it with `vireo host show` on that host",
                r.peer.fingerprint
            );
        }
        eprint!("Compare it with `vireo host show` on that host. Trust it? [yes/no] ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "yes" {
            bail!("not trusted (answer was not \"yes\")");
        }
        req.fingerprint = Some(r.peer.fingerprint.clone());
        r = client.post("/v1/host/trust", &req).await?;
    }
    if json {
        return output::json(&r);
    }
    println!(
        "trusted host {} at {} ({})",
        r.peer.name, r.peer.address, r.peer.fingerprint
    );
    println!("the other host must trust this one too for migrations in either direction");
    Ok(())
}

/// `vireo host list`.
pub async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let peers: Vec<PeerInfo> = client.get("/v1/hosts").await?;
    if json {
        return output::json(&peers);
    }
    output::table(
        &["NAME", "ADDRESS", "VERSION", "PROTOCOL", "FINGERPRINT"],
        &peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.address.clone(),
                    p.version.clone(),
                    p.protocol_version.to_string(),
                    p.fingerprint.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(())
}

/// `vireo host untrust NAME`.
pub async fn untrust(client: &Client, name: String) -> anyhow::Result<()> {
    let _: serde_json::Value = client.delete(&format!("/v1/hosts/{name}")).await?;
    println!("host {name} is no longer trusted");
    Ok(())
}

/// `vireo host set --max-migrations N`.
pub async fn set(client: &Client, max_migrations: u32, json: bool) -> anyhow::Result<()> {
    let s: HostSettings = client
        .patch(
            "/v1/host/settings",
            &HostSettingsPatch {
                max_migrations: Some(max_migrations),
            },
        )
        .await?;
    if json {
        return output::json(&s);
    }
    println!("simultaneous migrations: {}", s.max_migrations);
    Ok(())
}

fn phase_name(p: MigrationPhase) -> &'static str {
    match p {
        MigrationPhase::Negotiating => "negotiating",
        MigrationPhase::Preparing => "preparing",
        MigrationPhase::CopyingDisks => "copying-disks",
        MigrationPhase::Memory => "memory",
        MigrationPhase::Switchover => "switchover",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Cancelled => "cancelled",
        MigrationPhase::Failed => "failed",
    }
}

fn progress_line(j: &MigrationJobInfo) -> String {
    format!(
        "{} {:<12} memory {}/{} (remaining {}), pass {}, dirty {} pages/s, expected downtime {} ms",
        j.id,
        phase_name(j.phase),
        format_size(j.memory_transferred),
        format_size(j.memory_total),
        format_size(j.memory_remaining),
        j.passes,
        j.dirty_pages_rate,
        j.expected_downtime_ms
    )
}

/// `vireo vm move`: starts the job and follows it (exit 1 unless it completes).
pub async fn move_vm(client: &Client, a: MoveArgs) -> anyhow::Result<i32> {
    let req = MoveRequest {
        to: a.to.clone(),
        include_storage: a.include_storage,
        destination_path: a.destination_path.clone(),
        bandwidth: a.bandwidth.unwrap_or(0),
        max_downtime_ms: a.max_downtime,
    };
    let mut j: MigrationJobInfo = client
        .post(&format!("/v1/vms/{}/move", a.name), &req)
        .await?;
    if a.no_wait {
        if a.json {
            output::json(&j)?;
        } else {
            println!("{}", j.id);
        }
        return Ok(0);
    }
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    while !j.phase.is_final() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        j = client.get(&format!("/v1/migrations/{}", j.id)).await?;
        let line = progress_line(&j);
        if line != last && tty {
            eprint!("\r{line}\x1b[K");
            last = line;
        }
    }
    if tty {
        eprintln!();
    }
    if a.json {
        output::json(&j)?;
    }
    match j.phase {
        MigrationPhase::Completed => {
            if !a.json {
                println!(
                    "moved {} to {} in {:.1} s (downtime {} ms, {} of memory sent)",
                    j.vm,
                    j.peer,
                    j.elapsed_secs,
                    j.downtime_ms.map(|d| d.to_string()).unwrap_or("?".into()),
                    format_size(j.memory_transferred)
                );
            }
            Ok(0)
        }
        _ => bail!(
            "migration {} {}: {}",
            j.id,
            phase_name(j.phase),
            j.message.unwrap_or_default()
        ),
    }
}

/// `vireo job show mig-...`.
pub async fn job_show(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let j: MigrationJobInfo = client.get(&format!("/v1/migrations/{id}")).await?;
    if json {
        return output::json(&j);
    }
    println!("{}", progress_line(&j));
    if let Some(m) = &j.message {
        println!("{m}");
    }
    Ok(())
}

/// `vireo job cancel mig-...`.
pub async fn job_cancel(client: &Client, id: &str) -> anyhow::Result<()> {
    let j: MigrationJobInfo = client
        .post(&format!("/v1/migrations/{id}/cancel"), &())
        .await?;
    println!("migration {} cancelling; the VM stays on this host", j.id);
    Ok(())
}
