//! Per-VM memory settings, their validation, and which of them may change while the VM runs.

use serde::{Deserialize, Serialize};

use crate::{ErrorKind, ALIGN, MIB};

/// Default memory buffer: the balancer gives a VM its demand plus this many percent.
pub const DEFAULT_BUFFER_PERCENT: u32 = 20;
/// Largest memory buffer accepted, in percent.
pub const MAX_BUFFER_PERCENT: u32 = 2000;
/// Default memory weight (priority when the host is short of memory).
pub const DEFAULT_WEIGHT: u32 = 5000;
/// Largest memory weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Smallest startup or minimum RAM accepted (a Linux guest does not boot in less).
pub const MIN_RAM: u64 = 32 * MIB;

/// A VM's memory settings, like Hyper-V's dynamic memory settings. Sizes are bytes.
///
/// With `dynamic` off the VM has exactly `startup` bytes and the balancer never changes it;
/// `minimum`, `maximum`, `buffer_percent` and `weight` are then kept but unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Dynamic memory on or off.
    pub dynamic: bool,
    /// RAM the VM boots with (QEMU `-m`); the balloon works below it, virtio-mem above it.
    pub startup: u64,
    /// The balancer never goes below this.
    pub minimum: u64,
    /// The balancer never goes above this.
    pub maximum: u64,
    /// Extra memory on top of demand, in percent of demand (0..=2000).
    #[serde(default = "default_buffer")]
    pub buffer_percent: u32,
    /// Priority when the host is short of memory (0..=10000).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_buffer() -> u32 {
    DEFAULT_BUFFER_PERCENT
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// Why a [`MemorySettings`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A size is not a multiple of 2 MiB.
    #[error("{field} RAM ({bytes} bytes) is not a multiple of 2 MiB")]
    NotAligned {
        /// `startup`, `minimum` or `maximum`.
        field: &'static str,
        /// The size given.
        bytes: u64,
    },
    /// A size is below the smallest a guest can run with.
    #[error("{field} RAM ({} MiB) is below the smallest accepted, {} MiB", .bytes / MIB, MIN_RAM / MIB)]
    TooSmall {
        /// `startup` or `minimum`.
        field: &'static str,
        /// The size given.
        bytes: u64,
    },
    /// minimum > startup.
    #[error("minimum RAM ({} MiB) is above startup RAM ({} MiB)", .minimum / MIB, .startup / MIB)]
    MinimumAboveStartup {
        /// Minimum given.
        minimum: u64,
        /// Startup given.
        startup: u64,
    },
    /// startup > maximum.
    #[error("startup RAM ({} MiB) is above maximum RAM ({} MiB)", .startup / MIB, .maximum / MIB)]
    StartupAboveMaximum {
        /// Startup given.
        startup: u64,
        /// Maximum given.
        maximum: u64,
    },
    /// The VM could be given more than the host can ever give to VMs.
    #[error(
        "{field} RAM ({} MiB) is more than this host can ever give a VM ({} MiB: host memory minus the reserve)",
        .bytes / MIB, .host_limit / MIB
    )]
    AboveHost {
        /// `startup` or `maximum`.
        field: &'static str,
        /// The size given.
        bytes: u64,
        /// Host memory minus the reserve.
        host_limit: u64,
    },
    /// buffer_percent > 2000.
    #[error("memory buffer {percent}% is above the largest accepted, {MAX_BUFFER_PERCENT}%")]
    BufferTooLarge {
        /// Buffer given.
        percent: u32,
    },
    /// weight > 10000.
    #[error("memory weight {weight} is above the largest accepted, {MAX_WEIGHT}")]
    WeightTooLarge {
        /// Weight given.
        weight: u32,
    },
}

impl SettingsError {
    /// Always [`ErrorKind::Invalid`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Invalid
    }
}

/// Why a change of [`MemorySettings`] is refused while the VM runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveChangeError {
    /// Dynamic memory was switched on or off.
    #[error("dynamic memory can only be switched on or off while the VM is off")]
    DynamicToggled,
    /// Startup RAM changed.
    #[error("startup RAM can only change while the VM is off")]
    StartupChanged,
    /// Maximum RAM shrank.
    #[error(
        "maximum RAM can only grow while the VM runs ({} MiB -> {} MiB)",
        .old / MIB, .new / MIB
    )]
    MaximumShrunk {
        /// Maximum now.
        old: u64,
        /// Maximum asked for.
        new: u64,
    },
}

impl LiveChangeError {
    /// Always [`ErrorKind::Unsupported`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Unsupported
    }
}

impl Default for MemorySettings {
    /// Static 1 GiB.
    fn default() -> Self {
        MemorySettings::fixed(1024 * MIB)
    }
}

impl MemorySettings {
    /// Static memory: the VM always has `startup` bytes.
    pub fn fixed(startup: u64) -> MemorySettings {
        MemorySettings {
            dynamic: false,
            startup,
            minimum: startup,
            maximum: startup,
            buffer_percent: DEFAULT_BUFFER_PERCENT,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// Dynamic memory with the default buffer (20 %) and weight (5000).
    pub fn dynamic(startup: u64, minimum: u64, maximum: u64) -> MemorySettings {
        MemorySettings {
            dynamic: true,
            startup,
            minimum,
            maximum,
            buffer_percent: DEFAULT_BUFFER_PERCENT,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// The least the VM may have: `minimum` if dynamic, else `startup`.
    pub fn floor(&self) -> u64 {
        if self.dynamic {
            self.minimum
        } else {
            self.startup
        }
    }

    /// The most the VM may have: `maximum` if dynamic, else `startup`.
    pub fn ceiling(&self) -> u64 {
        if self.dynamic {
            self.maximum
        } else {
            self.startup
        }
    }

    /// Checks the settings on their own and against `host_limit`, the most this host can ever
    /// give one VM ([`crate::HostMemory::vm_limit`]: host memory minus the reserve).
    ///
    /// Refuses: sizes not a multiple of 2 MiB or below 32 MiB, minimum > startup,
    /// startup > maximum, maximum (or startup) > `host_limit`, buffer > 2000 %,
    /// weight > 10000. Static settings check only `startup`.
    pub fn validate(&self, host_limit: u64) -> Result<(), SettingsError> {
        let sizes: &[(&'static str, u64)] = if self.dynamic {
            &[
                ("startup", self.startup),
                ("minimum", self.minimum),
                ("maximum", self.maximum),
            ]
        } else {
            &[("startup", self.startup)]
        };
        for &(field, bytes) in sizes {
            if bytes % ALIGN != 0 {
                return Err(SettingsError::NotAligned { field, bytes });
            }
            if bytes < MIN_RAM {
                return Err(SettingsError::TooSmall { field, bytes });
            }
        }
        if self.dynamic {
            if self.minimum > self.startup {
                return Err(SettingsError::MinimumAboveStartup {
                    minimum: self.minimum,
                    startup: self.startup,
                });
            }
            if self.startup > self.maximum {
                return Err(SettingsError::StartupAboveMaximum {
                    startup: self.startup,
                    maximum: self.maximum,
                });
            }
            if self.buffer_percent > MAX_BUFFER_PERCENT {
                return Err(SettingsError::BufferTooLarge {
                    percent: self.buffer_percent,
                });
            }
            if self.weight > MAX_WEIGHT {
                return Err(SettingsError::WeightTooLarge {
                    weight: self.weight,
                });
            }
        }
        let (field, bytes) = if self.dynamic {
            ("maximum", self.maximum)
        } else {
            ("startup", self.startup)
        };
        if bytes > host_limit {
            return Err(SettingsError::AboveHost {
                field,
                bytes,
                host_limit,
            });
        }
        Ok(())
    }
}

/// Checks that a running VM may go from `old` to `new` settings: minimum, buffer and weight may
/// change, maximum may only grow; dynamic on/off and startup may not change.
///
/// It does not validate `new` on its own: call [`MemorySettings::validate`] first. A maximum
/// that grows past the virtio-mem region the VM booted with is the caller's to refuse (the
/// region's size is fixed at boot; see `docs/dynamic-memory.md`).
pub fn check_live_change(
    old: &MemorySettings,
    new: &MemorySettings,
) -> Result<(), LiveChangeError> {
    if old.dynamic != new.dynamic {
        return Err(LiveChangeError::DynamicToggled);
    }
    if old.startup != new.startup {
        return Err(LiveChangeError::StartupChanged);
    }
    if new.dynamic && new.maximum < old.maximum {
        return Err(LiveChangeError::MaximumShrunk {
            old: old.maximum,
            new: new.maximum,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GIB;

    const LIMIT: u64 = 14 * GIB;

    fn good() -> MemorySettings {
        MemorySettings::dynamic(512 * MIB, 256 * MIB, 4 * GIB)
    }

    /// Sensible settings (and the defaults) pass.
    #[test]
    fn valid_settings_pass() {
        good().validate(LIMIT).unwrap();
        MemorySettings::default().validate(LIMIT).unwrap();
        MemorySettings::fixed(2 * GIB).validate(LIMIT).unwrap();
        let s = MemorySettings {
            buffer_percent: 2000,
            weight: 10_000,
            ..good()
        };
        s.validate(LIMIT).unwrap();
        let s = MemorySettings {
            minimum: 512 * MIB,
            maximum: 512 * MIB,
            ..good()
        };
        s.validate(LIMIT).unwrap();
    }

    /// Each invalid combination gets its own error with a message naming the sizes.
    #[test]
    fn invalid_settings_refused_with_clear_message() {
        let cases = [
            (
                MemorySettings { minimum: GIB, ..good() },
                "minimum RAM (1024 MiB) is above startup RAM (512 MiB)",
            ),
            (
                MemorySettings { maximum: 256 * MIB, ..good() },
                "startup RAM (512 MiB) is above maximum RAM (256 MiB)",
            ),
            (
                MemorySettings { maximum: 16 * GIB, ..good() },
                "maximum RAM (16384 MiB) is more than this host can ever give a VM (14336 MiB: host memory minus the reserve)",
            ),
            (
                MemorySettings { buffer_percent: 2001, ..good() },
                "memory buffer 2001% is above the largest accepted, 2000%",
            ),
            (
                MemorySettings { weight: 10_001, ..good() },
                "memory weight 10001 is above the largest accepted, 10000",
            ),
            (
                MemorySettings { startup: 512 * MIB + 4096, ..good() },
                "startup RAM (536875008 bytes) is not a multiple of 2 MiB",
            ),
            (
                MemorySettings { minimum: 16 * MIB, ..good() },
                "minimum RAM (16 MiB) is below the smallest accepted, 32 MiB",
            ),
            (
                MemorySettings::fixed(15 * GIB),
                "startup RAM (15360 MiB) is more than this host can ever give a VM (14336 MiB: host memory minus the reserve)",
            ),
        ];
        for (s, msg) in cases {
            let e = s.validate(LIMIT).unwrap_err();
            assert_eq!(e.to_string(), msg);
            assert_eq!(e.kind(), ErrorKind::Invalid);
        }
    }

    /// Static settings ignore the unused dynamic fields.
    #[test]
    fn static_settings_ignore_dynamic_fields() {
        let s = MemorySettings {
            minimum: 0,
            maximum: 0,
            weight: 99_999,
            ..MemorySettings::fixed(GIB)
        };
        s.validate(LIMIT).unwrap();
        assert_eq!((s.floor(), s.ceiling()), (GIB, GIB));
    }

    /// Minimum, buffer and weight may change live, maximum may grow; nothing else.
    #[test]
    fn live_changes() {
        let old = good();
        for new in [
            MemorySettings {
                minimum: 128 * MIB,
                ..old
            },
            MemorySettings {
                minimum: 512 * MIB,
                ..old
            },
            MemorySettings {
                buffer_percent: 50,
                ..old
            },
            MemorySettings { weight: 100, ..old },
            MemorySettings {
                maximum: 8 * GIB,
                ..old
            },
            old,
        ] {
            check_live_change(&old, &new).unwrap();
        }
        let e = check_live_change(
            &old,
            &MemorySettings {
                maximum: 2 * GIB,
                ..old
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            LiveChangeError::MaximumShrunk {
                old: 4 * GIB,
                new: 2 * GIB
            }
        );
        assert_eq!(
            e.to_string(),
            "maximum RAM can only grow while the VM runs (4096 MiB -> 2048 MiB)"
        );
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert_eq!(
            check_live_change(
                &old,
                &MemorySettings {
                    startup: GIB,
                    ..old
                }
            ),
            Err(LiveChangeError::StartupChanged)
        );
        assert_eq!(
            check_live_change(
                &old,
                &MemorySettings {
                    dynamic: false,
                    ..old
                }
            ),
            Err(LiveChangeError::DynamicToggled)
        );
    }

    /// JSON uses the field names, fills buffer and weight defaults and refuses unknown fields.
    #[test]
    fn serde_defaults_and_unknown_fields() {
        let s: MemorySettings = serde_json::from_str(
            r#"{"dynamic":true,"startup":536870912,"minimum":268435456,"maximum":4294967296}"#,
        )
        .unwrap();
        assert_eq!(s, good());
        assert!(serde_json::from_str::<MemorySettings>(
            r#"{"dynamic":true,"startup":1,"minimum":1,"maximum":1,"bufer":5}"#
        )
        .is_err());
    }
}
