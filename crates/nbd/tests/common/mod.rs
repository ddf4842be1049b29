//! Shared helpers for the nbd integration tests: an in-process server on a
//! unix socket in a temp dir, external tool runner, and a raw protocol client.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nbd::{Export, Server, ServerConfig};

/// Fails (never skips) when a peer tool is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run scripts/setup.sh (Debian packages libnbd-bin, python3-libnbd, qemu-utils, fio)");
}

/// Runs a tool with a time limit, returning its output; panics with stderr on failure.
pub fn run_ok(tool: &str, args: &[&str]) -> Output {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a tool with a 120 s limit.
pub fn run(tool: &str, args: &[&str]) -> Output {
    require(tool);
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg("120")
        .arg(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"))
}

/// An in-process NBD server on its own runtime thread.
pub struct TestServer {
    pub server: Server,
    pub socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves `exports` on `socket` with the default configuration.
    pub fn start(socket: &Path, exports: Vec<(&str, Arc<dyn Export>)>) -> TestServer {
        TestServer::start_with(socket, exports, ServerConfig::default())
    }

    /// Serves `exports` on `socket` with `config`.
    pub fn start_with(
        socket: &Path,
        exports: Vec<(&str, Arc<dyn Export>)>,
        config: ServerConfig,
    ) -> TestServer {
        let server = Server::new(config).expect("server config");
        for (name, e) in exports {
            server.add_export(name, e).expect("add export");
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = server.clone();
        let path = socket.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = nbd::bind_unix(&path).expect("bind");
                ready_tx.send(()).expect("ready");
                s.serve_unix(listener).await.expect("serve");
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server did not start");
        TestServer {
            server,
            socket: socket.to_path_buf(),
            thread: Some(thread),
        }
    }

    /// `nbd+unix` URI of an export.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Graceful shutdown; waits for the server thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.server.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sparse raw image: `size` bytes with random data at each `(offset, len)`.
pub fn make_image(path: &Path, size: u64, data: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    for (i, (off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(*len, i as u64 + 1), *off)
            .expect("fill image");
    }
}

// ---- raw protocol client -------------------------------------------------

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

pub fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

/// Reads the greeting and sends client flags (fixed newstyle, no zeroes).
pub fn greet(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
}

pub fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).expect("send option");
}

/// Reads one option reply: (option, type, data).
pub fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).expect("option reply data");
    (opt, kind, d)
}

/// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
pub fn handshake(s: &mut UnixStream, name: &str, structured: bool) -> (u64, u16) {
    greet(s);
    if structured {
        send_option(s, 8, &[]);
        assert_eq!(read_option_reply(s).1, 1, "structured reply ACK");
    }
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, 7, &d);
    let mut info = None;
    loop {
        let (_, kind, data) = read_option_reply(s);
        match kind {
            3 if data[..2] == [0, 0] => {
                info = Some((
                    u64::from_be_bytes(data[2..10].try_into().unwrap()),
                    u16::from_be_bytes(data[10..12].try_into().unwrap()),
                ))
            }
            3 => {}
            1 => break,
            k => panic!(
                "GO failed with reply type {k:#x}: {}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    info.expect("NBD_INFO_EXPORT")
}

pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Reads a simple reply header: (error, cookie).
pub fn read_simple(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("simple reply");
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE_MAGIC);
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// Reads one structured chunk: (flags, type, cookie, payload).
pub fn read_chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("structured reply");
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().unwrap()),
        STRUCTURED_MAGIC
    );
    let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
    let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).expect("chunk payload");
    (flags, kind, cookie, d)
}

/// True when the peer has closed the connection (EOF or reset).
pub fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    }
}

/// Checks the server still serves a normal client: write then read back.
pub fn healthy(socket: &Path, name: &str) {
    let mut s = connect(socket);
    let (size, _) = handshake(&mut s, name, false);
    assert!(size >= 4096);
    let data = pattern(4096, 99);
    let mut w = request(1, 0, 1, 0, 4096);
    w.extend_from_slice(&data);
    s.write_all(&w).unwrap();
    assert_eq!(read_simple(&mut s), (0, 1));
    s.write_all(&request(0, 0, 2, 0, 4096)).unwrap();
    assert_eq!(read_simple(&mut s), (0, 2));
    let mut back = vec![0u8; 4096];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data, "data read back differs");
    s.write_all(&request(2, 0, 3, 0, 0)).unwrap();
}

/// Resident memory of this process in bytes.
pub fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
