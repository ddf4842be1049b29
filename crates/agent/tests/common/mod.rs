//! Helpers shared by the agent's integration tests: real peers (qemu-ga, the vireo-guest
//! binary) started on unix sockets, and host facts to compare their answers with.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::{AgentClient, ClientOptions};

/// Commands that must never run against the host itself.
pub const DANGEROUS: &str = "guest-shutdown,guest-set-time,guest-fsfreeze-freeze,\
guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,guest-suspend-disk,guest-suspend-ram,\
guest-suspend-hybrid,guest-set-user-password,guest-set-vcpus,guest-set-memory-blocks";

/// A peer process serving a unix socket; killed on drop.
pub struct PeerProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(p: &mut PeerProcess) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.socket.exists() {
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!("peer exited early: {st}");
        }
        assert!(Instant::now() < deadline, "peer socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Debian's qemu-ga 7.2 in `unix-listen` mode, with every command that would touch the
/// host (shutdown, clock, freeze...) disabled.
pub fn start_qemu_ga() -> PeerProcess {
    let bin = Path::new("/usr/sbin/qemu-ga");
    assert!(
        bin.exists(),
        "/usr/sbin/qemu-ga is missing: run scripts/setup.sh (package qemu-guest-agent)"
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("qemu-ga.conf");
    std::fs::write(&conf, "").unwrap();
    let socket = dir.path().join("qga.sock");
    let child = Command::new(bin)
        .env("QGA_CONF", &conf)
        .arg("-m")
        .arg("unix-listen")
        .arg("-p")
        .arg(&socket)
        .arg("-f")
        .arg(dir.path().join("qga.pid"))
        .arg("-t")
        .arg(dir.path())
        .arg("-b")
        .arg(DANGEROUS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-ga");
    let mut p = PeerProcess { child, dir, socket };
    wait_for_socket(&mut p);
    p
}

/// Path of the vireo-guest binary cargo built for these tests.
pub fn vireo_guest_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vireo-guest")
}

/// The vireo-guest binary in `--listen` mode with simulated system actions.
pub fn start_vireo_guest() -> PeerProcess {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qga.sock");
    let child = Command::new(vireo_guest_bin())
        .arg("--listen")
        .arg(&socket)
        .arg("--simulate")
        .arg("--kvp-dir")
        .arg(dir.path().join("kvp"))
        .arg("--log")
        .arg(dir.path().join("log"))
        .stdin(Stdio::null())
        .spawn()
        .expect("starting vireo-guest");
    let mut p = PeerProcess { child, dir, socket };
    wait_for_socket(&mut p);
    p
}

/// A client with short timeouts for tests.
pub fn client(socket: &Path) -> AgentClient {
    AgentClient::with_options(
        socket,
        ClientOptions {
            call_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
}

/// A host fact from /proc.
pub fn proc_text(p: &str) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

/// A cheap content checksum (FNV-1a 64).
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
