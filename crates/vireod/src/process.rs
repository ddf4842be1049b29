//! Processes vireod supervises: spawning detached workers and checking that a PID is
//! still the process we think it is (PIDs are reused; zombies are dead).

use std::path::Path;
use std::process::Stdio;

/// Whether `pid` is alive, not a zombie, and its command line contains `needle`.
pub fn alive(pid: u32, needle: &str) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // Field 3 (after the parenthesised command) is the state; Z and X are dead.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains(needle),
        Err(_) => false,
    }
}

/// Reads a PID file.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Starts `vireo-worker` for the run directory `run_dir`, in its own session so that it
/// (and the QEMU it starts) outlive vireod. The child is reaped by a background task.
pub fn spawn_worker(worker_bin: &Path, run_dir: &Path, attach: bool) -> std::io::Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("worker.log"))?;
    let mut cmd = tokio::process::Command::new(worker_bin);
    cmd.arg("--run-dir").arg(run_dir);
    if attach {
        cmd.arg("--attach");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}
