//! `cargo xtask`: project automation that is not part of the product.
//!
//! Owns the test guests: a Debian kernel and a busybox initramfs carrying a guest agent,
//! on bootable disk images for generation 1 (BIOS/MBR) and generation 2 (UEFI/GPT with the
//! Microsoft-signed Secure Boot chain), cached by a hash of their inputs; and the boot tests
//! that prove they work. See docs/test-guests.md.

mod agent;
mod boot;
mod cache;
mod cmd;
mod cpio;
mod debs;
mod disk;
mod elf;
mod image;
mod kernel;
mod suite;
mod testcmd;

use agent::AgentKind;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Vireo project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Variant names are the CLI subcommand names (guest-image, guest-test, ...).
#[allow(clippy::enum_variant_names)]
#[derive(Subcommand)]
enum Cmd {
    /// Build (or take from the cache) a bootable test-guest disk image.
    GuestImage(GuestImageArgs),
    /// Download and unpack the guest kernel and qemu-guest-agent into the cache.
    GuestFetch(CacheArgs),
    /// Print the guest kernel's package, version and vmlinuz path (fetching it if needed).
    GuestKernel(CacheArgs),
    /// Boot an image under QEMU (TCG) the way the tests do; interactive on this terminal.
    GuestBoot(boot::BootArgs),
    /// Boot tests: each generation, qemu-ga, VHDX output, cache behaviour.
    GuestTest(testcmd::TestArgs),
    /// Remove cached images made by other builder versions (or all with --all).
    GuestCacheClean(CleanArgs),
    /// Build every test binary once and run them in parallel lanes, with wall times.
    TestSuite(suite::SuiteArgs),
}

#[derive(Args, Clone)]
struct CleanArgs {
    /// Remove every cached image, not only stale ones.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args, Clone)]
struct CacheArgs {
    /// Cache directory [default: <repo>/.cache/guest]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct GuestImageArgs {
    /// Machine generation: 1 (pc, SeaBIOS, IDE) or 2 (q35, OVMF Secure Boot, virtio-scsi).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    generation: u8,
    /// Output image; `.vhdx` gives a dynamic VHDX, anything else raw.
    #[arg(long, required_unless_present = "print_cache_key")]
    out: Option<PathBuf>,
    /// Guest agent started (and respawned) by the guest.
    #[arg(long, value_enum, default_value = "vireo")]
    agent: AgentKind,
    /// Use this static vireo-guest binary instead of building the agent crate.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Disk size (multiple of 1M, at least 64M).
    #[arg(long, default_value = "256M")]
    size: String,
    /// Kernel package (NAME or NAME=VERSION) instead of what linux-image-amd64 depends on.
    #[arg(long)]
    kernel_package: Option<String>,
    /// Extra file for the initramfs, GUEST_PATH=HOST_FILE (mode 0755); repeatable.
    #[arg(long = "extra-file", value_name = "GUEST_PATH=HOST_FILE")]
    extra_files: Vec<String>,
    /// Leave out the network test programs (ip, tc, iperf3, dnsmasq, tcpdump and their
    /// libraries, about 3 MiB of compressed initramfs).
    #[arg(long)]
    no_net_tools: bool,
    /// Print the cache key and the inputs it hashes, build nothing.
    #[arg(long)]
    print_cache_key: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

/// The repository root (xtask's parent directory).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

fn open_cache(a: &CacheArgs) -> Result<cache::Cache> {
    let dir = a
        .cache_dir
        .clone()
        .unwrap_or_else(|| repo_root().join(".cache/guest"));
    cache::Cache::open(&dir)
}

impl GuestImageArgs {
    fn spec(&self) -> Result<image::ImageSpec> {
        let mut extra_files = Vec::new();
        for e in &self.extra_files {
            let (g, h) = e
                .split_once('=')
                .with_context(|| format!("--extra-file {e:?}: expected GUEST_PATH=HOST_FILE"))?;
            extra_files.push((g.to_owned(), PathBuf::from(h)));
        }
        Ok(image::ImageSpec {
            generation: image::Generation::from_number(self.generation)?,
            agent: self.agent,
            agent_bin: self.agent_bin.clone(),
            size: image::parse_size(&self.size)?,
            kernel_package: self.kernel_package.clone(),
            extra_files,
            net_tools: !self.no_net_tools,
        })
    }
}

fn guest_image(a: &GuestImageArgs) -> Result<()> {
    let spec = a.spec()?;
    disk::check_size(spec.size)?;
    let cache = open_cache(&a.cache)?;
    let repo = repo_root();
    if a.print_cache_key {
        let (key, inputs) = image::cache_key(&repo, &cache, &spec)?;
        println!("{key}");
        eprint!("{inputs}");
        return Ok(());
    }
    let Some(out) = &a.out else {
        anyhow::bail!("--out is required");
    };
    let built = image::build(&repo, &cache, &spec)?;
    image::export(&cache, &built, out)?;
    println!(
        "guest: {} {} (key {}{})",
        if built.hit { "cached" } else { "wrote" },
        out.display(),
        built.key,
        if built.hit { ", cache hit" } else { "" }
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::GuestImage(a) => guest_image(&a),
        Cmd::GuestFetch(a) => open_cache(&a).and_then(|c| {
            let _lock = c.lock()?;
            let pkg = kernel::resolve(None)?;
            kernel::ensure(&c, &pkg)?;
            debs::ensure_unpacked(&c, &debs::candidate("qemu-guest-agent")?)?;
            let mut inputs = cache::Inputs::default();
            debs::programs_with_libs(&c, image::NET_TOOLS, image::NET_TOOL_LIBS, &mut inputs)?;
            Ok(())
        }),
        Cmd::GuestKernel(a) => open_cache(&a).and_then(|c| {
            let _lock = c.lock()?;
            let k = kernel::ensure(&c, &kernel::resolve(None)?)?;
            println!("package {} {}", k.pkg.name, k.pkg.version);
            println!("release {}", k.kver);
            println!("vmlinuz {}", k.vmlinuz().display());
            println!("modules {}", k.modules_dir().display());
            Ok(())
        }),
        Cmd::GuestBoot(a) => boot::boot_cmd(&a),
        Cmd::GuestTest(a) => testcmd::run(&a),
        Cmd::TestSuite(a) => suite::run(&a, &repo_root()),
        Cmd::GuestCacheClean(a) => open_cache(&a.cache).and_then(|c| {
            let removed = image::clean(&c, a.all)?;
            if removed > 0 {
                println!("guest: removed {removed} cached image(s)");
            }
            Ok(())
        }),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
