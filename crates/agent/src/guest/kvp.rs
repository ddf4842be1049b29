//! Key-value pair pools kept as files so guest scripts can use them with `cat` and `echo`:
//! `<root>/host/<key>` (set by the host) and `<root>/guest/<key>` (published by the guest).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::protocol::{validate_kvp_key, validate_kvp_value, KvpPair, KvpPool, KVP_MAX_VALUE};

/// Default root of the pools inside the guest.
pub const DEFAULT_KVP_ROOT: &str = "/run/vireo/kvp";

/// Errors of the KVP store.
#[derive(Debug, thiserror::Error)]
pub enum KvpError {
    /// The key or value breaks the rules.
    #[error("{0}")]
    Invalid(String),
    /// File access failed.
    #[error("{op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// File or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A stored value is too long or not UTF-8.
    #[error("stored value of {path} is not UTF-8 text of at most {KVP_MAX_VALUE} bytes")]
    BadValue {
        /// The file.
        path: PathBuf,
    },
}

/// The two pools under one root directory.
#[derive(Debug, Clone)]
pub struct KvpStore {
    root: PathBuf,
}

impl KvpStore {
    /// Pools under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        KvpStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of `pool`.
    pub fn dir(&self, pool: KvpPool) -> PathBuf {
        self.root.join(pool.dir_name())
    }

    /// Stores `key=value` in `pool` atomically (temp file + rename).
    pub fn set(&self, pool: KvpPool, key: &str, value: &str) -> Result<(), KvpError> {
        validate_kvp_key(key).map_err(KvpError::Invalid)?;
        validate_kvp_value(value).map_err(KvpError::Invalid)?;
        let dir = self.dir(pool);
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| KvpError::Io { op, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        // Keys never start with '.', so the temp name cannot collide with a key.
        let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(value.as_bytes()).map_err(io("writing", &tmp))?;
        drop(f);
        let dst = dir.join(key);
        fs::rename(&tmp, &dst).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            KvpError::Io {
                op: "renaming into",
                path: dst.clone(),
                source: e,
            }
        })
    }

    /// The value of `key` in `pool`, `None` if unset.
    pub fn get(&self, pool: KvpPool, key: &str) -> Result<Option<String>, KvpError> {
        validate_kvp_key(key).map_err(KvpError::Invalid)?;
        read_value(&self.dir(pool).join(key))
    }

    /// Removes `key` from `pool`; absent keys are fine.
    pub fn delete(&self, pool: KvpPool, key: &str) -> Result<(), KvpError> {
        validate_kvp_key(key).map_err(KvpError::Invalid)?;
        let path = self.dir(pool).join(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(KvpError::Io {
                op: "removing",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// All pairs of `pool` sorted by key; files that are not valid pairs are skipped.
    pub fn list(&self, pool: KvpPool) -> Result<Vec<KvpPair>, KvpError> {
        let dir = self.dir(pool);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(KvpError::Io {
                    op: "listing",
                    path: dir,
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Ok(key) = entry.file_name().into_string() else {
                continue;
            };
            if validate_kvp_key(&key).is_err() {
                continue;
            }
            match read_value(&entry.path()) {
                Ok(Some(value)) => out.push(KvpPair { key, value }),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "skipping KVP entry"),
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

fn read_value(path: &Path) -> Result<Option<String>, KvpError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KvpError::Io {
                op: "opening",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Ok(None);
    }
    let mut buf = Vec::new();
    f.take(KVP_MAX_VALUE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|source| KvpError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        })?;
    if buf.len() > KVP_MAX_VALUE {
        return Err(KvpError::BadValue {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| KvpError::BadValue {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set/get/list/delete round-trip through plain files a shell can read.
    #[test]
    fn roundtrip_through_files() {
        let d = tempfile::tempdir().unwrap();
        let s = KvpStore::new(d.path());
        assert_eq!(s.get(KvpPool::Host, "a").unwrap(), None);
        assert!(s.list(KvpPool::Guest).unwrap().is_empty());
        s.set(KvpPool::Host, "b", "two\nlines").unwrap();
        s.set(KvpPool::Host, "a", "1").unwrap();
        s.set(KvpPool::Host, "a", "one").unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("host/b")).unwrap(),
            "two\nlines"
        );
        fs::write(d.path().join("host/.junk"), "x").unwrap();
        fs::write(d.path().join("host/bad"), [0xc3, 0x28]).unwrap();
        let l = s.list(KvpPool::Host).unwrap();
        let keys: Vec<_> = l
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(keys, [("a", "one"), ("b", "two\nlines")]);
        assert!(matches!(
            s.get(KvpPool::Host, "bad"),
            Err(KvpError::BadValue { .. })
        ));
        s.delete(KvpPool::Host, "a").unwrap();
        s.delete(KvpPool::Host, "a").unwrap();
        assert_eq!(s.get(KvpPool::Host, "a").unwrap(), None);
    }

    /// Bad keys and oversize values are refused and create no file.
    #[test]
    fn refuses_bad_input() {
        let d = tempfile::tempdir().unwrap();
        let s = KvpStore::new(d.path());
        assert!(matches!(
            s.set(KvpPool::Host, "../escape", "x"),
            Err(KvpError::Invalid(_))
        ));
        assert!(matches!(
            s.set(KvpPool::Host, "k", &"x".repeat(KVP_MAX_VALUE + 1)),
            Err(KvpError::Invalid(_))
        ));
        assert!(!d.path().join("escape").exists());
        assert!(!d.path().join("host").exists());
    }
}
