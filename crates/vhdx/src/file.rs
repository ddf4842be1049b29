//! Host file access: positional I/O, advisory locks, hole punching.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Reads exactly `buf.len()` bytes at `off`; bytes past the end of the file read as zero.
pub(crate) fn read_at_or_zero(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `off`.
pub(crate) fn write_at(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    f.write_all_at(buf, off)
}

/// Takes a non-blocking `flock`: exclusive for writers, shared for readers.
/// Returns `Ok(false)` when another process holds a conflicting lock.
///
/// A conflict is retried for a short while: a child forked by another thread
/// of this process holds our descriptors (and so our locks) until it execs.
pub(crate) fn lock(f: &File, exclusive: bool) -> io::Result<bool> {
    for _ in 0..20 {
        if try_lock(f, exclusive)? {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    try_lock(f, exclusive)
}

fn try_lock(f: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a valid, open descriptor has no memory effects.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Deallocates `[off, off+len)` keeping the file size; the range then reads as
/// zeros. Falls back to writing zeros where punching is not supported.
pub(crate) fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a valid descriptor has no memory effects.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    write_zeros(f, off, len)
}

/// Writes zeros over `[off, off+len)`.
pub(crate) fn write_zeros(f: &File, off: u64, len: u64) -> io::Result<()> {
    let z = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(z.len() as u64) as usize;
        f.write_all_at(&z[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Allocates disk space for `[off, off+len)` (fixed disks), extending the file.
pub(crate) fn preallocate(f: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid descriptor has no memory effects.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off as libc::off_t, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        let end = off + len;
        if f.metadata()?.len() < end {
            f.set_len(end)?;
        }
        return Ok(());
    }
    Err(e)
}

/// Bytes the file occupies on disk.
pub(crate) fn allocated_bytes(f: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(f.metadata()?.blocks() * 512)
}
