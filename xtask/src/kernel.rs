//! The test-guest kernel: Debian's generic `linux-image-amd64` (its versioned, Debian-signed
//! image package), downloaded and unpacked into the cache, and the closure of the kernel
//! modules the guests load, resolved from each module's own `depends=` info (the package
//! ships no modules.dep; depmod runs at install time, which never happens here).

use crate::cache::Cache;
use crate::debs::{self, Pkg};
use crate::elf;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The metapackage that names the current kernel.
pub const META_PACKAGE: &str = "linux-image-amd64";

/// Modules loaded by the guest's /init, dependencies added automatically.
pub const MODULES: &[&str] = &[
    // generation 1 storage: IDE (PIIX) through libata, SCSI disks
    "ata_piix",
    "ata_generic",
    "libata",
    "scsi_mod",
    "sd_mod",
    // synthetic devices
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_console",
    "virtio_balloon",
    "virtio_mem",
    // generation 1 legacy NIC, VLANs
    "e1000",
    "8021q",
    // file systems (ext4 asks the crypto API for crc32c at mount time)
    "ext4",
    "crc32c_generic",
    "crc32c_intel",
    // ACPI power button -> input event -> busybox acpid
    "button",
    "evdev",
];

/// An unpacked kernel package.
pub struct Kernel {
    /// The versioned image package.
    pub pkg: Pkg,
    /// `uname -r`, such as `6.1.0-56-amd64`.
    pub kver: String,
    /// Root of the unpacked package.
    pub root: PathBuf,
}

impl Kernel {
    /// The (Debian-signed) kernel image.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.kver))
    }

    /// `/lib/modules/<kver>` inside the package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.kver))
    }
}

/// Picks the kernel package: `package` if given (`NAME` or `NAME=VERSION`), else the one
/// `linux-image-amd64` currently depends on, at apt's candidate version.
pub fn resolve(package: Option<&str>) -> Result<Pkg> {
    match package {
        Some(p) => match p.split_once('=') {
            Some((name, version)) => Ok(Pkg {
                name: name.to_owned(),
                version: version.to_owned(),
            }),
            None => debs::candidate(p),
        },
        None => debs::candidate(&debs::first_dependency(META_PACKAGE, "linux-image-")?),
    }
}

/// Downloads and unpacks the kernel package if needed.
pub fn ensure(cache: &Cache, pkg: &Pkg) -> Result<Kernel> {
    let Some(kver) = pkg.name.strip_prefix("linux-image-") else {
        bail!("{} is not a linux-image-* package", pkg.name);
    };
    let kver = kver.trim_end_matches("-unsigned").to_owned();
    let root = debs::ensure_unpacked(cache, pkg)?;
    let k = Kernel {
        pkg: pkg.clone(),
        kver,
        root,
    };
    crate::cmd::require_file(&k.vmlinuz(), &pkg.name)?;
    Ok(k)
}

/// Kernel modules in load order.
pub struct Modules {
    /// Paths relative to `/lib/modules/<kver>`, dependencies first.
    pub order: Vec<String>,
    /// A modules.dep covering exactly these modules (for busybox modprobe).
    pub modules_dep: String,
}

fn module_name(file_stem: &str) -> String {
    file_stem.replace('-', "_")
}

fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, base, out)?;
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            let rel = p.strip_prefix(base)?.to_string_lossy().into_owned();
            out.insert(module_name(stem), rel);
        }
    }
    Ok(())
}

/// Resolves `wanted` and their dependencies; built-in ones are left out.
pub fn resolve_modules(k: &Kernel, wanted: &[&str]) -> Result<Modules> {
    let mdir = k.modules_dir();
    let mut by_name = BTreeMap::new();
    walk(&mdir.join("kernel"), &mdir, &mut by_name)?;
    let builtin: BTreeSet<String> = fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(module_name))
        .collect();

    struct Walk<'a> {
        mdir: &'a Path,
        by_name: &'a BTreeMap<String, String>,
        builtin: &'a BTreeSet<String>,
        done: BTreeMap<String, Vec<String>>,
        active: BTreeSet<String>,
        order: Vec<String>,
    }
    impl Walk<'_> {
        fn visit(&mut self, name: &str) -> Result<()> {
            let name = module_name(name);
            if self.done.contains_key(&name) || self.builtin.contains(&name) {
                return Ok(());
            }
            if !self.active.insert(name.clone()) {
                bail!("module dependency cycle through {name}");
            }
            let Some(rel) = self.by_name.get(&name) else {
                bail!("kernel module {name} is neither a module nor built in");
            };
            let bytes = fs::read(self.mdir.join(rel))?;
            let deps = elf::module_depends(&bytes).with_context(|| format!("reading {rel}"))?;
            for d in &deps {
                self.visit(d)?;
            }
            self.active.remove(&name);
            self.done.insert(name, deps);
            self.order.push(rel.clone());
            Ok(())
        }
    }
    let mut w = Walk {
        mdir: &mdir,
        by_name: &by_name,
        builtin: &builtin,
        done: BTreeMap::new(),
        active: BTreeSet::new(),
        order: Vec::new(),
    };
    for m in wanted {
        w.visit(m)?;
    }
    // modules.dep lists the whole closure, last-to-load first, like depmod writes it.
    let pos: BTreeMap<&str, usize> = w
        .order
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_str(), i))
        .collect();
    let mut modules_dep = String::new();
    for name in w.done.keys() {
        let mut closure = BTreeSet::new();
        let mut stack: Vec<&String> = w.done[name].iter().collect();
        while let Some(d) = stack.pop() {
            let d = module_name(d);
            if let (Some(rel), Some(deps)) = (by_name.get(&d), w.done.get(&d)) {
                if closure.insert(rel.as_str()) {
                    stack.extend(deps.iter());
                }
            }
        }
        let mut deps: Vec<&str> = closure.into_iter().collect();
        deps.sort_by_key(|r| std::cmp::Reverse(pos.get(r).copied().unwrap_or(0)));
        modules_dep.push_str(&format!("{}: {}\n", by_name[name], deps.join(" ")));
    }
    Ok(Modules {
        order: w.order,
        modules_dep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the real Debian kernel (fetched into the default cache if needed): the modules
    /// the guests need resolve, built-ins are left out, and every dependency loads before
    /// its user.
    #[test]
    fn resolves_real_kernel_modules() {
        let cache = Cache::open(&crate::repo_root().join(".cache/guest")).unwrap();
        let k = {
            let _lock = cache.lock().unwrap();
            let pkg = resolve(None).expect("apt lists: run scripts/setup.sh");
            ensure(&cache, &pkg).unwrap()
        };
        let m = resolve_modules(&k, MODULES).unwrap();
        let pos = |stem: &str| {
            m.order
                .iter()
                .position(|r| r.ends_with(&format!("/{stem}.ko")))
                .unwrap_or_else(|| panic!("{stem} missing from {:?}", m.order))
        };
        assert!(pos("jbd2") < pos("ext4") && pos("mbcache") < pos("ext4"));
        assert!(pos("libata") < pos("ata_piix") && pos("scsi_mod") < pos("sd_mod"));
        assert!(pos("virtio") < pos("virtio_pci") && pos("virtio_ring") < pos("virtio_net"));
        pos("e1000");
        pos("8021q");
        assert!(m
            .modules_dep
            .lines()
            .any(|l| l.starts_with("kernel/fs/ext4/ext4.ko: ") && l.contains("jbd2.ko")));
        assert!(resolve_modules(&k, &["no_such_module_xyz"]).is_err());
    }
}
