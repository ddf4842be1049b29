//! The QEMU command line for a machine description.
//!
//! [`MachineConfig`] describes one VM in QEMU's terms (it is built by the worker from the
//! API's `VmSpec`); [`MachineConfig::to_args`] validates it and returns the argv (without the
//! binary). The machine profiles follow the generation table of the architecture map:
//!
//! | | [`Generation::Gen1`] | [`Generation::Gen2`] |
//! |---|---|---|
//! | machine | `pc` (i440fx), `vmport=off` | `q35,smm=on`, `vmport=off`, S3/S4 off |
//! | firmware | SeaBIOS ([`Firmware::Bios`]) | OVMF in pflash ([`Firmware::Uefi`]), `secure=on` with Secure Boot |
//! | disks | IDE (`ide-hd`/`ide-cd` on `ide.0`/`ide.1`), SCSI or virtio-blk for data | virtio-scsi (`scsi-hd`/`scsi-cd`) or virtio-blk; no IDE |
//! | NIC | `e1000` (legacy, PXE) | `virtio-net-pci` |
//! | video | `VGA` (std) | `bochs-display` (GOP for OVMF) |
//!
//! Every channel to QEMU is a unix socket in [`MachineConfig::run_dir`] on which QEMU is the
//! **server** (`server=on,wait=off`), so that a restarted worker can connect again:
//! `qmp.sock` (QMP), `serial.sock` (serial console), `qga.sock` (guest agent, virtio-serial
//! port `org.qemu.guest_agent.0`), and the pidfile `qemu.pid`. QEMU is not told to
//! `-daemonize`; see [`crate::process`].
//!
//! Option values are escaped for QEMU's option parser (`,` becomes `,,`), so paths with
//! commas are safe; ids are restricted to QEMU's id syntax.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ErrorKind;

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors building a command line: all of them are invalid input.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// An id does not follow QEMU's syntax (letter first, then letters, digits, `-`, `.`, `_`;
    /// at most 24 bytes here so derived node names fit QEMU's 31-byte limit).
    #[error("invalid id {0:?}: must start with a letter, contain only letters, digits, '-', '.', '_' and be at most 24 bytes")]
    InvalidId(String),
    /// Two devices share an id.
    #[error("duplicate device id {0:?}")]
    DuplicateId(String),
    /// Two devices share a boot index.
    #[error("boot index {0} is used twice")]
    DuplicateBootIndex(u32),
    /// A MAC address is malformed or multicast.
    #[error("invalid MAC address {0:?}: expected six hex pairs, unicast")]
    InvalidMac(String),
    /// A numeric field is out of range.
    #[error("{field} out of range: {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value given.
        value: u64,
    },
    /// A socket path is too long for `sun_path`.
    #[error("socket path {0} is longer than 107 bytes")]
    SocketPathTooLong(PathBuf),
    /// A path must be absolute.
    #[error("path {0} must be absolute")]
    RelativePath(PathBuf),
    /// The configuration mixes pieces of both generations or overflows a bus.
    #[error("{0}")]
    Inconsistent(String),
    /// A string contains a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
}

impl CmdlineError {
    /// Classification for callers: always [`ErrorKind::InvalidInput`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidInput
    }
}

/// Machine generation (see the table in the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    /// `pc`, SeaBIOS, IDE, e1000.
    Gen1,
    /// `q35`, OVMF, virtio-scsi, virtio-net.
    Gen2,
}

/// Accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// Software emulation (multi-threaded TCG).
    Tcg,
}

/// Image format of a file-backed disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// qcow2.
    Qcow2,
    /// VHDX (QEMU's own driver; Vireo normally serves VHDX through NBD instead).
    Vhdx,
}

impl DiskFormat {
    fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DiskSource {
    /// A local image file opened by QEMU.
    File {
        /// Absolute path of the image.
        path: PathBuf,
        /// Image format.
        format: DiskFormat,
        /// Open read-only.
        read_only: bool,
    },
    /// An NBD export on a unix socket (Vireo's disk service). QEMU reconnects for
    /// `reconnect_delay` seconds while the server restarts.
    Nbd {
        /// Absolute path of the NBD server's unix socket.
        socket_path: PathBuf,
        /// Export name.
        export: String,
        /// Seconds QEMU keeps requests queued while reconnecting (0: fail at once).
        reconnect_delay: u32,
        /// Open read-only.
        read_only: bool,
    },
}

/// Bus a disk hangs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// Emulated IDE (generation 1 only): at most 4 devices.
    Ide,
    /// virtio-scsi (one controller `scsi0`, one LUN per disk).
    Scsi,
    /// virtio-blk, one PCI device per disk.
    VirtioBlk,
}

/// Disk or optical drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMedia {
    /// Hard disk.
    #[default]
    Disk,
    /// CD/DVD drive (read-only; not on virtio-blk).
    Cdrom,
}

/// A disk attached to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAttachment {
    /// Device id (QEMU id syntax); the block node is `drv-<id>`.
    pub id: String,
    /// Data source.
    pub source: DiskSource,
    /// Bus.
    pub bus: DiskBus,
    /// Disk or CD-ROM.
    #[serde(default)]
    pub media: DiskMedia,
    /// Firmware boot order (lower first); `None`: not bootable.
    #[serde(default)]
    pub boot_index: Option<u32>,
}

/// NIC device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// Intel e1000 (legacy network adapter, generation 1).
    E1000,
    /// virtio-net (synthetic network adapter).
    VirtioNet,
}

/// What a NIC is plugged into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NicBackend {
    /// Not connected (link up, frames go nowhere).
    None,
    /// A stream of length-prefixed frames over a unix socket (`-netdev stream`), e.g. a
    /// vireo-switch port. `server: true` makes QEMU listen (survives a switch restart;
    /// QEMU 7.2 does not reconnect as a client).
    Stream {
        /// Socket path.
        path: PathBuf,
        /// QEMU listens (true) or connects (false).
        server: bool,
    },
}

/// A NIC attached to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAttachment {
    /// Device id; the netdev is `net-<id>`.
    pub id: String,
    /// MAC address `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// Device model.
    pub model: NicModel,
    /// Backend.
    pub backend: NicBackend,
    /// Network boot order; `None`: no network boot.
    #[serde(default)]
    pub boot_index: Option<u32>,
}

/// Firmware.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (QEMU's default `bios-256k.bin`).
    Bios,
    /// OVMF in two pflash devices.
    Uefi {
        /// Read-only code image (e.g. `OVMF_CODE_4M.secboot.fd` for Secure Boot).
        code: PathBuf,
        /// The VM's own writable copy of a variable store (see `firmware::prepare_vars`).
        vars: PathBuf,
        /// Lock the variable store to SMM (`cfi.pflash01 secure=on`); needed for Secure Boot.
        secure_boot: bool,
    },
}

/// virtio-balloon options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Guest reports freed pages to the host (`free-page-reporting=on`).
    pub free_page_reporting: bool,
    /// Guest deflates under memory pressure (`deflate-on-oom=on`).
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds (0: off).
    pub stats_interval_secs: u32,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            free_page_reporting: true,
            deflate_on_oom: false,
            stats_interval_secs: 2,
        }
    }
}

/// A virtio-mem device for hot-adding memory beyond `memory_mib`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemConfig {
    /// Largest size the device can grow to, MiB.
    pub max_mib: u64,
    /// Plug granularity, MiB (2 is QEMU's minimum on x86).
    pub block_mib: u64,
    /// Size plugged at start, MiB.
    pub requested_mib: u64,
}

/// The files QEMU serves in the run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// QMP socket.
    pub qmp: PathBuf,
    /// Guest agent socket.
    pub qga: PathBuf,
    /// Serial console socket.
    pub serial: PathBuf,
    /// Pidfile.
    pub pidfile: PathBuf,
    /// QEMU's stdout/stderr log (written by [`crate::process`]).
    pub log: PathBuf,
}

impl RunPaths {
    /// The standard names inside `run_dir`.
    pub fn new(run_dir: &Path) -> RunPaths {
        RunPaths {
            qmp: run_dir.join("qmp.sock"),
            qga: run_dir.join("qga.sock"),
            serial: run_dir.join("serial.sock"),
            pidfile: run_dir.join("qemu.pid"),
            log: run_dir.join("qemu.log"),
        }
    }
}

/// Id of the balloon device (for `QmpClient::set_balloon_stats_interval`).
pub const BALLOON_ID: &str = "balloon0";
/// Generation 2 machines carry this many empty PCIe root ports, `hp0`..`hp3`, for
/// hot-adding PCI devices (`device_add ... bus=hp0`): q35's root bus takes no hotplug.
/// Generation 1 hot-adds on `pci.0`.
pub const GEN2_HOTPLUG_PORTS: u32 = 4;
/// Id of the virtio-mem device.
pub const VIRTIO_MEM_ID: &str = "vmem0";

/// Everything QEMU needs to know about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// VM name (`-name guest=...`); any text.
    pub name: String,
    /// VM UUID (SMBIOS system UUID).
    pub uuid: uuid::Uuid,
    /// Machine generation.
    pub generation: Generation,
    /// Accelerator.
    pub accel: Accel,
    /// CPU model (`-cpu`); `None`: QEMU's default (`qemu64`), portable across hosts.
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// vCPU count.
    pub cpus: u32,
    /// Startup memory, MiB.
    pub memory_mib: u64,
    /// Disks, in bus order.
    #[serde(default)]
    pub disks: Vec<DiskAttachment>,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<NicAttachment>,
    /// Firmware; must match the generation (Gen1: Bios, Gen2: Uefi).
    pub firmware: Firmware,
    /// Directory of the sockets and the pidfile (see [`RunPaths`]).
    pub run_dir: PathBuf,
    /// `-incoming` URI (`defer` to use `migrate-incoming` later).
    #[serde(default)]
    pub incoming: Option<String>,
    /// Start with vCPUs stopped (`-S`); the worker then sends `cont`.
    #[serde(default)]
    pub start_paused: bool,
    /// Balloon device; `None`: no balloon.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// virtio-mem device; `None`: none.
    #[serde(default)]
    pub virtio_mem: Option<VirtioMemConfig>,
    /// Guest RTC in local time (Windows) instead of UTC.
    #[serde(default)]
    pub rtc_localtime: bool,
}

impl Default for MachineConfig {
    /// A 1-vCPU, 512 MiB generation 1 TCG machine with a balloon and nothing else; set
    /// `name`, `uuid` and `run_dir` at least. Use `..Default::default()` in struct literals
    /// so that new optional fields do not break callers.
    fn default() -> Self {
        MachineConfig {
            name: String::new(),
            uuid: uuid::Uuid::nil(),
            generation: Generation::Gen1,
            accel: Accel::Tcg,
            cpu_model: None,
            cpus: 1,
            memory_mib: 512,
            disks: Vec::new(),
            nics: Vec::new(),
            firmware: Firmware::Bios,
            run_dir: PathBuf::new(),
            incoming: None,
            start_paused: false,
            balloon: Some(BalloonConfig::default()),
            virtio_mem: None,
            rtc_localtime: false,
        }
    }
}

/// Escapes one option value for QEMU's `key=value,...` parser.
fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// A `-option` argument built from `key=value` pairs.
#[derive(Default)]
struct Opts(Vec<u8>);

impl Opts {
    fn new(first: &str) -> Opts {
        Opts(first.as_bytes().to_vec())
    }
    fn kv(mut self, key: &str, value: impl AsRef<OsStr>) -> Opts {
        if !self.0.is_empty() {
            self.0.push(b',');
        }
        self.0.extend_from_slice(key.as_bytes());
        self.0.push(b'=');
        self.0.extend_from_slice(escape(value.as_ref()).as_bytes());
        self
    }
    fn flag(self, key: &str, on: bool) -> Opts {
        self.kv(key, if on { "on" } else { "off" })
    }
    fn build(self) -> OsString {
        OsString::from_vec(self.0)
    }
}

struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, opt: &str, value: impl Into<OsString>) {
        self.0.push(opt.into());
        self.0.push(value.into());
    }
    fn flag(&mut self, opt: &str) {
        self.0.push(opt.into());
    }
}

/// Checks QEMU's id syntax (and our length cap).
pub fn validate_id(id: &str) -> Result<(), CmdlineError> {
    let ok = id.len() <= 24
        && id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(CmdlineError::InvalidId(id.to_string()))
    }
}

fn validate_mac(mac: &str) -> Result<(), CmdlineError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    let unicast = ok && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0);
    if unicast {
        Ok(())
    } else {
        Err(CmdlineError::InvalidMac(mac.to_string()))
    }
}

fn check_nul(s: &OsStr) -> Result<(), CmdlineError> {
    if s.as_bytes().contains(&0) {
        Err(CmdlineError::Nul(s.to_string_lossy().into_owned()))
    } else {
        Ok(())
    }
}

fn check_abs(p: &Path) -> Result<(), CmdlineError> {
    check_nul(p.as_os_str())?;
    if p.is_absolute() {
        Ok(())
    } else {
        Err(CmdlineError::RelativePath(p.to_path_buf()))
    }
}

fn check_socket(p: &Path) -> Result<(), CmdlineError> {
    check_abs(p)?;
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        Err(CmdlineError::SocketPathTooLong(p.to_path_buf()))
    } else {
        Ok(())
    }
}

impl MachineConfig {
    /// The socket and pidfile paths of this VM.
    pub fn paths(&self) -> RunPaths {
        RunPaths::new(&self.run_dir)
    }

    /// Checks the configuration without building anything.
    pub fn validate(&self) -> Result<(), CmdlineError> {
        check_nul(OsStr::new(&self.name))?;
        if self.cpus == 0 || self.cpus > 288 {
            return Err(CmdlineError::OutOfRange {
                field: "cpus",
                value: self.cpus.into(),
            });
        }
        if self.memory_mib < 16 || self.memory_mib > 16 * 1024 * 1024 {
            return Err(CmdlineError::OutOfRange {
                field: "memory_mib",
                value: self.memory_mib,
            });
        }
        let paths = self.paths();
        for p in [&paths.qmp, &paths.qga, &paths.serial] {
            check_socket(p)?;
        }
        match (&self.generation, &self.firmware) {
            (Generation::Gen1, Firmware::Bios) => {}
            (Generation::Gen2, Firmware::Uefi { code, vars, .. }) => {
                check_abs(code)?;
                check_abs(vars)?;
            }
            (g, _) => {
                return Err(CmdlineError::Inconsistent(format!(
                    "{g:?} needs {} firmware",
                    if *g == Generation::Gen1 {
                        "BIOS"
                    } else {
                        "UEFI"
                    }
                )))
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut boots = std::collections::HashSet::new();
        let mut ide = 0;
        for d in &self.disks {
            validate_id(&d.id)?;
            if !ids.insert(d.id.as_str()) {
                return Err(CmdlineError::DuplicateId(d.id.clone()));
            }
            if let Some(b) = d.boot_index {
                if !boots.insert(b) {
                    return Err(CmdlineError::DuplicateBootIndex(b));
                }
            }
            match &d.source {
                DiskSource::File { path, .. } => check_abs(path)?,
                DiskSource::Nbd {
                    socket_path,
                    export,
                    ..
                } => {
                    check_socket(socket_path)?;
                    check_nul(OsStr::new(export))?;
                }
            }
            match d.bus {
                DiskBus::Ide if self.generation == Generation::Gen2 => {
                    return Err(CmdlineError::Inconsistent(format!(
                        "disk {}: generation 2 machines have no IDE bus",
                        d.id
                    )))
                }
                DiskBus::Ide => ide += 1,
                DiskBus::VirtioBlk if d.media == DiskMedia::Cdrom => {
                    return Err(CmdlineError::Inconsistent(format!(
                        "disk {}: a CD-ROM cannot be on virtio-blk",
                        d.id
                    )))
                }
                _ => {}
            }
        }
        if ide > 4 {
            return Err(CmdlineError::Inconsistent(format!(
                "{ide} IDE devices; the IDE controller takes 4"
            )));
        }
        for n in &self.nics {
            validate_id(&n.id)?;
            if !ids.insert(n.id.as_str()) {
                return Err(CmdlineError::DuplicateId(n.id.clone()));
            }
            validate_mac(&n.mac)?;
            if let Some(b) = n.boot_index {
                if !boots.insert(b) {
                    return Err(CmdlineError::DuplicateBootIndex(b));
                }
            }
            if let NicBackend::Stream { path, .. } = &n.backend {
                check_socket(path)?;
            }
        }
        if let Some(m) = &self.virtio_mem {
            if m.block_mib < 2 || !m.block_mib.is_power_of_two() || m.max_mib % m.block_mib != 0 {
                return Err(CmdlineError::OutOfRange {
                    field: "virtio_mem.block_mib",
                    value: m.block_mib,
                });
            }
            if m.requested_mib > m.max_mib || m.requested_mib % m.block_mib != 0 {
                return Err(CmdlineError::OutOfRange {
                    field: "virtio_mem.requested_mib",
                    value: m.requested_mib,
                });
            }
        }
        if let Some(inc) = &self.incoming {
            check_nul(OsStr::new(inc))?;
        }
        if let Some(cpu) = &self.cpu_model {
            check_nul(OsStr::new(cpu))?;
        }
        Ok(())
    }

    /// Validates and returns QEMU's argv (without the binary name).
    pub fn to_args(&self) -> Result<Vec<OsString>, CmdlineError> {
        self.validate()?;
        let paths = self.paths();
        let gen2 = self.generation == Generation::Gen2;
        let mut a = Args(Vec::new());

        a.push(
            "-name",
            Opts::default()
                .kv("guest", &self.name)
                .flag("debug-threads", true)
                .build(),
        );
        a.push("-uuid", self.uuid.hyphenated().to_string());
        a.flag("-nodefaults");
        a.flag("-no-user-config");
        a.push("-msg", "timestamp=on");

        // Machine.
        let mut machine = Opts::new(if gen2 { "q35" } else { "pc" }).flag("vmport", false);
        if gen2 {
            machine = machine.flag("smm", true);
        }
        if let Firmware::Uefi { .. } = self.firmware {
            machine = machine
                .kv("pflash0", "pflash-code")
                .kv("pflash1", "pflash-vars");
        }
        a.push("-machine", machine.build());
        a.push(
            "-accel",
            match self.accel {
                Accel::Kvm => "kvm",
                Accel::Tcg => "tcg",
            },
        );
        if let Some(cpu) = &self.cpu_model {
            a.push("-cpu", cpu.clone());
        }
        a.push(
            "-smp",
            Opts::default()
                .kv("cpus", self.cpus.to_string())
                .kv("sockets", "1")
                .kv("cores", self.cpus.to_string())
                .kv("threads", "1")
                .build(),
        );
        match &self.virtio_mem {
            None => a.push("-m", format!("{}M", self.memory_mib)),
            Some(m) => a.push(
                "-m",
                format!(
                    "{}M,maxmem={}M",
                    self.memory_mib,
                    self.memory_mib + m.max_mib
                ),
            ),
        }
        if gen2 {
            a.push("-global", "ICH9-LPC.disable_s3=1");
            a.push("-global", "ICH9-LPC.disable_s4=1");
        }
        a.push(
            "-rtc",
            if self.rtc_localtime {
                "base=localtime"
            } else {
                "base=utc"
            },
        );

        // Firmware.
        if let Firmware::Uefi {
            code,
            vars,
            secure_boot,
        } = &self.firmware
        {
            a.push(
                "-blockdev",
                Opts::default()
                    .kv("node-name", "pflash-code-file")
                    .kv("driver", "file")
                    .kv("filename", code)
                    .flag("read-only", true)
                    .build(),
            );
            a.push(
                "-blockdev",
                Opts::default()
                    .kv("node-name", "pflash-code")
                    .kv("driver", "raw")
                    .kv("file", "pflash-code-file")
                    .flag("read-only", true)
                    .build(),
            );
            a.push(
                "-blockdev",
                Opts::default()
                    .kv("node-name", "pflash-vars-file")
                    .kv("driver", "file")
                    .kv("filename", vars)
                    .build(),
            );
            a.push(
                "-blockdev",
                Opts::default()
                    .kv("node-name", "pflash-vars")
                    .kv("driver", "raw")
                    .kv("file", "pflash-vars-file")
                    .build(),
            );
            if *secure_boot {
                a.push("-global", "driver=cfi.pflash01,property=secure,value=on");
            }
        }

        // Control channels: QEMU is the server on every socket.
        a.push(
            "-chardev",
            Opts::new("socket")
                .kv("id", "qmp0")
                .kv("path", &paths.qmp)
                .flag("server", true)
                .flag("wait", false)
                .build(),
        );
        a.push("-mon", "chardev=qmp0,mode=control");
        a.push(
            "-chardev",
            Opts::new("socket")
                .kv("id", "serial0")
                .kv("path", &paths.serial)
                .flag("server", true)
                .flag("wait", false)
                .build(),
        );
        a.push("-serial", "chardev:serial0");
        a.push(
            "-chardev",
            Opts::new("socket")
                .kv("id", "qga0")
                .kv("path", &paths.qga)
                .flag("server", true)
                .flag("wait", false)
                .build(),
        );
        a.push("-device", "virtio-serial-pci,id=vser0");
        a.push(
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        );
        a.push("-pidfile", paths.pidfile.clone());
        a.push("-display", "none");
        a.push("-vga", "none");
        a.push("-device", if gen2 { "bochs-display" } else { "VGA" });

        // Disks.
        let needs_scsi = self.disks.iter().any(|d| d.bus == DiskBus::Scsi);
        if needs_scsi {
            a.push("-device", "virtio-scsi-pci,id=scsi0");
        }
        let mut ide_slot = 0u32;
        let mut lun = 0u32;
        for d in &self.disks {
            let node = format!("drv-{}", d.id);
            let read_only = match &d.source {
                DiskSource::File { read_only, .. } | DiskSource::Nbd { read_only, .. } => {
                    *read_only || d.media == DiskMedia::Cdrom
                }
            };
            match &d.source {
                DiskSource::File { path, format, .. } => {
                    let file_node = format!("file-{}", d.id);
                    a.push(
                        "-blockdev",
                        Opts::default()
                            .kv("node-name", &file_node)
                            .kv("driver", "file")
                            .kv("filename", path)
                            .kv("cache.direct", "off")
                            .flag("read-only", read_only)
                            .build(),
                    );
                    a.push(
                        "-blockdev",
                        Opts::default()
                            .kv("node-name", &node)
                            .kv("driver", format.driver())
                            .kv("file", &file_node)
                            .flag("read-only", read_only)
                            .build(),
                    );
                }
                DiskSource::Nbd {
                    socket_path,
                    export,
                    reconnect_delay,
                    ..
                } => {
                    a.push(
                        "-blockdev",
                        Opts::default()
                            .kv("node-name", &node)
                            .kv("driver", "nbd")
                            .kv("server.type", "unix")
                            .kv("server.path", socket_path)
                            .kv("export", export)
                            .kv("reconnect-delay", reconnect_delay.to_string())
                            .flag("read-only", read_only)
                            .build(),
                    );
                }
            }
            let cd = d.media == DiskMedia::Cdrom;
            let mut dev = match d.bus {
                DiskBus::Ide => {
                    let o = Opts::new(if cd { "ide-cd" } else { "ide-hd" })
                        .kv("bus", format!("ide.{}", ide_slot / 2))
                        .kv("unit", (ide_slot % 2).to_string());
                    ide_slot += 1;
                    o
                }
                DiskBus::Scsi => {
                    let o = Opts::new(if cd { "scsi-cd" } else { "scsi-hd" })
                        .kv("bus", "scsi0.0")
                        .kv("channel", "0")
                        .kv("scsi-id", "0")
                        .kv("lun", lun.to_string());
                    lun += 1;
                    o
                }
                DiskBus::VirtioBlk => Opts::new("virtio-blk-pci"),
            }
            .kv("drive", &node)
            .kv("id", &d.id);
            if let Some(b) = d.boot_index {
                dev = dev.kv("bootindex", b.to_string());
            }
            a.push("-device", dev.build());
        }

        // NICs.
        for n in &self.nics {
            let mut dev = Opts::new(match n.model {
                NicModel::E1000 => "e1000",
                NicModel::VirtioNet => "virtio-net-pci",
            })
            .kv("id", &n.id)
            .kv("mac", n.mac.to_ascii_lowercase());
            if let NicBackend::Stream { path, server } = &n.backend {
                let netdev = format!("net-{}", n.id);
                a.push(
                    "-netdev",
                    Opts::new("stream")
                        .kv("id", &netdev)
                        .flag("server", *server)
                        .kv("addr.type", "unix")
                        .kv("addr.path", path)
                        .build(),
                );
                dev = dev.kv("netdev", &netdev);
            }
            if let Some(b) = n.boot_index {
                dev = dev.kv("bootindex", b.to_string());
            }
            a.push("-device", dev.build());
        }

        // Memory devices.
        if let Some(b) = &self.balloon {
            a.push(
                "-device",
                Opts::new("virtio-balloon-pci")
                    .kv("id", BALLOON_ID)
                    .flag("free-page-reporting", b.free_page_reporting)
                    .flag("deflate-on-oom", b.deflate_on_oom)
                    .kv(
                        "guest-stats-polling-interval",
                        b.stats_interval_secs.to_string(),
                    )
                    .build(),
            );
        }
        if let Some(m) = &self.virtio_mem {
            a.push(
                "-object",
                Opts::new("memory-backend-ram")
                    .kv("id", "mem-vmem0")
                    .kv("size", format!("{}M", m.max_mib))
                    .flag("reserve", false)
                    .build(),
            );
            a.push(
                "-device",
                Opts::new("virtio-mem-pci")
                    .kv("id", VIRTIO_MEM_ID)
                    .kv("memdev", "mem-vmem0")
                    .kv("block-size", format!("{}M", m.block_mib))
                    .kv("requested-size", format!("{}M", m.requested_mib))
                    .build(),
            );
        }

        if gen2 {
            for i in 0..GEN2_HOTPLUG_PORTS {
                a.push(
                    "-device",
                    format!(
                        "pcie-root-port,id=hp{i},chassis={},port={}",
                        i + 1,
                        0x10 + i
                    ),
                );
            }
        }

        if let Some(inc) = &self.incoming {
            a.push("-incoming", inc.clone());
        }
        if self.start_paused {
            a.flag("-S");
        }
        Ok(a.0)
    }

    /// [`MachineConfig::to_args`] rendered for logs (arguments joined by spaces, lossy).
    pub fn to_display_string(&self) -> Result<String, CmdlineError> {
        Ok(self
            .to_args()?
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "))
    }
}

/// QMP arguments to hot-add a disk: the `blockdev-add` objects (in order) and the
/// `device_add` driver and properties (without `id`, which is `disk.id`).
///
/// SCSI disks go on `scsi0.0` at `lun` (the machine must have a SCSI disk already, or
/// the caller adds `virtio-scsi-pci` first); virtio-blk disks need a free hotplug port
/// (`bus`, e.g. `hp0`) on generation 2. IDE does not hotplug.
pub fn disk_hotplug_args(
    disk: &DiskAttachment,
    lun: u32,
    bus: Option<&str>,
) -> Result<(Vec<serde_json::Value>, &'static str, serde_json::Value), CmdlineError> {
    use serde_json::json;
    validate_id(&disk.id)?;
    let node = format!("drv-{}", disk.id);
    let cd = disk.media == DiskMedia::Cdrom;
    let mut blockdevs = Vec::new();
    let path_str = |p: &Path| -> Result<String, CmdlineError> {
        check_abs(p)?;
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| CmdlineError::Nul(p.to_string_lossy().into_owned()))
    };
    match &disk.source {
        DiskSource::File {
            path,
            format,
            read_only,
        } => {
            let ro = *read_only || cd;
            let file_node = format!("file-{}", disk.id);
            blockdevs.push(json!({"node-name": file_node, "driver": "file",
                "filename": path_str(path)?, "read-only": ro}));
            blockdevs.push(json!({"node-name": node, "driver": format.driver(),
                "file": file_node, "read-only": ro}));
        }
        DiskSource::Nbd {
            socket_path,
            export,
            reconnect_delay,
            read_only,
        } => {
            blockdevs.push(json!({"node-name": node, "driver": "nbd",
                "server": {"type": "unix", "path": path_str(socket_path)?},
                "export": export, "reconnect-delay": reconnect_delay,
                "read-only": *read_only || cd}));
        }
    }
    let (driver, mut props) = match disk.bus {
        DiskBus::Ide => {
            return Err(CmdlineError::Inconsistent(format!(
                "disk {}: IDE does not support hot-add",
                disk.id
            )))
        }
        DiskBus::Scsi => (
            if cd { "scsi-cd" } else { "scsi-hd" },
            json!({"bus": "scsi0.0", "channel": 0, "scsi-id": 0, "lun": lun, "drive": node}),
        ),
        DiskBus::VirtioBlk => ("virtio-blk-pci", json!({"drive": node})),
    };
    if let (Some(b), DiskBus::VirtioBlk) = (bus, disk.bus) {
        props["bus"] = json!(b);
    }
    if let Some(b) = disk.boot_index {
        props["bootindex"] = json!(b);
    }
    Ok((blockdevs, driver, props))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(generation: Generation) -> MachineConfig {
        MachineConfig {
            name: "vm1".into(),
            uuid: uuid::Uuid::nil(),
            generation,
            accel: Accel::Tcg,
            cpu_model: None,
            cpus: 2,
            memory_mib: 512,
            disks: vec![],
            nics: vec![],
            firmware: match generation {
                Generation::Gen1 => Firmware::Bios,
                Generation::Gen2 => Firmware::Uefi {
                    code: "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd".into(),
                    vars: "/run/vireo/vm1/vars.fd".into(),
                    secure_boot: true,
                },
            },
            run_dir: "/run/vireo/vm1".into(),
            incoming: None,
            start_paused: false,
            balloon: Some(BalloonConfig::default()),
            virtio_mem: None,
            rtc_localtime: false,
        }
    }

    fn args(c: &MachineConfig) -> Vec<String> {
        c.to_args()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    /// Value of every occurrence of option `opt`.
    fn values<'a>(a: &'a [String], opt: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == opt)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// Generation 1: pc, SeaBIOS, IDE boot disk, e1000, VGA, sockets as servers.
    #[test]
    fn gen1_argv() {
        let mut c = base(Generation::Gen1);
        c.disks.push(DiskAttachment {
            id: "boot".into(),
            source: DiskSource::File {
                path: "/var/lib/vireo/a.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: false,
            },
            bus: DiskBus::Ide,
            media: DiskMedia::Disk,
            boot_index: Some(0),
        });
        c.disks.push(DiskAttachment {
            id: "cd".into(),
            source: DiskSource::File {
                path: "/iso/x.iso".into(),
                format: DiskFormat::Raw,
                read_only: true,
            },
            bus: DiskBus::Ide,
            media: DiskMedia::Cdrom,
            boot_index: None,
        });
        c.nics.push(NicAttachment {
            id: "nic0".into(),
            mac: "52:54:00:12:34:56".into(),
            model: NicModel::E1000,
            backend: NicBackend::Stream {
                path: "/run/vireo/sw0/p1.sock".into(),
                server: true,
            },
            boot_index: Some(1),
        });
        let a = args(&c);
        assert_eq!(values(&a, "-machine"), vec!["pc,vmport=off"]);
        assert!(a.contains(&"-nodefaults".to_string()));
        assert!(a.contains(&"-no-user-config".to_string()));
        assert_eq!(values(&a, "-accel"), vec!["tcg"]);
        assert_eq!(values(&a, "-m"), vec!["512M"]);
        assert_eq!(values(&a, "-display"), vec!["none"]);
        assert_eq!(values(&a, "-vga"), vec!["none"]);
        let dev = values(&a, "-device");
        assert!(dev.contains(&"VGA"));
        assert!(dev.contains(&"ide-hd,bus=ide.0,unit=0,drive=drv-boot,id=boot,bootindex=0"));
        assert!(dev.contains(&"ide-cd,bus=ide.0,unit=1,drive=drv-cd,id=cd"));
        assert!(dev.contains(&"e1000,id=nic0,mac=52:54:00:12:34:56,netdev=net-nic0,bootindex=1"));
        assert!(
            dev.contains(&"virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0")
        );
        assert!(dev
            .iter()
            .any(|d| d.starts_with("virtio-balloon-pci,id=balloon0,free-page-reporting=on")));
        assert!(!dev.iter().any(|d| d.starts_with("virtio-scsi")));
        assert!(!dev.iter().any(|d| d.starts_with("pcie-root-port")));
        let bd = values(&a, "-blockdev");
        assert!(bd.contains(&"node-name=drv-boot,driver=qcow2,file=file-boot,read-only=off"));
        assert!(bd.contains(&"node-name=drv-cd,driver=raw,file=file-cd,read-only=on"));
        assert_eq!(
            values(&a, "-netdev"),
            vec!["stream,id=net-nic0,server=on,addr.type=unix,addr.path=/run/vireo/sw0/p1.sock"]
        );
        let ch = values(&a, "-chardev");
        assert_eq!(ch.len(), 3);
        for c in ch {
            assert!(c.ends_with(",server=on,wait=off"), "{c}");
        }
        assert_eq!(values(&a, "-mon"), vec!["chardev=qmp0,mode=control"]);
        assert_eq!(values(&a, "-serial"), vec!["chardev:serial0"]);
        assert_eq!(values(&a, "-pidfile"), vec!["/run/vireo/vm1/qemu.pid"]);
        assert!(values(&a, "-global").is_empty());
        assert!(!a.contains(&"-S".to_string()));
        assert!(!a.contains(&"-daemonize".to_string()));
    }

    /// Generation 2: q35 with SMM, OVMF in pflash with secure=on, virtio-scsi, virtio-net.
    #[test]
    fn gen2_argv() {
        let mut c = base(Generation::Gen2);
        c.disks.push(DiskAttachment {
            id: "os".into(),
            source: DiskSource::Nbd {
                socket_path: "/run/vireo/vm1/disk-os.sock".into(),
                export: "os".into(),
                reconnect_delay: 30,
                read_only: false,
            },
            bus: DiskBus::Scsi,
            media: DiskMedia::Disk,
            boot_index: Some(0),
        });
        c.disks.push(DiskAttachment {
            id: "data".into(),
            source: DiskSource::File {
                path: "/d/data.vhdx".into(),
                format: DiskFormat::Vhdx,
                read_only: false,
            },
            bus: DiskBus::Scsi,
            media: DiskMedia::Disk,
            boot_index: None,
        });
        c.nics.push(NicAttachment {
            id: "nic0".into(),
            mac: "52:54:00:AB:CD:EF".into(),
            model: NicModel::VirtioNet,
            backend: NicBackend::None,
            boot_index: None,
        });
        c.incoming = Some("defer".into());
        c.start_paused = true;
        let a = args(&c);
        assert_eq!(
            values(&a, "-machine"),
            vec!["q35,vmport=off,smm=on,pflash0=pflash-code,pflash1=pflash-vars"]
        );
        let g = values(&a, "-global");
        assert!(g.contains(&"driver=cfi.pflash01,property=secure,value=on"));
        assert!(g.contains(&"ICH9-LPC.disable_s3=1"));
        let bd = values(&a, "-blockdev");
        assert!(bd.contains(&"node-name=pflash-code-file,driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd,read-only=on"));
        assert!(
            bd.contains(&"node-name=pflash-vars-file,driver=file,filename=/run/vireo/vm1/vars.fd")
        );
        assert!(bd.contains(&"node-name=drv-os,driver=nbd,server.type=unix,server.path=/run/vireo/vm1/disk-os.sock,export=os,reconnect-delay=30,read-only=off"));
        let dev = values(&a, "-device");
        assert!(dev.contains(&"virtio-scsi-pci,id=scsi0"));
        assert!(dev.contains(
            &"scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=drv-os,id=os,bootindex=0"
        ));
        assert!(
            dev.contains(&"scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=1,drive=drv-data,id=data")
        );
        assert!(dev.contains(&"virtio-net-pci,id=nic0,mac=52:54:00:ab:cd:ef"));
        assert!(dev.contains(&"bochs-display"));
        assert!(dev.contains(&"pcie-root-port,id=hp0,chassis=1,port=16"));
        assert_eq!(
            dev.iter()
                .filter(|d| d.starts_with("pcie-root-port"))
                .count(),
            4
        );
        assert!(!dev
            .iter()
            .any(|d| d.starts_with("ide-") || *d == "VGA" || d.starts_with("e1000")));
        assert_eq!(values(&a, "-incoming"), vec!["defer"]);
        assert!(a.contains(&"-S".to_string()));
    }

    /// Commas in paths and names are doubled so QEMU reads them as one value.
    #[test]
    fn commas_are_escaped() {
        let mut c = base(Generation::Gen1);
        c.name = "a,b".into();
        c.run_dir = "/run/x,y".into();
        c.disks.push(DiskAttachment {
            id: "d0".into(),
            source: DiskSource::File {
                path: "/img/a,file=/etc/shadow.raw".into(),
                format: DiskFormat::Raw,
                read_only: false,
            },
            bus: DiskBus::Ide,
            media: DiskMedia::Disk,
            boot_index: None,
        });
        let a = args(&c);
        assert_eq!(values(&a, "-name"), vec!["guest=a,,b,debug-threads=on"]);
        assert!(values(&a, "-blockdev")
            .contains(&"node-name=file-d0,driver=file,filename=/img/a,,file=/etc/shadow.raw,cache.direct=off,read-only=off"));
        assert_eq!(values(&a, "-pidfile"), vec!["/run/x,y/qemu.pid"]);
        assert!(values(&a, "-chardev")
            .contains(&"socket,id=qmp0,path=/run/x,,y/qmp.sock,server=on,wait=off"));
    }

    /// Bad input is refused with a precise error.
    #[test]
    fn invalid_configs_are_refused() {
        let mut c = base(Generation::Gen1);
        c.firmware = Firmware::Uefi {
            code: "/a".into(),
            vars: "/b".into(),
            secure_boot: false,
        };
        assert!(matches!(c.to_args(), Err(CmdlineError::Inconsistent(_))));

        let mut c = base(Generation::Gen2);
        c.disks.push(DiskAttachment {
            id: "x".into(),
            source: DiskSource::File {
                path: "/a".into(),
                format: DiskFormat::Raw,
                read_only: false,
            },
            bus: DiskBus::Ide,
            media: DiskMedia::Disk,
            boot_index: None,
        });
        assert!(matches!(c.to_args(), Err(CmdlineError::Inconsistent(_))));

        let mut c = base(Generation::Gen1);
        c.nics.push(NicAttachment {
            id: "n".into(),
            mac: "01:00:00:00:00:01".into(),
            model: NicModel::E1000,
            backend: NicBackend::None,
            boot_index: None,
        });
        assert!(matches!(c.to_args(), Err(CmdlineError::InvalidMac(_))));

        for bad in [
            "",
            "0abc",
            "a b",
            "a,b",
            "this-id-is-much-too-long-for-qemu",
        ] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        let mut c = base(Generation::Gen1);
        c.run_dir = PathBuf::from(format!("/{}", "r".repeat(100)));
        assert!(matches!(
            c.to_args(),
            Err(CmdlineError::SocketPathTooLong(_))
        ));

        let mut c = base(Generation::Gen1);
        c.cpus = 0;
        assert!(c.to_args().is_err());

        let mut c = base(Generation::Gen1);
        let d = DiskAttachment {
            id: "a".into(),
            source: DiskSource::File {
                path: "rel.img".into(),
                format: DiskFormat::Raw,
                read_only: false,
            },
            bus: DiskBus::Ide,
            media: DiskMedia::Disk,
            boot_index: None,
        };
        c.disks.push(d);
        assert!(matches!(c.to_args(), Err(CmdlineError::RelativePath(_))));
    }

    /// virtio-mem sets maxmem and a sparse RAM backend.
    #[test]
    fn virtio_mem_args() {
        let mut c = base(Generation::Gen2);
        c.virtio_mem = Some(VirtioMemConfig {
            max_mib: 1024,
            block_mib: 2,
            requested_mib: 0,
        });
        let a = args(&c);
        assert_eq!(values(&a, "-m"), vec!["512M,maxmem=1536M"]);
        assert!(values(&a, "-device")
            .contains(&"virtio-mem-pci,id=vmem0,memdev=mem-vmem0,block-size=2M,requested-size=0M"));
    }
}
