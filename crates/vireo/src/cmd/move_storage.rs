//! `vireo vm move-storage VM --path DIR [--disk N]`: storage live migration.

use api::checkpoint::JobInfo;
use api::storage_move::{MoveJob, MoveStorage};
use api::Client;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `vireo vm move-storage`.
#[derive(clap::Args)]
pub struct MoveStorageArgs {
    /// VM (running).
    pub name: String,
    /// Destination directory (created if missing).
    #[arg(long)]
    pub path: PathBuf,
    /// Only this disk (index as in `vireo vm show`); default all.
    #[arg(long)]
    pub disk: Option<usize>,
    /// Copy rate limit, bytes per second (suffixes K, M, G).
    #[arg(long, value_parser = api::units::parse_size)]
    pub bandwidth: Option<u64>,
    /// Return once the job started (follow it with `vireo job show ID`).
    #[arg(long)]
    pub no_wait: bool,
    /// Print the job as JSON when it ends.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Deserialize)]
struct VmJob {
    #[serde(flatten)]
    job: JobInfo,
}

/// Runs the command; exit code 1 when the move failed or was cancelled.
pub async fn run(client: &Client, a: MoveStorageArgs) -> anyhow::Result<i32> {
    let path = std::path::absolute(&a.path).unwrap_or(a.path);
    let req = MoveStorage {
        path,
        disk: a.disk,
        max_bytes_per_sec: a.bandwidth,
    };
    let name: String = a
        .name
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let job: MoveJob = client
        .post(&format!("/v1/vms/{name}/move-storage"), &req)
        .await?;
    // Progress is for people: on a terminal only, so scripts get one result line.
    let tty = std::io::stderr().is_terminal();
    if tty {
        eprintln!(
            "moving the disks of {} to {} (job {})",
            a.name,
            job.dir.display(),
            job.id
        );
    }
    if a.no_wait {
        println!("{}", job.id);
        return Ok(0);
    }
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let j: VmJob = client.get(&format!("/v1/jobs/{}", job.id)).await?;
        let j = j.job;
        let line = format!("{} disk {}: {}/{} MiB", j.state, j.disk, j.done, j.total);
        if tty && line != last {
            eprintln!("{line}");
            last = line;
        }
        match j.state.as_str() {
            "done" => {
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&j)?);
                } else {
                    println!(
                        "moved: the disks of {} are in {}",
                        a.name,
                        job.dir.display()
                    );
                }
                return Ok(0);
            }
            "cancelled" => {
                anyhow::bail!(
                    "the move of {}'s disks was cancelled: the disks stayed where they were",
                    a.name
                );
            }
            "failed" => {
                anyhow::bail!(
                    "moving the disks of {} failed: {} (the disks stayed where they were; `vireo job show {}` has the details)",
                    a.name,
                    j.error.unwrap_or_else(|| "unknown reason".into()),
                    job.id
                );
            }
            _ => {}
        }
    }
}
