//! Seeding a replica without sending the whole disks over the network: an export on
//! removable media (`vireo replica export` on the primary, `vireo replica import` on the
//! replica host) or a copy that already sits on the replica host (`--initial existing`).
//!
//! ```text
//!  <export dir>/export.json       ExportMeta (vm, disk sizes, files, time)
//!  <export dir>/disk<i>.vhdx      a copy of each disk (all-zero MiBs left unallocated)
//!  <replica dir>/seed/seed.json   the same meta once imported (or written for an existing copy)
//!  <replica dir>/seed/disk<i>.vhdx
//! ```
//!
//! The copy need not be consistent: it is read while the guest runs. The replica's store is
//! created over the seed ([`crate::ReplicaStore::create_resync_over`]) and the primary,
//! change tracking attached first, compares checksums ([`crate::resync`]): every block the
//! guest changed after it was copied (or while) differs and is shipped, the rest is not.

use crate::store::{img as img_err, io as io_err, write_durably, StoreError};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Version of `export.json`.
pub const EXPORT_VERSION: u32 = 1;
/// Name of the metadata file in an export directory.
pub const EXPORT_META: &str = "export.json";
const CHUNK: u64 = 1 << 20;

/// The metadata of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportMeta {
    /// Format version ([`EXPORT_VERSION`]).
    pub format_version: u32,
    /// The VM.
    pub vm: String,
    /// Size of each disk.
    pub disk_sizes: Vec<u64>,
    /// File of each disk, relative to the export directory.
    pub files: Vec<String>,
    /// Unix milliseconds when the copy started.
    pub started_unix_ms: u64,
}

/// Copies a disk of `size` bytes read by `read(off, buf)` into a new dynamic VHDX at
/// `dst` (all-zero MiBs stay unallocated). Returns the bytes of data written.
pub fn export_image(
    size: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    dst: &Path,
) -> Result<u64, StoreError> {
    if dst.exists() {
        return Err(StoreError::Mismatch(format!(
            "{} exists: export into an empty directory",
            dst.display()
        )));
    }
    let v = vhdx::Vhdx::create(
        dst,
        &vhdx::CreateOptions {
            size,
            block_size: CHUNK as u32,
            ..Default::default()
        },
    )
    .map_err(img_err("creating", dst))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut off, mut written) = (0u64, 0u64);
    while off < size {
        let n = CHUNK.min(size - off) as usize;
        read(off, &mut buf[..n]).map_err(io_err("reading the disk for", dst))?;
        if buf[..n].iter().any(|&b| b != 0) {
            v.write_at(&buf[..n], off)
                .map_err(img_err("writing", dst))?;
            written += n as u64;
        }
        off += n as u64;
    }
    v.flush().map_err(img_err("flushing", dst))?;
    v.close().map_err(img_err("closing", dst))?;
    Ok(written)
}

/// Writes `meta` into `dir` (temp file, fsync, rename, directory fsync): the export is
/// complete only once this file exists.
pub fn save_meta(dir: &Path, name: &str, meta: &ExportMeta) -> Result<(), StoreError> {
    let b = serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Mismatch(e.to_string()))?;
    write_durably(dir, name, &b)
}

/// Reads and checks the metadata `name` in `dir`: version, file names (plain names in
/// `dir`), one file per disk, each present.
pub fn load_meta(dir: &Path, name: &str) -> Result<ExportMeta, StoreError> {
    let p = dir.join(name);
    let b = std::fs::read(&p).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            StoreError::Mismatch(format!(
                "{} holds no complete export ({name} is missing)",
                dir.display()
            ))
        } else {
            StoreError::Io {
                op: "reading",
                path: p.clone(),
                source: e,
            }
        }
    })?;
    let m: ExportMeta = serde_json::from_slice(&b)
        .map_err(|e| StoreError::Mismatch(format!("{}: {e}", p.display())))?;
    if m.format_version != EXPORT_VERSION {
        return Err(StoreError::Mismatch(format!(
            "{}: format version {} (this build reads {EXPORT_VERSION})",
            p.display(),
            m.format_version
        )));
    }
    if m.files.len() != m.disk_sizes.len() || m.files.is_empty() {
        return Err(StoreError::Mismatch(format!(
            "{}: {} files for {} disks",
            p.display(),
            m.files.len(),
            m.disk_sizes.len()
        )));
    }
    for f in &m.files {
        // An export names files inside it; a seed of an existing copy names them in place.
        let plain = Path::new(f).file_name().is_some_and(|n| n == f.as_str())
            || (name == SEED_META && Path::new(f).is_absolute());
        if !plain {
            return Err(StoreError::Mismatch(format!(
                "{}: bad file name {f:?}",
                p.display()
            )));
        }
        if !dir.join(f).is_file() {
            return Err(StoreError::Mismatch(format!(
                "{}: {f} is missing",
                dir.display()
            )));
        }
    }
    Ok(m)
}

/// The seed images in `dir` (`seed.json` written by [`import`]), each checked to open with
/// the size the metadata gives.
pub fn seed_paths(dir: &Path) -> Result<(ExportMeta, Vec<PathBuf>), StoreError> {
    let m = load_meta(dir, SEED_META)?;
    let mut out = Vec::new();
    for (f, &size) in m.files.iter().zip(&m.disk_sizes) {
        let p = dir.join(f);
        let v = vhdx::Vhdx::open(&p, vhdx::OpenOptions { read_only: true })
            .map_err(img_err("opening", &p))?;
        if v.size() != size {
            return Err(StoreError::Mismatch(format!(
                "{} has {} bytes, the export says {size}",
                p.display(),
                v.size()
            )));
        }
        out.push(p);
    }
    Ok((m, out))
}

/// Name of the metadata in a replica's seed directory.
pub const SEED_META: &str = "seed.json";

/// Replica host: copies the export in `from` (checked) into `seed_dir` (which must not
/// exist), fsyncs everything and writes `seed.json` last. `vm` must be the export's VM.
/// Returns the metadata and the bytes copied.
pub fn import(from: &Path, vm: &str, seed_dir: &Path) -> Result<(ExportMeta, u64), StoreError> {
    // Say what to give instead: the directory an export wrote, once it finished.
    let hint = format!(
        "give the directory `vireo replica export {vm} --to DIR` wrote on the primary, once it has finished (it writes {EXPORT_META} last)"
    );
    if !from.is_dir() {
        return Err(StoreError::Mismatch(format!(
            "{} {}: {hint}",
            from.display(),
            if from.exists() {
                "is not a directory"
            } else {
                "does not exist"
            }
        )));
    }
    if !from.join(EXPORT_META).exists() {
        return Err(StoreError::Mismatch(format!(
            "{} holds no complete export ({EXPORT_META} is missing): {hint}",
            from.display()
        )));
    }
    let m = load_meta(from, EXPORT_META)?;
    if m.vm != vm {
        return Err(StoreError::Mismatch(format!(
            "{} is an export of VM {:?}, not {vm:?}",
            from.display(),
            m.vm
        )));
    }
    if seed_dir.join(SEED_META).exists() {
        return Err(StoreError::Mismatch(format!(
            "{} already holds a seed of {vm}",
            seed_dir.display()
        )));
    }
    let _ = std::fs::remove_dir_all(seed_dir);
    std::fs::create_dir_all(seed_dir).map_err(io_err("creating", seed_dir))?;
    let mut bytes = 0;
    for f in &m.files {
        let (src, dst) = (from.join(f), seed_dir.join(f));
        bytes += std::fs::copy(&src, &dst).map_err(io_err("copying", &src))?;
        std::fs::File::open(&dst)
            .and_then(|x| x.sync_all())
            .map_err(io_err("syncing", &dst))?;
    }
    save_meta(seed_dir, SEED_META, &m)?;
    // The copies open and have the export's sizes.
    seed_paths(seed_dir)?;
    Ok((m, bytes))
}

/// Replica host, `--initial existing`: records the VHDX images `disks` (a copy of the VM's
/// disks that already sits on this host, possibly old) as the seed in `seed_dir`, in place:
/// they are never written (the store's layers go on top). Returns the metadata.
pub fn import_existing(
    disks: &[PathBuf],
    vm: &str,
    seed_dir: &Path,
) -> Result<ExportMeta, StoreError> {
    if disks.is_empty() {
        return Err(StoreError::Mismatch(
            "give the existing copy's disks (--disk FILE, in the VM's disk order)".into(),
        ));
    }
    if seed_dir.join(SEED_META).exists() {
        return Err(StoreError::Mismatch(format!(
            "{} already holds a seed of {vm}",
            seed_dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut sizes = Vec::new();
    for d in disks {
        if !d.is_file() {
            return Err(StoreError::Mismatch(format!(
                "{} {}: give the existing copy's VHDX images on this host (--disk FILE per disk, in the VM's disk order; `vireo disk convert` turns other formats into VHDX)",
                d.display(),
                if d.exists() {
                    "is not a file"
                } else {
                    "does not exist"
                }
            )));
        }
        let p = d.canonicalize().map_err(io_err("finding", d))?;
        let v = vhdx::Vhdx::open(&p, vhdx::OpenOptions { read_only: true })
            .map_err(img_err("opening", &p))?;
        sizes.push(v.size());
        files.push(p.to_string_lossy().to_string());
    }
    std::fs::create_dir_all(seed_dir).map_err(io_err("creating", seed_dir))?;
    let m = ExportMeta {
        format_version: EXPORT_VERSION,
        vm: vm.to_string(),
        disk_sizes: sizes,
        files,
        started_unix_ms: 0,
    };
    save_meta(seed_dir, SEED_META, &m)?;
    Ok(m)
}
