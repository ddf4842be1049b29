//! The switch's persisted configuration: `RUN_DIR/switch.json`, written with temp file,
//! fsync and rename, carrying a format version and a CRC32C of the configuration.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use switch::SwitchConfig;

/// Current file format.
pub const FORMAT_VERSION: u32 = 1;
const MAX_FILE: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
struct File {
    format_version: u32,
    crc32c: u32,
    config: SwitchConfig,
}

/// Path of the state file.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("switch.json")
}

fn crc(cfg: &SwitchConfig) -> anyhow::Result<u32> {
    Ok(crc32c::crc32c(&serde_json::to_vec(cfg)?))
}

/// Writes the configuration atomically.
pub fn save(run_dir: &Path, cfg: &SwitchConfig) -> anyhow::Result<()> {
    let f = File {
        format_version: FORMAT_VERSION,
        crc32c: crc(cfg)?,
        config: cfg.clone(),
    };
    let data = serde_json::to_vec_pretty(&f)?;
    let tmp = run_dir.join(".switch.json.tmp");
    let mut w = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    w.write_all(&data)?;
    w.sync_all()?;
    fs::rename(&tmp, path(run_dir)).context("renaming switch state into place")?;
    if let Ok(d) = fs::File::open(run_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the configuration if the file exists; refuses unknown versions and bad checksums.
pub fn load(run_dir: &Path) -> anyhow::Result<Option<SwitchConfig>> {
    let p = path(run_dir);
    let meta = match fs::metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    if meta.len() > MAX_FILE {
        bail!("{} is larger than {MAX_FILE} bytes", p.display());
    }
    let data = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let f: File =
        serde_json::from_slice(&data).with_context(|| format!("parsing {}", p.display()))?;
    if f.format_version != FORMAT_VERSION {
        bail!(
            "{} has format version {}, this switch reads {FORMAT_VERSION}",
            p.display(),
            f.format_version
        );
    }
    if crc(&f.config)? != f.crc32c {
        bail!("{} fails its checksum", p.display());
    }
    Ok(Some(f.config))
}
