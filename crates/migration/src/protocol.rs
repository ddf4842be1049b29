//! The host-to-host protocol: hello first (protocol version, feature list, host facts),
//! then the pure compatibility check, then the migration messages.
//!
//! ```text
//!  source vireod                                   destination vireod
//!   GET  /peer/v1/hello  ─────────────────────────>  Hello (open to untrusted hosts)
//!   check(source, dest, needs)  -- refuse here, before anything moves
//!   POST /peer/v1/migrations  (PrepareRequest) ───>  check again, start worker -incoming defer
//!   tunnel "memory" (ALPN vireo-stream/1) ════════>  QEMU migrate-incoming unix:…
//!   GET  /peer/v1/migrations/{id}  (every second; the destination's lease)
//!   ── QEMU pre-switchover: source disks released ──
//!   POST /peer/v1/migrations/{id}/activate ───────>  destination opens the disks
//!   ── QEMU completed (source paused) ──
//!   POST /peer/v1/migrations/{id}/commit ─────────>  destination resumes the VM
//!   source quits its QEMU and forgets the VM
//!   POST /peer/v1/migrations/{id}/abort  (any failure before commit) ─> destination cleans up
//! ```

use api::{Accel, Generation, VmSpec};
use serde::{Deserialize, Serialize};

/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest protocol version this build accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Features this build offers. A migration needs the ones [`required_features`] lists.
pub const FEATURES: &[&str] = &[
    "shared-storage",
    "shared-nothing",
    "pause-before-switchover",
    "tls-tunnel",
    "auto-converge",
];

/// Firmware a host has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareFacts {
    /// SeaBIOS (generation 1).
    pub seabios: bool,
    /// OVMF (generation 2).
    pub ovmf: bool,
    /// OVMF with Secure Boot.
    pub ovmf_secure_boot: bool,
}

/// What a host says about itself in its hello.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// QEMU version line.
    pub qemu_version: String,
    /// Accelerator VMs get.
    pub accel: Option<Accel>,
    /// CPU flags (from /proc/cpuinfo) when the accelerator is KVM; empty under TCG.
    #[serde(default)]
    pub cpu_flags: Vec<String>,
    /// Firmware.
    pub firmware: FirmwareFacts,
    /// Virtual switches defined on the host.
    #[serde(default)]
    pub switches: Vec<String>,
    /// Memory available for VMs (after the host reserve), bytes.
    pub memory_available: u64,
    /// Maximum simultaneous migrations.
    pub max_migrations: u32,
    /// Migrations running now.
    pub active_migrations: u32,
}

/// `GET /peer/v1/hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version spoken.
    pub protocol_version: u32,
    /// Oldest accepted.
    pub min_protocol_version: u32,
    /// vireod version.
    pub vireo_version: String,
    /// Host name.
    pub hostname: String,
    /// Certificate fingerprint.
    pub fingerprint: String,
    /// Feature list.
    pub features: Vec<String>,
    /// Host facts.
    pub facts: HostFacts,
}

/// What a VM needs from a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNeeds {
    /// VM name.
    pub name: String,
    /// Memory, bytes.
    pub memory: u64,
    /// Generation.
    pub generation: Generation,
    /// Secure Boot.
    pub secure_boot: bool,
    /// Accelerator the VM runs with on the source.
    pub accel: Accel,
    /// Switches its NICs are connected to.
    pub switches: Vec<String>,
    /// Disks are copied.
    pub include_storage: bool,
}

impl VmNeeds {
    /// The needs of `spec` running with `accel`.
    pub fn of(spec: &VmSpec, accel: Accel, include_storage: bool) -> VmNeeds {
        let mut switches: Vec<String> = spec.nics.iter().filter_map(|n| n.switch.clone()).collect();
        switches.sort();
        switches.dedup();
        VmNeeds {
            name: spec.name.clone(),
            memory: spec.memory,
            generation: spec.generation,
            secure_boot: spec.secure_boot,
            accel,
            switches,
            include_storage,
        }
    }
}

/// Features a migration with these needs requires of both ends.
pub fn required_features(needs: &VmNeeds) -> Vec<&'static str> {
    let mut f = vec!["pause-before-switchover", "tls-tunnel"];
    f.push(if needs.include_storage {
        "shared-nothing"
    } else {
        "shared-storage"
    });
    f
}

/// Why a destination cannot take a VM, with the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Incompatible {
    /// Protocol versions do not overlap.
    #[error("protocol version mismatch: {source_host} speaks {source_version} (accepts {source_min}..), {dest_host} speaks {dest_version} (accepts {dest_min}..); fix: upgrade vireod on the older host")]
    Version {
        /// Source host.
        source_host: String,
        /// Its version.
        source_version: u32,
        /// Its minimum.
        source_min: u32,
        /// Destination host.
        dest_host: String,
        /// Its version.
        dest_version: u32,
        /// Its minimum.
        dest_min: u32,
    },
    /// A feature is missing at one end.
    #[error("{host} lacks the feature {feature:?}; fix: upgrade vireod on {host}")]
    Feature {
        /// Host lacking it.
        host: String,
        /// Feature.
        feature: String,
    },
    /// Accelerators differ.
    #[error("the VM runs with {source_accel:?} on the source but {dest_host} would run it with {dest_accel:?}; fix: use hosts with the same accelerator (`vireod --accel`)")]
    Accel {
        /// Source accelerator.
        source_accel: Accel,
        /// Destination host.
        dest_host: String,
        /// Destination accelerator.
        dest_accel: Option<Accel>,
    },
    /// The destination's QEMU is older than the source's.
    #[error("{dest_host} has QEMU {dest_qemu}, older than the source's {source_qemu} (QEMU migrates only to the same or a newer version); fix: upgrade QEMU on {dest_host}")]
    Qemu {
        /// Destination host.
        dest_host: String,
        /// Its version.
        dest_qemu: String,
        /// Source version.
        source_qemu: String,
    },
    /// CPU flags the VM may use are missing.
    #[error("{dest_host}'s CPU lacks {missing:?} that the VM may use; fix: move to a host with the same CPU features")]
    Cpu {
        /// Destination host.
        dest_host: String,
        /// Flags missing there.
        missing: Vec<String>,
    },
    /// Firmware is missing.
    #[error("{dest_host} has no {firmware} firmware for this generation {generation} VM; fix: install the {package} package on {dest_host}")]
    Firmware {
        /// Destination host.
        dest_host: String,
        /// Which firmware.
        firmware: String,
        /// VM generation.
        generation: u8,
        /// Debian package.
        package: String,
    },
    /// A switch is missing.
    #[error("{dest_host} has no virtual switch named {switch:?} (the VM's network adapter is connected to it); fix: create it on {dest_host} (`vireo switch new {switch}`) or disconnect the adapter")]
    Switch {
        /// Destination host.
        dest_host: String,
        /// Switch name.
        switch: String,
    },
    /// Too little memory.
    #[error("{dest_host} has {available} bytes of memory available for VMs, the VM needs {needed}; fix: free memory on {dest_host}, lower its reserve (`vireo host set --memory-reserve`) or shrink the VM")]
    Memory {
        /// Destination host.
        dest_host: String,
        /// Needed bytes.
        needed: u64,
        /// Available bytes.
        available: u64,
    },
    /// The destination runs its maximum of migrations.
    #[error("{host} already runs {active} of its {max} simultaneous migrations; fix: wait, or raise it with `vireo host set --max-migrations N`")]
    Busy {
        /// Host.
        host: String,
        /// Running.
        active: u32,
        /// Maximum.
        max: u32,
    },
}

/// Parses `QEMU emulator version 7.2.5 (...)` (or `qemu-system-x86_64 ... version 7.2.5`)
/// into (major, minor).
pub fn qemu_major_minor(s: &str) -> Option<(u32, u32)> {
    let v = s
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)?;
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it
        .next()?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Whether `source` can move a VM with `needs` to `dest`: every reason it cannot, each with
/// its fix. Pure; both ends run it (the source before preparing, the destination again
/// when asked to prepare).
pub fn check(source: &Hello, dest: &Hello, needs: &VmNeeds) -> Vec<Incompatible> {
    let mut out = Vec::new();
    let overlap = source.protocol_version >= dest.min_protocol_version
        && dest.protocol_version >= source.min_protocol_version;
    if !overlap {
        out.push(Incompatible::Version {
            source_host: source.hostname.clone(),
            source_version: source.protocol_version,
            source_min: source.min_protocol_version,
            dest_host: dest.hostname.clone(),
            dest_version: dest.protocol_version,
            dest_min: dest.min_protocol_version,
        });
        return out;
    }
    for f in required_features(needs) {
        for h in [source, dest] {
            if !h.features.iter().any(|x| x == f) {
                out.push(Incompatible::Feature {
                    host: h.hostname.clone(),
                    feature: f.to_string(),
                });
            }
        }
    }
    if dest.facts.accel != Some(needs.accel) {
        out.push(Incompatible::Accel {
            source_accel: needs.accel,
            dest_host: dest.hostname.clone(),
            dest_accel: dest.facts.accel,
        });
    }
    if let (Some(s), Some(d)) = (
        qemu_major_minor(&source.facts.qemu_version),
        qemu_major_minor(&dest.facts.qemu_version),
    ) {
        if d < s {
            out.push(Incompatible::Qemu {
                dest_host: dest.hostname.clone(),
                dest_qemu: format!("{}.{}", d.0, d.1),
                source_qemu: format!("{}.{}", s.0, s.1),
            });
        }
    }
    if needs.accel == Accel::Kvm {
        let missing: Vec<String> = source
            .facts
            .cpu_flags
            .iter()
            .filter(|f| !dest.facts.cpu_flags.contains(f))
            .cloned()
            .collect();
        if !missing.is_empty() {
            out.push(Incompatible::Cpu {
                dest_host: dest.hostname.clone(),
                missing,
            });
        }
    }
    let fw = &dest.facts.firmware;
    let fw_missing = match needs.generation {
        Generation::Gen1 => (!fw.seabios).then_some(("SeaBIOS", 1, "seabios")),
        Generation::Gen2 if needs.secure_boot => {
            (!fw.ovmf_secure_boot).then_some(("OVMF Secure Boot", 2, "ovmf"))
        }
        Generation::Gen2 => (!fw.ovmf).then_some(("OVMF", 2, "ovmf")),
    };
    if let Some((firmware, generation, package)) = fw_missing {
        out.push(Incompatible::Firmware {
            dest_host: dest.hostname.clone(),
            firmware: firmware.into(),
            generation,
            package: package.into(),
        });
    }
    for s in &needs.switches {
        if !dest.facts.switches.contains(s) {
            out.push(Incompatible::Switch {
                dest_host: dest.hostname.clone(),
                switch: s.clone(),
            });
        }
    }
    if dest.facts.memory_available < needs.memory {
        out.push(Incompatible::Memory {
            dest_host: dest.hostname.clone(),
            needed: needs.memory,
            available: dest.facts.memory_available,
        });
    }
    if dest.facts.active_migrations >= dest.facts.max_migrations {
        out.push(Incompatible::Busy {
            host: dest.hostname.clone(),
            active: dest.facts.active_migrations,
            max: dest.facts.max_migrations,
        });
    }
    out
}

/// All reasons on one line.
pub fn explain(reasons: &[Incompatible]) -> String {
    reasons
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `POST /peer/v1/migrations`: prepare an incoming VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// Migration id (chosen by the source).
    pub id: String,
    /// The source's hello (the destination re-checks compatibility).
    pub source: Hello,
    /// What the VM needs.
    pub needs: VmNeeds,
    /// The VM's configuration (same UUID on the destination).
    pub spec: VmSpec,
    /// Each disk's export facts (placeholder exports until activation).
    pub disks: Vec<api::migration::ExportFacts>,
    /// The disk service state (`disks.json`: chain leaves and checkpoint tree).
    #[serde(default)]
    pub disk_state: Option<serde_json::Value>,
    /// UEFI variable store (generation 2), base64.
    #[serde(default)]
    pub uefi_vars: Option<String>,
    /// Multifd channels (0: off).
    #[serde(default)]
    pub multifd_channels: u32,
    /// The source's launch (`launch.json`): the destination starts an identical machine.
    #[serde(default)]
    pub launch: Option<serde_json::Value>,
    /// Shared-nothing: the disks are copied to the destination.
    #[serde(default)]
    pub storage: Option<StorageCopy>,
}

/// The disks a shared-nothing migration copies (part of [`PrepareRequest`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageCopy {
    /// Directory for the copies on the destination (`None`: the VM's directory there).
    pub destination_path: Option<std::path::PathBuf>,
    /// Every file of every disk's chain (leaves, parents, checkpoint images), per disk.
    pub files: Vec<Vec<std::path::PathBuf>>,
}

impl StorageCopy {
    /// Where each source file lands in `dir`: same file name. Refuses names used twice
    /// (two chains with equal file names in different directories).
    pub fn destinations(
        &self,
        dir: &std::path::Path,
    ) -> Result<Vec<(std::path::PathBuf, std::path::PathBuf)>, String> {
        let mut out: Vec<(std::path::PathBuf, std::path::PathBuf)> = Vec::new();
        for f in self.files.iter().flatten() {
            let name = f
                .file_name()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("disk file {} has no file name", f.display()))?;
            let to = dir.join(name);
            if let Some((other, _)) = out.iter().find(|(s, t)| *t == to && s != f) {
                return Err(format!(
                    "{} and {} have the same file name and would both land at {}; rename one of them first",
                    other.display(),
                    f.display(),
                    to.display()
                ));
            }
            if !out.iter().any(|(s, _)| s == f) {
                out.push((f.clone(), to));
            }
        }
        Ok(out)
    }
}

/// The channel name of disk `i`'s mirror stream in a [`crate::tls::StreamHeader`].
pub fn disk_channel(i: usize) -> String {
    format!("disk-{i}")
}

/// The disk index of a mirror stream channel name.
pub fn parse_disk_channel(c: &str) -> Option<usize> {
    c.strip_prefix("disk-")?.parse().ok()
}

/// Seconds without a word from the source after which a destination aborts an incoming
/// migration on its own (the source refreshes it every second).
pub const LEASE_SECS: u64 = 10;

/// State of an incoming migration on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncomingState {
    /// The worker waits for the state.
    Prepared,
    /// Disks are opened on the destination.
    Activated,
    /// The VM runs on the destination.
    Committed,
    /// Cleaned up.
    Aborted,
}

/// `GET /peer/v1/migrations/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingStatus {
    /// Migration id.
    pub id: String,
    /// Where it is.
    pub state: IncomingState,
    /// The destination QEMU's run state.
    pub qemu_status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            vireo_version: "0.1.0".into(),
            hostname: name.into(),
            fingerprint: "F".into(),
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
            facts: HostFacts {
                qemu_version: "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)".into(),
                accel: Some(Accel::Tcg),
                cpu_flags: vec![],
                firmware: FirmwareFacts {
                    seabios: true,
                    ovmf: true,
                    ovmf_secure_boot: true,
                },
                switches: vec!["lan".into()],
                memory_available: 4 << 30,
                max_migrations: 2,
                active_migrations: 0,
            },
        }
    }

    fn needs() -> VmNeeds {
        VmNeeds {
            name: "vm".into(),
            memory: 1 << 30,
            generation: Generation::Gen1,
            secure_boot: false,
            accel: Accel::Tcg,
            switches: vec!["lan".into()],
            include_storage: false,
        }
    }

    /// Equal hosts are compatible.
    #[test]
    fn same_hosts_ok() {
        assert_eq!(check(&hello("a"), &hello("b"), &needs()), vec![]);
    }

    /// Each incompatibility is reported with its reason and fix.
    #[test]
    fn each_refusal_named() {
        let a = hello("a");
        let mut b = hello("b");
        b.protocol_version = 9;
        b.min_protocol_version = 9;
        let r = check(&a, &b, &needs());
        assert!(matches!(r[..], [Incompatible::Version { .. }]));
        assert!(explain(&r).contains("upgrade vireod"));

        let mut b = hello("b");
        b.facts.switches.clear();
        b.facts.memory_available = 1 << 20;
        b.facts.firmware.seabios = false;
        b.facts.accel = Some(Accel::Kvm);
        b.facts.qemu_version = "QEMU emulator version 6.2.0".into();
        b.facts.active_migrations = 2;
        b.features.retain(|f| f != "tls-tunnel");
        let r = check(&a, &b, &needs());
        let text = explain(&r);
        for want in [
            "virtual switch named \"lan\"",
            "memory-reserve",
            "SeaBIOS",
            "same accelerator",
            "upgrade QEMU",
            "max-migrations",
            "tls-tunnel",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
    }

    /// Under KVM a destination without all of the source's CPU flags is refused.
    #[test]
    fn cpu_flags() {
        let mut a = hello("a");
        let mut b = hello("b");
        a.facts.accel = Some(Accel::Kvm);
        b.facts.accel = Some(Accel::Kvm);
        a.facts.cpu_flags = vec!["avx2".into(), "sse4_2".into()];
        b.facts.cpu_flags = vec!["sse4_2".into()];
        let mut n = needs();
        n.accel = Accel::Kvm;
        let r = check(&a, &b, &n);
        assert_eq!(
            r,
            vec![Incompatible::Cpu {
                dest_host: "b".into(),
                missing: vec!["avx2".into()]
            }]
        );
    }

    /// Copies land under their file name; equal names from two directories are refused.
    #[test]
    fn storage_destinations() {
        use std::path::PathBuf;
        let s = StorageCopy {
            destination_path: None,
            files: vec![
                vec![PathBuf::from("/a/x.vhdx"), PathBuf::from("/a/base.vhdx")],
                vec![PathBuf::from("/b/y.vhdx"), PathBuf::from("/a/base.vhdx")],
            ],
        };
        let d = s.destinations(std::path::Path::new("/d")).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[1].1, PathBuf::from("/d/base.vhdx"));
        let bad = StorageCopy {
            destination_path: None,
            files: vec![
                vec![PathBuf::from("/a/x.vhdx")],
                vec![PathBuf::from("/b/x.vhdx")],
            ],
        };
        assert!(bad.destinations(std::path::Path::new("/d")).is_err());
        assert_eq!(parse_disk_channel(&disk_channel(3)), Some(3));
        assert_eq!(parse_disk_channel("memory"), None);
    }

    #[test]
    fn qemu_version_parse() {
        assert_eq!(
            qemu_major_minor("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)"),
            Some((7, 2))
        );
        assert_eq!(qemu_major_minor("not found"), None);
    }
}
