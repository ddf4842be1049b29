//! Raw file (or block device) export: `pread`/`pwrite`, `SEEK_DATA`/`SEEK_HOLE`
//! for block status, `fallocate` for trim and zeroing.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{write_zero_buffers, Export, ExportFlags, Extent, ZeroMode};

/// Most extents one [`Export::block_status`] call reports; the client asks
/// again for the rest.
const MAX_EXTENTS: usize = 1024;

/// Serves a raw image file or block device.
pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
    description: String,
}

impl FileExport {
    /// Opens `path` for serving; read-only opens it `O_RDONLY`.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<FileExport> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let mut e = FileExport::from_file(file, read_only)?;
        e.description = format!("raw file {}", path.display());
        Ok(e)
    }

    /// Serves an already open file (it must be open for writing unless `read_only`).
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<FileExport> {
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileExport {
            file,
            size,
            read_only,
            description: "raw file".into(),
        })
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek(&self, pos: u64, whence: libc::c_int) -> io::Result<u64> {
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only reads its integer arguments. The shared file offset it moves
        // is never used for I/O (all I/O is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }

    fn fua(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        } else {
            Ok(())
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags {
            read_only: self.read_only,
            can_trim: !self.read_only,
            can_fast_zero: !self.read_only,
            // One fd shared by all connections: flush covers every writer.
            can_multi_conn: true,
            rotational: false,
        }
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.file.write_all_at(buf, off)?;
        self.fua(fua)
    }

    fn try_read_at(&self, buf: &mut [u8], off: u64) -> Option<io::Result<()>> {
        Some(self.read_at(buf, off))
    }

    fn try_write_at(&self, buf: &[u8], off: u64) -> Option<io::Result<()>> {
        Some(self.write_at(buf, off, false))
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn trim(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => self.fua(fua),
            // Trim is advisory: a store that cannot punch holes keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        if mode.may_trim {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ) {
                Ok(()) => return self.fua(mode.fua),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => return self.fua(mode.fua),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
        if mode.fast {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        write_zero_buffers(self, off, len)?;
        self.fua(mode.fua)
    }

    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = off.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                // No data at or after pos: the rest is a hole.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                // SEEK_DATA unsupported (e.g. a block device): all data.
                Err(_) => {
                    out.push(Extent::data(pos, end - pos));
                    break;
                }
            };
            if data > pos {
                let hole_end = data.min(end);
                out.push(Extent::hole(pos, hole_end - pos));
                pos = hole_end;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE).unwrap_or(end);
            let data_end = hole.min(end).max(pos + 1);
            out.push(Extent::data(pos, data_end - pos));
            pos = data_end;
        }
        Ok(out)
    }

    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: posix_fadvise only reads its integer arguments; it is a hint.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_punch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 1 << 20).unwrap();
        drop(f);
        let e = FileExport::open(&p, false).unwrap();
        let ext = e.block_status(0, 4 << 20).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent::hole(0, 1 << 20),
                Extent::data(1 << 20, 1 << 20),
                Extent::hole(2 << 20, 2 << 20)
            ]
        );
        e.write_zeroes(
            1 << 20,
            1 << 20,
            ZeroMode {
                may_trim: true,
                fast: true,
                fua: false,
            },
        )
        .unwrap();
        assert_eq!(
            e.block_status(0, 4 << 20).unwrap(),
            vec![Extent::hole(0, 4 << 20)]
        );
        let mut b = vec![9u8; 4096];
        e.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|x| *x == 0));
        let ro = FileExport::open(&p, true).unwrap();
        assert!(ro.write_at(&[1], 0, false).is_err());
    }
}
