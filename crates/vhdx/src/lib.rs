//! `vhdx`: the MS-VHDX virtual disk format, complete and crash-safe.
//!
//! Owns the on-disk format — file identifier, headers, region table, metadata
//! log (write-ahead and replay), block allocation table, sector bitmaps, metadata
//! items and parent locators — and the operations on images: create, open,
//! read/write at any offset, flush, unmap, resize, merge, compact, check/repair
//! and conversion from and to raw (and qcow2 via `qemu-img`).
//!
//! It must not know about VMs, sockets or async runtimes: the API is synchronous,
//! positional (`read_at(&self, ..)`) and `Send + Sync`, so a disk service can call
//! it from many threads at once (e.g. through `spawn_blocking`).
//!
//! ```no_run
//! use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};
//! let d = Vhdx::create("/tmp/a.vhdx", &CreateOptions { size: 1 << 30, ..Default::default() })?;
//! d.write_at(&[1u8; 4096], 1 << 20)?;
//! d.flush()?;
//! drop(d);
//! let d = Vhdx::open("/tmp/a.vhdx", OpenOptions { read_only: true })?;
//! let mut buf = [0u8; 4096];
//! d.read_at(&mut buf, 1 << 20)?;
//! # Ok::<(), vhdx::Error>(())
//! ```
#![warn(missing_docs)]
// The workspace MSRV is 1.80: keep `%` and `map_or` over newer std helpers.
#![allow(clippy::manual_is_multiple_of, clippy::unnecessary_map_or)]

pub mod bat;
pub mod bitmap;
pub mod check;
pub mod create;
pub mod error;
mod file;
pub mod guid;
pub mod header;
pub mod image;
pub mod locator;
pub mod log;
pub mod metadata;
pub mod ops;
pub mod region;
pub mod reparent;

pub use check::{check, CheckReport};
pub use create::{create, CreateOptions};
pub use error::{Error, ErrorKind, Result};
pub use guid::Guid;
pub use image::{ChainEntry, DiskType, Extent, ExtentState, OpenOptions, Vhdx};
pub use ops::{
    compact, convert, detect_format, merge, merge_block, merge_into_child, CompactSummary,
    ConvertOptions, ImageFormat, Progress,
};
pub use reparent::absorb_parent;
