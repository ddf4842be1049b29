//! Restart on the same socket path: QEMU's NBD client (qemu-io with
//! reconnect-delay) rides through a server restart without an I/O error,
//! and data written before, during and after is intact. Also: graceful
//! shutdown answers in-flight requests, and socket takeover rules.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::{Export, ExportFlags, FileExport, MemExport};

const MIB: usize = 1 << 20;

fn serve_file(socket: &std::path::Path, img: &std::path::Path) -> TestServer {
    let e: Arc<dyn Export> = Arc::new(FileExport::open(img, false).unwrap());
    TestServer::start(socket, vec![("", e)])
}

/// qemu-io keeps one NBD connection with reconnect; the server is stopped
/// and a new one started on the same path. A write and a read issued while
/// no server runs wait and complete after the restart; nothing errors.
#[test]
fn qemu_reconnects_across_restart() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    make_image(&img, 16 * MIB as u64, &[]);
    let first = serve_file(&sock, &img);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},reconnect-delay=20",
        sock.display()
    );
    let mut qemu = Command::new("timeout")
        .args(["-k", "5", "90", "qemu-io", "--image-opts", &opts])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = qemu.stdin.take().unwrap();
    let mut stdout = qemu.stdout.take().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let seen2 = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen2
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    // qemu-io reads stdin with buffered fgets: send a line only when it
    // shows its prompt, or queued lines wait for the next wakeup.
    let mut sent = 0;
    let mut say = |cmd: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().matches("qemu-io> ").count() <= sent {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io stuck before {cmd:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stdin.write_all(cmd.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
        sent += 1;
    };
    say("write -P 0x5a 0 1M");
    say("flush");
    // Wait for the flush to complete (next prompt), then stop the server.
    say("");
    first.stop();
    assert!(sock.exists(), "socket path stays for the next server");
    // Issued while no server runs: waits for the reconnect.
    say("write -P 0x6b 1M 1M");
    std::thread::sleep(Duration::from_millis(1500));
    let second = serve_file(&sock, &img);
    say("read -P 0x5a 0 1M");
    say("read -P 0x6b 1M 1M");
    say("write -P 0x7c 2M 64k");
    say("flush");
    say("quit");
    drop(stdin);
    let status = qemu.wait().unwrap();
    reader.join().unwrap();
    let text = seen.lock().unwrap().clone();
    let mut err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "qemu-io failed: {text}\n{err}");
    assert!(
        !text.contains("failed") && !text.to_lowercase().contains("error"),
        "{text}\n{err}"
    );
    assert_eq!(text.matches("wrote ").count(), 3, "{text}");
    assert_eq!(text.matches("read ").count(), 2, "{text}");
    drop(second);
    let data = std::fs::read(&img).unwrap();
    assert!(data[..MIB].iter().all(|b| *b == 0x5a));
    assert!(data[MIB..2 * MIB].iter().all(|b| *b == 0x6b));
    assert!(data[2 * MIB..2 * MIB + 65536].iter().all(|b| *b == 0x7c));
    assert!(data[2 * MIB + 65536..].iter().all(|b| *b == 0));
}

struct Slow(MemExport);

impl Export for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn flags(&self) -> ExportFlags {
        self.0.flags()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(700));
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> std::io::Result<()> {
        self.0.write_at(buf, off, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Shutdown while a request is in flight: the client still gets its reply
/// (with the right data), then the connection closes.
#[test]
fn shutdown_answers_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(MIB, 3);
    let e: Arc<dyn Export> = Arc::new(Slow(MemExport::from_bytes(&data, false)));
    let srv = TestServer::start(&dir.path().join("s"), vec![("", e)]);
    let mut s = connect(&srv.socket);
    handshake(&mut s, "", false);
    s.write_all(&request(0, 0, 9, 8192, 4096)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stopper = std::thread::spawn(move || srv.stop());
    assert_eq!(read_simple(&mut s), (0, 9));
    let mut d = vec![0u8; 4096];
    s.read_exact(&mut d).unwrap();
    assert_eq!(d, data[8192..12288]);
    assert!(closed(&mut s));
    stopper.join().unwrap();
}

/// bind_unix refuses a path with a live server and a path that is not a
/// socket (left untouched), and takes over a stale socket.
#[test]
fn socket_takeover_rules() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let e: Arc<dyn Export> = Arc::new(MemExport::new(MIB as u64));
    let srv = TestServer::start(&sock, vec![("", e.clone())]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async { nbd::bind_unix(&sock).map(|_| ()) })
        .unwrap_err();
    assert_eq!(err.kind(), nbd::ErrorKind::Busy, "{err}");
    srv.stop();
    // A stale socket file from a dead server.
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("stale")).unwrap();
    drop(stale);
    let srv = TestServer::start(&dir.path().join("stale"), vec![("", e)]);
    healthy(&srv.socket, "");
    let file = dir.path().join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    let err = rt
        .block_on(async { nbd::bind_unix(&file).map(|_| ()) })
        .unwrap_err();
    assert_eq!(err.kind(), nbd::ErrorKind::Invalid);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
