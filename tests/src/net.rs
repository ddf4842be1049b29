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

/// Kills the `vireo-switch` processes under a state directory (test cleanup).
pub fn kill_switches(state_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(state_dir.join("switches")) {
        for e in entries.flatten() {
            if let Some(pid) = std::fs::read_to_string(e.path().join("switch.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("vireo-switch") {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Kills the switches of a host when dropped. Declare it before the `Host` so that it drops
/// after it: a live vireod would respawn the switches.
pub struct SwitchGuard(pub std::path::PathBuf);

impl Drop for SwitchGuard {
    fn drop(&mut self) {
        kill_switches(&self.0);
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

/// Receiver throughput in bit/s of an `iperf3 -J` client run.
pub fn iperf_bps(json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("iperf3 -J output is not JSON ({e}): {json}"));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no receiver summary in iperf3 output: {v:#}"))
}
