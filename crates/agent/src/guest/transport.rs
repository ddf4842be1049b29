//! Moving bytes between a channel and the [`Server`].
//!
//! A virtio-serial port never goes away when the host disconnects: `poll` reports `POLLHUP`
//! and `read` returns 0 until something connects to the chardev on the host again. So on
//! the port, end-of-file means "wait a bit and poll again" ([`EofPolicy::Wait`]); the
//! loop sleeps between checks and never spins. A port that fails outright (hot-unplug) is
//! closed and reopened. On a socket (tests, `--listen`), end-of-file ends the session.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Server;
use crate::framing::{Frame, Splitter};
use crate::protocol::{self, GUEST_AGENT_PORT_NAME};

/// How long a reply may wait for the channel to accept it before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll granularity, so a stop request is seen promptly.
const POLL_MS: i32 = 500;

/// What end-of-file on the channel means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EofPolicy {
    /// The peer may come back (virtio-serial port): sleep this long, then poll again.
    Wait(Duration),
    /// The session is over (socket): return.
    Return,
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// The peer closed the channel ([`EofPolicy::Return`]).
    Eof,
    /// The stop flag was set.
    Stopped,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Polls `fd` for `events`; returns revents (0 on timeout).
fn poll_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(if r == 0 { 0 } else { p.revents })
}

fn write_reply<C: Write + AsRawFd>(chan: &mut C, mut data: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while !data.is_empty() {
        match chan.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let rev = poll_fd(chan.as_raw_fd(), libc::POLLOUT, ms.min(POLL_MS))?;
                if rev & (libc::POLLERR | libc::POLLNVAL) != 0 {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Serves requests arriving on `chan` until end-of-file (with [`EofPolicy::Return`]),
/// `stop`, or a hard error of the channel.
pub fn serve<C: Read + Write + AsRawFd>(
    server: &Server,
    chan: &mut C,
    eof: EofPolicy,
    stop: &AtomicBool,
) -> io::Result<ServeEnd> {
    set_nonblocking(chan.as_raw_fd())?;
    let mut splitter = Splitter::default();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(ServeEnd::Stopped);
        }
        let rev = poll_fd(chan.as_raw_fd(), libc::POLLIN, POLL_MS)?;
        if rev == 0 {
            continue;
        }
        if rev & libc::POLLNVAL != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let n = if rev & libc::POLLIN != 0 {
            match chan.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        } else {
            // POLLHUP / POLLERR without data: the host end is not connected.
            0
        };
        if n == 0 {
            if !splitter.is_idle() {
                tracing::debug!("host disconnected in the middle of a request");
            }
            splitter.reset();
            match eof {
                EofPolicy::Return => return Ok(ServeEnd::Eof),
                EofPolicy::Wait(d) => {
                    std::thread::sleep(d);
                    continue;
                }
            }
        }
        splitter.feed(&buf[..n], &mut frames);
        for f in frames.drain(..) {
            let reply = match f {
                Frame::Text(t) => server.handle(&t),
                Frame::Delimiter => None,
                Frame::Overflow => Some(
                    protocol::Response::Error {
                        error: protocol::QgaError {
                            class: protocol::CLASS_GENERIC.into(),
                            desc: "JSON parse error, request too large or too deeply nested".into(),
                        },
                        id: None,
                    }
                    .encode(),
                ),
            };
            if let Some(r) = reply {
                if let Err(e) = write_reply(chan, &r) {
                    tracing::debug!(error = %e, "reply dropped");
                }
            }
        }
    }
}

/// The device of the virtio-serial port named `name`: `/dev/virtio-ports/<name>` when udev
/// or mdev made the link, else the `/dev/vportNpM` whose sysfs `name` matches.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let link = Path::new("/dev/virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim() == name {
            let dev = Path::new("/dev").join(entry.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn open_port(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Serves the guest agent port forever: finds it (`device`, or by name), opens it, serves,
/// and reopens it after errors; waits (without spinning) while it is absent.
pub fn serve_port(server: &Server, device: Option<&Path>, stop: &AtomicBool) -> io::Result<()> {
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let path = match device {
            Some(p) => Some(p.to_path_buf()),
            None => find_port(GUEST_AGENT_PORT_NAME),
        };
        let opened = match &path {
            Some(p) => open_port(p).map(|f| (p.clone(), f)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {GUEST_AGENT_PORT_NAME}"),
            )),
        };
        let (path, mut file) = match opened {
            Ok(x) => x,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "guest agent port not available; retrying");
                    warned = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        warned = false;
        tracing::info!(device = %path.display(), "serving guest agent port");
        match serve(
            server,
            &mut file,
            EofPolicy::Wait(Duration::from_millis(200)),
            stop,
        ) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(device = %path.display(), error = %e, "port failed; reopening");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

/// Serves clients of a unix socket one after the other (qemu-ga's `unix-listen`).
pub fn serve_listener(
    server: &Server,
    listener: &UnixListener,
    stop: &AtomicBool,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                tracing::debug!("client connected");
                if let Err(e) = serve(server, &mut conn, EofPolicy::Return, stop) {
                    tracing::debug!(error = %e, "client session failed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                poll_fd(listener.as_raw_fd(), libc::POLLIN, POLL_MS)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
