//! Port backends: how frames get in and out of the switch process.
//!
//! - `StreamConnect`: QEMU runs `-netdev stream,server=on,addr.type=unix,addr.path=P`;
//!   the switch connects to `P`, and after any disconnect (QEMU restart, switch restart)
//!   connects again every [`RECONNECT_INTERVAL`]. QEMU 7.2 has no client-side reconnect,
//!   but its stream server re-accepts after a client goes away, so this is the mode in
//!   which "the switch restarts and VMs reconnect automatically" holds.
//! - `StreamListen`: the switch listens at `P` (for peers that connect, or QEMU 8+ with
//!   `server=off,reconnect=N`); a new connection replaces the old one.
//! - `Tap`: a TAP interface (IFF_TAP | IFF_NO_PI) the switch creates; one read/write per frame.
//! - `Packet`: an AF_PACKET socket on a host interface, promiscuous, receiving from a
//!   TPACKET_V2 ring (recvmmsg where the kernel refuses one), VLAN tags restored from the
//!   ring's `tp_vlan_tci` (PACKET_AUXDATA on the recvmmsg path); sending through a
//!   TPACKET_V2 transmit ring on a second, send-only socket (one `send` per batch, qdisc
//!   bypassed), with `sendmmsg` for frames bigger than a slot and where there is no ring.
//!
//! Stream framing (checked against QEMU 7.2): every frame is preceded by its length as a
//! 4-byte big-endian integer; no padding, no FCS.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use switch::Backend;

use crate::sys::{self, Gso, VNET_HDR_LEN};

/// How often a disconnected `StreamConnect` port retries.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);
/// Largest frame accepted from a stream peer (QEMU's own limit is 69632).
pub const MAX_STREAM_FRAME: usize = 69632;
/// Bytes of queued output per stream port before frames are dropped.
const STREAM_WBUF_LIMIT: usize = 512 << 10;
/// Frames queued per TAP/packet port before frames are dropped.
const FRAME_QUEUE_LIMIT: usize = 2048;
/// Frames read from one port per loop iteration (fairness between ports).
pub const READ_BATCH: usize = 64;
/// Environment variable: when set, packet ports send with `sendmmsg` only (no transmit
/// ring), for comparison in benchmarks.
pub const NO_TX_RING_ENV: &str = "VIREO_SWITCH_NO_TX_RING";

/// A port's I/O state.
pub enum PortIo {
    /// A unix stream port (either direction).
    Stream(StreamPort),
    /// A TAP device.
    Tap(FramePort),
    /// An AF_PACKET socket.
    Packet(FramePort, Box<PacketRx>),
}

/// How a packet port receives.
pub enum PacketRx {
    /// A TPACKET_V2 ring shared with the kernel (no system call or copy per frame).
    Ring(sys::RxRing),
    /// `recvmmsg` into the switch's buffers (where the kernel refuses a ring).
    Batch(sys::RecvBatch),
}

/// A unix stream port.
pub struct StreamPort {
    path: String,
    listener: Option<UnixListener>,
    conn: Option<UnixStream>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wstart: usize,
    next_try: Instant,
}

/// A TAP or packet port: a descriptor and a queue of frames to send.
pub struct FramePort {
    fd: OwnedFd,
    qbuf: Vec<u8>,
    qlens: Vec<usize>,
    qhdrs: Vec<[u8; VNET_HDR_LEN]>,
    send: sys::SendBatch,
    /// A packet port's transmit ring (frames up to [`sys::TX_RING_MAX_FRAME`]); `None` on
    /// TAP ports and where the kernel refuses one (then everything goes by `sendmmsg`).
    tx: Option<sys::TxRing>,
}

/// What happened to a port's link while polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// Nothing changed.
    None,
    /// Connected.
    Up,
    /// Disconnected.
    Down,
}

impl PortIo {
    /// Opens a backend. Stream ports start disconnected; TAP and packet ports start up.
    pub fn open(b: &Backend) -> io::Result<PortIo> {
        Ok(match b {
            Backend::StreamConnect { path } => PortIo::Stream(StreamPort::new(path, None)),
            Backend::StreamListen { path } => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let l = UnixListener::bind(path)?;
                l.set_nonblocking(true)?;
                PortIo::Stream(StreamPort::new(path, Some(l)))
            }
            Backend::Tap { ifname } => {
                let fd = sys::open_tap(ifname)?;
                sys::set_link_up(ifname)?;
                PortIo::Tap(FramePort::new(fd))
            }
            Backend::Packet { ifname } => {
                let fd = sys::open_packet(ifname)?;
                let rx = match sys::RxRing::new(fd.as_raw_fd()) {
                    Ok(r) => PacketRx::Ring(r),
                    Err(e) => {
                        tracing::info!(iface = %ifname, error = %e, "no receive ring; using recvmmsg");
                        PacketRx::Batch(sys::RecvBatch::new(READ_BATCH, 65536 + 64))
                    }
                };
                let mut port = FramePort::new(fd);
                if std::env::var_os(NO_TX_RING_ENV).is_none() {
                    match sys::TxRing::new(ifname) {
                        Ok(r) => port.tx = Some(r),
                        Err(e) => {
                            tracing::info!(iface = %ifname, error = %e, "no transmit ring; using sendmmsg")
                        }
                    }
                }
                PortIo::Packet(port, Box::new(rx))
            }
        })
    }

    /// True when the port can carry frames now.
    pub fn is_up(&self) -> bool {
        match self {
            PortIo::Stream(s) => s.conn.is_some(),
            _ => true,
        }
    }

    /// The descriptor to poll and the events wanted.
    pub fn poll_fd(&self) -> Option<(RawFd, i16)> {
        match self {
            PortIo::Stream(s) => match (&s.conn, &s.listener) {
                (Some(c), _) => {
                    let mut ev = libc::POLLIN;
                    if s.wstart < s.wbuf.len() {
                        ev |= libc::POLLOUT;
                    }
                    Some((c.as_raw_fd(), ev))
                }
                (None, Some(l)) => Some((l.as_raw_fd(), libc::POLLIN)),
                (None, None) => None,
            },
            PortIo::Tap(p) | PortIo::Packet(p, _) => {
                let mut ev = libc::POLLIN;
                if !p.qlens.is_empty() || p.tx.as_ref().is_some_and(sys::TxRing::has_pending) {
                    ev |= libc::POLLOUT;
                }
                Some((p.fd.as_raw_fd(), ev))
            }
        }
    }

    /// A listening stream port also polls for new connections while connected.
    pub fn listen_fd(&self) -> Option<RawFd> {
        match self {
            PortIo::Stream(StreamPort {
                listener: Some(l),
                conn: Some(_),
                ..
            }) => Some(l.as_raw_fd()),
            _ => None,
        }
    }

    /// When a disconnected connect-mode port wants to retry.
    pub fn next_retry(&self) -> Option<Instant> {
        match self {
            PortIo::Stream(s) if s.conn.is_none() && s.listener.is_none() => Some(s.next_try),
            _ => None,
        }
    }

    /// Connects or accepts if due/possible.
    pub fn maintain(&mut self, now: Instant) -> LinkEvent {
        let PortIo::Stream(s) = self else {
            return LinkEvent::None;
        };
        if let Some(l) = &s.listener {
            match l.accept() {
                Ok((c, _)) => {
                    let was_up = s.conn.is_some();
                    if c.set_nonblocking(true).is_ok() {
                        tracing::info!(path = %s.path, replaced = was_up, "stream peer connected");
                        s.attach(c);
                        return LinkEvent::Up;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(path = %s.path, error = %e, "accept failed"),
            }
            return LinkEvent::None;
        }
        if s.conn.is_some() || now < s.next_try {
            return LinkEvent::None;
        }
        s.next_try = now + RECONNECT_INTERVAL;
        match UnixStream::connect(&s.path) {
            Ok(c) if c.set_nonblocking(true).is_ok() => {
                tracing::info!(path = %s.path, "connected to stream peer");
                s.attach(c);
                LinkEvent::Up
            }
            Ok(_) => LinkEvent::None,
            Err(e) => {
                tracing::trace!(path = %s.path, error = %e, "stream peer not there yet");
                LinkEvent::None
            }
        }
    }

    /// Reads up to a batch of frames, handing each to `f`. Returns a link event when the
    /// peer went away.
    pub fn read_frames(&mut self, f: &mut dyn FnMut(&[u8], Option<Gso>)) -> LinkEvent {
        match self {
            PortIo::Stream(s) => s.read_frames(&mut |fr| f(fr, None)),
            PortIo::Tap(p) => {
                let mut buf = [0u8; 65536];
                for _ in 0..READ_BATCH {
                    match sys::read(p.fd.as_raw_fd(), &mut buf) {
                        Ok(0) => break,
                        Ok(n) => f(&buf[..n], None),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => break, // link down
                        Err(e) => {
                            tracing::warn!(error = %e, "tap read");
                            break;
                        }
                    }
                }
                LinkEvent::None
            }
            PortIo::Packet(p, rx) => {
                let batch = match rx.as_mut() {
                    PacketRx::Ring(r) => {
                        r.recv(p.fd.as_raw_fd(), 4 * READ_BATCH, f);
                        return LinkEvent::None;
                    }
                    PacketRx::Batch(b) => b,
                };
                for _ in 0..4 {
                    match batch.recv(p.fd.as_raw_fd(), f) {
                        Ok(n) if n == READ_BATCH => continue,
                        Ok(_) => break,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "packet recv");
                            break;
                        }
                    }
                }
                LinkEvent::None
            }
        }
    }

    /// Queues a frame for sending; false if the queue is full or the link is down.
    pub fn queue(&mut self, frame: &[u8]) -> bool {
        match self {
            PortIo::Stream(s) => {
                if s.conn.is_none() || s.wbuf.len() - s.wstart > STREAM_WBUF_LIMIT {
                    return false;
                }
                s.wbuf
                    .extend_from_slice(&(frame.len() as u32).to_be_bytes());
                s.wbuf.extend_from_slice(frame);
                true
            }
            PortIo::Tap(p) | PortIo::Packet(p, _) => p.push(frame, [0; VNET_HDR_LEN]),
        }
    }

    /// Queues a TCP super-frame: whole, with a GSO header, on a packet port (the kernel
    /// segments it); split into segments elsewhere (QEMU stream and TAP peers take frames of
    /// at most the MTU). False if any part could not be queued.
    pub fn queue_super_frame(&mut self, frame: &[u8], gso: Gso) -> bool {
        if let PortIo::Packet(p, _) = self {
            if let Some(h) = sys::gso_header(frame, gso) {
                return p.push(frame, h);
            }
        }
        let mut ok = true;
        let r = switch::frame::segment_tcp(frame, usize::from(gso.size), &mut |seg| {
            ok &= self.queue(seg);
        });
        ok && r.is_some()
    }

    /// True if the port is up and its own output queue has room (otherwise the engine keeps
    /// frames in its weighted backlog).
    pub fn has_room(&self) -> bool {
        match self {
            PortIo::Stream(s) => s.conn.is_some() && s.wbuf.len() - s.wstart <= STREAM_WBUF_LIMIT,
            PortIo::Tap(p) | PortIo::Packet(p, _) => p.qlens.len() < FRAME_QUEUE_LIMIT,
        }
    }

    /// True if frames wait to be sent.
    pub fn has_output(&self) -> bool {
        match self {
            PortIo::Stream(s) => s.wstart < s.wbuf.len(),
            PortIo::Tap(p) | PortIo::Packet(p, _) => {
                !p.qlens.is_empty() || p.tx.as_ref().is_some_and(sys::TxRing::has_pending)
            }
        }
    }

    /// Sends what can be sent without blocking.
    pub fn flush(&mut self) -> LinkEvent {
        match self {
            PortIo::Stream(s) => s.flush(),
            PortIo::Tap(p) => {
                let mut off = 0;
                let mut sent = 0;
                for &l in &p.qlens {
                    match sys::write(p.fd.as_raw_fd(), &p.qbuf[off..off + l]) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // EIO when the TAP is down: the frame is lost, like on a wire
                            tracing::trace!(error = %e, "tap write");
                        }
                    }
                    off += l;
                    sent += 1;
                }
                p.consume(sent, off);
                LinkEvent::None
            }
            PortIo::Packet(p, _) if p.tx.is_some() => {
                p.flush_ring();
                LinkEvent::None
            }
            PortIo::Packet(p, _) => {
                let mut off = 0;
                let mut sent = 0;
                while sent < p.qlens.len() {
                    let end = p.qlens.len().min(sent + 64);
                    let lens = &p.qlens[sent..end];
                    let hdrs = &p.qhdrs[sent..end];
                    match sys::sendmmsg(p.fd.as_raw_fd(), &mut p.send, &p.qbuf[off..], lens, hdrs) {
                        Ok(0) => break,
                        Ok(n) => {
                            off += lens[..n].iter().sum::<usize>();
                            sent += n;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "packet send; dropping frame");
                            off += lens[0];
                            sent += 1;
                        }
                    }
                }
                p.consume(sent, off);
                LinkEvent::None
            }
        }
    }

    /// Closes the stream connection (for tests of reconnect and on removal).
    pub fn close(&mut self) {
        if let PortIo::Stream(s) = self {
            s.detach();
        }
    }
}

impl FramePort {
    fn new(fd: OwnedFd) -> Self {
        FramePort {
            fd,
            qbuf: Vec::with_capacity(1 << 20),
            qlens: Vec::new(),
            qhdrs: Vec::new(),
            send: sys::SendBatch::default(),
            tx: None,
        }
    }

    /// Sends the queue through the transmit ring: every frame that fits goes into a slot
    /// and one `send` has the kernel transmit them; a frame too big for a slot first has
    /// the ring kicked (order is kept) and then goes by `sendmmsg`. Frames stay queued while
    /// the ring is full.
    fn flush_ring(&mut self) {
        let Some(ring) = self.tx.as_mut() else {
            return;
        };
        let fd = self.fd.as_raw_fd();
        let mut off = 0;
        let mut sent = 0;
        while sent < self.qlens.len() {
            let l = self.qlens[sent];
            let frame = &self.qbuf[off..off + l];
            if l <= sys::TX_RING_MAX_FRAME {
                if !ring.put(frame, &self.qhdrs[sent]) {
                    break; // full: the kernel still holds the slot
                }
            } else {
                if let Err(e) = ring.kick() {
                    tracing::trace!(error = %e, "transmit ring kick");
                    break;
                }
                match sys::sendmmsg(fd, &mut self.send, frame, &[l], &self.qhdrs[sent..=sent]) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => tracing::debug!(error = %e, "packet send; dropping frame"),
                }
            }
            off += l;
            sent += 1;
        }
        if let Err(e) = ring.kick() {
            // ENOBUFS/EAGAIN: the requested slots stay requested and are sent next time
            tracing::trace!(error = %e, "transmit ring kick");
        }
        self.consume(sent, off);
    }

    fn push(&mut self, frame: &[u8], hdr: [u8; VNET_HDR_LEN]) -> bool {
        // Nothing waits ahead of it: straight into a transmit ring slot (one copy; the
        // next flush kicks the ring). Otherwise it queues behind the waiting frames.
        if self.qlens.is_empty() && frame.len() <= sys::TX_RING_MAX_FRAME {
            if let Some(ring) = self.tx.as_mut() {
                if ring.put(frame, &hdr) {
                    return true;
                }
            }
        }
        if self.qlens.len() >= FRAME_QUEUE_LIMIT {
            return false;
        }
        self.qbuf.extend_from_slice(frame);
        self.qlens.push(frame.len());
        self.qhdrs.push(hdr);
        true
    }

    fn consume(&mut self, frames: usize, bytes: usize) {
        if frames == self.qlens.len() {
            self.qlens.clear();
            self.qhdrs.clear();
            self.qbuf.clear();
        } else if frames > 0 {
            self.qlens.drain(..frames);
            self.qhdrs.drain(..frames);
            self.qbuf.drain(..bytes);
        }
    }
}

impl StreamPort {
    fn new(path: &str, listener: Option<UnixListener>) -> Self {
        StreamPort {
            path: path.to_string(),
            listener,
            conn: None,
            rbuf: vec![0; 256 * 1024],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(256 * 1024),
            wstart: 0,
            next_try: Instant::now(),
        }
    }

    fn attach(&mut self, c: UnixStream) {
        let _ = sys::set_nonblocking(c.as_raw_fd());
        self.conn = Some(c);
        self.rstart = 0;
        self.rend = 0;
        self.wbuf.clear();
        self.wstart = 0;
    }

    fn detach(&mut self) {
        if self.conn.take().is_some() {
            tracing::info!(path = %self.path, "stream peer disconnected");
        }
        self.rstart = 0;
        self.rend = 0;
        self.wbuf.clear();
        self.wstart = 0;
        self.next_try = Instant::now() + RECONNECT_INTERVAL;
    }

    fn read_frames(&mut self, f: &mut dyn FnMut(&[u8])) -> LinkEvent {
        let Some(c) = &self.conn else {
            return LinkEvent::None;
        };
        let fd = c.as_raw_fd();
        // compact
        if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        match sys::read(fd, &mut self.rbuf[self.rend..]) {
            Ok(0) => {
                self.detach();
                return LinkEvent::Down;
            }
            Ok(n) => self.rend += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LinkEvent::None,
            Err(e) => {
                tracing::info!(path = %self.path, error = %e, "stream read failed");
                self.detach();
                return LinkEvent::Down;
            }
        }
        while self.rend - self.rstart >= 4 {
            let h = &self.rbuf[self.rstart..self.rstart + 4];
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len > MAX_STREAM_FRAME {
                tracing::warn!(path = %self.path, len, "stream peer sent an oversized frame; disconnecting");
                self.detach();
                return LinkEvent::Down;
            }
            if self.rend - self.rstart < 4 + len {
                break;
            }
            let start = self.rstart + 4;
            f(&self.rbuf[start..start + len]);
            self.rstart = start + len;
        }
        LinkEvent::None
    }

    fn flush(&mut self) -> LinkEvent {
        let Some(c) = &self.conn else {
            return LinkEvent::None;
        };
        let fd = c.as_raw_fd();
        while self.wstart < self.wbuf.len() {
            match sys::write(fd, &self.wbuf[self.wstart..]) {
                Ok(n) => self.wstart += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::info!(path = %self.path, error = %e, "stream write failed");
                    self.detach();
                    return LinkEvent::Down;
                }
            }
        }
        if self.wstart == self.wbuf.len() {
            self.wbuf.clear();
            self.wstart = 0;
        } else if self.wstart > (1 << 20) {
            self.wbuf.drain(..self.wstart);
            self.wstart = 0;
        }
        LinkEvent::None
    }
}
