//! [`DirSink`]: a mirror destination in a local directory (storage migration, and the
//! receiving end of a stream).

use super::{
    chunk_checksums, held_chunks, image_checksums, merge_sorted, ChainPlan, LayerFormat,
    MirrorError, MirrorResult, MirrorSink, COPY_CHUNK,
};
use crate::image::Image;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhdx::{CreateOptions, DiskType, Vhdx};

/// Writes a mirrored chain into a directory: frozen layers as byte copies (the CRC32C of
/// the bytes received, written with their write-back started at once, checked against the
/// sender's at the layer's end and made durable at the next `flush` (so that the last of
/// their write-back overlaps the active layer's copy); or, in a local storage move
/// ([`MirrorSink::open_local`]), handed to the mirror to fill in the kernel and check
/// itself), the active layer as a new image of the same format filled with the copied
/// ranges (created over the source's parent in a local move, re-pointed at commit). Refuses to overwrite any file; `abort` removes
/// every file it created (and the directory, if it created it and it is empty).
pub struct DirSink {
    dir: PathBuf,
    plan: Option<ChainPlan>,
    created: Vec<PathBuf>,
    created_dir: bool,
    files: Vec<Option<File>>,
    crcs: Vec<u32>,
    /// Per frozen layer: `Some(next offset)` while every byte arrived through `file_data`
    /// in order (its CRC is in `crcs`); `None` once it must be re-read to be checked.
    received: Vec<Option<u64>>,
    /// Frozen layers complete and checked, whose `fsync` waits for the next `flush`.
    unsynced: Vec<(File, PathBuf)>,
    active: Option<Image>,
    /// The active layer was created over the source's parent ([`MirrorSink::open_local`]):
    /// at commit it is re-pointed at this file (the destination's copy of that parent).
    repoint_to: Option<PathBuf>,
    /// The frozen layers were copied and checked chunk by chunk by the caller
    /// ([`MirrorSink::open_local`]): `file_end` takes their CRC as given.
    caller_checked: bool,
}

impl DirSink {
    /// A sink writing into `dir` (created if missing; must be an absolute path).
    pub fn new(dir: impl Into<PathBuf>) -> DirSink {
        DirSink {
            dir: dir.into(),
            plan: None,
            created: Vec::new(),
            created_dir: false,
            files: Vec::new(),
            crcs: Vec::new(),
            received: Vec::new(),
            unsynced: Vec::new(),
            active: None,
            repoint_to: None,
            caller_checked: false,
        }
    }

    /// Makes the completed frozen layers durable.
    fn sync_frozen(&mut self) -> MirrorResult<()> {
        for (f, p) in std::mem::take(&mut self.unsynced) {
            f.sync_all().map_err(|e| self.io("syncing", &p, e))?;
        }
        Ok(())
    }

    /// The destination directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn plan(&self) -> MirrorResult<&ChainPlan> {
        self.plan
            .as_ref()
            .ok_or_else(|| MirrorError::Protocol("no chain begun".into()))
    }

    fn active(&self) -> MirrorResult<&Image> {
        self.active
            .as_ref()
            .ok_or_else(|| MirrorError::Protocol("the active layer is not created".into()))
    }

    fn io(&self, op: &'static str, path: &Path, e: std::io::Error) -> MirrorError {
        let inner_full = e.get_ref().is_some_and(|i| super::chain_has_enospc(i));
        if e.raw_os_error() == Some(super::ENOSPC) || inner_full {
            return MirrorError::DiskFull {
                what: format!("{op} {}", path.display()),
            };
        }
        MirrorError::Io {
            op,
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Starts the write-back of `[off, off+len)` of a frozen layer now, so that it overlaps
/// the next reads and the layer's deferred `fsync` finds little left
/// (`SYNC_FILE_RANGE_WRITE` waits for nothing). Best effort.
pub(super) fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor the caller owns; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

impl DirSink {
    /// Creates the active layer, a differencing one over `parent`.
    fn create_active(&mut self, parent: Option<PathBuf>) -> MirrorResult<()> {
        let plan = self.plan()?.clone();
        let p = self.dir.join(&plan.active.name);
        let img = match &plan.active.format {
            LayerFormat::Vhdx {
                disk_type,
                block_size,
                logical_sector_size,
                physical_sector_size,
            } => {
                let disk_type = match disk_type.as_str() {
                    "fixed" => DiskType::Fixed,
                    "dynamic" => DiskType::Dynamic,
                    "differencing" => DiskType::Differencing,
                    t => return Err(MirrorError::InvalidInput(format!("unknown disk type {t}"))),
                };
                let opts = CreateOptions {
                    size: if disk_type == DiskType::Differencing {
                        0
                    } else {
                        plan.size
                    },
                    disk_type,
                    block_size: *block_size,
                    logical_sector_size: *logical_sector_size,
                    physical_sector_size: *physical_sector_size,
                    parent,
                };
                self.created.push(p.clone());
                let v = Vhdx::create(&p, &opts)
                    .map_err(|e| MirrorError::dest(format!("creating {}", p.display()), e))?;
                if self.repoint_to.is_none() {
                    self.check_chain_here(&v)?;
                }
                if v.size() != plan.size {
                    return Err(MirrorError::Verify(format!(
                        "the new leaf has {} bytes, the source {}",
                        v.size(),
                        plan.size
                    )));
                }
                Image::Vhdx(Arc::new(v))
            }
            LayerFormat::Raw => {
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map_err(|e| self.io("creating", &p, e))?;
                self.created.push(p.clone());
                f.set_len(plan.size).map_err(|e| self.io("sizing", &p, e))?;
                Image::Raw {
                    file: nbd::FileExport::from_file(f, false)
                        .map_err(|e| self.io("opening", &p, e))?,
                    path: p.clone(),
                }
            }
        };
        self.active = Some(img);
        Ok(())
    }

    /// Every parent of `v` must be a file of this directory (the parent locators' relative
    /// paths resolve here).
    fn check_chain_here(&self, v: &Vhdx) -> MirrorResult<()> {
        for c in v.chain().iter().skip(1) {
            if c.path.parent() != Some(self.dir.as_path()) {
                return Err(MirrorError::Verify(format!(
                    "the copied chain resolves its parent to {} outside {}; chains spanning directories cannot be moved",
                    c.path.display(),
                    self.dir.display()
                )));
            }
        }
        Ok(())
    }

    /// Re-points the active layer (created over the source's parent) at the destination's
    /// copy of it (byte-identical: same DataWriteGuid), closes it, and checks that the
    /// reopened chain stays in this directory.
    fn repoint_and_close(&mut self, v: Vhdx, parent: &Path) -> MirrorResult<()> {
        let leaf = v.path().to_path_buf();
        let dest =
            |what: &str, e: vhdx::Error| MirrorError::dest(format!("{what} {}", leaf.display()), e);
        let p = Vhdx::open(parent, vhdx::OpenOptions { read_only: true })
            .map_err(|e| dest("opening the parent of", e))?;
        v.set_parent(&p).map_err(|e| dest("re-pointing", e))?;
        drop(p);
        v.close().map_err(|e| dest("closing", e))?;
        let reopened = Vhdx::open(&leaf, vhdx::OpenOptions { read_only: true })
            .map_err(|e| dest("reopening", e))?;
        self.check_chain_here(&reopened)
    }
}

impl MirrorSink for DirSink {
    fn begin(&mut self, plan: &ChainPlan) -> MirrorResult<()> {
        plan.validate()?;
        if self.plan.is_some() {
            return Err(MirrorError::Protocol("a chain was already begun".into()));
        }
        if !self.dir.is_absolute() {
            return Err(MirrorError::InvalidInput(format!(
                "the destination {} is not an absolute path",
                self.dir.display()
            )));
        }
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(|e| self.io("creating", &self.dir, e))?;
            self.created_dir = true;
        }
        let mut names: Vec<&str> = plan.frozen.iter().map(|f| f.name.as_str()).collect();
        names.push(&plan.active.name);
        for n in names {
            let p = self.dir.join(n);
            if p.exists() {
                return Err(MirrorError::InvalidInput(format!(
                    "{} exists at the destination; remove it or choose another directory",
                    p.display()
                )));
            }
        }
        for f in &plan.frozen {
            let p = self.dir.join(&f.name);
            let file = File::options()
                .write(true)
                .read(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| self.io("creating", &p, e))?;
            self.created.push(p);
            self.files.push(Some(file));
            self.crcs.push(0);
            self.received.push(Some(0));
        }
        self.plan = Some(plan.clone());
        Ok(())
    }

    fn file_data(&mut self, layer: usize, off: u64, data: &[u8]) -> MirrorResult<()> {
        let p = self.dir.join(
            &self
                .plan()?
                .frozen
                .get(layer)
                .ok_or_else(|| MirrorError::Protocol(format!("no layer {layer}")))?
                .name,
        );
        let f = self
            .files
            .get(layer)
            .and_then(|f| f.as_ref())
            .ok_or_else(|| MirrorError::Protocol(format!("layer {layer} is closed")))?;
        f.write_all_at(data, off)
            .map_err(|e| self.io("writing", &p, e))?;
        start_writeback(f, off, data.len() as u64);
        let next = &mut self.received[layer];
        if *next == Some(off) {
            *next = Some(off + data.len() as u64);
            self.crcs[layer] = crc32c::crc32c_append(self.crcs[layer], data);
        } else {
            *next = None;
        }
        Ok(())
    }

    fn file_end(&mut self, layer: usize, len: u64, crc: u32) -> MirrorResult<()> {
        let fl = self
            .plan()?
            .frozen
            .get(layer)
            .cloned()
            .ok_or_else(|| MirrorError::Protocol(format!("no layer {layer}")))?;
        let p = self.dir.join(&fl.name);
        let f = self
            .files
            .get_mut(layer)
            .and_then(Option::take)
            .ok_or_else(|| MirrorError::Protocol(format!("layer {layer} is closed")))?;
        f.set_len(len).map_err(|e| self.io("sizing", &p, e))?;
        let got = match self.received.get(layer).copied().flatten() {
            _ if self.caller_checked => crc,
            // Every byte arrived in order: their CRC was computed on the way in.
            Some(next) if next == len => self.crcs[layer],
            _ => {
                let mut buf = vec![0u8; 4 << 20];
                let mut off = 0u64;
                let mut got = 0u32;
                while off < len {
                    let n = (len - off).min(buf.len() as u64) as usize;
                    f.read_exact_at(&mut buf[..n], off)
                        .map_err(|e| self.io("verifying", &p, e))?;
                    got = crc32c::crc32c_append(got, &buf[..n]);
                    off += n as u64;
                }
                got
            }
        };
        let on_disk = f.metadata().map_err(|e| self.io("verifying", &p, e))?.len();
        if got != crc || len != fl.len || on_disk != len {
            return Err(MirrorError::Verify(format!(
                "{}: {len} bytes ({on_disk} on disk) with CRC32C {got:08x}, expected {} bytes with {crc:08x}",
                p.display(),
                fl.len
            )));
        }
        self.crcs[layer] = got;
        self.unsynced.push((f, p));
        Ok(())
    }

    fn activate(&mut self) -> MirrorResult<()> {
        if self.files.iter().any(Option::is_some) {
            return Err(MirrorError::Protocol(
                "the active layer comes after every frozen layer".into(),
            ));
        }
        let parent = self
            .plan()?
            .active
            .parent
            .as_ref()
            .map(|n| self.dir.join(n));
        self.create_active(parent)
    }

    fn open_local(&mut self, source_parent: Option<&Path>) -> MirrorResult<Option<Vec<File>>> {
        let plan = self.plan()?.clone();
        if self.active.is_some() || self.received.iter().any(|r| *r != Some(0)) {
            return Err(MirrorError::Protocol(
                "the destination was opened for local copies after data arrived".into(),
            ));
        }
        let parent = match (&plan.active.parent, source_parent) {
            (Some(_), None) => {
                return Err(MirrorError::Protocol(
                    "the active layer's parent in the source chain was not given".into(),
                ))
            }
            (Some(name), Some(src)) => {
                self.repoint_to = Some(self.dir.join(name));
                Some(src.to_path_buf())
            }
            (None, _) => None,
        };
        let mut targets = Vec::with_capacity(self.files.len());
        for (i, f) in self.files.iter().enumerate() {
            let p = self.dir.join(&plan.frozen[i].name);
            let f = f
                .as_ref()
                .ok_or_else(|| MirrorError::Protocol(format!("layer {i} is closed")))?;
            targets.push(f.try_clone().map_err(|e| self.io("opening", &p, e))?);
        }
        // Filled and checked by the caller (it reads every chunk back from both files).
        self.caller_checked = true;
        self.create_active(parent)?;
        Ok(Some(targets))
    }
    fn write(&mut self, off: u64, data: &[u8]) -> MirrorResult<()> {
        let a = self.active()?;
        if off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= a.size())
            .is_none()
        {
            return Err(MirrorError::Protocol("write beyond the disk".into()));
        }
        a.write_at(data, off)
            .map_err(|e| self.io("writing", a.path(), e))
    }

    fn zero(&mut self, off: u64, len: u64) -> MirrorResult<()> {
        let a = self.active()?;
        if off.checked_add(len).filter(|e| *e <= a.size()).is_none() {
            return Err(MirrorError::Protocol("zeroing beyond the disk".into()));
        }
        a.write_zeroes(off, len, nbd::ZeroMode::default())
            .map_err(|e| self.io("zeroing", a.path(), e))
    }

    fn flush(&mut self) -> MirrorResult<()> {
        self.sync_frozen()?;
        let a = self.active()?;
        a.flush().map_err(|e| self.io("flushing", a.path(), e))
    }

    fn checksums(&mut self) -> MirrorResult<Vec<u32>> {
        let a = self.active()?;
        image_checksums(a, a.size()).map_err(|e| self.io("checksumming", a.path(), e))
    }

    fn held_checksums(&mut self, chunks: &[u64]) -> MirrorResult<Vec<(u64, u32)>> {
        let a = self.active()?;
        let size = a.size();
        let total = size.div_ceil(COPY_CHUNK);
        if chunks.windows(2).any(|w| w[0] >= w[1]) || chunks.last().is_some_and(|&c| c >= total) {
            return Err(MirrorError::Protocol(
                "chunk list out of order or beyond the disk".into(),
            ));
        }
        let all = merge_sorted(chunks, &held_chunks(a, size)?);
        let sums =
            chunk_checksums(a, size, &all).map_err(|e| self.io("checksumming", a.path(), e))?;
        Ok(all.into_iter().zip(sums).collect())
    }

    fn commit(&mut self) -> MirrorResult<Vec<PathBuf>> {
        let plan = self.plan()?.clone();
        self.sync_frozen()?;
        let a = self
            .active
            .take()
            .ok_or_else(|| MirrorError::Protocol("the active layer is not created".into()))?;
        let leaf = a.path().to_path_buf();
        match a {
            Image::Vhdx(v) => match (Arc::try_unwrap(v), self.repoint_to.take()) {
                (Ok(v), Some(parent)) => self.repoint_and_close(v, &parent)?,
                (Ok(v), None) => v
                    .close()
                    .map_err(|e| MirrorError::dest(format!("closing {}", leaf.display()), e))?,
                (Err(_), _) => {
                    return Err(MirrorError::Busy("the new leaf is still in use".into()))
                }
            },
            Image::Raw { file, .. } => {
                nbd::Export::flush(&file).map_err(|e| self.io("flushing", &leaf, e))?
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io("syncing", &self.dir, e))?;
        let mut out = vec![leaf];
        out.extend(plan.frozen.iter().map(|f| self.dir.join(&f.name)));
        self.created.clear();
        self.plan = None;
        Ok(out)
    }

    fn abort(&mut self) {
        self.active = None;
        self.repoint_to = None;
        self.caller_checked = false;
        self.files.clear();
        self.received.clear();
        self.unsynced.clear();
        for p in self.created.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing the partial {}: {e}", p.display());
                }
            }
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
            self.created_dir = false;
        }
        self.plan = None;
    }
}
