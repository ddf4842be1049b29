//! The guest agent laid into the initramfs: Vireo's own static `vireo-guest`, Debian's
//! `qemu-ga` with the shared libraries it needs, or none.

use crate::cache::{sha256_hex, Cache, Inputs};
use crate::{cmd, debs, elf};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Which agent the guest runs (respawned by busybox init).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentKind {
    /// `/sbin/vireo-guest`, built from the `agent` crate as a static executable.
    Vireo,
    /// Debian's `/usr/sbin/qemu-ga` on `/dev/virtio-ports/org.qemu.guest_agent.0`.
    QemuGa,
    /// No agent.
    None,
}

impl AgentKind {
    /// The name written to the guest's `/etc/vireo-guest.conf` (`AGENT=`).
    pub fn name(self) -> &'static str {
        match self {
            AgentKind::Vireo => "vireo",
            AgentKind::QemuGa => "qemu-ga",
            AgentKind::None => "none",
        }
    }
}

/// Files to add to the initramfs: (absolute guest path, mode, bytes).
pub type GuestFiles = Vec<(String, u32, Vec<u8>)>;

/// Collects the agent's files and records their identity in `inputs`.
pub fn payload(
    kind: AgentKind,
    repo: &Path,
    cache: &Cache,
    agent_bin: Option<&Path>,
    inputs: &mut Inputs,
) -> Result<GuestFiles> {
    inputs.add("agent", kind.name());
    match kind {
        AgentKind::None => Ok(Vec::new()),
        AgentKind::Vireo => {
            let path = match agent_bin {
                Some(p) => p.to_path_buf(),
                None => build_vireo_guest(repo)?,
            };
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if !elf::is_static(&bytes).with_context(|| format!("inspecting {}", path.display()))? {
                bail!(
                    "{} is dynamically linked; the guest has no libc: build it with RUSTFLAGS=\"-C target-feature=+crt-static\"",
                    path.display()
                );
            }
            inputs.add("agent-bin", sha256_hex(&bytes));
            Ok(vec![("/sbin/vireo-guest".to_owned(), 0o755, bytes)])
        }
        AgentKind::QemuGa => qemu_ga(cache, inputs),
    }
}

/// Builds `vireo-guest` statically with its own target dir; returns the binary's path.
pub fn build_vireo_guest(repo: &Path) -> Result<PathBuf> {
    let target_dir = repo.join("target-guest-agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut c = cmd::command(
        &cargo,
        [
            "build",
            "--quiet",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "agent",
            "--bin",
            "vireo-guest",
        ],
    );
    c.current_dir(repo)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Stripped: the workspace's release profile keeps debug info (for profiling the
        // host side), which tripled the agent's size and so the initramfs a generation 1
        // guest's BIOS reads sector by sector (minutes under TCG on a loaded host).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    cmd::run(c).context(
        "building the static guest agent (agent crate, bin vireo-guest); use --agent none or --agent qemu-ga meanwhile",
    )?;
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/vireo-guest"))
}

/// Debian's qemu-ga from the downloaded (never installed) qemu-guest-agent package, with its
/// libraries resolved by ldd on the host (same Debian release) and the dynamic loader.
fn qemu_ga(cache: &Cache, inputs: &mut Inputs) -> Result<GuestFiles> {
    let pkg = debs::candidate("qemu-guest-agent")?;
    let root = debs::ensure_unpacked(cache, &pkg)?;
    let bin = root.join("usr/sbin/qemu-ga");
    cmd::require_file(&bin, "qemu-guest-agent")?;
    inputs.add("qemu-guest-agent", &pkg.version);
    let mut files: GuestFiles = vec![(
        "/usr/sbin/qemu-ga".to_owned(),
        0o755,
        fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?,
    )];
    let mut c = cmd::command("ldd", [&bin]);
    c.env("LC_ALL", "C");
    let out = cmd::stdout(c)?;
    for line in out.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("qemu-ga needs a library the host lacks ({line}): run scripts/setup.sh");
        }
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        if !path.starts_with('/') {
            continue; // linux-vdso.so.1
        }
        let bytes = fs::read(path).with_context(|| format!("reading {path}"))?;
        inputs.add(&format!("lib {path}"), sha256_hex(&bytes));
        files.push((path.to_owned(), 0o755, bytes));
    }
    Ok(files)
}
