//! Test harness: a `vireo-switch` child process with a tiny HTTP-over-unix client, network
//! namespaces joined by veth pairs, and a QEMU-like stream peer.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique tag for interface and namespace names (pid-based: tests of other
/// engineers run on the same host).
pub fn tag() -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    format!("{:x}{}", std::process::id() % 0xfff, n)
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns whether it succeeded.
pub fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fails (not skips) when a tool the test needs is missing.
pub fn require(tool: &str) {
    assert!(
        sh_ok(&format!("command -v {tool}")),
        "{tool} is missing: run scripts/setup.sh (it installs the test tools)"
    );
    assert!(
        nix_is_root(),
        "network tests need root (they create namespaces and interfaces)"
    );
}

fn nix_is_root() -> bool {
    sh("id -u").trim() == "0"
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = sh_ok(&format!("ip netns del {name}"));
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        Netns {
            name: name.to_string(),
        }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }

    pub fn exec_ok(&self, cmd: &str) -> bool {
        sh_ok(&format!("ip netns exec {} {cmd}", self.name))
    }

    /// Creates a veth pair: `inner` (in this namespace, with `addr` if given) and `outer`
    /// (in the root namespace, up, no address). Returns the inner MAC.
    pub fn veth(&self, inner: &str, outer: &str, addr: Option<&str>) -> String {
        let _ = sh_ok(&format!("ip link del {outer}"));
        sh(&format!(
            "ip link add {outer} type veth peer name {inner} netns {}",
            self.name
        ));
        sh(&format!("ip link set {outer} up"));
        sh(&format!("ip -n {} link set {inner} up", self.name));
        if let Some(a) = addr {
            sh(&format!("ip -n {} addr add {a} dev {inner}", self.name));
        }
        self.exec(&format!("cat /sys/class/net/{inner}/address"))
            .trim()
            .to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh_ok(&format!("ip netns pids {} | xargs -r kill -9", self.name));
        let _ = sh_ok(&format!("ip netns del {}", self.name));
    }
}

/// Deletes a root-namespace link on drop.
pub struct Link(pub String);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = sh_ok(&format!("ip link del {}", self.0));
    }
}

/// A running `vireo-switch`.
pub struct Switch {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vireo-switch")
}

impl Switch {
    /// Starts a switch from a config JSON in a fresh run dir.
    pub fn start(cfg: Value) -> Switch {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg_path = dir.path().join("config.json");
        std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let control = dir.path().join("control.sock");
        let mut s = Switch {
            child: None,
            dir,
            control,
        };
        s.spawn(Some(&cfg_path));
        s
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// (Re)starts the process on the same run dir.
    pub fn spawn(&mut self, cfg: Option<&Path>) {
        let mut c = Command::new(bin());
        c.arg("--control")
            .arg(&self.control)
            .arg("--run-dir")
            .arg(self.run_dir());
        if let Some(p) = cfg {
            c.arg("--config").arg(p);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("switch.log"))
            .unwrap();
        c.stdout(Stdio::null())
            .stderr(log)
            .env("VIREO_LOG", "debug");
        self.child = Some(c.spawn().expect("spawning vireo-switch"));
        let t0 = Instant::now();
        loop {
            if UnixStream::connect(&self.control).is_ok() {
                break;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("vireo-switch exited early with {st}: {}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "switch did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process hard (no cleanup: like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("switch.log")).unwrap_or_default()
    }

    /// One HTTP request on the control socket; returns status and JSON body (Null if empty).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut s = UnixStream::connect(&self.control).expect("connecting to control socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let b = body
            .map(|b| serde_json::to_vec(&b).unwrap())
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: switch\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            b.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(&b).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let text = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = body.trim();
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or(json!(body))
        };
        (status, v)
    }

    /// API call that must succeed (2xx).
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (st, v) = self.api(method, path, body);
        assert!(
            (200..300).contains(&st),
            "{method} {path} -> {st}: {v}\nlog:\n{}",
            self.log()
        );
        v
    }

    /// Counters of a port.
    pub fn counters(&self, port: &str) -> Value {
        self.ok("GET", &format!("/v1/ports/{port}"), None)["counters"].clone()
    }

    /// Waits until a port's link is up.
    pub fn wait_up(&self, port: &str) {
        let t0 = Instant::now();
        while !self.ok("GET", &format!("/v1/ports/{port}"), None)["up"]
            .as_bool()
            .unwrap_or(false)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "port {port} never came up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A packet-backend port on a root-namespace interface.
pub fn packet_port(name: &str, ifname: &str, vlan: Value) -> Value {
    json!({"name": name, "backend": {"kind": "packet", "ifname": ifname}, "vlan": vlan})
}

pub fn access(v: u16) -> Value {
    json!({"mode": "access", "vlan": v})
}

/// A QEMU-like `-netdev stream,server=on` peer: listens, accepts the switch, and speaks
/// 4-byte big-endian length-prefixed frames.
pub struct StreamPeer {
    pub path: PathBuf,
    listener: UnixListener,
    conn: Option<UnixStream>,
}

impl StreamPeer {
    pub fn listen(path: &Path) -> StreamPeer {
        let _ = std::fs::remove_file(path);
        StreamPeer {
            path: path.to_path_buf(),
            listener: UnixListener::bind(path).unwrap(),
            conn: None,
        }
    }

    /// Waits for the switch to connect.
    pub fn accept(&mut self) {
        self.listener.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    self.conn = Some(c);
                    return;
                }
                Err(_) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "switch never connected"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    pub fn send(&mut self, frame: &[u8]) {
        let c = self.conn.as_mut().expect("connected");
        let mut b = (frame.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(frame);
        c.write_all(&b).unwrap();
    }

    /// Writes bytes as they are (already length-prefixed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let c = self.conn.as_mut().expect("connected");
        c.write_all(bytes).unwrap();
    }

    /// True once the switch closed the connection (a read returns EOF).
    pub fn is_closed(&mut self) -> bool {
        let c = self.conn.as_mut().expect("connected");
        let mut b = [0u8; 1];
        matches!(c.read(&mut b), Ok(0))
    }

    /// Reads frames until `pred` holds for one (returned) or `timeout` passes.
    pub fn recv_until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let c = self.conn.as_mut().expect("connected");
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let mut h = [0u8; 4];
            match c.read_exact(&mut h) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return None,
            }
            let len = u32::from_be_bytes(h) as usize;
            let mut f = vec![0u8; len];
            // the rest of a frame follows promptly
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            c.read_exact(&mut f).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if pred(&f) {
                return Some(f);
            }
        }
        None
    }
}

pub fn mac_bytes(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}
