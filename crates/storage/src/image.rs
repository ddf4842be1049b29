//! One image of a disk, VHDX (with its parents) or raw, and [`open_image`], the one
//! place where the disk service detects a format.

use crate::error::{to_io, Result, StorageError};
use nbd::Export;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhdx::{ExtentState, ImageFormat, OpenOptions, Vhdx};

/// An open image: a VHDX chain (opened from its leaf; parents read-only) or a raw file.
pub enum Image {
    /// A VHDX image and, through it, its parents.
    Vhdx(Arc<Vhdx>),
    /// A raw image.
    Raw {
        /// The file, served as is.
        file: nbd::FileExport,
        /// Where it lives.
        path: PathBuf,
    },
}

/// Opens `path`, detecting its format from its first bytes: VHDX (its parents are found
/// through its parent locator and opened read-only) or raw. qcow2 is refused with a
/// message naming `vireo disk convert`.
pub fn open_image(path: &Path, read_only: bool) -> Result<Image> {
    match vhdx::detect_format(path).map_err(StorageError::image("opening", path))? {
        ImageFormat::Vhdx => Ok(Image::Vhdx(Arc::new(
            Vhdx::open(path, OpenOptions { read_only })
                .map_err(StorageError::image("opening", path))?,
        ))),
        ImageFormat::Raw => Ok(Image::Raw {
            file: nbd::FileExport::open(path, read_only)
                .map_err(StorageError::io("opening", path))?,
            path: path.to_path_buf(),
        }),
        ImageFormat::Qcow2 => Err(StorageError::Format {
            path: path.to_path_buf(),
            format: "qcow2",
        }),
    }
}

impl Image {
    /// Path of the leaf (the image written to).
    pub fn path(&self) -> &Path {
        match self {
            Image::Vhdx(v) => v.path(),
            Image::Raw { path, .. } => path,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Image::Vhdx(v) => v.size(),
            Image::Raw { file, .. } => file.size(),
        }
    }

    /// Paths of the chain, leaf first (one entry for raw).
    pub fn chain_paths(&self) -> Vec<PathBuf> {
        match self {
            Image::Vhdx(v) => v.chain().into_iter().map(|c| c.path).collect(),
            Image::Raw { path, .. } => vec![path.clone()],
        }
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            Image::Vhdx(v) => v.read_at(buf, off).map_err(to_io),
            Image::Raw { file, .. } => file.read_at(buf, off),
        }
    }

    pub(crate) fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self {
            Image::Vhdx(v) => v.write_at(buf, off).map_err(to_io),
            Image::Raw { file, .. } => file.write_at(buf, off, false),
        }
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        match self {
            Image::Vhdx(v) => v.flush().map_err(to_io),
            Image::Raw { file, .. } => file.flush(),
        }
    }

    pub(crate) fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        match self {
            Image::Vhdx(v) => v.unmap(off, len).map_err(to_io),
            Image::Raw { file, .. } => file.trim(off, len, false),
        }
    }

    pub(crate) fn write_zeroes(&self, off: u64, len: u64, mode: nbd::ZeroMode) -> io::Result<()> {
        match self {
            Image::Vhdx(v) => v.write_zeroes(off, len).map_err(to_io),
            Image::Raw { file, .. } => {
                file.write_zeroes(off, len, nbd::ZeroMode { fua: false, ..mode })
            }
        }
    }

    pub(crate) fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<nbd::Extent>> {
        match self {
            Image::Vhdx(v) => {
                let mut out = Vec::new();
                vhdx_status(v, off, len, &mut out)?;
                Ok(out)
            }
            Image::Raw { file, .. } => file.block_status(off, len),
        }
    }
}

/// Most extents returned by one block status call.
const MAX_EXTENTS: usize = 2048;

/// Block status of a VHDX chain: ranges a layer does not hold are asked of its parent.
fn vhdx_status(v: &Vhdx, off: u64, len: u64, out: &mut Vec<nbd::Extent>) -> io::Result<()> {
    for e in v.block_status(off, len).map_err(to_io)? {
        if out.len() >= MAX_EXTENTS {
            return Ok(());
        }
        match e.state {
            ExtentState::Data => push(out, nbd::Extent::data(e.off, e.len)),
            ExtentState::Zero | ExtentState::Unmapped => push(out, nbd::Extent::hole(e.off, e.len)),
            ExtentState::FromParent => match v.parent() {
                Some(p) => vhdx_status(p, e.off, e.len, out)?,
                None => push(out, nbd::Extent::hole(e.off, e.len)),
            },
        }
    }
    Ok(())
}

fn push(out: &mut Vec<nbd::Extent>, e: nbd::Extent) {
    if let Some(l) = out.last_mut() {
        if l.hole == e.hole && l.zero == e.zero && l.end() == e.offset {
            l.len += e.len;
            return;
        }
    }
    out.push(e);
}
