//! `vireo replica ...`: asynchronous replication of a VM to another host, recovery points
//! and failover (planned, unplanned, test). See docs/replica.md.

use super::output;
use api::replica::{
    interval_name, parse_interval, EnableReplica, FailoverReport, FailoverRequest,
    ReplicaHostSettings, ReplicaStatus, MIN_APP_CONSISTENT_SECS,
};
use api::units::format_size;
use api::Client;
use clap::Subcommand;
use std::path::PathBuf;

/// Replica commands.
#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Replicate a VM to another (trusted) host.
    Enable {
        /// The VM.
        vm: String,
        /// Replica host: a trusted host's name or address.
        #[arg(long)]
        to: String,
        /// 30s, 5m, 15m or continuous.
        #[arg(long, default_value = "5m", value_parser = parse_interval)]
        interval: u64,
        /// Hourly recovery points kept besides the latest (1-24).
        #[arg(long, default_value_t = 4)]
        recovery_points: usize,
        /// Initial replication: network (over the host channel, resumable), export (the
        /// replica host imported `vireo replica export`), existing (a copy already there,
        /// `vireo replica import --disk`); export and existing ship only what differs.
        #[arg(long, default_value = "network")]
        initial: String,
        /// Initial replication bandwidth limit, bytes per second (K, M, G suffixes).
        #[arg(long, value_parser = api::units::parse_size)]
        bandwidth: Option<u64>,
        /// Start the initial replication now (else `vireo replica start VM`).
        #[arg(long, conflicts_with = "start_at")]
        start: bool,
        /// Start the initial replication by itself at this time: RFC 3339
        /// (`2026-12-01T02:00:00Z`, UTC) or a delay from now (`2h`, `30m`).
        #[arg(long, value_parser = parse_start_at)]
        start_at: Option<u64>,
        /// Make an application-consistent recovery point this often (`4h`, `30m`): the
        /// guest's file systems are frozen through its agent for the cut; the points in
        /// between are crash-consistent. Default: crash-consistent points only.
        #[arg(long, value_parser = parse_app_consistent_every)]
        app_consistent_every: Option<u64>,
    },
    /// Start the initial replication.
    Start {
        /// The VM.
        vm: String,
    },
    /// Pause replication (changes keep being tracked).
    Pause {
        /// The VM.
        vm: String,
    },
    /// Resume a paused replication (ships what changed meanwhile).
    Resume {
        /// The VM.
        vm: String,
    },
    /// Stop replicating a VM (the replica keeps its recovery points).
    Disable {
        /// The VM.
        vm: String,
    },
    /// Replication state, last cycle, lag and bytes shipped, both roles.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fail over: with --planned on the primary (zero loss); on the replica when the
    /// primary is lost (revisable with --point until `commit`).
    Failover {
        /// The VM.
        vm: String,
        /// Planned failover, run on the primary.
        #[arg(long)]
        planned: bool,
        /// Recovery point id (replica; default the latest).
        #[arg(long)]
        point: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a failover final (the other recovery points are no longer offered).
    Commit {
        /// The VM.
        vm: String,
    },
    /// Undo a failover that is not committed (the VM started on the replica goes).
    CancelFailover {
        /// The VM.
        vm: String,
    },
    /// Start an isolated copy (`VM-test`) from a point; replication continues. Its network
    /// adapters are disconnected, or on the test switch given by --switch.
    TestFailover {
        /// The VM.
        vm: String,
        /// Recovery point id (default the latest).
        #[arg(long)]
        point: Option<u64>,
        /// Connect the copy's adapters to this (isolated) switch, e.g. a private switch.
        #[arg(long)]
        switch: Option<String>,
    },
    /// Remove the test copy.
    TestStop {
        /// The VM.
        vm: String,
    },
    /// After an unplanned failover (run here, on the former replica, once the old primary
    /// is back and its copy is off): replicate back, shipping only the blocks whose
    /// checksums differ.
    Reverse {
        /// The VM.
        vm: String,
    },
    /// On the primary: compare the replica with the disks by checksums (per MiB) and ship
    /// only what differs (when change tracking cannot be trusted).
    Resync {
        /// The VM.
        vm: String,
    },
    /// On the primary: copy the VM's disks into DIR (removable media) to seed its replica.
    Export {
        /// The VM.
        vm: String,
        /// Directory that receives the export.
        #[arg(long)]
        to: PathBuf,
    },
    /// On the replica host: seed the replica of VM from an export (--from) or from an
    /// existing copy of its disks here (--disk, in the VM's disk order; used in place).
    Import {
        /// The VM.
        vm: String,
        /// An export directory.
        #[arg(long, conflicts_with = "disk")]
        from: Option<PathBuf>,
        /// An existing copy's VHDX image (repeat per disk).
        #[arg(long)]
        disk: Vec<PathBuf>,
    },
}

/// `--start-at`: an RFC 3339 time or a delay from now, as Unix milliseconds.
fn parse_start_at(s: &str) -> Result<u64, String> {
    let at = match humantime::parse_duration(s) {
        Ok(d) => std::time::SystemTime::now() + d,
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!(
                "{s:?}: use an RFC 3339 time in UTC (2026-12-01T02:00:00Z) or a delay (2h, 30m)"
            )
        })?,
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// `--app-consistent-every`: a duration of at least [`MIN_APP_CONSISTENT_SECS`], in seconds.
fn parse_app_consistent_every(s: &str) -> Result<u64, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (use e.g. 4h, 1h, 30m)"))?;
    if d.as_secs() < MIN_APP_CONSISTENT_SECS {
        return Err(format!(
            "{s:?} is too often: each application-consistent point freezes the guest's file systems (at least {MIN_APP_CONSISTENT_SECS}s; hours are usual)"
        ));
    }
    Ok(d.as_secs())
}

/// Unix milliseconds as an RFC 3339 time (seconds).
fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn path_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_report(r: &FailoverReport) {
    for s in &r.steps {
        println!("{s}");
    }
}

async fn action(
    client: &Client,
    vm: &str,
    what: &str,
    req: &FailoverRequest,
) -> anyhow::Result<FailoverReport> {
    Ok(client
        .post(&format!("/v1/replica/{}/{what}", path_part(vm)), req)
        .await?)
}

/// Runs a replica command.
pub async fn run(client: &Client, cmd: ReplicaCommand) -> anyhow::Result<()> {
    match cmd {
        ReplicaCommand::Enable {
            vm,
            to,
            interval,
            recovery_points,
            initial,
            bandwidth,
            start,
            start_at,
            app_consistent_every,
        } => {
            let req = EnableReplica {
                to,
                interval_secs: interval,
                recovery_points,
                initial,
                bandwidth: bandwidth.unwrap_or(0),
                app_consistent_every_secs: app_consistent_every.unwrap_or(0),
                start_at_unix_ms: start_at,
            };
            let s: ReplicaStatus = client
                .post(&format!("/v1/replica/{}/enable", path_part(&vm)), &req)
                .await?;
            println!(
                "replication of {vm} to {} enabled (interval {}, {} recovery points{})",
                s.peer,
                interval_name(interval),
                recovery_points,
                match app_consistent_every {
                    Some(secs) => format!(
                        ", application-consistent every {}",
                        humantime::format_duration(std::time::Duration::from_secs(secs))
                    ),
                    None => String::new(),
                }
            );
            if let Some(at) = s.start_at_unix_ms {
                println!(
                    "initial replication starts by itself at {} (`vireo replica start {vm}` starts it now)",
                    rfc3339_ms(at)
                );
            } else if start {
                let _: ReplicaStatus = client
                    .post(&format!("/v1/replica/{}/start", path_part(&vm)), &())
                    .await?;
                println!("initial replication started (`vireo replica status` follows it)");
            } else {
                println!("start the initial replication with `vireo replica start {vm}`");
            }
            Ok(())
        }
        ReplicaCommand::Start { vm } => state(client, &vm, "start").await,
        ReplicaCommand::Pause { vm } => state(client, &vm, "pause").await,
        ReplicaCommand::Resume { vm } => state(client, &vm, "resume").await,
        ReplicaCommand::Disable { vm } => {
            let _: serde_json::Value = client
                .post(&format!("/v1/replica/{}/disable", path_part(&vm)), &())
                .await?;
            println!("replication of {vm} disabled (the replica host keeps its recovery points)");
            Ok(())
        }
        ReplicaCommand::Status { json } => {
            let list: Vec<ReplicaStatus> = client.get("/v1/replica").await?;
            if json {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.vm.clone(),
                        format!("{:?}", s.role).to_lowercase(),
                        s.peer.clone(),
                        serde_json::to_value(s.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        interval_name(s.interval_secs),
                        s.last_seq.to_string(),
                        s.lag_secs
                            .map(|l| format!("{l:.0}s"))
                            .unwrap_or_else(|| "-".into()),
                        s.rpo_last_hour_secs
                            .map(|l| format!("{l:.0}s"))
                            .unwrap_or_else(|| "-".into()),
                        format_size(s.bytes_shipped),
                        match (s.initial_progress, s.points.is_empty()) {
                            _ if s.start_at_unix_ms.is_some() => format!(
                                "starts {}",
                                rfc3339_ms(s.start_at_unix_ms.unwrap_or_default())
                            ),
                            (Some(p), _) if p < 1.0 => format!("initial {:.0}%", p * 100.0),
                            // Application-consistent points are marked with `*`.
                            (_, false) => format!(
                                "points {}",
                                s.points
                                    .iter()
                                    .map(|p| format!(
                                        "{}{}",
                                        p.id,
                                        if p.app_consistent { "*" } else { "" }
                                    ))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            ),
                            _ => "-".into(),
                        },
                        s.failover
                            .clone()
                            .or_else(|| s.warning.clone())
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "VM", "ROLE", "PEER", "STATE", "INTERVAL", "CYCLE", "LAG", "RPO 1H", "SHIPPED",
                    "DETAIL", "NOTE",
                ],
                &rows,
            );
            if list
                .iter()
                .any(|s| s.points.iter().any(|p| p.app_consistent))
            {
                println!("(* application-consistent recovery point)");
            }
            for s in &list {
                if let Some(w) = &s.warning {
                    eprintln!("warning: {}: {w}", s.vm);
                }
            }
            Ok(())
        }
        ReplicaCommand::Failover {
            vm,
            planned,
            point,
            json,
        } => {
            let r = action(
                client,
                &vm,
                "failover",
                &FailoverRequest {
                    planned,
                    point,
                    test_switch: None,
                },
            )
            .await?;
            if json {
                return output::json(&r);
            }
            print_report(&r);
            Ok(())
        }
        ReplicaCommand::Commit { vm } => {
            print_report(&action(client, &vm, "commit", &FailoverRequest::default()).await?);
            Ok(())
        }
        ReplicaCommand::CancelFailover { vm } => {
            print_report(
                &action(client, &vm, "cancel-failover", &FailoverRequest::default()).await?,
            );
            Ok(())
        }
        ReplicaCommand::TestFailover { vm, point, switch } => {
            let req = FailoverRequest {
                planned: false,
                point,
                test_switch: switch,
            };
            print_report(&action(client, &vm, "test-failover", &req).await?);
            Ok(())
        }
        ReplicaCommand::TestStop { vm } => {
            print_report(&action(client, &vm, "test-stop", &FailoverRequest::default()).await?);
            Ok(())
        }
        ReplicaCommand::Reverse { vm } => {
            print_report(&action(client, &vm, "reverse", &FailoverRequest::default()).await?);
            Ok(())
        }
        ReplicaCommand::Export { vm, to } => {
            let dir = std::path::absolute(&to).unwrap_or(to);
            let r: FailoverReport = client
                .post(
                    &format!("/v1/replica/{}/export", path_part(&vm)),
                    &api::replica::ExportReplica { dir },
                )
                .await?;
            print_report(&r);
            Ok(())
        }
        ReplicaCommand::Import { vm, from, disk } => {
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let req = api::replica::ImportReplica {
                from: from.map(abs),
                disks: disk.into_iter().map(abs).collect(),
            };
            let r: FailoverReport = client
                .post(&format!("/v1/replica/{}/import", path_part(&vm)), &req)
                .await?;
            print_report(&r);
            Ok(())
        }
        ReplicaCommand::Resync { vm } => {
            print_report(&action(client, &vm, "resync", &FailoverRequest::default()).await?);
            Ok(())
        }
    }
}

async fn state(client: &Client, vm: &str, what: &str) -> anyhow::Result<()> {
    let s: ReplicaStatus = client
        .post(&format!("/v1/replica/{}/{what}", path_part(vm)), &())
        .await?;
    println!(
        "replication of {vm}: {}",
        serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    Ok(())
}

/// `vireo host set --allow-replica-from HOST... --replica-path DIR`.
pub async fn host_set(
    client: &Client,
    allow_from: Option<Vec<String>>,
    path: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let mut s: ReplicaHostSettings = client.get("/v1/replica/host-settings").await?;
    if let Some(a) = allow_from {
        s.allow_from = a;
    }
    if let Some(p) = path {
        s.path = Some(std::path::absolute(&p).unwrap_or(p));
    }
    let s: ReplicaHostSettings = client.put("/v1/replica/host-settings", &s).await?;
    if json {
        return output::json(&s);
    }
    output::fields(&[
        (
            "replicas from",
            if s.allow_from.is_empty() {
                "- (none)".into()
            } else {
                s.allow_from.join(", ")
            },
        ),
        (
            "replica path",
            s.path
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into()),
        ),
    ]);
    Ok(())
}
