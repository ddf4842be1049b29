//! Admission control: a VM starts only if its minimum can be guaranteed.

use crate::{ErrorKind, HostMemory, MemorySettings, SettingsError, MIB};

/// Why a VM may not start on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The VM's settings are invalid for this host.
    #[error("invalid memory settings")]
    Invalid(#[source] SettingsError),
    /// The minimums of all VMs (this one included) plus the reserve exceed host memory.
    #[error(
        "cannot guarantee the VM's minimum RAM ({} MiB): running VMs' minimums ({} MiB) plus the \
         host reserve ({} MiB) leave {} MiB of {} MiB",
        .minimum / MIB, .running / MIB, .reserve / MIB, .left / MIB, .total / MIB
    )]
    MinimumNotGuaranteed {
        /// The new VM's minimum (startup RAM if static).
        minimum: u64,
        /// Sum of the running VMs' minimums.
        running: u64,
        /// Host reserve.
        reserve: u64,
        /// What is left for the new VM.
        left: u64,
        /// Host memory.
        total: u64,
    },
    /// The VM boots with startup RAM, which does not fit even with every running VM at its
    /// minimum.
    #[error(
        "cannot boot the VM with its startup RAM ({} MiB): at most {} MiB can be freed for it",
        .startup / MIB, .left / MIB
    )]
    StartupUnavailable {
        /// The new VM's startup RAM.
        startup: u64,
        /// What is left with every running VM at its minimum.
        left: u64,
    },
}

impl AdmissionError {
    /// [`ErrorKind::Invalid`] for bad settings, [`ErrorKind::Capacity`] otherwise.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdmissionError::Invalid(_) => ErrorKind::Invalid,
            _ => ErrorKind::Capacity,
        }
    }
}

/// Decides whether a VM with `new` settings may start next to the `running` VMs' settings.
///
/// The VM is refused if its settings are invalid for the host, if the sum of all minimums
/// (static VMs count their startup RAM) plus the host reserve exceeds host memory, or if its
/// startup RAM does not fit with every running VM shrunk to its minimum. Admission only checks
/// guarantees: the balancer then takes the startup RAM from running VMs above their minimum,
/// within a few rounds.
pub fn admit(
    new: &MemorySettings,
    running: &[MemorySettings],
    host: &HostMemory,
) -> Result<(), AdmissionError> {
    new.validate(host.vm_limit())
        .map_err(AdmissionError::Invalid)?;
    let running_min = running
        .iter()
        .fold(0u64, |a, s| a.saturating_add(s.floor()));
    let left = host.vm_limit().saturating_sub(running_min);
    if new.floor() > left {
        return Err(AdmissionError::MinimumNotGuaranteed {
            minimum: new.floor(),
            running: running_min,
            reserve: host.reserve,
            left,
            total: host.total,
        });
    }
    if new.startup > left {
        return Err(AdmissionError::StartupUnavailable {
            startup: new.startup,
            left,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GIB;
    use std::error::Error as _;

    fn host() -> HostMemory {
        HostMemory {
            total: 16 * GIB,
            free_for_vms: 2 * GIB,
            reserve: 2 * GIB,
        }
    }

    /// A VM whose minimum still fits is admitted even if the host is busy right now.
    #[test]
    fn admits_when_minimums_fit() {
        let running = vec![MemorySettings::dynamic(2 * GIB, GIB, 8 * GIB); 6];
        let new = MemorySettings::dynamic(2 * GIB, GIB, 8 * GIB);
        admit(&new, &running, &host()).unwrap();
        // Exactly full: 14 GiB for VMs minus 6 GiB of running minimums leaves 8 GiB to boot with.
        let new = MemorySettings::dynamic(8 * GIB, GIB, 8 * GIB);
        admit(&new, &running, &host()).unwrap();
    }

    /// Minimums plus reserve above host memory: refused with the figures in the message.
    #[test]
    fn refuses_unguaranteed_minimum() {
        let running = vec![MemorySettings::fixed(4 * GIB); 3];
        let new = MemorySettings::dynamic(4 * GIB, 3 * GIB, 8 * GIB);
        let e = admit(&new, &running, &host()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Capacity);
        assert_eq!(
            e.to_string(),
            "cannot guarantee the VM's minimum RAM (3072 MiB): running VMs' minimums (12288 MiB) \
             plus the host reserve (2048 MiB) leave 2048 MiB of 16384 MiB"
        );
    }

    /// Startup RAM that cannot be freed even with every VM at its minimum: refused.
    #[test]
    fn refuses_unavailable_startup() {
        let running = vec![MemorySettings::dynamic(4 * GIB, 4 * GIB, 4 * GIB); 3];
        let new = MemorySettings::dynamic(4 * GIB, GIB, 4 * GIB);
        let e = admit(&new, &running, &host()).unwrap_err();
        assert_eq!(
            e,
            AdmissionError::StartupUnavailable {
                startup: 4 * GIB,
                left: 2 * GIB
            }
        );
    }

    /// Invalid settings are refused as invalid, with the cause attached, not printed.
    #[test]
    fn refuses_invalid_settings() {
        let new = MemorySettings::dynamic(GIB, 2 * GIB, 4 * GIB);
        let e = admit(&new, &[], &host()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(e.to_string(), "invalid memory settings");
        assert!(e
            .source()
            .unwrap()
            .to_string()
            .contains("minimum RAM (2048 MiB) is above startup"));
    }
}
