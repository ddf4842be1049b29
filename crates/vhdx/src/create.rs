//! Creating fixed, dynamic and differencing images.
//!
//! Layout: file identifier, headers and region tables in the first MiB, then the
//! log (1 MiB), the metadata region (1 MiB), the BAT (sized for growth) and the
//! payload. Everything is written and flushed before the headers, which are
//! written last; a failed create removes the file.

use std::path::{Path, PathBuf};

use crate::bat::{make_entry, state, Geometry};
use crate::error::{Error, Result};
use crate::file;
use crate::guid::Guid;
use crate::header::{self, Header, HEADER_OFFSETS};
use crate::image::{DiskType, OpenOptions, Vhdx};
use crate::locator::ParentLocator;
use crate::metadata::{self, DiskMetadata};
use crate::region::{Region, RegionTable, REGION_TABLE_OFFSETS};

const MIB: u64 = 1 << 20;
/// Default block size of dynamic and fixed disks.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
/// Creator string written into the file identifier.
pub const CREATOR: &str = "Vireo vhdx";

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (differencing disks: 0 takes the parent's size).
    pub size: u64,
    /// Kind of disk. `Differencing` requires `parent`.
    pub disk_type: DiskType,
    /// Block size, 1 MiB to 256 MiB, power of two; 0 for the default (32 MiB,
    /// or the parent's for differencing disks).
    pub block_size: u32,
    /// Logical sector size, 512 or 4096; 0 for 512 (or the parent's).
    pub logical_sector_size: u32,
    /// Physical sector size, 512 or 4096; 0 for 4096 (or the parent's).
    pub physical_sector_size: u32,
    /// Parent image of a differencing disk.
    pub parent: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            disk_type: DiskType::Dynamic,
            block_size: 0,
            logical_sector_size: 0,
            physical_sector_size: 0,
            parent: None,
        }
    }
}

impl Vhdx {
    /// Creates an image (refusing to overwrite an existing file) and opens it read-write.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Vhdx> {
        create(path.as_ref(), opts, &|_, _| {})
    }
}

/// Creates an image; `progress(done, total)` is called while a fixed disk is
/// allocated.
pub fn create(path: &Path, opts: &CreateOptions, progress: &dyn Fn(u64, u64)) -> Result<Vhdx> {
    let mut md = DiskMetadata {
        block_size: if opts.block_size == 0 {
            DEFAULT_BLOCK_SIZE
        } else {
            opts.block_size
        },
        leave_blocks_allocated: opts.disk_type == DiskType::Fixed,
        has_parent: false,
        virtual_size: opts.size,
        logical_sector_size: if opts.logical_sector_size == 0 {
            512
        } else {
            opts.logical_sector_size
        },
        physical_sector_size: if opts.physical_sector_size == 0 {
            4096
        } else {
            opts.physical_sector_size
        },
        page83: Guid::new_random(),
        parent_locator: None,
    };
    match (opts.disk_type, &opts.parent) {
        (DiskType::Differencing, Some(pp)) => {
            let parent = Vhdx::open(pp, OpenOptions { read_only: true })?;
            md.has_parent = true;
            if opts.size == 0 {
                md.virtual_size = parent.size();
            }
            if opts.block_size == 0 {
                md.block_size = parent.block_size();
            }
            if opts.logical_sector_size == 0 {
                md.logical_sector_size = parent.logical_sector_size();
            } else if opts.logical_sector_size != parent.logical_sector_size() {
                return Err(Error::InvalidInput(format!(
                    "a differencing disk must use its parent's {}-byte logical sectors",
                    parent.logical_sector_size()
                )));
            }
            if opts.physical_sector_size == 0 {
                md.physical_sector_size = parent.physical_sector_size();
            }
            let loc = ParentLocator::for_parent(path, pp, parent.data_write_guid());
            md.parent_locator = Some(loc.to_bytes());
        }
        (DiskType::Differencing, None) => {
            return Err(Error::InvalidInput(
                "a differencing disk needs a parent".into(),
            ));
        }
        (_, Some(_)) => {
            return Err(Error::InvalidInput(
                "only differencing disks have a parent".into(),
            ));
        }
        _ => {}
    }
    // Round the size up to a whole sector, as qemu-img does.
    let ss = u64::from(md.logical_sector_size);
    md.virtual_size = md.virtual_size.div_ceil(ss.max(1)) * ss.max(1);
    md.validate()
        .map_err(|e| Error::InvalidInput(e.to_string()))?;

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::InvalidInput(format!("{} already exists", path.display()))
            } else {
                Error::io("creating", path, e)
            }
        })?;
    let r = write_new(&f, path, &md, opts.disk_type, progress);
    drop(f);
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Vhdx::open(path, OpenOptions { read_only: false })
}

fn write_new(
    f: &std::fs::File,
    path: &Path,
    md: &DiskMetadata,
    kind: DiskType,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let io = |op| move |e| Error::io(op, path, e);
    let geo = Geometry::new(md.block_size, md.logical_sector_size, md.has_parent);
    let entries = geo.total_entries(md.virtual_size);
    // Room to grow: BAT sized for 4x the size (at least 1 MiB), within the format's maximum.
    let growth = md
        .virtual_size
        .saturating_mul(4)
        .min(metadata::MAX_VIRTUAL_SIZE);
    let cap_entries = geo.total_entries(growth).max(entries);
    let bat_len = (cap_entries * 8).div_ceil(MIB).max(1) * MIB;
    let log = Region {
        offset: MIB,
        length: MIB as u32,
    };
    let meta = Region {
        offset: 2 * MIB,
        length: MIB as u32,
    };
    let bat = Region {
        offset: 3 * MIB,
        length: bat_len as u32,
    };
    if bat_len > u64::from(u32::MAX) {
        return Err(Error::Unsupported("BAT larger than 4 GiB".into()));
    }
    let payload_start = bat.end();

    file::write_at(f, &header::file_identifier(CREATOR), 0).map_err(io("writing"))?;
    let rt = RegionTable {
        bat,
        metadata: meta,
    }
    .to_bytes();
    for off in REGION_TABLE_OFFSETS {
        file::write_at(f, &rt, off).map_err(io("writing"))?;
    }
    file::write_at(f, &md.to_bytes(), meta.offset).map_err(io("writing"))?;

    let mut file_end = payload_start;
    let mut bat_bytes = vec![0u8; (entries * 8) as usize];
    if kind == DiskType::Fixed {
        let blocks = geo.payload_blocks(md.virtual_size);
        for b in 0..blocks {
            let i = geo.payload_index(b) as usize;
            let e = make_entry(state::FULLY_PRESENT, payload_start + b * geo.block_size);
            bat_bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        let total = blocks * geo.block_size;
        let step = 1u64 << 30;
        let mut done = 0;
        while done < total {
            let n = step.min(total - done);
            file::preallocate(f, payload_start + done, n).map_err(io("allocating"))?;
            done += n;
            progress(done, total);
        }
        file_end = payload_start + total;
    }
    file::write_at(f, &bat_bytes, bat.offset).map_err(io("writing"))?;
    f.set_len(file_end.max(bat.end())).map_err(io("sizing"))?;
    f.sync_all().map_err(io("flushing"))?;

    let h = Header {
        sequence: 1,
        file_write_guid: Guid::new_random(),
        data_write_guid: Guid::new_random(),
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: log.length,
        log_offset: log.offset,
    };
    file::write_at(f, &h.to_bytes(), HEADER_OFFSETS[0]).map_err(io("writing"))?;
    let h2 = Header { sequence: 2, ..h };
    file::write_at(f, &h2.to_bytes(), HEADER_OFFSETS[1]).map_err(io("writing"))?;
    f.sync_all().map_err(io("flushing"))?;
    Ok(())
}
