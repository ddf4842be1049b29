//! `storage`: Vireo's disk service. Every VM disk is served over NBD from a chain of
//! images: a VHDX leaf and its parents (or a raw image for imported disks). It owns:
//!
//! - [`open_image`], the one place a format is detected;
//! - [`DiskChain`], an [`nbd::Export`] over a chain whose active leaf can be switched
//!   atomically while clients write (checkpoint create) and merged live into its parent
//!   while clients write (checkpoint remove);
//! - [`DiskService`], one export per VM disk on `<run_dir>/disk<i>.nbd.sock`, re-served on
//!   the same sockets by a restarted worker;
//! - [`DiskState`], the per-VM checkpoint tree, current leaves and merge jobs, persisted
//!   atomically in the VM directory so a kill -9 at any point resumes where it was.
//!
//! It must not know about QEMU: quiescing the guest (agent freeze, memory state) is the
//! worker's job around [`DiskService::create_checkpoint`].

#![warn(missing_docs)]

mod absorb;
mod chain;
mod consolidate;
mod error;
mod image;
mod journal;
pub mod mirror;
mod service;
mod state;
pub mod tracking;
pub mod wire;

pub use chain::DiskChain;
pub use error::{ErrorKind, Result, StorageError};
pub use image::{open_image, Image};
pub use service::{export_name, journal_path, offline, socket_path, DiskConfig, DiskService};
pub use state::{
    now_unix, Checkpoint, CheckpointKind, DiskState, MergeJob, MergeKind, MergeState, FILE_NAME,
    FORMAT_VERSION,
};
