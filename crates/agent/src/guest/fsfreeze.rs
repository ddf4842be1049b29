//! `guest-fsfreeze-*`: FIFREEZE/FITHAW on local block-device filesystems.
//!
//! Candidates come from `/proc/self/mounts`: the source must be a path (a block device;
//! this skips proc, sysfs, tmpfs, overlay and friends) and the type must not be a network
//! or FUSE filesystem. A filesystem mounted several times is frozen once.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::protocol::FsfreezeStatus;

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

const SKIP_TYPES: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "ceph",
    "glusterfs",
    "virtiofs",
    "fuse",
    "fuseblk",
    "iso9660",
    "squashfs",
    "autofs",
];

fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push((v & 0xff) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points that can be frozen, in mount order.
pub fn freezable_mounts(mounts_text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mounts_text.lines() {
        let mut f = line.split_whitespace();
        let (Some(src), Some(dir), Some(ty)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !src.starts_with('/') {
            continue;
        }
        if SKIP_TYPES.contains(&ty) || ty.starts_with("fuse.") {
            continue;
        }
        out.push(PathBuf::from(unescape_mount_field(dir)));
    }
    out
}

fn ioctl_on(path: &PathBuf, req: libc::c_ulong) -> std::io::Result<()> {
    let f = fs::File::open(path)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument that the kernel ignores.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Freeze state of the guest.
#[derive(Debug, Default)]
pub struct Freezer {
    frozen: Vec<PathBuf>,
    status: Option<FsfreezeStatus>,
}

impl Freezer {
    /// Current status.
    pub fn status(&self) -> FsfreezeStatus {
        self.status.unwrap_or(FsfreezeStatus::Thawed)
    }

    fn candidates() -> Result<Vec<PathBuf>, String> {
        let text = fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
        Ok(freezable_mounts(&text))
    }

    /// Freezes all candidates, or only those in `only`. Returns how many it froze; on
    /// failure everything frozen so far is thawed again.
    pub fn freeze(&mut self, only: Option<&[String]>) -> Result<i64, String> {
        let mut seen_dev = HashSet::new();
        let mut list = Self::candidates()?;
        if let Some(only) = only {
            list.retain(|p| only.iter().any(|o| std::path::Path::new(o) == p));
        }
        // Children before parents, as qemu-ga does.
        list.reverse();
        for mp in list {
            let Ok(meta) = fs::metadata(&mp) else {
                continue;
            };
            if !seen_dev.insert(meta.dev()) {
                continue;
            }
            match ioctl_on(&mp, FIFREEZE) {
                Ok(()) => {
                    tracing::info!(mountpoint = %mp.display(), "filesystem frozen");
                    self.frozen.push(mp);
                }
                // Already frozen (by someone else), or cannot be frozen: skip it.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBUSY) | Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                    ) => {}
                Err(e) => {
                    let msg = format!("failed to freeze {}: {e}", mp.display());
                    let _ = self.thaw();
                    return Err(msg);
                }
            }
        }
        if !self.frozen.is_empty() {
            self.status = Some(FsfreezeStatus::Frozen);
        }
        Ok(self.frozen.len() as i64)
    }

    /// Thaws what this agent froze; after an agent restart (nothing recorded) it tries
    /// every candidate. Returns how many it thawed.
    pub fn thaw(&mut self) -> Result<i64, String> {
        let list: Vec<PathBuf> = if self.frozen.is_empty() {
            Self::candidates()?
        } else {
            std::mem::take(&mut self.frozen).into_iter().rev().collect()
        };
        let mut n = 0;
        for mp in list {
            match ioctl_on(&mp, FITHAW) {
                Ok(()) => {
                    tracing::info!(mountpoint = %mp.display(), "filesystem thawed");
                    n += 1;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => tracing::warn!(mountpoint = %mp.display(), error = %e, "thaw failed"),
            }
        }
        self.status = Some(FsfreezeStatus::Thawed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo, network and FUSE filesystems are not candidates; escapes are decoded.
    #[test]
    fn candidates_from_mounts() {
        let t = "proc /proc proc rw 0 0\n/dev/vda1 / ext4 rw 0 0\ntmpfs /run tmpfs rw 0 0\n\
                 /dev/vdb1 /mnt/my\\040disk xfs rw 0 0\nsrv:/x /nfs nfs4 rw 0 0\n\
                 /dev/fuse /f fuse.sshfs rw 0 0\n";
        assert_eq!(
            freezable_mounts(t),
            vec![PathBuf::from("/"), PathBuf::from("/mnt/my disk")]
        );
    }
}
