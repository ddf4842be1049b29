//! The guest cache directory: downloaded .debs, their unpacked trees, and built images keyed
//! by a hash of their inputs.
//!
//! ```text
//! <cache>/lock                      flock(2) held while building
//! <cache>/debs/<pkg>_<ver>_amd64.deb
//! <cache>/unpacked/<pkg>_<ver>/     dpkg-deb -x of the .deb (complete trees only)
//! <cache>/images/<key>.raw          built images; <key>.inputs lists what the key hashes
//! <cache>/images/<key>.vhdx         the same image converted, made on demand
//! ```

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// An opened cache directory.
pub struct Cache {
    root: PathBuf,
}

/// Held while the cache is being written; released on drop.
pub struct CacheLock {
    _lock: Flock<File>,
}

impl Cache {
    /// Opens (creating) the cache at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["debs", "unpacked", "images"] {
            fs::create_dir_all(root.join(d))
                .with_context(|| format!("creating cache directory {}", root.display()))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Takes the cache's exclusive lock (waits for other builders).
    pub fn lock(&self) -> Result<CacheLock> {
        let path = self.root.join("lock");
        let f = File::create(&path).with_context(|| format!("opening {}", path.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(CacheLock { _lock: lock })
    }

    /// Where downloaded .deb files live.
    pub fn debs(&self) -> PathBuf {
        self.root.join("debs")
    }

    /// Where unpacked .deb trees live.
    pub fn unpacked(&self) -> PathBuf {
        self.root.join("unpacked")
    }

    /// Where built images live.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The ordered list of inputs that decides a cache key.
#[derive(Default)]
pub struct Inputs {
    lines: Vec<String>,
}

impl Inputs {
    /// Records an input as `name value`.
    pub fn add(&mut self, name: &str, value: impl AsRef<str>) {
        self.lines.push(format!("{name} {}", value.as_ref()));
    }

    /// The text that is hashed (also stored next to the image).
    pub fn text(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }

    /// The cache key: 32 hex digits of the SHA-256 of [`Inputs::text`].
    pub fn key(&self) -> String {
        sha256_hex(self.text().as_bytes())[..32].to_owned()
    }
}

/// Copies `src` to `dst` through a temporary file and a rename, sharing blocks (reflink) when
/// the filesystem can and keeping holes otherwise.
pub fn copy_out(src: &Path, dst: &Path) -> Result<()> {
    let name = dst
        .file_name()
        .with_context(|| format!("{} has no file name", dst.display()))?;
    let tmp = dst.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut c = crate::cmd::command("cp", ["--reflink=auto", "--sparse=always"]);
    c.arg(src).arg(&tmp);
    if let Err(e) = crate::cmd::run(c) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, dst).with_context(|| format!("renaming into {}", dst.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key changes with any input and not otherwise.
    #[test]
    fn key_follows_inputs() {
        let mut a = Inputs::default();
        a.add("x", "1");
        let mut b = Inputs::default();
        b.add("x", "1");
        assert_eq!(a.key(), b.key());
        b.add("y", "2");
        assert_ne!(a.key(), b.key());
        assert_eq!(sha256_hex(b"abc")[..8].to_owned(), "ba7816bf");
    }
}
