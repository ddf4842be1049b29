//! Malformed, out-of-range and abusive clients: each gets the protocol's
//! error (or a dropped connection where the protocol requires it), nothing
//! changes in the export, and the server keeps serving other clients.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::{Export, ExportFlags, MemExport, ServerConfig};

const MIB: u64 = 1 << 20;

fn mem_server(dir: &std::path::Path) -> TestServer {
    let rw: Arc<dyn Export> = Arc::new(MemExport::new(64 * MIB));
    let ro: Arc<dyn Export> = Arc::new(MemExport::from_bytes(&pattern(MIB as usize, 5), true));
    TestServer::start(&dir.join("nbd.sock"), vec![("rw", rw), ("ro", ro)])
}

/// libnbd in non-strict mode: out-of-range, oversized, wrongly flagged and
/// read-only-violating requests get EINVAL/ENOSPC/EPERM; data is unchanged;
/// the connection and the server stay usable.
#[test]
fn libnbd_non_strict_requests() {
    require("python3");
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hostile_libnbd.py");
    let out = std::process::Command::new("timeout")
        .args([
            "120",
            "/usr/bin/python3",
            script,
            &srv.uri("rw"),
            &srv.uri("ro"),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "hostile libnbd script failed (needs python3-libnbd: scripts/setup.sh)\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = srv.server.stats("rw").unwrap();
    assert!(st.errors >= 12, "{st:?}");
    healthy(&srv.socket, "rw");
}

/// Garbage instead of an option, a bad request magic, a truncated header,
/// unknown client flags: the connection is dropped, the server lives on.
#[test]
fn garbage_drops_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());

    let mut s = connect(&srv.socket);
    greet(&mut s);
    s.write_all(b"GARBAGE!GARBAGE!").unwrap();
    assert!(closed(&mut s), "bad option magic must drop the connection");

    let mut s = connect(&srv.socket);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(
        closed(&mut s),
        "unknown client flags must drop the connection"
    );

    let mut s = connect(&srv.socket);
    handshake(&mut s, "rw", true);
    s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    s.write_all(&[0u8; 24]).unwrap();
    assert!(closed(&mut s), "bad request magic must drop the connection");

    let mut s = connect(&srv.socket);
    handshake(&mut s, "rw", false);
    s.write_all(&request(0, 0, 1, 0, 512)[..10]).unwrap();
    drop(s);

    let mut s = connect(&srv.socket);
    greet(&mut s);
    send_option(&mut s, 1, b"no-such-export");
    assert!(
        closed(&mut s),
        "EXPORT_NAME of an unknown export must drop the connection"
    );

    healthy(&srv.socket, "rw");
}

/// Option haggling: STARTTLS refused with POLICY, unknown options UNSUP,
/// bad GO data INVALID, unknown export UNKNOWN, a 1 MiB option skipped with
/// TOO_BIG, a 4 GiB option length drops the connection; the old
/// EXPORT_NAME path still works.
#[test]
fn option_haggling_errors() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let mut s = connect(&srv.socket);
    greet(&mut s);
    send_option(&mut s, 5, &[]);
    assert_eq!(
        read_option_reply(&mut s).1,
        0x8000_0002,
        "STARTTLS -> ERR_POLICY"
    );
    send_option(&mut s, 99, b"whatever");
    assert_eq!(
        read_option_reply(&mut s).1,
        0x8000_0001,
        "unknown -> ERR_UNSUP"
    );
    send_option(&mut s, 7, &[0, 0, 0, 200, b'x']);
    assert_eq!(
        read_option_reply(&mut s).1,
        0x8000_0003,
        "truncated GO -> ERR_INVALID"
    );
    send_option(&mut s, 7, &[0, 0, 0, 3, b'n', b'o', b'p', 0, 0]);
    assert_eq!(
        read_option_reply(&mut s).1,
        0x8000_0006,
        "unknown export -> ERR_UNKNOWN"
    );
    send_option(&mut s, 10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        read_option_reply(&mut s).1,
        0x8000_0003,
        "SET_META_CONTEXT before structured -> ERR_INVALID"
    );
    send_option(&mut s, 3, &vec![7u8; MIB as usize]);
    assert_eq!(
        read_option_reply(&mut s).1,
        0x8000_0009,
        "1 MiB option -> ERR_TOO_BIG"
    );
    send_option(&mut s, 3, &[]);
    let mut names = Vec::new();
    loop {
        let (_, kind, d) = read_option_reply(&mut s);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 2);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["ro", "rw"]);
    // Old clients: EXPORT_NAME, then size + flags (no zeroes negotiated).
    send_option(&mut s, 1, b"ro");
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), MIB);
    assert_ne!(
        u16::from_be_bytes(r[8..].try_into().unwrap()) & 2,
        0,
        "read-only flag"
    );
    s.write_all(&request(0, 0, 5, 4096, 4096)).unwrap();
    assert_eq!(read_simple(&mut s), (0, 5));
    let mut d = vec![0u8; 4096];
    s.read_exact(&mut d).unwrap();
    assert_eq!(d, pattern(MIB as usize, 5)[4096..8192]);

    let mut s = connect(&srv.socket);
    greet(&mut s);
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&3u32.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&v).unwrap();
    assert!(closed(&mut s), "4 GiB option must drop the connection");
    healthy(&srv.socket, "rw");
}

/// A client sending options forever is cut off after the option limit.
#[test]
fn endless_options_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let mut s = connect(&srv.socket);
    greet(&mut s);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&99u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        for _ in 0..10_000 {
            if w.write_all(&opt).is_err() {
                return;
            }
        }
    });
    let mut replies = 0;
    let mut h = [0u8; 20];
    while s.read_exact(&mut h).is_ok() {
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut msg = vec![0u8; len as usize];
        if s.read_exact(&mut msg).is_err() {
            break;
        }
        assert_eq!(
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            0x8000_0001
        );
        replies += 1;
    }
    writer.join().unwrap();
    assert_eq!(
        replies, 4096,
        "server answers up to its option limit, then closes"
    );
    healthy(&srv.socket, "rw");
}

/// Unknown commands and flags get EINVAL; an oversized write has its
/// payload skipped and gets EINVAL; the connection stays in sync.
#[test]
fn bad_requests_keep_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let mut s = connect(&srv.socket);
    handshake(&mut s, "rw", false);
    s.write_all(&request(42, 0, 1, 0, 512)).unwrap();
    assert_eq!(read_simple(&mut s), (22, 1));
    s.write_all(&request(3, 0x80, 2, 0, 0)).unwrap();
    assert_eq!(read_simple(&mut s), (22, 2));
    // BLOCK_STATUS without a negotiated context.
    s.write_all(&request(7, 0, 3, 0, 512)).unwrap();
    assert_eq!(read_simple(&mut s), (22, 3));
    let big = 33 * MIB as usize;
    let mut w = request(1, 0, 4, 0, big as u32);
    w.extend_from_slice(&vec![0xeeu8; big]);
    s.write_all(&w).unwrap();
    assert_eq!(read_simple(&mut s), (22, 4));
    s.write_all(&request(0, 0, 5, 0, 4096)).unwrap();
    assert_eq!(read_simple(&mut s), (0, 5));
    let mut d = vec![1u8; 4096];
    s.read_exact(&mut d).unwrap();
    assert!(
        d.iter().all(|b| *b == 0),
        "refused write must not change data"
    );
    // Structured: a refused read gets an error chunk, never a simple reply.
    let mut s = connect(&srv.socket);
    handshake(&mut s, "rw", true);
    s.write_all(&request(0, 0, 6, 64 * MIB, 1)).unwrap();
    let (flags, kind, cookie, p) = read_chunk(&mut s);
    assert_eq!((flags & 1, kind, cookie), (1, 0x8001, 6));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 22);
    s.write_all(&request(0, 0, 7, 0, 0)).unwrap();
    let (flags, kind, cookie, _) = read_chunk(&mut s);
    assert_eq!(
        (flags & 1, kind, cookie),
        (1, 0, 7),
        "zero-length read: NONE chunk"
    );
}

/// An export whose reads at offset 0 are slow.
struct SlowFirstBlock(MemExport);

impl Export for SlowFirstBlock {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn flags(&self) -> ExportFlags {
        self.0.flags()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        if off == 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> std::io::Result<()> {
        self.0.write_at(buf, off, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Requests run concurrently and replies come back in completion order:
/// a fast read sent after a slow one is answered first.
#[test]
fn replies_complete_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let e: Arc<dyn Export> = Arc::new(SlowFirstBlock(MemExport::new(MIB)));
    let srv = TestServer::start(&dir.path().join("s"), vec![("", e)]);
    let mut s = connect(&srv.socket);
    handshake(&mut s, "", true);
    let mut reqs = request(0, 0, 1, 0, 4096);
    reqs.extend_from_slice(&request(0, 0, 2, 4096, 4096));
    s.write_all(&reqs).unwrap();
    let first = read_chunk(&mut s);
    let second = read_chunk(&mut s);
    assert_eq!(
        (first.2, second.2),
        (2, 1),
        "fast read must overtake the slow one"
    );
    assert_eq!(first.1, 1);
    assert_eq!(first.3.len(), 8 + 4096);
}

/// A client that sends 1 MiB reads but never reads the replies makes the
/// server stop reading it: memory stays bounded, and another client is
/// served normally meanwhile.
#[test]
fn client_that_never_reads_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let e: Arc<dyn Export> = Arc::new(MemExport::from_bytes(&pattern(64 * MIB as usize, 1), false));
    let cfg = ServerConfig {
        max_buffered: 40 << 20,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&dir.path().join("s"), vec![("", e)], cfg);
    let before = rss();
    let mut s = connect(&srv.socket);
    handshake(&mut s, "", false);
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(None).unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent2 = sent.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..4096u64 {
            if w.write_all(&request(0, 0, i, (i % 64) * MIB, MIB as u32))
                .is_err()
            {
                return;
            }
            sent2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Let the server fill its budget and the socket buffers.
    let start = Instant::now();
    let mut last = u64::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = sent.load(std::sync::atomic::Ordering::Relaxed);
        if now == last || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        last = now;
    }
    let stuck_at = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        stuck_at < 4096,
        "the server kept reading a client that never reads replies"
    );
    healthy(&srv.socket, "");
    let grown = rss().saturating_sub(before);
    assert!(grown < 200 * MIB, "memory grew by {} MiB", grown / MIB);
    s.shutdown(Shutdown::Both).unwrap();
    writer.join().unwrap();
    healthy(&srv.socket, "");
}

/// Reads beyond the first MiB take 250 ms each.
struct SlowHigh(MemExport, Arc<std::sync::atomic::AtomicU64>);

impl Export for SlowHigh {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn flags(&self) -> ExportFlags {
        self.0.flags()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        if off >= MIB {
            std::thread::sleep(Duration::from_millis(250));
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> std::io::Result<()> {
        self.0.write_at(buf, off, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A client that floods slow requests uses only its own I/O threads: a
/// second client's requests complete while most of the flood is still
/// queued.
#[test]
fn flooding_client_does_not_starve_others() {
    let dir = tempfile::tempdir().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let e: Arc<dyn Export> = Arc::new(SlowHigh(MemExport::new(4 * MIB), done.clone()));
    let srv = TestServer::start(&dir.path().join("s"), vec![("", e)]);
    let mut flood = connect(&srv.socket);
    handshake(&mut flood, "", false);
    let mut reqs = Vec::new();
    for i in 0..64u64 {
        reqs.extend_from_slice(&request(0, 0, i, MIB + i * 4096, 4096));
    }
    flood.write_all(&reqs).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..5 {
        healthy(&srv.socket, "");
    }
    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        finished < 64,
        "other clients waited for the whole flood ({finished} of 64 done)"
    );
    for _ in 0..64 {
        let (err, _) = read_simple(&mut flood);
        assert_eq!(err, 0);
        let mut d = vec![0u8; 4096];
        flood.read_exact(&mut d).unwrap();
    }
}
