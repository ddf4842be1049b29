//! `vireo`: the command-line client for Vireo hosts.
//!
//! Exit status: 0 on success, 1 with a one-line cause on stderr on failure; `vireo vm exec`
//! returns the guest command's own exit status.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vireo", version, about = "Manage Vireo virtualization hosts")]
struct Cli {
    /// Path of the vireod API socket.
    #[arg(
        long,
        global = true,
        env = "VIREO_SOCKET",
        default_value = "/run/vireo/vireod.sock"
    )]
    socket: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The host: accelerator, QEMU, resources.
    #[command(subcommand)]
    Host(cmd::host::HostCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(cmd::vm::VmCommand),
    /// Benchmarks against a live host.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// VHDX and raw disk images (works without a running host).
    #[command(subcommand)]
    Disk(cmd::disk::DiskCommand),
    /// VM checkpoints (snapshots): new, list, apply, remove (live merge), export.
    #[command(subcommand)]
    Checkpoint(cmd::checkpoint::CheckpointCommand),
    /// Long-running jobs (live merges).
    #[command(subcommand)]
    Job(cmd::checkpoint::JobCommand),
    /// Virtual switches: new, list, show, delete, acl, mirror, capture, stats.
    #[command(subcommand)]
    Switch(cmd::switch::SwitchCommand),
    /// Dynamic memory: the balancer's view of the host and its VMs.
    #[command(subcommand)]
    Memory(cmd::memory::MemoryCommand),
    /// Replica: replication to another host, recovery points, failover.
    #[command(subcommand)]
    Replica(cmd::replica::ReplicaCommand),
}

fn main() {
    // Behave like a Unix tool when piped into `head`: die quietly on SIGPIPE.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("{}", usage_error_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Disk(c) => cmd::disk::run(c).map(|_| 0),
        other => run_remote(&cli.socket, other),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

fn run_remote(socket: &std::path::Path, command: Command) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = api::Client::new(socket);
    rt.block_on(async move {
        match command {
            Command::Host(c) => cmd::host::run(&client, c).await.map(|_| 0),
            Command::Vm(c) => cmd::vm::run(&client, c).await,
            Command::Bench(c) => cmd::bench::run(&client, c).await.map(|_| 0),
            Command::Checkpoint(c) => cmd::checkpoint::run(&client, c).await.map(|_| 0),
            Command::Job(c) => cmd::checkpoint::run_job(&client, c).await.map(|_| 0),
            Command::Switch(c) => cmd::switch::run(&client, c).await.map(|_| 0),
            Command::Memory(c) => cmd::memory::run(&client, c).await.map(|_| 0),
            Command::Replica(c) => cmd::replica::run(&client, c).await.map(|_| 0),
            Command::Disk(_) => unreachable!("handled locally"),
        }
    })
}

/// clap's multi-line usage error as one line (the contract: one line on stderr).
fn usage_error_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    format!("{} (see --help)", parts.join(" "))
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
