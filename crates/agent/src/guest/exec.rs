//! `guest-exec`, `guest-exec-status` and `vireo-exec-read`: processes started for the host.
//!
//! Each process gets a reader thread per captured pipe, a writer thread for stdin data and
//! a waiter thread, so the agent's request loop never blocks on a child. A process counts
//! as exited once it has been reaped *and* its captured pipes have reached EOF, so no
//! output is lost (qemu-ga behaves the same).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use base64::Engine as _;

use crate::protocol::{CaptureOutput, GuestExec, GuestExecStatus};

/// Unread output kept per stream before the rest is dropped (qemu-ga's limit).
pub const MAX_CAPTURE: usize = 16 << 20;

#[derive(Default)]
struct Stream {
    unread: Vec<u8>,
    truncated: bool,
    open: bool,
    captured: bool,
}

impl Stream {
    fn push(&mut self, data: &[u8]) {
        let room = MAX_CAPTURE.saturating_sub(self.unread.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.unread.extend_from_slice(&data[..data.len().min(room)]);
    }
}

#[derive(Default)]
struct Proc {
    out: Stream,
    err: Stream,
    status: Option<ExitStatus>,
}

impl Proc {
    fn exited(&self) -> bool {
        self.status.is_some() && !self.out.open && !self.err.open
    }
}

type Shared = Arc<Mutex<Proc>>;

fn lock(p: &Shared) -> MutexGuard<'_, Proc> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Processes started by the host, by pid.
#[derive(Default)]
pub struct ExecTable {
    procs: Mutex<HashMap<i64, Shared>>,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn spawn_reader(
    name: &'static str,
    mut src: impl Read + Send + 'static,
    shared: Shared,
    pick: fn(&mut Proc) -> &mut Stream,
) {
    let r = thread::Builder::new()
        .name(format!("exec-{name}"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => pick(&mut lock(&shared)).push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            pick(&mut lock(&shared)).open = false;
        });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot start exec reader thread");
    }
}

impl ExecTable {
    /// Starts `req`; returns the pid or a qemu-ga style error text.
    pub fn spawn(&self, req: &GuestExec) -> Result<i64, String> {
        let input = match &req.input_data {
            Some(b64) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| "Invalid parameter 'input-data'".to_string())?,
            ),
            None => None,
        };
        let (cap_out, cap_err, merged) = match &req.capture_output {
            None | Some(CaptureOutput::Flag(false)) => (false, false, false),
            Some(CaptureOutput::Flag(true)) => (true, true, false),
            Some(CaptureOutput::Mode(m)) => match m.as_str() {
                "none" => (false, false, false),
                "stdout" => (true, false, false),
                "stderr" => (false, true, false),
                "separated" => (true, true, false),
                "merged" => (true, false, true),
                _ => return Err("Invalid parameter 'capture-output'".into()),
            },
        };

        let mut cmd = Command::new(&req.path);
        cmd.args(req.arg.iter().flatten());
        if let Some(env) = &req.env {
            cmd.env_clear();
            for kv in env {
                match kv.split_once('=') {
                    Some((k, v)) if !k.is_empty() => {
                        cmd.env(k, v);
                    }
                    _ => return Err(format!("Invalid parameter 'env': '{kv}'")),
                }
            }
        }
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut merged_read = None;
        if merged {
            let (r, w) = pipe().map_err(|e| format!("cannot create pipe: {e}"))?;
            let w2 = w
                .try_clone()
                .map_err(|e| format!("cannot create pipe: {e}"))?;
            cmd.stdout(Stdio::from(w));
            cmd.stderr(Stdio::from(w2));
            merged_read = Some(r);
        } else {
            cmd.stdout(if cap_out {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stderr(if cap_err {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "Guest agent command failed, error was 'Failed to execute child process \u{201c}{}\u{201d} ({e})'",
                req.path
            )
        })?;
        // The Command still holds the parent's copies of the merged pipe's write end.
        drop(cmd);
        let pid = i64::from(child.id());

        let shared: Shared = Arc::new(Mutex::new(Proc::default()));
        {
            let mut p = lock(&shared);
            p.out.captured = cap_out;
            p.err.captured = cap_err;
            p.out.open = cap_out;
            p.err.open = cap_err && !merged;
        }
        if let Some(r) = merged_read {
            spawn_reader("out", std::fs::File::from(r), shared.clone(), |p| {
                &mut p.out
            });
        }
        if let Some(o) = child.stdout.take() {
            spawn_reader("out", o, shared.clone(), |p| &mut p.out);
        }
        if let Some(e) = child.stderr.take() {
            spawn_reader("err", e, shared.clone(), |p| &mut p.err);
        }
        if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
            let r = thread::Builder::new()
                .name("exec-in".into())
                .spawn(move || {
                    // A child that exits without reading gets EPIPE; that is its business.
                    let _ = stdin.write_all(&data);
                });
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot start exec stdin thread");
            }
        }
        let waiter_shared = shared.clone();
        thread::Builder::new()
            .name("exec-wait".into())
            .spawn(move || {
                let status = child.wait();
                let mut p = lock(&waiter_shared);
                p.status = Some(status.unwrap_or_else(|_| ExitStatus::from_raw(255 << 8)));
            })
            .map_err(|e| format!("cannot start exec waiter thread: {e}"))?;
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, shared);
        tracing::info!(pid, path = %req.path, "started process for the host");
        Ok(pid)
    }

    /// `vireo-exec-signal`: signals a process of the table that has not been reaped.
    pub fn signal(&self, pid: i64, signal: i64) -> Result<(), String> {
        let sig = libc::c_int::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| "Invalid parameter 'signal'".to_string())?;
        let procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let shared = procs
            .get(&pid)
            .ok_or_else(|| "Invalid parameter 'pid'".to_string())?;
        let p = lock(shared);
        if p.status.is_some() {
            // Already reaped: the pid may belong to someone else now.
            return Ok(());
        }
        let raw = libc::pid_t::try_from(pid).map_err(|_| "Invalid parameter 'pid'".to_string())?;
        // SAFETY: kill takes no pointers; the pid is our unreaped child.
        if unsafe { libc::kill(raw, sig) } != 0 {
            return Err(format!("kill: {}", std::io::Error::last_os_error()));
        }
        tracing::info!(pid, signal = sig, "signalled process for the host");
        Ok(())
    }

    /// `guest-exec-status` (`drain == false`: all output, at exit only) or
    /// `vireo-exec-read` (`drain == true`: output since the last read, at any time).
    pub fn status(&self, pid: i64, drain: bool) -> Result<GuestExecStatus, String> {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let shared = procs
            .get(&pid)
            .cloned()
            .ok_or_else(|| "Invalid parameter 'pid'".to_string())?;
        let mut p = lock(&shared);
        let exited = p.exited();
        let mut st = GuestExecStatus {
            exited,
            ..Default::default()
        };
        if !exited && !drain {
            return Ok(st);
        }
        if exited {
            let status = p.status.unwrap_or_else(|| ExitStatus::from_raw(0));
            st.exitcode = status.code().map(i64::from);
            st.signal = status.signal().map(i64::from);
        }
        let b64 = |v: &mut Vec<u8>| base64::engine::general_purpose::STANDARD.encode(v);
        if !p.out.unread.is_empty() || (drain && p.out.captured) {
            st.out_data = Some(b64(&mut p.out.unread));
            st.out_truncated = Some(p.out.truncated);
            p.out.unread = Vec::new();
        }
        if !p.err.unread.is_empty() || (drain && p.err.captured) {
            st.err_data = Some(b64(&mut p.err.unread));
            st.err_truncated = Some(p.err.truncated);
            p.err.unread = Vec::new();
        }
        drop(p);
        if exited {
            procs.remove(&pid);
        }
        Ok(st)
    }
}
