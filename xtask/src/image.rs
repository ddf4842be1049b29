//! `guest-image`: the test-guest image builder and its cache.
//!
//! Inputs (kernel package version, busybox, agent bytes, the files under `guest/`, boot
//! loaders, options, [`BUILDER_VERSION`]) are listed and hashed into a key; the image is
//! built once per key under `<cache>/images/` and copied (reflinked where possible) to
//! `--out`.

use crate::agent::{self, AgentKind, GuestFiles};
use crate::cache::{self, sha256_hex, Cache, Inputs};
use crate::cpio::Archive;
use crate::{cmd, debs, disk, elf, kernel};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bump when the builder's output changes for equal inputs.
pub const BUILDER_VERSION: &str = "vireo-guest-image/3";

/// Kernel command line of every test guest. `memhp_default_state=online_movable`: the guest
/// has no udev, so memory hot-added by virtio-mem (dynamic memory) is onlined by the kernel
/// itself, as movable memory that can be unplugged again.
pub const CMDLINE: &str =
    "console=ttyS0,115200 quiet panic=-1 no_timer_check memhp_default_state=online_movable";

/// The static busybox (package busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// Files from `guest/` laid into every initramfs: (guest path, mode, bytes).
const GUEST_FILES: &[(&str, u32, &[u8])] = &[
    ("/init", 0o755, include_bytes!("../../guest/init")),
    (
        "/etc/vireo/ready",
        0o755,
        include_bytes!("../../guest/vireo/ready"),
    ),
    (
        "/etc/vireo/agent-run",
        0o755,
        include_bytes!("../../guest/vireo/agent-run"),
    ),
    (
        "/etc/udhcpc.script",
        0o755,
        include_bytes!("../../guest/udhcpc.script"),
    ),
    (
        "/etc/acpi/PWRF/00000080",
        0o755,
        include_bytes!("../../guest/acpi/power-button"),
    ),
    (
        "/etc/acpid.conf",
        0o644,
        include_bytes!("../../guest/acpid.conf"),
    ),
    ("/etc/profile", 0o644, include_bytes!("../../guest/profile")),
    (
        "/sbin/shutdown",
        0o755,
        include_bytes!("../../guest/shutdown"),
    ),
];

/// Network test programs every guest carries unless [`ImageSpec::net_tools`] is off: the
/// real `ip` (802.1Q sub-interfaces: `ip link add link eth0 name eth0.10 type vlan id 10`)
/// and `tc` from iproute2, `iperf3`, `dnsmasq`, `tcpdump`. busybox provides `ping`, `arping`,
/// `udhcpc` and `udhcpd`.
pub const NET_TOOLS: &[debs::Program] = &[
    debs::Program {
        package: "iproute2",
        path: "bin/ip",
        guest: "/sbin/ip",
    },
    debs::Program {
        package: "iproute2",
        path: "sbin/tc",
        guest: "/sbin/tc",
    },
    debs::Program {
        package: "iperf3",
        path: "usr/bin/iperf3",
        guest: "/usr/bin/iperf3",
    },
    debs::Program {
        package: "dnsmasq-base",
        path: "usr/sbin/dnsmasq",
        guest: "/usr/sbin/dnsmasq",
    },
    debs::Program {
        package: "tcpdump",
        path: "usr/bin/tcpdump",
        guest: "/usr/bin/tcpdump",
    },
];

/// Library packages unpacked for [`NET_TOOLS`] so the host needs none of them installed.
pub const NET_TOOL_LIBS: &[&str] = &["libiperf0", "libpcap0.8"];

/// `/etc/passwd`: root, and the users dnsmasq (`nobody`, `dnsmasq`) and tcpdump drop to.
const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n\
dnsmasq:x:100:65534:dnsmasq:/nonexistent:/bin/false\n\
tcpdump:x:101:102:tcpdump:/nonexistent:/bin/false\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";

/// `/etc/group`.
const GROUP: &[u8] = b"root:x:0:\ntty:x:5:\ntcpdump:x:102:\nnogroup:x:65534:\n";

/// Machine generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// `pc`, SeaBIOS, IDE, MBR + syslinux.
    One,
    /// `q35`, OVMF (Secure Boot), virtio-scsi, GPT + ESP with shim and signed grub.
    Two,
}

impl Generation {
    /// From `1` or `2`.
    pub fn from_number(n: u8) -> Result<Self> {
        match n {
            1 => Ok(Self::One),
            2 => Ok(Self::Two),
            _ => bail!("generation must be 1 or 2, got {n}"),
        }
    }

    /// `1` or `2`.
    pub fn number(self) -> u8 {
        match self {
            Self::One => 1,
            Self::Two => 2,
        }
    }
}

/// What to build.
pub struct ImageSpec {
    /// Machine generation the image boots on.
    pub generation: Generation,
    /// Guest agent.
    pub agent: AgentKind,
    /// Use this vireo-guest binary instead of building it.
    pub agent_bin: Option<PathBuf>,
    /// Disk size in bytes.
    pub size: u64,
    /// Kernel package override (`NAME` or `NAME=VERSION`).
    pub kernel_package: Option<String>,
    /// Extra files: (absolute guest path, host file).
    pub extra_files: Vec<(String, PathBuf)>,
    /// Carry [`NET_TOOLS`] (with their libraries).
    pub net_tools: bool,
}

/// A built (or found) image in the cache.
pub struct Built {
    /// Cache key.
    pub key: String,
    /// The cached raw image.
    pub image: PathBuf,
    /// True when the image was already cached.
    pub hit: bool,
}

/// Parses sizes such as `256M`, `1G`, `67108864`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => bail!("bad size suffix in {s:?} (K, M or G)"),
            };
            (&s[..i], mul)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mul)
        .with_context(|| format!("size {s:?} overflows"))
}

/// Everything that goes into the image, gathered before the cache lookup.
struct Prepared {
    inputs: Inputs,
    kernel: kernel::Kernel,
    modules: kernel::Modules,
    busybox: Vec<u8>,
    agent_files: GuestFiles,
    tool_files: GuestFiles,
    extra: GuestFiles,
}

fn prepare(repo: &Path, cache: &Cache, spec: &ImageSpec) -> Result<Prepared> {
    let mut inputs = Inputs::default();
    inputs.add("builder", BUILDER_VERSION);
    inputs.add("generation", spec.generation.number().to_string());
    inputs.add("size", spec.size.to_string());
    inputs.add("cmdline", CMDLINE);

    let pkg = kernel::resolve(spec.kernel_package.as_deref())?;
    let kernel = kernel::ensure(cache, &pkg)?;
    inputs.add("kernel", format!("{} {}", pkg.name, pkg.version));
    let modules = kernel::resolve_modules(&kernel, kernel::MODULES)?;
    inputs.add("modules", modules.order.join(","));

    cmd::require_file(Path::new(BUSYBOX), "busybox-static")?;
    let busybox = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
    if !elf::is_static(&busybox)? {
        bail!("{BUSYBOX} is not static: install busybox-static (scripts/setup.sh)");
    }
    inputs.add("busybox", sha256_hex(&busybox));
    for (path, mode, bytes) in GUEST_FILES {
        inputs.add(&format!("file {path} {mode:o}"), sha256_hex(bytes));
    }
    let boot_files: &[&str] = match spec.generation {
        Generation::One => &[disk::SYSLINUX_MBR, disk::SYSLINUX],
        Generation::Two => &[disk::SHIM, disk::GRUB],
    };
    for f in boot_files {
        inputs.add(&format!("boot {f}"), cache::sha256_file(Path::new(f))?);
    }

    let agent_files = agent::payload(
        spec.agent,
        repo,
        cache,
        spec.agent_bin.as_deref(),
        &mut inputs,
    )?;
    inputs.add("net-tools", if spec.net_tools { "on" } else { "off" });
    let tool_files = if spec.net_tools {
        debs::programs_with_libs(cache, NET_TOOLS, NET_TOOL_LIBS, &mut inputs)?
    } else {
        Vec::new()
    };
    let mut extra = Vec::new();
    for (guest, host) in &spec.extra_files {
        if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
            bail!("extra file destination {guest:?} must be an absolute path without ..");
        }
        let bytes = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        inputs.add(&format!("extra {guest}"), sha256_hex(&bytes));
        extra.push((guest.clone(), 0o755, bytes));
    }
    Ok(Prepared {
        inputs,
        kernel,
        modules,
        busybox,
        agent_files,
        tool_files,
        extra,
    })
}

/// Computes the cache key (and the input list) without building.
pub fn cache_key(repo: &Path, cache: &Cache, spec: &ImageSpec) -> Result<(String, String)> {
    let _lock = cache.lock()?;
    let p = prepare(repo, cache, spec)?;
    Ok((p.inputs.key(), p.inputs.text()))
}

/// Builds the image unless the cache has it.
pub fn build(repo: &Path, cache: &Cache, spec: &ImageSpec) -> Result<Built> {
    disk::check_size(spec.size)?;
    let _lock = cache.lock()?;
    let p = prepare(repo, cache, spec)?;
    let key = p.inputs.key();
    let image = cache.images().join(format!("{key}.raw"));
    if image.exists() {
        return Ok(Built {
            key,
            image,
            hit: true,
        });
    }
    let started = Instant::now();
    let work = cache
        .images()
        .join(format!(".build-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let res = build_into(&p, spec, &key, &work);
    let res = res.and_then(|tmp| {
        fs::write(
            cache.images().join(format!("{key}.inputs")),
            p.inputs.text(),
        )?;
        fs::rename(&tmp, &image).context("moving the image into the cache")?;
        Ok(())
    });
    let _ = fs::remove_dir_all(&work);
    res?;
    println!(
        "guest: built generation {} image {key} in {:.1}s",
        spec.generation.number(),
        started.elapsed().as_secs_f64()
    );
    Ok(Built {
        key,
        image,
        hit: false,
    })
}

fn build_into(p: &Prepared, spec: &ImageSpec, key: &str, work: &Path) -> Result<PathBuf> {
    let cpio = initramfs(p)?;
    let cpio_path = work.join("initrd.cpio");
    fs::write(&cpio_path, cpio)?;
    let mut c = cmd::command("gzip", ["-6", "-n"]);
    c.arg(&cpio_path);
    cmd::run(c)?;
    let initrd = work.join("initrd.cpio.gz");
    let volume_id = u32::from_str_radix(&key[..8], 16)?;
    let boot = disk::BootFiles {
        vmlinuz: &p.kernel.vmlinuz(),
        initrd: &initrd,
        cmdline: CMDLINE,
        volume_id,
    };
    let out = work.join("disk.raw");
    match spec.generation {
        Generation::One => disk::generation1(&out, spec.size, &boot, work)?,
        Generation::Two => disk::generation2(&out, spec.size, &boot, work)?,
    }
    Ok(out)
}

/// The initramfs tree, written as a newc archive.
fn initramfs(p: &Prepared) -> Result<Vec<u8>> {
    enum Node {
        Dir(u32),
        File(u32, Vec<u8>),
        Link(String),
        Char(u32, u32, u32),
    }
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    fn add(tree: &mut BTreeMap<String, Node>, path: &str, node: Node) {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        for comp in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            tree.entry(parent.clone()).or_insert(Node::Dir(0o755));
        }
        tree.insert(path.to_owned(), node);
    }
    for d in ["dev", "proc", "sys", "run", "root", "etc", "var", "mnt"] {
        add(&mut tree, d, Node::Dir(0o755));
    }
    add(&mut tree, "root", Node::Dir(0o700));
    add(&mut tree, "tmp", Node::Dir(0o1777));
    add(&mut tree, "var/run", Node::Link("../run".into()));
    add(&mut tree, "dev/console", Node::Char(0o600, 5, 1));
    add(
        &mut tree,
        "bin/busybox",
        Node::File(0o755, p.busybox.clone()),
    );
    let list = cmd::stdout(cmd::command(BUSYBOX, ["--list-full"]))?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet != "bin/busybox" {
            add(&mut tree, applet, Node::Link("/bin/busybox".into()));
        }
    }
    for (path, mode, bytes) in GUEST_FILES {
        add(&mut tree, path, Node::File(*mode, bytes.to_vec()));
    }
    let mdir = format!("lib/modules/{}", p.kernel.kver);
    for rel in &p.modules.order {
        let bytes = fs::read(p.kernel.modules_dir().join(rel))?;
        add(
            &mut tree,
            &format!("{mdir}/{rel}"),
            Node::File(0o644, bytes),
        );
    }
    add(
        &mut tree,
        &format!("{mdir}/modules.dep"),
        Node::File(0o644, p.modules.modules_dep.clone().into_bytes()),
    );
    let builtin = fs::read(p.kernel.modules_dir().join("modules.builtin")).unwrap_or_default();
    add(
        &mut tree,
        &format!("{mdir}/modules.builtin"),
        Node::File(0o644, builtin),
    );
    add(
        &mut tree,
        "etc/vireo-modules",
        Node::File(0o644, (p.modules.order.join("\n") + "\n").into_bytes()),
    );
    if !p.tool_files.is_empty() {
        add(&mut tree, "var/lib/misc", Node::Dir(0o755)); // dnsmasq's lease file
    }
    // After the busybox links: the real `ip` replaces busybox's applet.
    for (path, mode, bytes) in p.agent_files.iter().chain(&p.tool_files).chain(&p.extra) {
        add(&mut tree, path, Node::File(*mode, bytes.clone()));
    }
    add(
        &mut tree,
        "etc/hostname",
        Node::File(0o644, b"vireo-guest\n".to_vec()),
    );
    add(&mut tree, "etc/passwd", Node::File(0o644, PASSWD.to_vec()));
    add(&mut tree, "etc/group", Node::File(0o644, GROUP.to_vec()));
    let agent_name = agent_name(p);
    add(
        &mut tree,
        "etc/vireo-guest.conf",
        Node::File(
            0o644,
            format!("AGENT={agent_name}\nAGENT_ARGS=\n").into_bytes(),
        ),
    );

    let mut a = Archive::default();
    for (path, node) in &tree {
        match node {
            Node::Dir(m) => a.dir(path, *m),
            Node::File(m, d) => a.file(path, *m, d),
            Node::Link(t) => a.symlink(path, t),
            Node::Char(m, ma, mi) => a.chardev(path, *m, *ma, *mi),
        }
    }
    Ok(a.finish())
}

fn agent_name(p: &Prepared) -> &'static str {
    if p.agent_files
        .iter()
        .any(|(f, _, _)| f == "/sbin/vireo-guest")
    {
        AgentKind::Vireo.name()
    } else if p
        .agent_files
        .iter()
        .any(|(f, _, _)| f == "/usr/sbin/qemu-ga")
    {
        AgentKind::QemuGa.name()
    } else {
        AgentKind::None.name()
    }
}

/// Removes cached images (raw, vhdx, inputs) whose inputs name another builder version, or
/// all of them; returns how many images went.
pub fn clean(cache: &Cache, all: bool) -> Result<usize> {
    let _lock = cache.lock()?;
    let current = format!("builder {BUILDER_VERSION}\n");
    let mut removed = 0;
    for e in fs::read_dir(cache.images())? {
        let p = e?.path();
        if p.extension() != Some(std::ffi::OsStr::new("inputs")) {
            continue;
        }
        let text = fs::read_to_string(&p).unwrap_or_default();
        if all || !text.starts_with(&current) {
            for ext in ["raw", "vhdx", "inputs"] {
                let _ = fs::remove_file(p.with_extension(ext));
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// Copies the cached image to `out`: raw for any extension but `.vhdx`.
pub fn export(cache: &Cache, built: &Built, out: &Path) -> Result<()> {
    let is_vhdx = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx"));
    if !is_vhdx {
        return cache::copy_out(&built.image, out);
    }
    let _lock = cache.lock()?;
    let vhdx = cache.images().join(format!("{}.vhdx", built.key));
    if !vhdx.exists() {
        let tmp = cache
            .images()
            .join(format!(".{}.vhdx.{}", built.key, std::process::id()));
        if let Err(e) = write_vhdx(&built.image, &tmp) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &vhdx)?;
    }
    cache::copy_out(&vhdx, out)
}

/// Raw image to a dynamic VHDX, written natively by the `vhdx` crate.
pub fn write_vhdx(raw: &Path, dst: &Path) -> Result<()> {
    crate::disk::write_vhdx(raw, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes parse with and without suffixes; nonsense is refused.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
