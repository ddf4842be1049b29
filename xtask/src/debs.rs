//! Debian packages for guests: candidate versions from apt's lists, `apt-get download` into
//! the cache, `dpkg-deb -x` into a cached tree. Nothing is installed on the host.

use crate::cache::Cache;
use crate::cmd;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A package at an exact version.
#[derive(Clone, Debug)]
pub struct Pkg {
    /// Package name, such as `linux-image-6.1.0-56-amd64`.
    pub name: String,
    /// Debian version, such as `6.1.192-2`.
    pub version: String,
}

impl Pkg {
    fn file_stem(&self) -> String {
        format!("{}_{}", self.name, self.version.replace(':', "%3a"))
    }
}

/// apt-cache answers, memoised for the life of the process (apt-cache is slow on a busy host).
static APT_CACHE: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

fn apt_cache(args: &[&str]) -> Result<String> {
    let key = args.join(" ");
    if let Some(v) = APT_CACHE.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(v);
    }
    let out = cmd::stdout(cmd::command("apt-cache", args))?;
    if let Ok(mut m) = APT_CACHE.lock() {
        m.insert(key, out.clone());
    }
    Ok(out)
}

/// The candidate version apt would install for `name`.
pub fn candidate(name: &str) -> Result<Pkg> {
    let out = apt_cache(&["policy", name])?;
    let version = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)");
    match version {
        Some(v) => Ok(Pkg {
            name: name.to_owned(),
            version: v.to_owned(),
        }),
        None => bail!(
            "apt knows no candidate for {name}: run scripts/setup.sh (it runs apt-get update when needed)"
        ),
    }
}

/// The package a metapackage (such as `linux-image-amd64`) depends on first.
pub fn first_dependency(meta: &str, prefix: &str) -> Result<String> {
    let out = apt_cache(&["depends", "--important", meta])?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| {
            d.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
        .find(|d| d.starts_with(prefix))
        .with_context(|| format!("{meta} has no dependency starting with {prefix}"))
}

/// Downloads `pkg` into the cache unless it is there already; returns the .deb path.
pub fn ensure_deb(cache: &Cache, pkg: &Pkg) -> Result<PathBuf> {
    let deb = cache.debs().join(format!("{}_amd64.deb", pkg.file_stem()));
    if deb.exists() {
        return Ok(deb);
    }
    println!("guest: downloading {} {}", pkg.name, pkg.version);
    let tmp = cache
        .debs()
        .join(format!(".download.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut c = cmd::command(
        "apt-get",
        [
            "download",
            "-qq",
            "-o",
            "APT::Sandbox::User=root",
            &format!("{}={}", pkg.name, pkg.version),
        ],
    );
    c.current_dir(&tmp);
    let res = cmd::run(c).and_then(|_| {
        let mut found = fs::read_dir(&tmp)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"));
        let Some(got) = found.next() else {
            bail!("apt-get download left no .deb for {}", pkg.name)
        };
        fs::rename(&got, &deb).with_context(|| format!("moving {} into the cache", got.display()))
    });
    let _ = fs::remove_dir_all(&tmp);
    res?;
    Ok(deb)
}

/// Unpacks `pkg` (downloading it if needed) into the cache; returns the tree's root.
pub fn ensure_unpacked(cache: &Cache, pkg: &Pkg) -> Result<PathBuf> {
    let dir = cache.unpacked().join(pkg.file_stem());
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let deb = ensure_deb(cache, pkg)?;
    println!("guest: unpacking {} {}", pkg.name, pkg.version);
    let tmp = cache
        .unpacked()
        .join(format!(".{}.{}", pkg.file_stem(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(&dir);
    let mut c = cmd::command("dpkg-deb", ["-x"]);
    c.arg(&deb).arg(&tmp);
    if let Err(e) = cmd::run(c) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::write(tmp.join(".complete"), b"")?;
    fs::rename(&tmp, &dir).with_context(|| format!("renaming into {}", dir.display()))?;
    Ok(dir)
}

/// A program for the guest taken from a Debian package (downloaded, never installed).
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// Package that ships the program, such as `iproute2`.
    pub package: &'static str,
    /// The program's path inside the package, without the leading `/` (such as `bin/ip`).
    pub path: &'static str,
    /// Where the guest gets it (absolute).
    pub guest: &'static str,
}

/// Where the guest's dynamic loader finds libraries taken from unpacked packages.
const GUEST_LIBDIR: &str = "/lib/x86_64-linux-gnu";

/// Files for the initramfs: (absolute guest path, mode, bytes).
pub type Files = Vec<(String, u32, Vec<u8>)>;

/// Takes `programs` from their (downloaded, unpacked) packages with every shared library
/// they load and the dynamic loader, resolved by `ldd`. Libraries come from the unpacked
/// `lib_packages` first (so the host needs none of them installed), else from the host (the
/// same Debian release). Records package versions and library hashes in `inputs`.
pub fn programs_with_libs(
    cache: &Cache,
    programs: &[Program],
    lib_packages: &[&str],
    inputs: &mut crate::cache::Inputs,
) -> Result<Files> {
    let mut lib_dirs = Vec::new();
    for name in lib_packages {
        let pkg = candidate(name)?;
        let root = ensure_unpacked(cache, &pkg)?;
        inputs.add(&format!("libpkg {name}"), &pkg.version);
        for d in ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"] {
            if root.join(d).is_dir() {
                lib_dirs.push(root.join(d));
            }
        }
    }
    let ld_path = std::env::join_paths(&lib_dirs).context("library search path")?;
    let unpacked = cache.unpacked();
    let mut files: BTreeMap<String, (u32, Vec<u8>)> = BTreeMap::new();
    for prog in programs {
        let pkg = candidate(prog.package)?;
        let root = ensure_unpacked(cache, &pkg)?;
        let bin = root.join(prog.path);
        crate::cmd::require_file(&bin, prog.package)?;
        let bytes = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
        inputs.add(
            &format!("program {} {} {}", prog.guest, pkg.name, pkg.version),
            crate::cache::sha256_hex(&bytes),
        );
        files.insert(prog.guest.to_owned(), (0o755, bytes));
        let mut c = cmd::command("ldd", [&bin]);
        c.env("LC_ALL", "C").env("LD_LIBRARY_PATH", &ld_path);
        let out = cmd::stdout(c)?;
        for line in out.lines() {
            let line = line.trim();
            if line.contains("not found") {
                bail!(
                    "{} needs a library neither the host nor {lib_packages:?} has ({line}): run scripts/setup.sh",
                    prog.guest
                );
            }
            // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let (soname, path) = match line.split_once("=>") {
                Some((l, r)) => (l.trim(), r.trim()),
                None => ("", line),
            };
            let path = path.split_whitespace().next().unwrap_or_default();
            if !path.starts_with('/') {
                continue; // linux-vdso.so.1
            }
            let guest = if Path::new(path).starts_with(&unpacked) && !soname.is_empty() {
                format!("{GUEST_LIBDIR}/{soname}")
            } else {
                path.to_owned()
            };
            if files.contains_key(&guest) {
                continue;
            }
            let bytes = fs::read(path).with_context(|| format!("reading {path}"))?;
            inputs.add(&format!("lib {guest}"), crate::cache::sha256_hex(&bytes));
            files.insert(guest, (0o755, bytes));
        }
    }
    Ok(files.into_iter().map(|(p, (m, b))| (p, m, b)).collect())
}
