//! Parent locator (MS-VHDX 2.6.2.6): key/value pairs in UTF-16LE naming the
//! parent of a differencing disk and the parent's DataWriteGuid at link time.

use std::path::{Path, PathBuf};

use crate::guid::{self, Guid};
use crate::header::le32;

const MAX_PAIRS: usize = 256;

/// Parent locator errors.
#[derive(Debug, thiserror::Error)]
pub enum LocatorError {
    /// The locator type is not the VHDX locator.
    #[error("unknown parent locator type {0}")]
    Type(Guid),
    /// The structure does not fit its item.
    #[error("parent locator entries do not fit the metadata item")]
    Layout,
    /// A key or value is not UTF-16.
    #[error("parent locator text is not valid UTF-16")]
    Text,
    /// `parent_linkage` is missing or malformed.
    #[error("parent locator has no valid parent_linkage")]
    Linkage,
    /// No path key is present.
    #[error("parent locator has no relative_path or absolute_win32_path")]
    NoPath,
}

/// A parsed VHDX parent locator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Key/value pairs in file order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Parses the raw metadata item.
    pub fn parse(b: &[u8]) -> Result<ParentLocator, LocatorError> {
        if b.len() < 20 {
            return Err(LocatorError::Layout);
        }
        let t = Guid::from_slice(&b[..16]);
        if t != guid::LOCATOR_TYPE_VHDX {
            return Err(LocatorError::Type(t));
        }
        let count = u16::from_le_bytes([b[18], b[19]]) as usize;
        if count > MAX_PAIRS || 20 + 12 * count > b.len() {
            return Err(LocatorError::Layout);
        }
        let text = |off: u32, len: u16| -> Result<String, LocatorError> {
            let (off, len) = (off as usize, len as usize);
            if len % 2 != 0 || off.checked_add(len).map_or(true, |e| e > b.len()) {
                return Err(LocatorError::Layout);
            }
            let u: Vec<u16> = b[off..off + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&u).map_err(|_| LocatorError::Text)
        };
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = &b[20 + 12 * i..32 + 12 * i];
            let k = text(le32(e, 0), u16::from_le_bytes([e[8], e[9]]))?;
            let v = text(le32(e, 4), u16::from_le_bytes([e[10], e[11]]))?;
            entries.push((k, v));
        }
        let l = ParentLocator { entries };
        l.linkage()?;
        if l.get("relative_path").is_none()
            && l.get("absolute_win32_path").is_none()
            && l.get("volume_path").is_none()
        {
            return Err(LocatorError::NoPath);
        }
        Ok(l)
    }

    /// Value of a key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parent's DataWriteGuid recorded at link time.
    pub fn linkage(&self) -> Result<Guid, LocatorError> {
        self.get("parent_linkage")
            .and_then(|v| v.parse().ok())
            .ok_or(LocatorError::Linkage)
    }

    /// The alternative linkage (`parent_linkage2`), if any.
    pub fn linkage2(&self) -> Option<Guid> {
        self.get("parent_linkage2").and_then(|v| v.parse().ok())
    }

    /// Builds a locator for `parent` as seen from `child`.
    pub fn for_parent(child: &Path, parent: &Path, linkage: Guid) -> ParentLocator {
        let abs_parent = resolved(parent);
        let abs_child = resolved(child);
        let mut entries = vec![("parent_linkage".to_string(), format!("{{{linkage}}}"))];
        if let Some(rel) = abs_child.parent().and_then(|d| relative(d, &abs_parent)) {
            entries.push(("relative_path".to_string(), to_windows(&rel, true)));
        }
        entries.push((
            "absolute_win32_path".to_string(),
            to_windows(&abs_parent, false),
        ));
        ParentLocator { entries }
    }

    /// Serializes the metadata item.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        b[..16].copy_from_slice(&guid::LOCATOR_TYPE_VHDX.0);
        b[18..20].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut put = |s: &str| -> (u32, u16) {
                let off = b.len() as u32;
                for u in s.encode_utf16() {
                    b.extend_from_slice(&u.to_le_bytes());
                }
                (off, (b.len() as u32 - off) as u16)
            };
            let (ko, kl) = put(k);
            let (vo, vl) = put(v);
            let e = &mut b[20 + 12 * i..32 + 12 * i];
            e[0..4].copy_from_slice(&ko.to_le_bytes());
            e[4..8].copy_from_slice(&vo.to_le_bytes());
            e[8..10].copy_from_slice(&kl.to_le_bytes());
            e[10..12].copy_from_slice(&vl.to_le_bytes());
        }
        b
    }

    /// Candidate parent paths, in the order they are tried: relative to the
    /// child's directory first, then the absolute path.
    pub fn candidates(&self, child: &Path) -> Vec<PathBuf> {
        let dir = child.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut out = Vec::new();
        if let Some(r) = self.get("relative_path") {
            let p = from_windows(r);
            let p = if p.is_absolute() { p } else { dir.join(p) };
            // A detour through a directory removed since (`../p-9/../base.vhdx`, as
            // recorded by older versions) still names the file lexically.
            let plain = lexical(&p);
            out.push(p);
            if !out.contains(&plain) {
                out.push(plain);
            }
        }
        for key in ["absolute_win32_path", "volume_path"] {
            if let Some(a) = self.get(key) {
                // A drive-letter or volume path cannot name a file on this host.
                if a.len() >= 2 && a.as_bytes()[1] == b':' || a.starts_with("\\\\?\\") {
                    continue;
                }
                out.push(from_windows(a));
            }
        }
        out
    }
}

fn to_windows(p: &Path, relative: bool) -> String {
    let s = p.to_string_lossy().replace('/', "\\");
    if relative && !s.starts_with("..") {
        format!(".\\{s}")
    } else {
        s
    }
}

fn from_windows(s: &str) -> PathBuf {
    let s = s.replace('\\', "/");
    PathBuf::from(s.strip_prefix("./").unwrap_or(&s))
}

/// `target` relative to directory `base` (both absolute).
/// `p` as an absolute path without `.`/`..` detours or links: a parent found through a
/// chain of relative locators is `dir/../store/p-9/../p-8/../base.vhdx`, and a locator
/// recording that detour stops resolving once `p-9/` is removed. The file (or, for a child
/// being created, its directory) is resolved by the file system when it exists, lexically
/// otherwise.
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
        if let Ok(d) = dir.canonicalize() {
            return d.join(name);
        }
    }
    lexical(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// `p` with `.` dropped and each `..` taking away the component before it.
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn relative(base: &Path, target: &Path) -> Option<PathBuf> {
    let b: Vec<_> = base.components().collect();
    let t: Vec<_> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parent reached through `..` detours is recorded by its real path.
    #[test]
    fn detours_are_resolved() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(d.join("store/p-9")).unwrap();
        std::fs::create_dir_all(d.join("failover")).unwrap();
        std::fs::write(d.join("store/base.vhdx"), b"x").unwrap();
        let detour = d.join("failover/../store/p-9/../base.vhdx");
        let l =
            ParentLocator::for_parent(&d.join("failover/leaf.avhdx"), &detour, Guid::new_random());
        std::fs::remove_dir(d.join("store/p-9")).unwrap();
        assert_eq!(l.get("relative_path"), Some("..\\store\\base.vhdx"));
        let c = l.candidates(&d.join("failover/leaf.avhdx"));
        assert!(c.iter().any(|p| p.exists()), "{c:?}");
    }

    /// Locators round-trip, carry relative and absolute paths, and resolve back.
    #[test]
    fn roundtrip_and_paths() {
        let g = Guid::new_random();
        let l =
            ParentLocator::for_parent(Path::new("/a/b/child.vhdx"), Path::new("/a/c/base.vhdx"), g);
        let b = l.to_bytes();
        let p = ParentLocator::parse(&b).unwrap();
        assert_eq!(p, l);
        assert_eq!(p.linkage().unwrap(), g);
        assert_eq!(p.get("relative_path"), Some("..\\c\\base.vhdx"));
        assert_eq!(p.get("absolute_win32_path"), Some("\\a\\c\\base.vhdx"));
        let c = p.candidates(Path::new("/a/b/child.vhdx"));
        assert_eq!(c[0], PathBuf::from("/a/b/../c/base.vhdx"));
        assert_eq!(c[1], PathBuf::from("/a/c/base.vhdx"));
        let same = ParentLocator::for_parent(Path::new("/x/c.vhdx"), Path::new("/x/p.vhdx"), g);
        assert_eq!(same.get("relative_path"), Some(".\\p.vhdx"));
        assert!(ParentLocator::parse(&b[..30]).is_err());
    }
}
