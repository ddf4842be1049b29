//! Networking helpers for e2e tests: a host network namespace behind a veth pair (the uplink
//! of an external switch), guest shell helpers, switch counters, and cleanup of the
//! `vireo-switch` processes a test's vireod started.

use crate::Host;
use std::path::Path;
use std::process::Command;

/// Runs a host command, panicking with its output when it fails.
pub fn run(cmd: &[&str]) -> String {
    let o = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is missing ({e}): run `sudo scripts/setup.sh`", cmd[0]));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A network namespace `ns` holding `peer`, one end of a veth pair whose other end `host`
/// stays in the root namespace (to be an external switch's uplink). Removed on drop.
pub struct NetNs {
    /// Namespace name.
    pub ns: String,
    /// Root-namespace end (the uplink).
    pub host: String,
    /// End inside the namespace.
    pub peer: String,
}

impl NetNs {
    /// Creates the namespace and veth pair (names carry the test's pid to stay unique).
    pub fn new(tag: &str) -> NetNs {
        let id = std::process::id() % 100_000;
        let n = NetNs {
            ns: format!("vireo-{tag}-{id}"),
            host: format!("vu{tag}{id}"),
            peer: format!("vp{tag}{id}"),
        };
        let _ = Command::new("ip").args(["netns", "del", &n.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &n.host]).output();
        run(&["ip", "netns", "add", &n.ns]);
        run(&[
            "ip", "link", "add", &n.host, "type", "veth", "peer", "name", &n.peer,
        ]);
        run(&["ip", "link", "set", &n.peer, "netns", &n.ns]);
        run(&["ip", "link", "set", &n.host, "up"]);
        n.exec(&["ip", "link", "set", "lo", "up"]);
        n.exec(&["ip", "link", "set", &n.peer, "up"]);
        n
    }

    /// Runs a command inside the namespace, asserting success.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.ns];
        v.extend_from_slice(cmd);
        run(&v)
    }

    /// Whether the namespace gets echo replies from `ip` (`busybox ping`, up to `count`
    /// requests within `secs` seconds). The host may have no `ping` of its own (Debian's
    /// minimal image has none): a missing busybox fails the test instead of reading as
    /// "unreachable".
    pub fn ping(&self, ip: &str, count: u32, secs: u32) -> bool {
        let have = Command::new("busybox")
            .arg("true")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            have,
            "busybox is missing: run `sudo scripts/setup.sh` (busybox-static)"
        );
        let (c, w) = (count.to_string(), secs.to_string());
        self.try_exec(&["busybox", "ping", "-c", &c, "-w", &w, "-W", "2", ip])
    }

    /// Runs a command inside the namespace; returns whether it succeeded.
    pub fn try_exec(&self, cmd: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(cmd)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Pids of the `vireo-switch` processes started for `state_dir`: every process whose command
/// line names the `vireo-switch` binary and a run directory under `state_dir/switches/`.
/// Found through /proc rather than pid files, so a switch respawned by vireod, or one whose
/// pid file is gone with the temporary directory, is found too.
pub fn switch_pids(state_dir: &Path) -> Vec<i32> {
    let needle = state_dir.join("switches");
    let needle = needle.to_string_lossy();
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_switch = args
                .first()
                .is_some_and(|a| a.rsplit('/').next() == Some("vireo-switch"));
            if is_switch && args.iter().any(|a| a.contains(needle.as_ref())) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Kills (SIGKILL, by pid) the `vireo-switch` processes of a state directory and waits up to
/// 5 s for them to be gone (their TAP interfaces go with them).
pub fn kill_switches(state_dir: &Path) {
    let pids = switch_pids(state_dir);
    for &pid in &pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}/cmdline")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A [`Host`] that also cleans up the switches its vireod started, pass or fail. On drop it
/// kills vireod first (a live vireod respawns switches), then every `vireo-switch` process
/// of its state directory, and only then drops the `Host` (VMs, temporary directory).
pub struct SwitchHost(pub Host);

impl SwitchHost {
    /// Starts a vireod.
    pub fn start() -> SwitchHost {
        SwitchHost(Host::start())
    }
}

impl std::ops::Deref for SwitchHost {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.0
    }
}

impl std::ops::DerefMut for SwitchHost {
    fn deref_mut(&mut self) -> &mut Host {
        &mut self.0
    }
}

impl Drop for SwitchHost {
    fn drop(&mut self) {
        self.0.kill_daemon();
        kill_switches(&self.0.state_dir());
    }
}

/// Runs `script` in the guest and asserts it exits 0; returns stdout.
pub fn sh(h: &Host, vm: &str, script: &str) -> String {
    let o = h.vireo(&["vm", "exec", vm, "--", "sh", "-c", script]);
    assert!(
        o.status.success(),
        "in {vm}: `{script}` failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether `vm` gets echo replies from `ip` (3 tries, 1 s each, up to `count` pings).
pub fn ping(h: &Host, vm: &str, ip: &str) -> bool {
    let (code, _) = h.exec(vm, &format!("ping -c 2 -w 4 {ip} >/dev/null 2>&1"));
    code == 0
}

/// `vireo switch stats NAME --json`.
pub fn stats(h: &Host, switch: &str) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["switch", "stats", switch, "--json"]))
        .expect("switch stats --json is JSON")
}

/// One port's counters from `switch stats --json` (`port` is `VM/NIC`).
pub fn port_counters(h: &Host, switch: &str, port: &str) -> serde_json::Value {
    let s = stats(h, switch);
    s["ports"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["port"] == port))
        .map(|p| p["counters"].clone())
        .unwrap_or_else(|| panic!("no port {port} in switch stats: {s:#}"))
}

/// Drops of `reason` counted on `port`.
pub fn drops(h: &Host, switch: &str, port: &str, reason: &str) -> u64 {
    port_counters(h, switch, port)["drops"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// The MAC table of a switch, read from the switch process's own control socket
/// (`GET /v1/fdb`: rows of `vlan`, `mac`, `port`, `is_static`, `age_secs`).
pub fn switch_fdb(h: &Host, switch: &str) -> serde_json::Value {
    let sock = h
        .state_dir()
        .join("switches")
        .join(switch)
        .join("control.sock");
    let out = run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        sock.to_str().expect("utf-8 path"),
        "http://switch/v1/fdb",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("switch fdb is not JSON ({e}): {out}"))
}

/// Receiver throughput in bit/s of an `iperf3 -J` client run.
pub fn iperf_bps(json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("iperf3 -J output is not JSON ({e}): {json}"));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no receiver summary in iperf3 output: {v:#}"))
}
