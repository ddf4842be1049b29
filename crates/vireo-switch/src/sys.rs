//! Thin, checked wrappers over the Linux calls the backends need: TAP devices, AF_PACKET
//! sockets, interface flags, eventfd, recvmmsg/sendmmsg.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: [0; 24],
    };
    for (d, s) in r.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// Sets O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Opens (creating if needed) the TAP interface `name` with IFF_TAP | IFF_NO_PI, non-blocking.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let mut req = ifreq(name)?;
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    let path = c"/dev/net/tun";
    // SAFETY: path is a valid C string.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) })?;
    set_nonblocking(fd.as_raw_fd())?;
    Ok(fd)
}

fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: s is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// Brings an interface up (in the caller's network namespace).
pub fn set_link_up(name: &str) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of a struct ifreq.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) })?;
    let mut flags = libc::c_short::from_ne_bytes([req.data[0], req.data[1]]);
    flags |= libc::IFF_UP as libc::c_short;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: SIOCSIFFLAGS reads the flags of a struct ifreq.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) })?;
    Ok(())
}

/// The index of an interface.
pub fn ifindex(name: &str) -> io::Result<i32> {
    ifreq(name)?;
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c is a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {name:?}"),
        ))
    } else {
        Ok(i as i32)
    }
}

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Opens an AF_PACKET socket bound to `name`: promiscuous, outgoing host frames ignored,
/// VLAN auxdata and virtio-net headers on, non-blocking, large buffers. Brings the
/// interface up.
pub fn open_packet(name: &str) -> io::Result<OwnedFd> {
    let idx = ifindex(name)?;
    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: plain socket call.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd is fresh.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = idx;
    // SAFETY: binds with a correctly sized sockaddr_ll.
    cvt(unsafe {
        libc::bind(
            raw,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    // SAFETY: packet_mreq is plain data.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = idx;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: passes a packet_mreq and its size.
    cvt(unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq as *const libc::packet_mreq as *const libc::c_void,
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    })?;
    setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;
    // virtio-net headers tell us about partial checksums and GSO/GRO super-frames
    setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    // Frames the host itself sends out of the interface are not switch input.
    setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
    let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20);
    set_nonblocking(raw)?;
    set_link_up(name)?;
    Ok(fd)
}

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd call.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: fd is fresh.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd.
pub fn eventfd_kick(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a u64.
    let _ = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Drains an eventfd.
pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a u64.
    let _ = unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// write(2) from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

const AUX_SPACE: usize = 64;

/// A TCP super-frame's segment size (from a virtio-net header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// Payload bytes per segment (the sender's MSS).
    pub size: u16,
}

/// The virtio-net header that makes the kernel segment a TCP super-frame on send (and fill
/// in its checksums); `None` if the frame is not IPv4/IPv6 TCP.
pub fn gso_header(frame: &[u8], gso: Gso) -> Option<[u8; VNET_HDR_LEN]> {
    let p = switch::frame::parse(frame).ok()?;
    let l3 = p.l3_offset;
    let (ty, l4) = match p.l3 {
        switch::frame::L3::Ipv4 {
            l4: switch::frame::L4::Tcp { .. },
            ..
        } => (
            VIRTIO_NET_HDR_GSO_TCPV4,
            l3 + usize::from(frame[l3] & 0x0f) * 4,
        ),
        switch::frame::L3::Ipv6 {
            l4: switch::frame::L4::Tcp { .. },
            ..
        } => (VIRTIO_NET_HDR_GSO_TCPV6, l3 + 40),
        _ => return None,
    };
    let thl = usize::from(*frame.get(l4 + 12)? >> 4) * 4;
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h[1] = ty;
    h[2..4].copy_from_slice(&((l4 + thl) as u16).to_le_bytes());
    h[4..6].copy_from_slice(&gso.size.to_le_bytes());
    h[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    Some(h)
}
/// Size of the virtio-net header in front of every frame on a PACKET_VNET_HDR socket.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

/// Receive buffers for `recvmmsg` on a packet socket, with VLAN auxdata.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    ctrl: Vec<[u64; AUX_SPACE / 8]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside only point into the batch's own heap buffers.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `n` buffers of `size` bytes (4 spare bytes in front for re-inserting a VLAN tag).
    pub fn new(n: usize, size: usize) -> Self {
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; size + 4]).collect(),
            ctrl: vec![[0u64; AUX_SPACE / 8]; n],
            // SAFETY: iovec and mmsghdr are plain data.
            iovs: vec![unsafe { std::mem::zeroed() }; n],
            // SAFETY: as above.
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
        }
    }

    /// Receives up to the batch size without blocking and calls `f` on each frame, with the
    /// 802.1Q tag the kernel had stripped put back and partial checksums completed. TCP
    /// super-frames (GSO/GRO) are handed on whole with their [`Gso`] segment size (their
    /// checksum stays partial: whoever segments them fills it in).
    pub fn recv(&mut self, fd: RawFd, f: &mut dyn FnMut(&[u8], Option<Gso>)) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i].iov_base = self.bufs[i][4..].as_mut_ptr() as *mut libc::c_void;
            self.iovs[i].iov_len = self.bufs[i].len() - 4;
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = std::ptr::null_mut();
            h.msg_namelen = 0;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = AUX_SPACE;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers of the stated sizes.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = r as usize;
        for i in 0..got {
            let len = (self.hdrs[i].msg_len as usize).min(self.bufs[i].len() - 4);
            if len < VNET_HDR_LEN + 12 {
                continue;
            }
            let tci = self.vlan_tci(i);
            let buf = &mut self.bufs[i];
            let mut v = [0u8; VNET_HDR_LEN];
            v.copy_from_slice(&buf[4..4 + VNET_HDR_LEN]);
            deliver(buf, 4 + VNET_HDR_LEN, 4 + len, v, tci, f);
        }
        Ok(got)
    }

    fn vlan_tci(&self, i: usize) -> Option<(u16, u16)> {
        let h = &self.hdrs[i].msg_hdr;
        // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let d = libc::CMSG_DATA(c);
                    let mut a = [0u8; 20];
                    std::ptr::copy_nonoverlapping(d, a.as_mut_ptr(), 20);
                    let status = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
                    let tci = u16::from_ne_bytes([a[16], a[17]]);
                    let tpid = u16::from_ne_bytes([a[18], a[19]]);
                    if status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 && tpid != 0 {
                            tpid
                        } else {
                            0x8100
                        };
                        return Some((tpid, tci));
                    }
                    return None;
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }
}

/// Hands one received frame on: `buf[start..end]` is the frame as the kernel delivered it,
/// `v` its virtio-net header, and the 4 bytes before `start` are free (the 802.1Q tag the
/// kernel stripped, `tci`, is put back there). Completes partial checksums; TCP super-frames
/// go on whole with their segment size; other GSO types are dropped.
fn deliver(
    buf: &mut [u8],
    start: usize,
    end: usize,
    v: [u8; VNET_HDR_LEN],
    tci: Option<(u16, u16)>,
    f: &mut dyn FnMut(&[u8], Option<Gso>),
) {
    if start < 4 || end > buf.len() || end < start + 12 {
        return;
    }
    let flags = v[0];
    let gso_type = v[1];
    let gso_size = u16::from_le_bytes([v[4], v[5]]) as usize;
    let mut csum_start = u16::from_le_bytes([v[6], v[7]]) as usize;
    let csum_offset = u16::from_le_bytes([v[8], v[9]]) as usize;
    let frame: &mut [u8] = match tci {
        Some((tpid, tci)) => {
            // move the MACs 4 bytes left and put the tag after them
            buf.copy_within(start..start + 12, start - 4);
            buf[start + 8..start + 10].copy_from_slice(&tpid.to_be_bytes());
            buf[start + 10..start + 12].copy_from_slice(&tci.to_be_bytes());
            csum_start += 4;
            &mut buf[start - 4..end]
        }
        None => &mut buf[start..end],
    };
    let tcp_gso = matches!(
        gso_type & 0x7f,
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6
    );
    if tcp_gso && gso_size > 0 {
        f(
            frame,
            Some(Gso {
                size: gso_size as u16,
            }),
        );
        return;
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        switch::frame::complete_partial_checksum(frame, csum_start, csum_offset);
    }
    if gso_type == 0 {
        f(frame, None);
    } else {
        tracing::debug!(
            gso_type,
            len = end - start,
            "unsupported GSO type; frame dropped"
        );
    }
}

const PACKET_RX_RING: i32 = 5;
const PACKET_COPY_THRESH: i32 = 7;
const PACKET_VERSION: i32 = 10;
const TPACKET_V2: i32 = 1;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_COPY: u32 = 1 << 1;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
/// Bytes per receive ring slot: a full 1514-byte frame plus a VLAN tag, the slot header,
/// the address and the virtio-net header fit; bigger frames (jumbo, GRO super-frames) take
/// the copy path (`TP_STATUS_COPY`: the kernel queues the whole frame on the socket).
const RX_FRAME_SIZE: usize = 2048;
/// Bytes per ring block (one allocation in the kernel).
const RX_BLOCK_SIZE: usize = 1 << 16;
/// Blocks per receive ring (64 of 64 KiB: 2048 slots, 4 MiB).
const RX_BLOCKS: usize = 64;

/// A TPACKET_V2 receive ring mapped from a packet socket: the kernel writes each frame into
/// a slot of shared memory in its softirq and the switch reads it there, with no system
/// call and no copy per frame. Frames too big for a slot come whole through the socket's
/// queue ([`RecvBatch`]).
pub struct RxRing {
    base: *mut u8,
    len: usize,
    slots: usize,
    head: usize,
    copy: RecvBatch,
}

/// Asks the kernel for a TPACKET_V2 ring (`PACKET_RX_RING` or `PACKET_TX_RING`) of
/// `blocks` blocks of `frame`-sized slots on `fd` and maps it. Returns the mapping, its
/// length and the slot count.
fn map_ring(
    fd: RawFd,
    opt: libc::c_int,
    blocks: usize,
    frame: usize,
) -> io::Result<(*mut u8, usize, usize)> {
    let slots = RX_BLOCK_SIZE / frame * blocks;
    let req: [u32; 4] = [
        RX_BLOCK_SIZE as u32,
        blocks as u32,
        frame as u32,
        slots as u32,
    ];
    // SAFETY: passes a struct tpacket_req (four u32) and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            opt,
            req.as_ptr() as *const libc::c_void,
            std::mem::size_of_val(&req) as libc::socklen_t,
        )
    })?;
    let len = RX_BLOCK_SIZE * blocks;
    // SAFETY: maps the ring the kernel just allocated for this socket; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok((base as *mut u8, len, slots))
}

// SAFETY: the mapping is owned by the ring and only touched through `&mut self`.
unsafe impl Send for RxRing {}

impl RxRing {
    /// Sets up the ring on a packet socket that has PACKET_VNET_HDR on and no ring yet
    /// (TPACKET_V2, copy threshold on) and maps it.
    pub fn new(fd: RawFd) -> io::Result<RxRing> {
        setsockopt_int(fd, libc::SOL_PACKET, PACKET_VERSION, TPACKET_V2)?;
        setsockopt_int(fd, libc::SOL_PACKET, PACKET_COPY_THRESH, 1)?;
        let (base, len, slots) = map_ring(fd, PACKET_RX_RING, RX_BLOCKS, RX_FRAME_SIZE)?;
        Ok(RxRing {
            base,
            len,
            slots,
            head: 0,
            copy: RecvBatch::new(1, 65536 + 64),
        })
    }

    fn status(&self, slot: usize) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: every slot starts with the u32 tp_status, 4-byte aligned inside the
        // mapping; the kernel and we hand it over with acquire/release ordering.
        unsafe { &*(self.base.add(slot * RX_FRAME_SIZE) as *const std::sync::atomic::AtomicU32) }
    }

    /// Hands up to `max` waiting frames to `f` (as [`RecvBatch::recv`] does); returns how
    /// many slots were consumed.
    pub fn recv(&mut self, fd: RawFd, max: usize, f: &mut dyn FnMut(&[u8], Option<Gso>)) -> usize {
        use std::sync::atomic::Ordering;
        let mut n = 0;
        while n < max {
            let st = self.status(self.head).load(Ordering::Acquire);
            if st & TP_STATUS_USER == 0 {
                break;
            }
            if st & TP_STATUS_COPY != 0 {
                // the whole frame waits in the socket queue, in order
                let _ = self.copy.recv(fd, f);
            } else {
                // SAFETY: the slot belongs to us until its status is given back; it lies
                // inside the mapping.
                let slot = unsafe {
                    std::slice::from_raw_parts_mut(
                        self.base.add(self.head * RX_FRAME_SIZE),
                        RX_FRAME_SIZE,
                    )
                };
                // struct tpacket2_hdr: status, len, snaplen (u32), mac, net (u16), sec,
                // nsec (u32), vlan_tci, vlan_tpid (u16)
                let len = u32::from_ne_bytes([slot[4], slot[5], slot[6], slot[7]]) as usize;
                let snaplen = u32::from_ne_bytes([slot[8], slot[9], slot[10], slot[11]]) as usize;
                let mac = u16::from_ne_bytes([slot[12], slot[13]]) as usize;
                let tci = u16::from_ne_bytes([slot[24], slot[25]]);
                let tpid = u16::from_ne_bytes([slot[26], slot[27]]);
                let tag = (st & TP_STATUS_VLAN_VALID != 0).then(|| {
                    let tpid = if st & TP_STATUS_VLAN_TPID_VALID != 0 && tpid != 0 {
                        tpid
                    } else {
                        0x8100
                    };
                    (tpid, tci)
                });
                // a truncated frame without a copy (socket queue full) is lost
                if snaplen == len && mac >= VNET_HDR_LEN && mac + snaplen <= RX_FRAME_SIZE {
                    let mut v = [0u8; VNET_HDR_LEN];
                    v.copy_from_slice(&slot[mac - VNET_HDR_LEN..mac]);
                    deliver(slot, mac, mac + snaplen, v, tag, f);
                }
            }
            self.status(self.head)
                .store(TP_STATUS_KERNEL, Ordering::Release);
            self.head = (self.head + 1) % self.slots;
            n += 1;
        }
        n
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Reusable `sendmmsg` arrays (no allocation per flush).
#[derive(Default)]
pub struct SendBatch {
    iovs: Vec<[libc::iovec; 2]>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers are rewritten before every use and never dereferenced between
// calls.
unsafe impl Send for SendBatch {}

/// Sends frames from a flat buffer with `sendmmsg` on a PACKET_VNET_HDR socket, each behind
/// its virtio-net header (`hdrs[i]`); returns how many were sent.
pub fn sendmmsg(
    fd: RawFd,
    batch: &mut SendBatch,
    buf: &[u8],
    lens: &[usize],
    hdrs: &[[u8; VNET_HDR_LEN]],
) -> io::Result<usize> {
    batch.iovs.clear();
    let mut off = 0;
    for (&l, h) in lens.iter().zip(hdrs) {
        batch.iovs.push([
            libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: buf[off..off + l].as_ptr() as *mut libc::c_void,
                iov_len: l,
            },
        ]);
        off += l;
    }
    // SAFETY: mmsghdr is plain data.
    batch
        .hdrs
        .resize(batch.iovs.len(), unsafe { std::mem::zeroed() });
    for (h, iov) in batch.hdrs.iter_mut().zip(batch.iovs.iter_mut()) {
        h.msg_hdr.msg_iov = iov.as_mut_ptr();
        h.msg_hdr.msg_iovlen = 2;
        h.msg_len = 0;
    }
    // SAFETY: headers point at iovecs over `buf` and `hdrs`, all alive for the call; the
    // kernel only reads through them.
    let r = unsafe {
        libc::sendmmsg(
            fd,
            batch.hdrs.as_mut_ptr(),
            batch.iovs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

const PACKET_LOSS: i32 = 14;
const PACKET_TX_RING: i32 = 13;
const PACKET_QDISC_BYPASS: i32 = 20;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
/// Where a TPACKET_V2 transmit slot's data starts: the slot header rounded up to 16 bytes.
const TX_DATA_OFF: usize = 32;
/// Bytes per transmit ring slot; frames up to a 1518-byte tagged frame fit, bigger ones
/// (jumbo frames, TCP super-frames) go through `sendmmsg`.
const TX_FRAME_SIZE: usize = 2048;
/// Blocks of 64 KiB per transmit ring (16: 512 slots, 1 MiB).
const TX_BLOCKS: usize = 16;

/// The largest frame a [`TxRing`] slot carries.
pub const TX_RING_MAX_FRAME: usize = TX_FRAME_SIZE - TX_DATA_OFF - VNET_HDR_LEN;

/// A TPACKET_V2 transmit ring on a send-only packet socket of its own (protocol 0, so it
/// receives nothing; PACKET_QDISC_BYPASS, PACKET_LOSS, PACKET_VNET_HDR): frames are written
/// into shared slots and one `send(2)` per batch has the kernel transmit them all, without
/// a `msghdr`/iovec per frame. The kernel references the slot pages in the socket buffers
/// (no copy) and hands a slot back when its buffer is freed.
pub struct TxRing {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
    slots: usize,
    head: usize,
    pending: usize,
}

// SAFETY: the mapping is owned by the ring and only touched through `&mut self`.
unsafe impl Send for TxRing {}

impl TxRing {
    /// Opens the send socket on interface `name` and maps its ring.
    pub fn new(name: &str) -> io::Result<TxRing> {
        let idx = ifindex(name)?;
        // SAFETY: plain socket call; protocol 0 means the socket receives nothing.
        let fd =
            cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: fd is fresh.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0;
        sll.sll_ifindex = idx;
        // SAFETY: binds with a correctly sized sockaddr_ll.
        cvt(unsafe {
            libc::bind(
                raw,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        setsockopt_int(raw, libc::SOL_PACKET, PACKET_VERSION, TPACKET_V2)?;
        setsockopt_int(raw, libc::SOL_PACKET, PACKET_LOSS, 1)?;
        // Best effort: without it frames go through the (usually empty) qdisc.
        let _ = setsockopt_int(raw, libc::SOL_PACKET, PACKET_QDISC_BYPASS, 1);
        let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20);
        let (base, len, slots) = map_ring(raw, PACKET_TX_RING, TX_BLOCKS, TX_FRAME_SIZE)?;
        set_nonblocking(raw)?;
        Ok(TxRing {
            fd,
            base,
            len,
            slots,
            head: 0,
            pending: 0,
        })
    }

    fn status(&self, slot: usize) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: every slot starts with the u32 tp_status, 4-byte aligned inside the
        // mapping; the kernel and we hand it over with acquire/release ordering.
        unsafe { &*(self.base.add(slot * TX_FRAME_SIZE) as *const std::sync::atomic::AtomicU32) }
    }

    /// Puts one frame (at most [`TX_RING_MAX_FRAME`] bytes) behind its virtio-net header
    /// into the next slot; false when the ring is full (the kernel still holds that slot).
    pub fn put(&mut self, frame: &[u8], hdr: &[u8; VNET_HDR_LEN]) -> bool {
        use std::sync::atomic::Ordering;
        if frame.len() > TX_RING_MAX_FRAME {
            return false;
        }
        if self.status(self.head).load(Ordering::Acquire) != TP_STATUS_AVAILABLE {
            return false;
        }
        // SAFETY: the slot is ours while its status is AVAILABLE; it lies inside the
        // mapping and the frame fits (checked above).
        let slot = unsafe {
            std::slice::from_raw_parts_mut(self.base.add(self.head * TX_FRAME_SIZE), TX_FRAME_SIZE)
        };
        let len = VNET_HDR_LEN + frame.len();
        slot[4..8].copy_from_slice(&(len as u32).to_ne_bytes()); // tp_len
        slot[TX_DATA_OFF..TX_DATA_OFF + VNET_HDR_LEN].copy_from_slice(hdr);
        if hdr[1] == 0 {
            // Not a GSO frame: `hdr_len` = the whole frame makes the kernel copy it into the
            // socket buffer's linear part instead of referencing the slot's page as a
            // zero-copy fragment. A virtual peer (veth) must copy such fragments anyway,
            // into a freshly allocated page per frame (`skb_copy_ubufs`); one copy into the
            // buffer the kernel allocates anyway is cheaper. (A physical NIC loses the
            // zero-copy of at most 2 KiB per frame.)
            let hl = (frame.len() as u16).to_le_bytes();
            slot[TX_DATA_OFF + 2..TX_DATA_OFF + 4].copy_from_slice(&hl);
        }
        slot[TX_DATA_OFF + VNET_HDR_LEN..TX_DATA_OFF + len].copy_from_slice(frame);
        self.status(self.head)
            .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.head = (self.head + 1) % self.slots;
        self.pending += 1;
        true
    }

    /// True when frames were put but not yet handed to the kernel by a successful kick.
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Has the kernel send every frame put since the last kick (one system call).
    pub fn kick(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        // SAFETY: a zero-length send on the ring socket; no buffer is passed.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // frames the kernel could not take yet stay requested; the next kick retries
            return Err(e);
        }
        self.pending = 0;
        Ok(())
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
