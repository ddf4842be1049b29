//! `vireo`: the command-line client for Vireo hosts.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vireo", version, about = "Manage Vireo virtualization hosts")]
struct Cli {
    /// Path of the vireod API socket.
    #[arg(long, global = true, env = "VIREO_SOCKET", default_value = "/run/vireo/vireod.sock")]
    socket: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// VHDX and raw disk images (works without a running host).
    #[command(subcommand)]
    Disk(cmd::disk::DiskCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Disk(c) => cmd::disk::run(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
