//! End-to-end harness: a real `vireod` per test in its own state directory, the real `vireo`
//! CLI, and real QEMU guests booted from the project's test-guest disk images.
//!
//! Binaries come from the cargo target directory the tests were built into (`cargo build
//! --workspace --bins` runs first in `scripts/test.sh`). Without QEMU or the guest images a
//! test fails with a message naming the setup command: a silently skipped test proves nothing.

pub mod guest_io;
pub mod multihost;
pub mod net;
pub mod replica_io;
pub mod vm_setup;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("VIREO_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Path of a built binary; panics with the command to run when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace --bins` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Panics with the setup command unless QEMU is installed.
pub fn require_qemu() {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "qemu-system-x86_64 is missing: run `sudo scripts/setup.sh`"
    );
}

/// Which agent a test guest carries.
#[derive(Clone, Copy, Debug)]
pub enum GuestAgent {
    /// Vireo's own `vireo-guest`.
    Vireo,
    /// Debian's `qemu-ga`.
    QemuGa,
    /// None.
    None,
}

/// Builds (cached) a bootable test-guest disk and copies it to `dir`.
pub fn guest_disk(dir: &Path, generation: u8, agent: GuestAgent) -> PathBuf {
    build_guest_disk(dir, generation, agent, true)
}

/// Like [`guest_disk`] without the network test programs (iproute2, iperf3, dnsmasq,
/// tcpdump): a smaller initramfs, which a generation 1 BIOS reads sector by sector, so it
/// boots much faster under TCG. For tests that do not configure the guest's network.
pub fn guest_disk_lite(dir: &Path, generation: u8, agent: GuestAgent) -> PathBuf {
    build_guest_disk(dir, generation, agent, false)
}

fn build_guest_disk(dir: &Path, generation: u8, agent: GuestAgent, net_tools: bool) -> PathBuf {
    let agent_name = match agent {
        GuestAgent::Vireo => "vireo",
        GuestAgent::QemuGa => "qemu-ga",
        GuestAgent::None => "none",
    };
    let lite = if net_tools { "" } else { "-lite" };
    let out = dir.join(format!("gen{generation}-{agent_name}{lite}.img"));
    let mut cmd = Command::new(bin("xtask"));
    cmd.current_dir(repo_root()).args([
        "guest-image",
        "--generation",
        &generation.to_string(),
        "--agent",
        agent_name,
    ]);
    if !net_tools {
        cmd.arg("--no-net-tools");
    }
    let status = cmd
        .arg("--out")
        .arg(&out)
        .status()
        .expect("running xtask guest-image");
    assert!(
        status.success(),
        "building the test guest failed: run `sudo scripts/setup.sh` first"
    );
    out
}

/// One vireod instance with its own state directory and socket.
pub struct Host {
    /// Temporary directory holding state, socket and test files.
    pub dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Host {
    /// Starts a vireod.
    pub fn start() -> Host {
        require_qemu();
        let dir = tempfile::Builder::new()
            .prefix("vireo-e2e-")
            .tempdir()
            .expect("tempdir");
        let mut h = Host { dir, daemon: None };
        h.spawn_daemon();
        h
    }

    /// State directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("vireod.sock")
    }

    fn spawn_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vireod.log"))
            .expect("daemon log");
        let child = Command::new(bin("vireod"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting vireod");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vireod did not come up; log:\n{}", self.daemon_log());
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vireod.log")).unwrap_or_default()
    }

    /// kill -9 the daemon (VMs keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again on the same state directory.
    pub fn restart_daemon(&mut self) {
        self.kill_daemon();
        self.spawn_daemon();
    }

    /// Runs `vireo ARGS` against this host.
    pub fn vireo(&self, args: &[&str]) -> Output {
        Command::new(bin("vireo"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running vireo")
    }

    /// Runs `vireo ARGS`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.vireo(args);
        assert!(
            o.status.success(),
            "vireo {args:?} failed ({}):\nstdout: {}\nstderr: {}\nvireod log tail:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            tail(&self.daemon_log(), 30)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `vireo ARGS`, asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.vireo(args);
        assert!(
            !o.status.success(),
            "vireo {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            err.starts_with("error: "),
            "error output is not one 'error: ...' line: {err:?}"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "error output should be one line: {err:?}"
        );
        err
    }

    /// `vireo vm show NAME --json`.
    pub fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["vm", "show", name, "--json"]))
            .expect("vm show --json is JSON")
    }

    /// Waits until `pred(show)` holds, panicking with the last state after `timeout`.
    pub fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.show(name);
            if pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {name}: {what}; last state:\n{v:#}\nconsole tail:\n{}\n{}",
                    tail(&std::fs::read_to_string(v["console_log"].as_str().unwrap_or("")).unwrap_or_default(), 40),
                    self.vm_logs(v["uuid"].as_str().unwrap_or(""))
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Tails of a VM's worker and QEMU logs and of the daemon's log, for a failure message
    /// (CI keeps nothing else).
    pub fn vm_logs(&self, uuid: &str) -> String {
        let run = self.state_dir().join("run").join(uuid);
        let mut out = String::new();
        for (what, path, lines) in [
            ("worker log", run.join("worker.log"), 30),
            ("qemu log", run.join("qemu.log"), 15),
            ("daemon log", self.dir.path().join("vireod.log"), 20),
        ] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!(
                "{what} tail ({}):\n{}\n",
                path.display(),
                tail(&text, lines)
            ));
        }
        out
    }

    /// Waits for heartbeat `ok`.
    pub fn wait_heartbeat(&self, name: &str) -> serde_json::Value {
        // Generous: a generation 1 guest's BIOS reads its kernel and initramfs sector by
        // sector, which takes minutes under TCG on a loaded 2-core CI machine.
        self.wait_for(name, Duration::from_secs(300), "heartbeat ok", |v| {
            v["heartbeat"] == "ok"
        })
    }

    /// Runs a shell command in the guest; returns (exit code, stdout).
    pub fn exec(&self, name: &str, script: &str) -> (i32, String) {
        let o = self.vireo(&["vm", "exec", name, "--", "sh", "-c", script]);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Debugging a failure: VIREO_E2E_KEEP=1 leaves the host, its VMs and its directory
        // as they were (clean up by hand).
        if std::thread::panicking() && std::env::var_os("VIREO_E2E_KEEP").is_some() {
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::Builder::new()
                    .prefix("vireo-e2e-kept-")
                    .tempdir()
                    .expect("tempdir"),
            );
            eprintln!("VIREO_E2E_KEEP: left running in {}", dir.keep().display());
            self.daemon.take();
            return;
        }
        // Leave no QEMU or worker behind, whatever the test did.
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
        self.kill_daemon();
        net::kill_switches(&self.state_dir());
    }
}

/// Last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
