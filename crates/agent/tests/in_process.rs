//! The vireo-guest dispatcher and transport in-process against AgentClient: stale data
//! and garbage on the channel, timeouts and resync, absent/hung/restarted agents and the
//! heartbeat they produce, FakeGuest's simulated actions, and a real filesystem freeze.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::framing::{Frame, Splitter};
use agent::guest::{transport, Server, ServerConfig, SystemMode};
use agent::protocol::{FsfreezeStatus, Request};
use agent::testing::FakeGuest;
use agent::{AgentClient, ClientOptions, ErrorKind, Heartbeat, HeartbeatState, ShutdownMode};

fn quick_client(socket: &Path) -> AgentClient {
    AgentClient::with_options(
        socket,
        ClientOptions {
            call_timeout: Duration::from_millis(400),
            sync_timeout: Duration::from_millis(400),
            ..Default::default()
        },
    )
}

fn sim_server(dir: &Path) -> Arc<Server> {
    Arc::new(Server::new(ServerConfig {
        kvp_root: dir.join("kvp"),
        blocked: Vec::new(),
        system: SystemMode::Simulated,
    }))
}

/// A peer that first writes `preamble` (stale data), then serves requests with the real
/// dispatcher, sleeping `delay` before answering the first request named `slow`.
fn scripted_peer(
    socket: PathBuf,
    server: Arc<Server>,
    preamble: Vec<u8>,
    slow: Option<(&'static str, Duration)>,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(&preamble).unwrap();
        let mut slow = slow;
        let mut sp = Splitter::default();
        let mut buf = [0u8; 4096];
        let mut frames = Vec::new();
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            sp.feed(&buf[..n], &mut frames);
            for f in frames.drain(..) {
                let Frame::Text(t) = f else { continue };
                let req: Request = serde_json::from_slice(&t).unwrap();
                if let Some((name, d)) = slow {
                    if req.execute == name {
                        std::thread::sleep(d);
                        slow = None;
                    }
                }
                if let Some(r) = server.handle(&t) {
                    if conn.write_all(&r).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Garbage, a stale delimited reply with another id and half a JSON object waiting in
/// the channel do not confuse the session start.
#[tokio::test]
async fn sync_skips_garbage_and_stale_replies() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mut pre = b"}}]garbage {\"return\": {}}\n".to_vec();
    pre.push(0xFF);
    pre.extend(b"{\"return\": 7}\n{\"return\": {\"version\": \"x\", ");
    let t = scripted_peer(sock.clone(), sim_server(dir.path()), pre, None);
    let c = common::client(&sock);
    c.ping().await.unwrap();
    assert_eq!(
        c.hostname().await.unwrap(),
        common::proc_text("/proc/sys/kernel/hostname")
    );
    drop(c);
    t.join().unwrap();
}

/// After a call times out, the late reply is discarded by the resync and the next call
/// gets its own answer.
#[tokio::test]
async fn timeout_then_resync_discards_late_reply() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let t = scripted_peer(
        sock.clone(),
        sim_server(dir.path()),
        Vec::new(),
        Some(("guest-info", Duration::from_millis(1200))),
    );
    let c = AgentClient::with_options(
        &sock,
        ClientOptions {
            call_timeout: Duration::from_millis(300),
            sync_timeout: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let e = c.info().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    // A stale guest-info reply would not decode as the time.
    let t_ns = c.get_time().await.unwrap();
    assert!(t_ns > 1_600_000_000_000_000_000);
    assert_eq!(
        c.hostname().await.unwrap(),
        common::proc_text("/proc/sys/kernel/hostname")
    );
    drop(c);
    t.join().unwrap();
}

/// Heartbeat from real pings: no agent answering -> no-contact; agent answers -> ok; agent
/// hangs -> lost after `lost_after`; it comes back -> ok.
#[tokio::test]
async fn heartbeat_from_real_pings() {
    let g = FakeGuest::start().unwrap();
    g.set_muted(true);
    let c = quick_client(g.socket_path());
    let mut hb = Heartbeat::new(Duration::from_millis(1500));
    for _ in 0..3 {
        let ok = c.ping().await.is_ok();
        assert!(!ok);
        hb.observe(Instant::now(), ok);
    }
    assert_eq!(hb.state(Instant::now()), HeartbeatState::NoContact);

    g.set_muted(false);
    let ok = c.ping().await.is_ok();
    assert_eq!(
        hb.observe(Instant::now(), ok),
        Some((HeartbeatState::NoContact, HeartbeatState::Ok))
    );

    g.set_muted(true);
    let start = Instant::now();
    let mut changes = Vec::new();
    while start.elapsed() < Duration::from_secs(3) {
        let ok = c.ping().await.is_ok();
        assert!(!ok);
        changes.extend(hb.observe(Instant::now(), ok));
    }
    assert_eq!(changes, [(HeartbeatState::Ok, HeartbeatState::Lost)]);

    g.set_muted(false);
    let ok = c.ping().await.is_ok();
    assert_eq!(
        hb.observe(Instant::now(), ok),
        Some((HeartbeatState::Lost, HeartbeatState::Ok))
    );
}

/// The socket going away and coming back (worker or QEMU restart) costs one failed call.
#[tokio::test]
async fn reconnects_after_socket_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = sim_server(dir.path());
    let run = |stop: Arc<AtomicBool>| {
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let s = server.clone();
        std::thread::spawn(move || transport::serve_listener(&s, &l, &stop).unwrap())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let t = run(stop.clone());
    let c = quick_client(&sock);
    c.ping().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    std::fs::remove_file(&sock).unwrap();
    let e = c.ping().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let stop = Arc::new(AtomicBool::new(false));
    let t = run(stop.clone());
    c.ping().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    drop(c);
    t.join().unwrap();
}

/// FakeGuest records shutdowns, offsets the clock on set-time and flips the freeze flag,
/// and blocks writes while "frozen" as the real agent does.
#[tokio::test]
async fn fake_guest_simulated_actions() {
    let g = FakeGuest::start().unwrap();
    let c = common::client(g.socket_path());
    c.shutdown(ShutdownMode::Halt).await.unwrap();
    c.shutdown(ShutdownMode::Powerdown).await.unwrap();
    c.ping().await.unwrap();
    assert_eq!(
        g.shutdown_requests(),
        [ShutdownMode::Halt, ShutdownMode::Powerdown]
    );
    let target = 1_000_000_000_000_000_000i64; // 2001-09-09
    c.set_time(Some(target)).await.unwrap();
    let t = c.get_time().await.unwrap();
    assert!((t - target).abs() < 5_000_000_000);
    assert_eq!(c.fsfreeze_freeze().await.unwrap(), 1);
    assert_eq!(c.fsfreeze_status().await.unwrap(), FsfreezeStatus::Frozen);
    let e = c.kvp_set("k", "v").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(g.kvp().get(agent::KvpPool::Host, "k").unwrap().is_none());
    c.ping().await.unwrap();
    assert_eq!(c.fsfreeze_thaw().await.unwrap(), 1);
    c.kvp_set("k", "v").await.unwrap();
    assert_eq!(
        g.kvp().get(agent::KvpPool::Host, "k").unwrap().as_deref(),
        Some("v")
    );
    g.publish("from-guest", "1").unwrap();
    assert_eq!(
        c.kvp_get(agent::KvpPool::Guest, "from-guest")
            .await
            .unwrap(),
        Some("1".into())
    );
}

struct LoopMount {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // Only matters if the test failed while frozen.
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

fn sh(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Real FIFREEZE/FITHAW on a loop-mounted ext4: while frozen a write+fsync blocks and
/// ordinary commands are refused; thaw lets the write finish with the right contents.
#[tokio::test]
async fn real_fsfreeze_on_loop_ext4() {
    for tool in ["mkfs.ext4", "mount", "umount", "fsfreeze"] {
        assert!(
            std::process::Command::new("which")
                .arg(tool)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
            "{tool} missing: run scripts/setup.sh"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    sh(std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg("-F")
        .arg(&img));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let lm = LoopMount { dir, mnt };
    let mnt = lm.mnt.clone();

    // Real system mode, but whole-system freeze and the rest blocked: only the
    // mountpoint list we pass can be frozen on this host.
    let server = Arc::new(Server::new(ServerConfig {
        kvp_root: lm.dir.path().join("kvp"),
        blocked: common::DANGEROUS
            .split(',')
            .filter(|c| *c != "guest-fsfreeze-freeze-list" && *c != "guest-fsfreeze-thaw")
            .map(String::from)
            .collect(),
        system: SystemMode::Real,
    }));
    let sock = lm.dir.path().join("s");
    let l = UnixListener::bind(&sock).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, st2) = (server.clone(), stop.clone());
    let t = std::thread::spawn(move || transport::serve_listener(&s2, &l, &st2).unwrap());
    let c = common::client(&sock);

    let e = c.fsfreeze_freeze().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let n = c
        .fsfreeze_freeze_list(&[mnt.to_string_lossy().into_owned()])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(c.fsfreeze_status().await.unwrap(), FsfreezeStatus::Frozen);
    let e = c
        .exec(&agent::RunRequest::from_argv(&["true"]).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");

    let data = common::pattern(1 << 20, 7);
    let (path, d2) = (mnt.join("file"), data.clone());
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&d2).unwrap();
        f.sync_all().unwrap();
        done2.store(true, Ordering::SeqCst);
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "write completed on a frozen fs"
    );
    assert_eq!(c.fsfreeze_thaw().await.unwrap(), 1);
    writer.join().unwrap();
    assert_eq!(c.fsfreeze_status().await.unwrap(), FsfreezeStatus::Thawed);
    let back = std::fs::read(mnt.join("file")).unwrap();
    assert_eq!(common::fnv(&back), common::fnv(&data));

    stop.store(true, Ordering::SeqCst);
    drop(c);
    t.join().unwrap();
    drop(lm);
}
