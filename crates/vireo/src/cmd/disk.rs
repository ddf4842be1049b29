//! `vireo disk ...`: create, inspect, check, resize, merge, compact and convert
//! disk images with the `vhdx` crate (works without a running host).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use vhdx::{CreateOptions, DiskType, ImageFormat, OpenOptions, Vhdx};

/// Disk commands.
#[derive(Subcommand)]
pub enum DiskCommand {
    /// Create a VHDX image (dynamic, fixed, or differencing with --parent).
    New {
        /// Image to create (must not exist).
        path: PathBuf,
        /// Virtual size, e.g. 64G, 512M, 1T (not with --parent).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Kind of disk.
        #[arg(long = "type", value_enum, default_value = "dynamic")]
        kind: Kind,
        /// Block size, 1M to 256M, a power of two (default 32M, or the parent's).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Logical sector size, 512 or 4096.
        #[arg(long)]
        sector_size: Option<u32>,
        /// Physical sector size, 512 or 4096 (default 4096).
        #[arg(long)]
        physical_sector_size: Option<u32>,
        /// Parent image: creates a differencing disk.
        #[arg(long, conflicts_with_all = ["size", "kind"])]
        parent: Option<PathBuf>,
    },
    /// Serve an image or VHDX chain over NBD on a unix socket (like qemu-nbd).
    Serve {
        /// Image (the leaf of a chain).
        path: PathBuf,
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
    },
    /// Show an image and its whole chain.
    Info {
        /// Image.
        path: PathBuf,
        /// Print a JSON object (documented in docs/disks.md).
        #[arg(long)]
        json: bool,
    },
    /// Check an image's consistency; --repair replays the log and fixes what it can.
    Check {
        /// Image.
        path: PathBuf,
        /// Repair.
        #[arg(long)]
        repair: bool,
    },
    /// Change the virtual size (shrinking needs an unused tail).
    Resize {
        /// Image.
        path: PathBuf,
        /// New virtual size, e.g. 100G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Merge a differencing disk into its parent (or an older ancestor), or with
    /// --into-child merge the whole chain into the child to drop the base.
    Merge {
        /// Differencing disk.
        child: PathBuf,
        /// Ancestor to merge into (default: the parent).
        #[arg(long, conflicts_with = "into_child")]
        into: Option<PathBuf>,
        /// Merge the parents into CHILD, which becomes a standalone dynamic disk.
        #[arg(long)]
        into_child: bool,
    },
    /// Reclaim zeroed and unmapped blocks and shrink the file.
    Compact {
        /// Image.
        path: PathBuf,
    },
    /// Convert between raw, VHDX and qcow2 (qcow2 through qemu-img).
    Convert {
        /// Source image (format detected).
        src: PathBuf,
        /// Destination (must not exist).
        dst: PathBuf,
        /// Output format (default: from the extension of DST; raw otherwise).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// VHDX output kind.
        #[arg(long = "type", value_enum, default_value = "dynamic")]
        kind: Kind,
        /// VHDX block size.
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// VHDX logical sector size, 512 or 4096.
        #[arg(long)]
        sector_size: Option<u32>,
    },
}

/// VHDX disk kinds a user can create.
#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    /// Allocated on write.
    Dynamic,
    /// Allocated at creation.
    Fixed,
}

/// Output formats of convert.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// MS-VHDX.
    Vhdx,
    /// Raw.
    Raw,
    /// qcow2 (via qemu-img).
    Qcow2,
}

/// Parses sizes such as `64G`, `512M`, `1T`, `1.5G`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => {
                    return Err(format!(
                        "unknown size unit {c:?} in {s:?} (use K, M, G, T or P)"
                    ))
                }
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    let bad = || {
        format!("invalid size {s:?}: expected a number with an optional K/M/G/T/P suffix, e.g. 64G")
    };
    let v = if let Some((i, f)) = num.split_once('.') {
        let i: u64 = i.parse().map_err(|_| bad())?;
        if f.is_empty() || f.len() > 6 || !f.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let frac: u64 = f.parse().map_err(|_| bad())?;
        let scale = 10u64.pow(f.len() as u32);
        i.checked_mul(mul)
            .and_then(|a| a.checked_add(frac.checked_mul(mul)? / scale))
            .ok_or_else(|| format!("size {s:?} is too large"))?
    } else {
        let i: u64 = num.parse().map_err(|_| bad())?;
        i.checked_mul(mul)
            .ok_or_else(|| format!("size {s:?} is too large"))?
    };
    if v == 0 {
        return Err(format!("size {s:?} must be greater than zero"));
    }
    Ok(v)
}

fn block_size(v: Option<u64>) -> anyhow::Result<u32> {
    match v {
        None => Ok(0),
        Some(b) => {
            u32::try_from(b).map_err(|_| anyhow::anyhow!("block size {b} is larger than 256M"))
        }
    }
}

/// A progress bar on a terminal, nothing when stderr is piped.
fn bar(msg: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(1);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(msg);
    b
}

fn with_bar<T>(msg: &'static str, f: impl FnOnce(&dyn Fn(u64, u64)) -> T) -> T {
    let b = bar(msg);
    let cb = |done: u64, total: u64| {
        b.set_length(total.max(1));
        b.set_position(done);
    };
    let r = f(&cb);
    b.finish_and_clear();
    r
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Runs a disk command.
pub fn run(cmd: DiskCommand) -> anyhow::Result<()> {
    let never = AtomicBool::new(false);
    match cmd {
        DiskCommand::Serve {
            path,
            socket,
            read_only,
        } => super::serve::serve(&path, &socket, read_only)?,
        DiskCommand::New {
            path,
            size,
            kind,
            block_size: bs,
            sector_size,
            physical_sector_size,
            parent,
        } => {
            let opts = CreateOptions {
                size: match (&parent, size) {
                    (Some(_), _) => 0,
                    (None, Some(s)) => s,
                    (None, None) => {
                        bail!("--size is required (or --parent for a differencing disk)")
                    }
                },
                disk_type: match (&parent, kind) {
                    (Some(_), _) => DiskType::Differencing,
                    (None, Kind::Fixed) => DiskType::Fixed,
                    (None, Kind::Dynamic) => DiskType::Dynamic,
                },
                block_size: block_size(bs)?,
                logical_sector_size: sector_size.unwrap_or(0),
                physical_sector_size: physical_sector_size.unwrap_or(0),
                parent,
            };
            let v = with_bar("allocating", |p| vhdx::create(&path, &opts, p))
                .with_context(|| format!("creating {}", path.display()))?;
            println!(
                "created {} ({}, {} virtual, {} blocks)",
                path.display(),
                v.disk_type().as_str(),
                human(v.size()),
                human(v.block_size().into())
            );
            v.close()?;
        }
        DiskCommand::Info { path, json } => info(&path, json)?,
        DiskCommand::Check { path, repair } => {
            let r = vhdx::check(&path, repair)
                .with_context(|| format!("checking {}", path.display()))?;
            for e in &r.repaired {
                println!("repaired: {e}");
            }
            for e in &r.errors {
                println!("ERROR: {e}");
            }
            println!(
                "{}/{} blocks allocated; {} leaked; chain of {}",
                r.allocated_blocks,
                r.total_blocks,
                human(r.leaked_bytes),
                r.chain_length
            );
            if r.is_clean() {
                println!("No errors were found on the image.");
            } else {
                bail!(
                    "{} error(s) found in {}; run with --repair",
                    r.errors.len(),
                    path.display()
                );
            }
        }
        DiskCommand::Resize { path, size } => {
            let v = Vhdx::open(&path, OpenOptions { read_only: false })
                .with_context(|| format!("opening {}", path.display()))?;
            v.resize(size)
                .with_context(|| format!("resizing {}", path.display()))?;
            v.close()?;
            println!("{} is now {}", path.display(), human(size));
        }
        DiskCommand::Merge {
            child,
            into,
            into_child,
        } => {
            if into_child {
                with_bar("merging", |p| vhdx::merge_into_child(&child, p, &never))
                    .with_context(|| format!("merging the chain into {}", child.display()))?;
                println!("{} no longer depends on a parent", child.display());
            } else {
                let t = with_bar("merging", |p| {
                    vhdx::merge(&child, into.as_deref(), p, &never)
                })
                .with_context(|| format!("merging {}", child.display()))?;
                println!(
                    "merged {} into {}; {} (and any image between) is now obsolete",
                    child.display(),
                    t.display(),
                    child.display()
                );
            }
        }
        DiskCommand::Compact { path } => {
            let s = with_bar("compacting", |p| vhdx::compact(&path, p, &never))
                .with_context(|| format!("compacting {}", path.display()))?;
            println!(
                "{}: {} -> {} ({} zero blocks released, {} blocks moved)",
                path.display(),
                human(s.before),
                human(s.after),
                s.zero_blocks,
                s.moved_blocks
            );
        }
        DiskCommand::Convert {
            src,
            dst,
            format,
            kind,
            block_size: bs,
            sector_size,
        } => {
            let opts = vhdx::ConvertOptions {
                format: format.map(|f| match f {
                    Format::Vhdx => ImageFormat::Vhdx,
                    Format::Raw => ImageFormat::Raw,
                    Format::Qcow2 => ImageFormat::Qcow2,
                }),
                vhdx: CreateOptions {
                    disk_type: match kind {
                        Kind::Fixed => DiskType::Fixed,
                        Kind::Dynamic => DiskType::Dynamic,
                    },
                    block_size: block_size(bs)?,
                    logical_sector_size: sector_size.unwrap_or(0),
                    ..Default::default()
                },
            };
            with_bar("converting", |p| {
                vhdx::convert(&src, &dst, &opts, p, &never)
            })
            .with_context(|| format!("converting {} to {}", src.display(), dst.display()))?;
            println!("converted {} -> {}", src.display(), dst.display());
        }
    }
    Ok(())
}

fn info(path: &Path, json: bool) -> anyhow::Result<()> {
    let v = Vhdx::open(path, OpenOptions { read_only: true })
        .with_context(|| format!("opening {}", path.display()))?;
    let chain: Vec<serde_json::Value> = v
        .chain()
        .iter()
        .map(|c| {
            serde_json::json!({
                "path": c.path.display().to_string(),
                "type": c.disk_type.as_str(),
                "virtual_size": c.virtual_size,
                "data_write_guid": c.data_write_guid.to_string(),
            })
        })
        .collect();
    let parent = v.parent().map(|p| p.path().display().to_string());
    let obj = serde_json::json!({
        "path": path.display().to_string(),
        "format": "vhdx",
        "type": v.disk_type().as_str(),
        "virtual_size": v.size(),
        "block_size": v.block_size(),
        "logical_sector_size": v.logical_sector_size(),
        "physical_sector_size": v.physical_sector_size(),
        "file_size": v.file_size()?,
        "disk_usage": v.disk_usage()?,
        "allocated_bytes": v.allocated_bytes(),
        "data_write_guid": v.data_write_guid().to_string(),
        "virtual_disk_id": v.virtual_disk_id().to_string(),
        "creator": v.creator(),
        "parent": parent,
        "chain": chain,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&obj)?);
        return Ok(());
    }
    println!("image:                {}", path.display());
    println!("type:                 {}", v.disk_type().as_str());
    println!(
        "virtual size:         {} ({} bytes)",
        human(v.size()),
        v.size()
    );
    println!("block size:           {}", human(v.block_size().into()));
    println!(
        "sector size:          {} logical, {} physical",
        v.logical_sector_size(),
        v.physical_sector_size()
    );
    println!(
        "file size:            {} ({} on disk)",
        human(v.file_size()?),
        human(v.disk_usage()?)
    );
    println!("allocated:            {}", human(v.allocated_bytes()));
    println!("data write guid:      {}", v.data_write_guid());
    println!("virtual disk id:      {}", v.virtual_disk_id());
    if let Some(p) = &parent {
        println!("parent:               {p}");
    }
    if v.chain().len() > 1 {
        println!("chain:");
        for (i, c) in v.chain().iter().enumerate() {
            println!(
                "  {i}: {} ({}, {})",
                c.path.display(),
                c.disk_type.as_str(),
                human(c.virtual_size)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command group end to end on real files: new (dynamic, fixed,
    /// differencing), info, check, resize, merge both ways, compact, convert;
    /// bad input is refused and leaves nothing behind.
    #[test]
    fn commands_end_to_end() {
        let dir = std::env::temp_dir().join(format!("vireo-disk-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n);
        let new = |path: PathBuf, size: Option<u64>, kind: Kind, parent: Option<PathBuf>| {
            DiskCommand::New {
                path,
                size,
                kind,
                block_size: Some(1 << 20),
                sector_size: None,
                physical_sector_size: None,
                parent,
            }
        };
        run(new(p("base.vhdx"), Some(16 << 20), Kind::Dynamic, None)).unwrap();
        run(new(p("fixed.vhdx"), Some(8 << 20), Kind::Fixed, None)).unwrap();
        run(new(
            p("child.vhdx"),
            None,
            Kind::Dynamic,
            Some(p("base.vhdx")),
        ))
        .unwrap();
        assert!(run(new(p("bad.vhdx"), None, Kind::Dynamic, None)).is_err());
        assert!(run(new(p("base.vhdx"), Some(1 << 20), Kind::Dynamic, None)).is_err());
        assert!(!p("bad.vhdx").exists());
        {
            let v = Vhdx::open(p("child.vhdx"), OpenOptions { read_only: false }).unwrap();
            v.write_at(&[0xAB; 8192], 4096).unwrap();
            v.close().unwrap();
        }
        run(DiskCommand::Info {
            path: p("child.vhdx"),
            json: true,
        })
        .unwrap();
        run(DiskCommand::Check {
            path: p("child.vhdx"),
            repair: false,
        })
        .unwrap();
        run(DiskCommand::Convert {
            src: p("child.vhdx"),
            dst: p("flat.raw"),
            format: None,
            kind: Kind::Dynamic,
            block_size: None,
            sector_size: None,
        })
        .unwrap();
        let raw = std::fs::read(p("flat.raw")).unwrap();
        assert_eq!(raw.len(), 16 << 20);
        assert!(raw[4096..12288].iter().all(|&b| b == 0xAB));
        std::fs::copy(p("child.vhdx"), p("child2.vhdx")).unwrap();
        run(DiskCommand::Merge {
            child: p("child2.vhdx"),
            into: None,
            into_child: true,
        })
        .unwrap();
        run(DiskCommand::Merge {
            child: p("child.vhdx"),
            into: None,
            into_child: false,
        })
        .unwrap();
        run(DiskCommand::Resize {
            path: p("base.vhdx"),
            size: 32 << 20,
        })
        .unwrap();
        run(DiskCommand::Compact {
            path: p("base.vhdx"),
        })
        .unwrap();
        let v = Vhdx::open(p("base.vhdx"), OpenOptions { read_only: true }).unwrap();
        assert_eq!(v.size(), 32 << 20);
        let mut b = vec![0u8; 8192];
        v.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0xAB));
        drop(v);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Sizes parse with binary units; bad input is refused with a clear message.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        for bad in ["", "G", "12X", "-1G", "0", "1..2G", "99999999999P", "1e9"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}

/// Format of a disk created for a VM.
#[derive(Clone, Copy, ValueEnum)]
pub enum NewFormatArg {
    /// Dynamic VHDX (default; checkpoints need it).
    Vhdx,
    /// Sparse raw file (no checkpoints).
    Raw,
}

impl From<NewFormatArg> for api::checkpoint::NewImageFormat {
    fn from(f: NewFormatArg) -> Self {
        match f {
            NewFormatArg::Vhdx => api::checkpoint::NewImageFormat::Vhdx,
            NewFormatArg::Raw => api::checkpoint::NewImageFormat::Raw,
        }
    }
}

/// `vireo vm disk ...`: the disks of a VM.
#[derive(Subcommand)]
pub enum VmDiskCommand {
    /// Add a disk to a VM that is off: a new image in the VM's directory (--size; a
    /// dynamic VHDX unless --format raw), or an existing image (--path).
    Add {
        /// VM name.
        vm: String,
        /// Size of a new disk, e.g. 10G.
        #[arg(long, value_parser = parse_size, conflicts_with = "path", required_unless_present = "path")]
        size: Option<u64>,
        /// Existing image to attach.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Format of the new disk.
        #[arg(long, value_enum, requires = "size")]
        format: Option<NewFormatArg>,
        /// Bus (default: IDE for generation 1, SCSI for 2).
        #[arg(long, value_enum)]
        bus: Option<super::vm::BusArg>,
        /// Attach read-only.
        #[arg(long)]
        read_only: bool,
    },
}

/// Sends a disk-add request; returns the VM as it is afterwards.
pub async fn add_to_vm(
    client: &api::Client,
    vm: &str,
    req: &api::checkpoint::AddDisk,
) -> anyhow::Result<api::VmInfo> {
    let path = format!("/v1/vms/{}/disks", urlencode(vm));
    Ok(client.post(&path, req).await?)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `vireo vm disk ...`; returns the exit code.
pub async fn run_vm_disk(client: &api::Client, cmd: VmDiskCommand) -> anyhow::Result<i32> {
    match cmd {
        VmDiskCommand::Add {
            vm,
            size,
            path,
            format,
            bus,
            read_only,
        } => {
            let path = match path {
                Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
                p => p,
            };
            let req = api::checkpoint::AddDisk {
                path,
                size,
                format: format.map(Into::into),
                bus: bus.map(Into::into),
                read_only,
            };
            let info = add_to_vm(client, &vm, &req).await?;
            if let Some(d) = info.disks.last() {
                println!(
                    "{vm}: disk {} is {}",
                    info.disks.len() - 1,
                    d.path.display()
                );
            }
            Ok(0)
        }
    }
}
