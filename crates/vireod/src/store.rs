//! The embedded store: one directory per VM under `<state>/vms/<uuid>/`, its configuration in
//! `config.json`. Every write goes to a temporary file that is fsynced, renamed over the old
//! one and followed by an fsync of the directory, so a kill -9 or power loss at any moment
//! leaves either the old or the new committed config, never a torn one.

use api::VmSpec;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Version of the on-disk record; an unknown version is refused rather than guessed.
pub const FORMAT_VERSION: u32 = 1;

/// The persisted record of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// Record format.
    pub format_version: u32,
    /// Configuration.
    pub spec: VmSpec,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on a store file.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A record that cannot be read.
    #[error("VM record {path} is unreadable: {detail}")]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// The VM inventory on disk.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Opens (creating) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let root = state_dir.join("vms");
        std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
        Ok(Store { root })
    }

    /// Directory of one VM (config, NVRAM, saved state).
    pub fn vm_dir(&self, uuid: &Uuid) -> PathBuf {
        self.root.join(uuid.to_string())
    }

    /// Loads every committed record. Leftover temporary files from an interrupted write are removed.
    pub fn load_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io("listing", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io("listing", &self.root))?;
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let _ = std::fs::remove_file(dir.join("config.json.tmp"));
            let path = dir.join("config.json");
            if !path.exists() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
            let rec: VmRecord =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            if rec.format_version != FORMAT_VERSION {
                return Err(StoreError::Corrupt {
                    path,
                    detail: format!(
                        "format version {} is not supported (this vireod knows {FORMAT_VERSION})",
                        rec.format_version
                    ),
                });
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// Commits a VM's configuration atomically and durably.
    pub fn save(&self, spec: &VmSpec) -> Result<(), StoreError> {
        let dir = self.vm_dir(&spec.uuid);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let rec = VmRecord {
            format_version: FORMAT_VERSION,
            spec: spec.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&rec).map_err(|e| StoreError::Corrupt {
            path: dir.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&dir.join("config.json"), &bytes)?;
        sync_dir(&self.root)
    }

    /// Removes a VM's directory (config, NVRAM, saved state).
    pub fn remove(&self, uuid: &Uuid) -> Result<(), StoreError> {
        let dir = self.vm_dir(uuid);
        // Remove the config first so an interrupted delete never leaves a half VM that loads.
        let cfg = dir.join("config.json");
        if cfg.exists() {
            std::fs::remove_file(&cfg).map_err(io("removing", &cfg))?;
            sync_dir(&dir)?;
        }
        std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
        sync_dir(&self.root)
    }
}

/// Writes `bytes` to `path` through a fsynced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("renaming into", path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::*;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            uuid: Uuid::new_v4(),
            generation: Generation::Gen1,
            cpus: 1,
            memory: 256 << 20,
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

    /// Saved records load back; a torn temporary file from a crash is ignored and cleaned.
    #[test]
    fn roundtrip_and_torn_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = spec("a");
        store.save(&a).unwrap();
        let mut a2 = a.clone();
        a2.cpus = 2;
        std::fs::write(
            store.vm_dir(&a.uuid).join("config.json.tmp"),
            b"{\"format_vers",
        )
        .unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec, a);
        store.save(&a2).unwrap();
        assert_eq!(store.load_all().unwrap()[0].spec.cpus, 2);
        store.remove(&a.uuid).unwrap();
        assert!(store.load_all().unwrap().is_empty());
    }

    /// An unknown format version is refused, not guessed.
    #[test]
    fn refuses_unknown_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = spec("a");
        store.save(&a).unwrap();
        let p = store.vm_dir(&a.uuid).join("config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"format_version\": 1", "\"format_version\": 99");
        std::fs::write(&p, text).unwrap();
        assert!(matches!(store.load_all(), Err(StoreError::Corrupt { .. })));
    }
}
