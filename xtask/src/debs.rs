//! Debian packages for guests: candidate versions from apt's lists, `apt-get download` into
//! the cache, `dpkg-deb -x` into a cached tree. Nothing is installed on the host.

use crate::cache::Cache;
use crate::cmd;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
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
