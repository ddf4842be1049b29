//! Starting QEMU so that it outlives the worker, and finding it again.
//!
//! Design choice: QEMU is **not** started with `-daemonize`. The worker spawns it as a child in
//! a new session (`setsid`), with stdin on `/dev/null` and stdout/stderr appended to
//! `qemu.log` in the run directory (never a pipe: a pipe would break when the worker dies).
//! This keeps early errors visible (the worker sees the exit status and the log if QEMU fails
//! to start), while the new session keeps QEMU out of the worker's process group and
//! controlling terminal, so killing the worker (even with `SIGKILL`) leaves QEMU running; it
//! is re-parented to init (or the nearest subreaper). QEMU writes `qemu.pid`; a restarted
//! worker calls [`QemuProcess::attach`], which checks that the pid still belongs to a QEMU
//! using this run directory, then reconnects to the sockets.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::cmdline::RunPaths;
use crate::ErrorKind;

/// Errors of process management.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Spawning QEMU failed (binary missing, no permission...).
    #[error("starting {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening the log file failed.
    #[error("opening QEMU log {0}")]
    Log(PathBuf, #[source] std::io::Error),
    /// QEMU exited during startup; `log` is the end of its output.
    #[error("QEMU exited during startup ({status}): {log}")]
    Exited {
        /// Exit status.
        status: ExitStatus,
        /// Last lines of `qemu.log`.
        log: String,
    },
    /// QEMU did not create its QMP socket and pidfile in time.
    #[error("QEMU did not become ready within {0:?}")]
    StartTimeout(Duration),
    /// No pidfile, or the process it names is gone or is not this VM's QEMU.
    #[error("no running QEMU for {0}: {1}")]
    NotRunning(PathBuf, String),
    /// Sending a signal failed.
    #[error("signalling QEMU pid {0}")]
    Signal(u32, #[source] std::io::Error),
}

impl ProcessError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProcessError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            ProcessError::Spawn { .. } | ProcessError::Log(..) | ProcessError::Signal(..) => {
                ErrorKind::Io
            }
            ProcessError::Exited { .. } => ErrorKind::Refused,
            ProcessError::StartTimeout(_) => ErrorKind::Timeout,
            ProcessError::NotRunning(..) => ErrorKind::NotFound,
        }
    }
}

/// The QEMU binary: `$VIREO_QEMU` if set, else `qemu-system-x86_64` from `PATH`.
pub fn default_binary() -> PathBuf {
    std::env::var_os("VIREO_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// A running QEMU, either spawned by this process or re-attached through its pidfile.
#[derive(Debug)]
pub struct QemuProcess {
    pid: u32,
    child: Option<Child>,
    paths: RunPaths,
}

impl QemuProcess {
    /// Spawns QEMU in a new session. Removes stale sockets and pidfile of `paths` first.
    /// Returns as soon as the process exists; call [`QemuProcess::wait_ready`] next.
    pub fn spawn(
        binary: &Path,
        args: &[OsString],
        paths: &RunPaths,
    ) -> Result<QemuProcess, ProcessError> {
        for stale in [&paths.qmp, &paths.qga, &paths.serial, &paths.pidfile] {
            // Missing files are the normal case.
            let _ = std::fs::remove_file(stale);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|e| ProcessError::Log(paths.log.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ProcessError::Log(paths.log.clone(), e))?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        tracing::info!(pid = child.id(), "spawned QEMU");
        Ok(QemuProcess {
            pid: child.id(),
            child: Some(child),
            paths: paths.clone(),
        })
    }

    /// Waits until the QMP socket and the pidfile exist. Fails with the log tail if QEMU
    /// exits first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(ProcessError::Exited {
                        status,
                        log: log_tail(&self.paths.log, 20),
                    });
                }
            }
            if self.paths.qmp.exists() && self.paths.pidfile.exists() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProcessError::StartTimeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Re-attaches to the QEMU of a run directory through its pidfile, checking that the
    /// process is alive, is a QEMU, and was started with this pidfile (pid reuse guard).
    pub fn attach(paths: &RunPaths) -> Result<QemuProcess, ProcessError> {
        let not_running = |why: String| ProcessError::NotRunning(paths.pidfile.clone(), why);
        let text = std::fs::read_to_string(&paths.pidfile)
            .map_err(|e| not_running(format!("reading pidfile: {e}")))?;
        let pid: u32 = text
            .trim()
            .parse()
            .map_err(|_| not_running(format!("pidfile holds {:?}", text.trim())))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|_| not_running(format!("pid {pid} is gone")))?;
        let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_qemu = argv
            .first()
            .and_then(|a| Path::new(OsStr::from_bytes(a)).file_name())
            .map(|f| f.to_string_lossy().starts_with("qemu-system"))
            .unwrap_or(false);
        let pidfile = paths.pidfile.as_os_str().as_bytes();
        let same_vm = argv
            .windows(2)
            .any(|w| w[0] == b"-pidfile" && w[1] == pidfile);
        if !is_qemu || !same_vm {
            return Err(not_running(format!(
                "pid {pid} is not the QEMU of this run directory"
            )));
        }
        let mut p = QemuProcess {
            pid,
            child: None,
            paths: paths.clone(),
        };
        if !p.is_alive() {
            return Err(not_running(format!("pid {pid} has exited")));
        }
        Ok(p)
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The run directory's paths.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// True while QEMU runs (a zombie counts as exited).
    pub fn is_alive(&mut self) -> bool {
        if let Some(child) = self.child.as_mut() {
            return matches!(child.try_wait(), Ok(None));
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Sends `SIGKILL` (last resort; prefer QMP `quit`).
    pub fn kill(&self) -> Result<(), ProcessError> {
        // SAFETY: plain kill(2) on a pid we verified.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(ProcessError::Signal(self.pid, e));
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for QEMU to exit; returns true if it did. Reaps it when it is
    /// our child.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Gives up ownership of the child without reaping it (used by tests that simulate a
    /// worker death).
    pub fn detach(mut self) -> u32 {
        self.child = None;
        self.pid
    }
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
