//! Defining the test VMs the disk-centred end-to-end tests share, written once: a generation 1
//! guest whose boot disk is converted to VHDX (checkpoints, mirroring and replication need
//! every disk in VHDX) plus an empty VHDX data disk.

use crate::multihost::NsHost;
use crate::Host;
use std::path::{Path, PathBuf};

/// Anything the `vireo` CLI can be run against, asserting success.
pub trait VireoCli {
    /// Runs `vireo ARGS`; panics with the daemon's log tail unless it succeeds; returns stdout.
    fn vireo_ok(&self, args: &[&str]) -> String;
}

impl VireoCli for Host {
    fn vireo_ok(&self, args: &[&str]) -> String {
        self.ok(args)
    }
}

impl VireoCli for NsHost {
    fn vireo_ok(&self, args: &[&str]) -> String {
        self.ok(args)
    }
}

/// The two disks of a VM made by [`define_gen1_vm`].
pub struct Gen1Disks {
    /// The VHDX boot disk converted from the raw test image.
    pub boot: PathBuf,
    /// The empty data disk.
    pub data: PathBuf,
}

/// The 64 MiB data disk with 1 MiB blocks most single-host tests use (131072 sectors:
/// `guest_io::DISK_64M`).
pub const DATA_64M: &[&str] = &["--size", "64M", "--block-size", "1M"];

/// The 16 MiB data disk the record writer fills (`guest_io::RECORD_WRITER`).
pub const DATA_16M: &[&str] = &["--size", "16M"];

/// Defines (does not start) VM `name` with generation 1 firmware and `memory`, booting from
/// `raw_boot` converted into `dir/boot.vhdx`, with a new `dir/data.vhdx` made with
/// `vireo disk new … DATA_OPTS` (e.g. [`DATA_64M`]) as its second disk.
pub fn define_gen1_vm(
    h: &impl VireoCli,
    name: &str,
    raw_boot: &Path,
    dir: &Path,
    memory: &str,
    data_opts: &[&str],
) -> Gen1Disks {
    let boot = dir.join("boot.vhdx");
    let data = dir.join("data.vhdx");
    let (boot_s, data_s) = (path_str(&boot), path_str(&data));
    h.vireo_ok(&["disk", "convert", path_str(raw_boot), boot_s]);
    let mut new_data = vec!["disk", "new", data_s];
    new_data.extend_from_slice(data_opts);
    h.vireo_ok(&new_data);
    h.vireo_ok(&[
        "vm",
        "new",
        name,
        "--generation",
        "1",
        "--memory",
        memory,
        "--disk",
        boot_s,
        "--disk",
        data_s,
    ]);
    Gen1Disks { boot, data }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
