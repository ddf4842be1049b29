//! Facts about the host for `vireo host show`.

use crate::manager::Manager;
use api::HostInfo;

/// Reads `/proc/meminfo` field `key` in bytes.
pub fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Resident set size of this process in bytes.
pub fn self_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// QEMU's version line, read once at start.
pub fn qemu_version() -> String {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "qemu-system-x86_64 not found (run scripts/setup.sh)".into())
}

static QEMU_VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The host's facts.
pub fn info(m: &Manager) -> HostInfo {
    let (defined, running) = m.counts();
    let host = m.host();
    HostInfo {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        state_dir: host.state_dir.clone(),
        accel: host.auto_accel.0,
        accel_reason: host.auto_accel.1.clone(),
        qemu: QEMU_VERSION.get_or_init(qemu_version).clone(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_total: meminfo("MemTotal"),
        memory_available: meminfo("MemAvailable"),
        vms_defined: defined,
        vms_running: running,
        daemon_rss: self_rss(),
        fingerprint: crate::peers::fingerprint(),
        listen: crate::peers::listen_address(),
    }
}
