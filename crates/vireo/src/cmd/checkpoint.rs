//! `vireo checkpoint ...` and `vireo job ...`.

use super::output;
use api::checkpoint::{
    CheckpointInfo, CheckpointTree, CheckpointType, ExportCheckpoint, JobInfo, NewCheckpoint,
    RemoveCheckpoint, RenameCheckpoint,
};
use api::Client;
use clap::{Subcommand, ValueEnum};
use std::path::PathBuf;

/// Kind of checkpoint on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    /// Disks plus memory and device state.
    Standard,
    /// Disks only, guest file systems frozen through the agent.
    Production,
}

/// `vireo checkpoint`.
#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Take a checkpoint of a running VM.
    New {
        /// VM.
        vm: String,
        /// Name (default checkpoint-N).
        name: Option<String>,
        /// Kind.
        #[arg(long = "type", value_enum, default_value = "standard")]
        kind: Kind,
        /// Print the API answer.
        #[arg(long)]
        json: bool,
    },
    /// Show the checkpoint tree.
    List {
        /// VM.
        vm: String,
        /// Print the API answer.
        #[arg(long)]
        json: bool,
    },
    /// Revert a VM to a checkpoint. A running VM is turned off first; a standard
    /// checkpoint then resumes running from its saved memory state, a production one
    /// leaves the VM off.
    Apply {
        /// VM.
        vm: String,
        /// Checkpoint name or id.
        name: String,
    },
    /// Remove a checkpoint (merging its disk layer live when the VM runs on it).
    Remove {
        /// VM.
        vm: String,
        /// Checkpoint name or id.
        name: String,
        /// Also remove every checkpoint below it.
        #[arg(long)]
        subtree: bool,
    },
    /// Rename a checkpoint.
    Rename {
        /// VM.
        vm: String,
        /// Checkpoint name or id.
        name: String,
        /// New name.
        new_name: String,
    },
    /// Write a checkpoint's disks as standalone VHDX files into DIR.
    Export {
        /// VM.
        vm: String,
        /// Checkpoint name or id.
        name: String,
        /// Directory.
        dir: PathBuf,
    },
}

/// `vireo job`.
#[derive(Subcommand)]
pub enum JobCommand {
    /// List jobs.
    List {
        /// Print the API answer.
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Show {
        /// Job id.
        id: String,
        /// Print the API answer.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job (a merge stops after its current block; `resume` continues it).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Continue a cancelled job.
    Resume {
        /// Job id.
        id: String,
    },
}

fn cp_path(vm: &str, rest: &str) -> String {
    format!("/v1/vms/{vm}/checkpoints{rest}")
}

fn print_tree(t: &CheckpointTree) {
    fn walk(t: &CheckpointTree, parent: Option<&str>, depth: usize, rows: &mut Vec<Vec<String>>) {
        for c in t
            .checkpoints
            .iter()
            .filter(|c| c.parent.as_deref() == parent)
        {
            let here = if t.current.as_deref() == Some(c.id.as_str()) {
                "  <- now"
            } else {
                ""
            };
            rows.push(vec![
                format!("{}{}{}", "  ".repeat(depth), c.name, here),
                c.id.clone(),
                format!("{:?}", c.kind).to_lowercase(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.created),
                )
                .to_string(),
            ]);
            walk(t, Some(&c.id), depth + 1, rows);
        }
    }
    let mut rows = Vec::new();
    walk(t, None, 0, &mut rows);
    output::table(&["NAME", "ID", "TYPE", "CREATED"], &rows);
    for j in t
        .jobs
        .iter()
        .filter(|j| j.state == "copying" || j.state == "cancelled")
    {
        println!(
            "job {}: merge {} {} ({}/{} blocks of disk {})",
            j.id, j.checkpoint, j.state, j.done, j.total, j.disk
        );
    }
}

fn print_cp(c: &CheckpointInfo) {
    println!("checkpoint {} ({}) created", c.name, c.id);
}

/// Runs a checkpoint command.
pub async fn run(client: &Client, cmd: CheckpointCommand) -> anyhow::Result<()> {
    match cmd {
        CheckpointCommand::New {
            vm,
            name,
            kind,
            json,
        } => {
            let req = NewCheckpoint {
                name,
                kind: match kind {
                    Kind::Standard => CheckpointType::Standard,
                    Kind::Production => CheckpointType::Production,
                },
            };
            let c: CheckpointInfo = client.post(&cp_path(&vm, ""), &req).await?;
            if json {
                output::json(&c)?
            } else {
                print_cp(&c)
            }
        }
        CheckpointCommand::List { vm, json } => {
            let t: CheckpointTree = client.get(&cp_path(&vm, "")).await?;
            if json {
                output::json(&t)?
            } else {
                print_tree(&t)
            }
        }
        CheckpointCommand::Apply { vm, name } => {
            let c: CheckpointInfo = client
                .post(&cp_path(&vm, &format!("/{name}/apply")), &())
                .await?;
            // A restore from the memory state reports `starting` until QEMU has loaded it;
            // wait that out (bounded) so the message says where the VM ended up.
            // The daemon's state cache lags the start by up to a supervision round, so
            // another state is trusted only once it has lasted a few seconds.
            let mut running = false;
            let mut other = 0;
            for _ in 0..120 {
                match client.get::<api::VmInfo>(&format!("/v1/vms/{vm}")).await {
                    Ok(v) if v.state == api::VmState::Running => {
                        running = true;
                        break;
                    }
                    Ok(v) if v.state == api::VmState::Starting => {}
                    Ok(_) if c.memory_state.is_some() && other < 10 => other += 1,
                    _ => break,
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await
            }
            println!(
                "VM {vm} reverted to checkpoint {}{}",
                c.name,
                match (running, c.memory_state.is_some()) {
                    (true, _) => " and running from its memory state",
                    (false, true) => " (the next start resumes its memory state)",
                    (false, false) => " (off)",
                }
            );
        }
        CheckpointCommand::Remove { vm, name, subtree } => {
            let mut names = vec![name.clone()];
            if subtree {
                let t: CheckpointTree = client.get(&cp_path(&vm, "")).await?;
                let root = t
                    .checkpoints
                    .iter()
                    .find(|c| c.name == name || c.id == name)
                    .map(|c| c.id.clone());
                let mut order = Vec::new();
                fn below(t: &CheckpointTree, id: &str, out: &mut Vec<String>) {
                    for c in t
                        .checkpoints
                        .iter()
                        .filter(|c| c.parent.as_deref() == Some(id))
                    {
                        below(t, &c.id, out);
                        out.push(c.id.clone());
                    }
                }
                if let Some(r) = root {
                    below(&t, &r, &mut order);
                }
                order.push(name);
                names = order;
            }
            for n in names {
                let r: RemoveCheckpoint = client.delete(&cp_path(&vm, &format!("/{n}"))).await?;
                match r.job {
                    Some(j) => println!(
                        "removing {n}: live merge job {} started (`vireo job show {}`)",
                        j.id, j.id
                    ),
                    None => println!("removed {n}"),
                }
            }
        }
        CheckpointCommand::Rename { vm, name, new_name } => {
            let c: CheckpointInfo = client
                .post(
                    &cp_path(&vm, &format!("/{name}/rename")),
                    &RenameCheckpoint { name: new_name },
                )
                .await?;
            println!("renamed to {}", c.name);
        }
        CheckpointCommand::Export { vm, name, dir } => {
            let dir = std::path::absolute(&dir)?;
            let files: Vec<PathBuf> = client
                .post(
                    &cp_path(&vm, &format!("/{name}/export")),
                    &ExportCheckpoint { dir },
                )
                .await?;
            for f in files {
                println!("{}", f.display());
            }
        }
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct VmJob {
    vm: String,
    #[serde(flatten)]
    job: JobInfo,
}

fn job_row(j: &VmJob) -> Vec<String> {
    let pct = (j.job.done * 100).checked_div(j.job.total).unwrap_or(0);
    vec![
        j.job.id.clone(),
        j.vm.clone(),
        j.job.kind.clone(),
        j.job.state.clone(),
        // A removal that only drops a record (the base layer stays) copies nothing.
        if j.job.total == 0 {
            match j.job.state.as_str() {
                "done" => "nothing to copy".to_string(),
                _ => format!("preparing (disk {})", j.job.disk),
            }
        } else {
            format!(
                "{pct}% ({}/{} blocks, disk {})",
                j.job.done, j.job.total, j.job.disk
            )
        },
        j.job.error.clone().unwrap_or_default(),
    ]
}

/// Runs a job command.
pub async fn run_job(client: &Client, cmd: JobCommand) -> anyhow::Result<()> {
    const HEADER: [&str; 6] = ["ID", "VM", "KIND", "STATE", "PROGRESS", "ERROR"];
    match cmd {
        JobCommand::List { json } => {
            let jobs: Vec<VmJob> = client.get("/v1/jobs").await?;
            if json {
                output::json(&jobs)?
            } else {
                output::table(&HEADER, &jobs.iter().map(job_row).collect::<Vec<_>>())
            }
        }
        JobCommand::Show { id, json } if id.starts_with("mig-") => {
            super::migrate::job_show(client, &id, json).await?
        }
        JobCommand::Cancel { id } if id.starts_with("mig-") => {
            super::migrate::job_cancel(client, &id).await?
        }
        JobCommand::Show { id, json } => {
            let j: VmJob = client.get(&format!("/v1/jobs/{id}")).await?;
            if json {
                output::json(&j)?
            } else {
                output::table(&HEADER, &[job_row(&j)])
            }
        }
        JobCommand::Cancel { id } => {
            let j: JobInfo = client.post(&format!("/v1/jobs/{id}/cancel"), &()).await?;
            println!("job {} cancelling (stops after its current block)", j.id);
        }
        JobCommand::Resume { id } => {
            let j: JobInfo = client.post(&format!("/v1/jobs/{id}/resume"), &()).await?;
            println!("job {} resumed", j.id);
        }
    }
    Ok(())
}
