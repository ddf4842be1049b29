//! `vireo disk ...` (owned by the VHDX work).
use clap::Subcommand;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Show information about an image.
    Info { path: std::path::PathBuf },
}

pub fn run(cmd: DiskCommand) -> anyhow::Result<()> {
    match cmd {
        DiskCommand::Info { path } => anyhow::bail!("not yet: {}", path.display()),
    }
}
