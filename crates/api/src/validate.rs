//! Validation of VM configurations: pure functions, no I/O except where a check is about
//! the host (disk files exist), which callers pass in as a closure.

use crate::types::{DiskBus, Generation, NicModel, VmSpec};

/// Smallest memory a VM may have.
pub const MIN_MEMORY: u64 = 32 << 20;
/// Largest vCPU count accepted.
pub const MAX_CPUS: u32 = 240;

/// Why a VM configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Bad name.
    #[error("invalid VM name {0:?}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    Name(String),
    /// Memory too small or not aligned.
    #[error("memory {0} bytes is below the minimum of 32 MiB")]
    MemoryTooSmall(u64),
    /// Memory not a whole number of MiB.
    #[error("memory must be a whole number of MiB (got {0} bytes)")]
    MemoryAlignment(u64),
    /// Too few or too many vCPUs.
    #[error("cpus must be between 1 and {MAX_CPUS} (got {0})")]
    Cpus(u32),
    /// IDE on generation 2.
    #[error(
        "generation 2 VMs have no IDE controller: attach disk {0} with --bus scsi (or virtio)"
    )]
    IdeOnGen2(String),
    /// Secure Boot on generation 1.
    #[error("Secure Boot needs UEFI firmware: only generation 2 VMs support it (use --secure-boot off or --generation 2)")]
    SecureBootOnGen1,
    /// e1000 on generation 2.
    #[error("the legacy network adapter (e1000) exists on generation 1 VMs only: use --model virtio for NIC {0}")]
    LegacyNicOnGen2(String),
    /// Disk file missing.
    #[error(
        "disk image {0} does not exist: create it first (e.g. `vireo disk new {0} --size 16G`)"
    )]
    MissingDisk(String),
    /// Disk path not absolute.
    #[error("disk path {0} must be absolute")]
    RelativeDisk(String),
    /// Same image twice.
    #[error("disk image {0} is attached twice")]
    DuplicateDisk(String),
    /// NIC name duplicate or MAC invalid.
    #[error("invalid NIC {0}: {1}")]
    Nic(String, String),
    /// Stop timeout out of range.
    #[error("stop timeout must be between 1 and 3600 seconds (got {0})")]
    StopTimeout(u64),
}

/// Checks a VM name.
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.to_string()))
    }
}

/// Checks a MAC address of the `aa:bb:cc:dd:ee:ff` form that is unicast.
pub fn check_mac(mac: &str) -> Result<(), String> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
    {
        return Err(format!(
            "MAC address {mac:?} is not of the form 52:54:00:12:34:56"
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(format!("MAC address {mac} is a multicast address"));
    }
    Ok(())
}

/// Checks a whole VM spec. `disk_exists` is asked about every disk path.
pub fn check_spec(
    spec: &VmSpec,
    disk_exists: &dyn Fn(&std::path::Path) -> bool,
) -> Result<(), SpecError> {
    check_name(&spec.name)?;
    if spec.memory < MIN_MEMORY {
        return Err(SpecError::MemoryTooSmall(spec.memory));
    }
    if !spec.memory.is_multiple_of(1 << 20) {
        return Err(SpecError::MemoryAlignment(spec.memory));
    }
    if spec.cpus == 0 || spec.cpus > MAX_CPUS {
        return Err(SpecError::Cpus(spec.cpus));
    }
    if spec.secure_boot && spec.generation == Generation::Gen1 {
        return Err(SpecError::SecureBootOnGen1);
    }
    if spec.stop_timeout_secs == 0 || spec.stop_timeout_secs > 3600 {
        return Err(SpecError::StopTimeout(spec.stop_timeout_secs));
    }
    let mut seen = std::collections::HashSet::new();
    for d in &spec.disks {
        let shown = d.path.display().to_string();
        if !d.path.is_absolute() {
            return Err(SpecError::RelativeDisk(shown));
        }
        if spec.generation == Generation::Gen2 && d.bus == DiskBus::Ide {
            return Err(SpecError::IdeOnGen2(shown));
        }
        if !seen.insert(d.path.clone()) {
            return Err(SpecError::DuplicateDisk(shown));
        }
        if !disk_exists(&d.path) {
            return Err(SpecError::MissingDisk(shown));
        }
    }
    let mut names = std::collections::HashSet::new();
    for n in &spec.nics {
        if !names.insert(n.name.clone()) {
            return Err(SpecError::Nic(n.name.clone(), "name used twice".into()));
        }
        check_mac(&n.mac).map_err(|e| SpecError::Nic(n.name.clone(), e))?;
        if spec.generation == Generation::Gen2 && n.model == NicModel::E1000 {
            return Err(SpecError::LegacyNicOnGen2(n.name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    fn spec(generation: Generation) -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            uuid: uuid::Uuid::nil(),
            generation,
            cpus: 1,
            memory: 512 << 20,
            disks: vec![],
            nics: vec![],
            boot_order: vec![BootDevice::Disk],
            secure_boot: false,
            secure_boot_template: SecureBootTemplate::None,
            accel: AccelChoice::Auto,
            stop_timeout_secs: 60,
            dynamic_memory: Default::default(),
        }
    }

    /// Every refused combination of the issue is refused with its own error.
    #[test]
    fn refuses_invalid_combinations() {
        let yes = |_: &std::path::Path| true;
        let mut s = spec(Generation::Gen2);
        s.disks.push(DiskSpec {
            path: "/d.img".into(),
            bus: DiskBus::Ide,
            read_only: false,
        });
        assert!(matches!(check_spec(&s, &yes), Err(SpecError::IdeOnGen2(_))));
        let mut s = spec(Generation::Gen1);
        s.secure_boot = true;
        assert_eq!(check_spec(&s, &yes), Err(SpecError::SecureBootOnGen1));
        let mut s = spec(Generation::Gen1);
        s.memory = 16 << 20;
        assert!(matches!(
            check_spec(&s, &yes),
            Err(SpecError::MemoryTooSmall(_))
        ));
        let mut s = spec(Generation::Gen1);
        s.disks.push(DiskSpec {
            path: "/nope.img".into(),
            bus: DiskBus::Ide,
            read_only: false,
        });
        assert!(matches!(
            check_spec(&s, &|_| false),
            Err(SpecError::MissingDisk(_))
        ));
        let mut s = spec(Generation::Gen1);
        s.name = "-bad name".into();
        assert!(matches!(check_spec(&s, &yes), Err(SpecError::Name(_))));
        let mut s = spec(Generation::Gen2);
        s.nics.push(NicSpec {
            name: "nic0".into(),
            mac: "52:54:00:00:00:01".into(),
            model: NicModel::E1000,
            switch: None,
            port: Default::default(),
        });
        assert!(matches!(
            check_spec(&s, &yes),
            Err(SpecError::LegacyNicOnGen2(_))
        ));
        assert!(check_spec(&spec(Generation::Gen1), &yes).is_ok());
    }

    /// MAC parsing rejects malformed and multicast addresses.
    #[test]
    fn macs() {
        assert!(check_mac("52:54:00:aa:bb:cc").is_ok());
        assert!(check_mac("01:00:5e:00:00:01").is_err());
        assert!(check_mac("52:54:00:aa:bb").is_err());
        assert!(check_mac("zz:54:00:aa:bb:cc").is_err());
    }
}
