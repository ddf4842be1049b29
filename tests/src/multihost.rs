//! Several vireod "hosts" on one machine, each in its own network namespace, joined by veth
//! links to a bridge in a hub namespace (so a test can cut one host's link). Disks live in
//! one temporary directory all hosts see (shared storage).

use crate::{bin, require_qemu, tail};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        o.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One host: a vireod in namespace `ns` listening on `addr`.
pub struct NsHost {
    /// Namespace name.
    pub ns: String,
    /// `--listen` address.
    pub addr: String,
    /// State directory, socket and log live here.
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    daemon: std::sync::Mutex<Option<Child>>,
}

impl NsHost {
    /// API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("vireod.sock")
    }

    /// State directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vireod.log")).unwrap_or_default()
    }

    /// Starts (or restarts) the daemon.
    pub fn spawn(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("vireod.log"))
            .expect("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(bin("vireod"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .args(["--listen", &self.addr])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        cmd.env("VIREO_TEST_HOLD_FILE", self.hold_file());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        *self.daemon.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(cmd.spawn().expect("starting vireod"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("vireod in {} did not come up:\n{}", self.ns, self.log());
    }

    /// kill -9 of the daemon (its VMs keep running).
    /// The file the daemon's migration test hook reads (`VIREO_TEST_HOLD_FILE`).
    pub fn hold_file(&self) -> PathBuf {
        self.dir.join("test-hold")
    }

    /// Makes this host's next outgoing migrations wait `ms` at `point` (`switchover`,
    /// `verified` or `commit`), the guest paused, so a test can strike there.
    pub fn hold(&self, point: &str, ms: u64) {
        std::fs::write(self.hold_file(), format!("{point} {ms}\n")).expect("hold file");
    }

    /// Outgoing migrations no longer wait.
    pub fn unhold(&self) {
        let _ = std::fs::remove_file(self.hold_file());
    }

    pub fn kill9(&self) {
        if let Some(mut c) = self.daemon.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the CLI against this host.
    pub fn vireo(&self, args: &[&str]) -> Output {
        Command::new(bin("vireo"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running vireo")
    }

    /// Runs the CLI; panics with context unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.vireo(args);
        assert!(
            o.status.success(),
            "[{}] vireo {args:?} failed:\nstdout: {}\nstderr: {}\nlog tail:\n{}",
            self.ns,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs the CLI; panics unless it fails; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.vireo(args);
        assert!(
            !o.status.success(),
            "[{}] vireo {args:?} should have failed: {}",
            self.ns,
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// `host show --json`.
    pub fn info(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["host", "show", "--json"])).expect("json")
    }

    /// Names of the VMs defined here.
    pub fn vm_names(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["vm", "list", "--json"])).expect("json");
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `vm show --json`.
    pub fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["vm", "show", name, "--json"])).expect("json")
    }

    /// Runs a shell script in the guest through the agent.
    pub fn exec(&self, name: &str, script: &str) -> (i32, String) {
        let o = self.vireo(&["vm", "exec", name, "--", "sh", "-c", script]);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    /// Waits until the agent of `name` answers.
    pub fn wait_heartbeat(&self, name: &str) {
        // Generous: TCG guests on a loaded 2-core CI machine boot slowly.
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut v = self.show(name);
        while Instant::now() < deadline {
            v = self.show(name);
            if v["heartbeat"] == "ok" {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let console =
            std::fs::read_to_string(v["console_log"].as_str().unwrap_or("")).unwrap_or_default();
        panic!(
            "no heartbeat from {name} on {}: {v:#}\nconsole tail:\n{}",
            self.ns,
            tail(&console, 30)
        );
    }

    /// Entries left in the state's run and vms directories (what a failed incoming leaves).
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in ["run", "vms"] {
            if let Ok(rd) = std::fs::read_dir(self.state_dir().join(d)) {
                out.extend(
                    rd.flatten()
                        .map(|e| format!("{d}/{}", e.file_name().to_string_lossy())),
                );
            }
        }
        out
    }

    /// Brings this host's link down or up.
    pub fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for NsHost {
    fn drop(&mut self) {
        let run = self.state_dir().join("run");
        if let Ok(entries) = std::fs::read_dir(&run) {
            for e in entries.flatten() {
                for f in ["qemu.pid", "worker.pid"] {
                    if let Some(pid) = std::fs::read_to_string(e.path().join(f))
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    {
                        // SAFETY: kill has no memory-safety preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        self.kill9();
        // vireod leaves its switch processes running when killed (they carry traffic
        // on their own); a test must not leave them burning CPU for the next ones.
        crate::net::kill_switches(&self.state_dir());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// The hosts and their hub.
pub struct Cluster {
    /// Shared directory (disks).
    pub dir: tempfile::TempDir,
    /// Hosts, in order A, B, C.
    pub hosts: Vec<NsHost>,
    hub: String,
}

impl Cluster {
    /// `n` hosts; `env[i]` are extra environment variables of host i's daemon.
    pub fn start(n: usize, env: &[&[(&str, &str)]]) -> Cluster {
        require_qemu();
        let ok = Command::new("ip")
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "iproute2 is missing: run `sudo scripts/setup.sh`");
        let dir = tempfile::Builder::new()
            .prefix("vireo-mig-")
            .tempdir()
            .expect("tempdir");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "{:x}{}",
            std::process::id() % 0xffff,
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let hub = format!("vmh{tag}");
        let _ = Command::new("ip")
            .args(["netns", "del", &hub])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        for i in 0..n {
            let ns = format!("vm{tag}{i}");
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", &ns]);
            let hub_end = format!("h{i}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &hub_end,
                "netns", &hub,
            ]);
            ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &hub_end, "up"]);
            let a = format!("10.77.0.{}", i + 1);
            ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let hdir = dir.path().join(format!("host{i}"));
            std::fs::create_dir_all(&hdir).expect("host dir");
            let h = NsHost {
                ns,
                addr: format!("{a}:7443"),
                dir: hdir,
                env: env
                    .get(i)
                    .map(|e| {
                        e.iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                daemon: std::sync::Mutex::new(None),
            };
            h.spawn();
            hosts.push(h);
        }
        Cluster { dir, hosts, hub }
    }

    /// Host `i` trusts host `j` (confirming j's fingerprint).
    /// A second network for the guests: `eth1` in every host, all on bridge `br1` in the hub
    /// namespace, which holds 10.88.0.254/24 (the address [`Pinger`] pings from). Returns the
    /// name of the hosts' interface (the uplink of an external switch).
    pub fn vm_network(&self) -> &'static str {
        ip(&["-n", &self.hub, "link", "add", "br1", "type", "bridge"]);
        ip(&[
            "-n",
            &self.hub,
            "addr",
            "add",
            "10.88.0.254/24",
            "dev",
            "br1",
        ]);
        ip(&["-n", &self.hub, "link", "set", "br1", "up"]);
        for (i, h) in self.hosts.iter().enumerate() {
            let hub_end = format!("v{i}");
            ip(&[
                "-n", &h.ns, "link", "add", "eth1", "type", "veth", "peer", "name", &hub_end,
                "netns", &self.hub,
            ]);
            ip(&["-n", &self.hub, "link", "set", &hub_end, "master", "br1"]);
            ip(&["-n", &self.hub, "link", "set", &hub_end, "up"]);
            ip(&["-n", &h.ns, "link", "set", "eth1", "up"]);
        }
        "eth1"
    }

    /// Starts pinging `addr` from the hub namespace every `interval_ms` (see
    /// [`Cluster::vm_network`]).
    pub fn pinger(&self, addr: &str, interval_ms: u64) -> Pinger {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hub, "busybox", "ping"])
            .args([
                "-i",
                &format!("{}", interval_ms as f64 / 1000.0),
                "-W",
                "1",
                addr,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox ping (busybox-static: run `sudo scripts/setup.sh`)");
        Pinger {
            child: Some(child),
            interval_ms,
        }
    }

    /// Whether `addr` answers a ping (3 tries within 3 s) from the hub namespace.
    pub fn hub_ping(&self, addr: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.hub, "busybox", "ping", "-c", "3", "-w", "3", addr,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn trust(&self, i: usize, j: usize) {
        let fp = self.hosts[j].info()["fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_string();
        let out = self.hosts[i].ok(&["host", "trust", &self.hosts[j].addr, "--fingerprint", &fp]);
        assert!(out.contains("trusted"), "{out}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.hosts.clear();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .status();
    }
}

/// A continuous ping (busybox) from the hub namespace; [`Pinger::stop`] sums it up.
pub struct Pinger {
    child: Option<Child>,
    interval_ms: u64,
}

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, Copy)]
pub struct PingSummary {
    /// Echo requests sent (the highest sequence number answered or not, plus one).
    pub sent: u64,
    /// Echo replies received.
    pub received: u64,
    /// The longest run of unanswered requests, times the interval, in ms.
    pub longest_gap_ms: u64,
}

impl Pinger {
    /// Stops the ping and reads its replies' sequence numbers.
    pub fn stop(mut self) -> PingSummary {
        let child = self.child.take().expect("running");
        // SAFETY: kill(2) of the child this Pinger started; SIGINT makes ping print its end.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        let seqs: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("seq=").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect();
        let sent = text
            .lines()
            .find_map(|l| l.split(" packets transmitted").next()?.trim().parse().ok())
            .unwrap_or_else(|| seqs.last().map_or(0, |s| s + 1));
        let mut longest = 0;
        let mut prev: Option<u64> = None;
        for &s in &seqs {
            let missing = match prev {
                Some(p) => s.saturating_sub(p + 1),
                None => s,
            };
            longest = longest.max(missing);
            prev = Some(s);
        }
        longest = longest.max(sent.saturating_sub(prev.map_or(0, |p| p + 1)));
        PingSummary {
            sent,
            received: seqs.len() as u64,
            longest_gap_ms: longest * self.interval_ms,
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
