//! Host side: [`AgentClient`] talks to qemu-ga or vireo-guest through the unix socket QEMU
//! serves as the chardev of the `org.qemu.guest_agent.0` virtio-serial port.
//!
//! QEMU accepts the connection whether or not an agent runs in the guest, and a guest agent
//! may start late, restart, or still hold replies meant for an earlier client. So:
//!
//! * every session starts with `0xFF` + `guest-sync-delimited {id: random}`, and every byte
//!   is discarded until a `0xFF` followed by the reply carrying that id;
//! * every request carries its own `id` member (echoed by qemu-ga and vireo-guest), and a
//!   reply with another id is stale and dropped;
//! * every call has a timeout; after one the next call resyncs first, and after a failed
//!   sync the connection is dropped and re-made (QEMU then discards whatever the dead agent
//!   never read, so a late-starting agent does not face a backlog).
//!
//! Calls are serialized by an async mutex; [`AgentClient`] is `Send + Sync` and meant to be
//! shared (`Arc`) by the worker's heartbeat, exec and KVP tasks.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures::Stream;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio::time::{timeout, Instant};
use tracing::{debug, trace};

use crate::framing::{Frame, Splitter};
use crate::protocol::{
    self, CaptureOutput, Command, FsfreezeStatus, GuestAgentInfo, GuestExec, GuestExecStatus,
    GuestExecStatusCmd, GuestFsfreezeFreeze, GuestFsfreezeFreezeList, GuestFsfreezeStatus,
    GuestFsfreezeThaw, GuestGetHostName, GuestGetOsinfo, GuestGetTime, GuestInfo,
    GuestNetworkGetInterfaces, GuestNetworkInterface, GuestOsInfo, GuestPing, GuestSetTime,
    GuestShutdown, GuestSyncDelimited, KvpPair, KvpPool, MemoryStatus, QgaError, Request, Response,
    ShutdownMode, VireoExecRead, VireoExecSignal, VireoKvpDelete, VireoKvpGet, VireoKvpList,
    VireoKvpSet, VireoMemoryStatus, CLASS_COMMAND_NOT_FOUND,
};

/// What kind of failure an [`AgentError`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The socket could not be reached or broke.
    Io,
    /// The agent did not answer in time (absent, hung or busy).
    Timeout,
    /// The agent answered with an error.
    Refused,
    /// The agent does not know the command, or it is disabled.
    Unsupported,
    /// The agent's reply made no sense.
    Protocol,
    /// The caller passed something invalid; nothing was sent.
    InvalidInput,
}

/// Errors of [`AgentClient`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connecting to the chardev socket failed.
    #[error("connecting to guest agent socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("guest agent channel I/O")]
    Io(#[source] io::Error),
    /// QEMU closed the socket.
    #[error("guest agent channel closed")]
    Closed,
    /// No reply in time.
    #[error("no reply from the guest agent to {command} within {timeout:?}")]
    Timeout {
        /// Command name.
        command: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// The agent answered with an error object.
    #[error("guest agent failed {command}: {error}")]
    Command {
        /// Command name.
        command: &'static str,
        /// The agent's error.
        error: QgaError,
    },
    /// The reply did not decode into the command's return type.
    #[error("guest agent sent an invalid reply to {command}")]
    Decode {
        /// Command name.
        command: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Base64 output data did not decode.
    #[error("guest agent sent invalid base64 in {field}")]
    Base64 {
        /// Field name.
        field: &'static str,
        /// Cause.
        #[source]
        source: base64::DecodeError,
    },
    /// The request could not be encoded or was refused locally.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The agent lacks a Vireo extension this call needs.
    #[error("guest agent does not support {0} (needs vireo-guest)")]
    Unsupported(&'static str),
}

impl AgentError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Connect { .. } | AgentError::Io(_) | AgentError::Closed => ErrorKind::Io,
            AgentError::Timeout { .. } => ErrorKind::Timeout,
            AgentError::Command { error, .. } if error.class == CLASS_COMMAND_NOT_FOUND => {
                ErrorKind::Unsupported
            }
            AgentError::Command { .. } => ErrorKind::Refused,
            AgentError::Decode { .. } | AgentError::Base64 { .. } => ErrorKind::Protocol,
            AgentError::InvalidInput(_) => ErrorKind::InvalidInput,
            AgentError::Unsupported(_) => ErrorKind::Unsupported,
        }
    }
}

/// Timeouts of an [`AgentClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Longest wait for the reply to an ordinary command.
    pub call_timeout: Duration,
    /// Longest wait for the `guest-sync-delimited` reply that opens a session.
    pub sync_timeout: Duration,
    /// How long `shutdown` waits for an error reply before taking silence as success.
    pub shutdown_grace: Duration,
    /// First interval between `exec_status` polls in [`AgentClient::run`]; it doubles up
    /// to [`ClientOptions::max_poll_interval`] while the process is silent.
    pub min_poll_interval: Duration,
    /// Longest interval between `exec_status` polls.
    pub max_poll_interval: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            call_timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(3),
            shutdown_grace: Duration::from_secs(1),
            min_poll_interval: Duration::from_millis(10),
            max_poll_interval: Duration::from_millis(250),
        }
    }
}

/// A command to run in the guest with [`AgentClient::run`] or [`AgentClient::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRequest {
    /// Program; looked up in the guest's `PATH` when it has no `/`.
    pub path: String,
    /// Arguments, without argv\[0\].
    pub args: Vec<String>,
    /// `NAME=VALUE` entries replacing the agent's environment; `None` inherits it.
    pub env: Option<Vec<String>>,
    /// Bytes fed to stdin; stdin is empty when `None`.
    pub stdin: Option<Vec<u8>>,
}

impl RunRequest {
    /// `argv[0]` is the program, the rest its arguments.
    pub fn from_argv<S: AsRef<str>>(argv: &[S]) -> Option<Self> {
        let (first, rest) = argv.split_first()?;
        Some(RunRequest {
            path: first.as_ref().to_string(),
            args: rest.iter().map(|s| s.as_ref().to_string()).collect(),
            env: None,
            stdin: None,
        })
    }
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExecExit {
    /// Exit code when it exited normally.
    pub code: Option<i64>,
    /// Signal when one killed it.
    pub signal: Option<i64>,
    /// Whether the agent dropped output past its capture limit.
    pub truncated: bool,
}

impl ExecExit {
    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Decoded state of a guest process ([`AgentClient::exec_status`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecStatus {
    /// `Some` once the process has ended (the agent then forgets the pid).
    pub exit: Option<ExecExit>,
    /// Captured stdout (all of it with qemu-ga, available at exit only).
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
}

/// One item of [`AgentClient::run`]'s stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// A chunk of stdout.
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The process ended; this is the last item.
    Exited(ExecExit),
}

struct Conn {
    stream: UnixStream,
    splitter: Splitter,
    frames: VecDeque<Frame>,
    synced: bool,
}

impl Conn {
    async fn next_frame(&mut self) -> Result<Frame, AgentError> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Ok(f);
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.stream.read(&mut buf).await.map_err(AgentError::Io)?;
            if n == 0 {
                return Err(AgentError::Closed);
            }
            trace!(bytes = n, "agent channel read");
            let mut out = Vec::new();
            self.splitter.feed(&buf[..n], &mut out);
            self.frames.extend(out);
        }
    }

    fn discard_buffered(&mut self) {
        self.frames.clear();
        self.splitter.reset();
    }
}

/// Host-side client of a guest agent (qemu-ga or vireo-guest).
pub struct AgentClient {
    path: PathBuf,
    opts: ClientOptions,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client for the chardev socket at `path`; it connects lazily on the first call.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_options(path, ClientOptions::default())
    }

    /// As [`AgentClient::new`], with explicit timeouts.
    pub fn with_options(path: impl Into<PathBuf>, opts: ClientOptions) -> Self {
        AgentClient {
            path: path.into(),
            opts,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Drops the connection; the next call reconnects and resyncs.
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }

    /// Connects if needed and resyncs the stream (`guest-sync-delimited` with a random id).
    pub async fn sync(&self) -> Result<(), AgentError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_mut() {
            c.synced = false;
        }
        self.ensure(&mut guard).await.map(|_| ())
    }

    async fn ensure<'a>(&self, guard: &'a mut Option<Conn>) -> Result<&'a mut Conn, AgentError> {
        if guard.is_none() {
            let stream =
                UnixStream::connect(&self.path)
                    .await
                    .map_err(|source| AgentError::Connect {
                        path: self.path.clone(),
                        source,
                    })?;
            debug!(path = %self.path.display(), "connected to guest agent socket");
            *guard = Some(Conn {
                stream,
                splitter: Splitter::default(),
                frames: VecDeque::new(),
                synced: false,
            });
        }
        let Some(conn) = guard.as_mut() else {
            return Err(AgentError::Closed);
        };
        if !conn.synced {
            match timeout(self.opts.sync_timeout, Self::do_sync(conn)).await {
                Ok(Ok(())) => conn.synced = true,
                Ok(Err(e)) => {
                    *guard = None;
                    return Err(e);
                }
                Err(_) => {
                    // Reconnect next time: QEMU drops what the agent never read.
                    *guard = None;
                    return Err(AgentError::Timeout {
                        command: GuestSyncDelimited::NAME,
                        timeout: self.opts.sync_timeout,
                    });
                }
            }
        }
        guard.as_mut().ok_or(AgentError::Closed)
    }

    async fn do_sync(conn: &mut Conn) -> Result<(), AgentError> {
        // Ids stay below 2^53 so any JSON implementation keeps them exact.
        let id = (rand::random::<u64>() >> 12) as i64;
        let req = Request::new(&GuestSyncDelimited { id }, None)
            .map_err(|e| AgentError::InvalidInput(e.to_string()))?;
        let mut bytes = vec![protocol::SYNC_DELIMITER];
        bytes
            .extend(serde_json::to_vec(&req).map_err(|e| AgentError::InvalidInput(e.to_string()))?);
        bytes.push(b'\n');
        conn.discard_buffered();
        conn.stream
            .write_all(&bytes)
            .await
            .map_err(AgentError::Io)?;
        let mut after_delimiter = false;
        loop {
            match conn.next_frame().await? {
                Frame::Delimiter => after_delimiter = true,
                Frame::Overflow => after_delimiter = false,
                Frame::Text(t) => {
                    let fresh = std::mem::take(&mut after_delimiter);
                    match Response::decode(&t) {
                        Ok(Response::Return { value, .. })
                            if fresh && value.as_i64() == Some(id) =>
                        {
                            debug!(id, "guest agent in sync");
                            return Ok(());
                        }
                        _ => trace!(len = t.len(), "discarding stale agent output"),
                    }
                }
            }
        }
    }

    /// Sends `cmd` and waits for its reply, resyncing first if needed.
    pub async fn call<C: Command>(&self, cmd: &C) -> Result<C::Returns, AgentError> {
        self.call_with_timeout(cmd, self.opts.call_timeout).await
    }

    /// As [`AgentClient::call`] with an explicit reply timeout.
    pub async fn call_with_timeout<C: Command>(
        &self,
        cmd: &C,
        limit: Duration,
    ) -> Result<C::Returns, AgentError> {
        let value = self.call_raw(cmd, limit, false).await?;
        let value = value.unwrap_or(Value::Null);
        serde_json::from_value(value).map_err(|source| AgentError::Decode {
            command: C::NAME,
            source,
        })
    }

    /// Sends `cmd`; `Ok(None)` means no reply within `limit` and `silence_ok` was set.
    async fn call_raw<C: Command>(
        &self,
        cmd: &C,
        limit: Duration,
        silence_ok: bool,
    ) -> Result<Option<Value>, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = Request::new(cmd, Some(Value::from(id)))
            .map_err(|e| AgentError::InvalidInput(e.to_string()))?;
        let mut bytes =
            serde_json::to_vec(&req).map_err(|e| AgentError::InvalidInput(e.to_string()))?;
        bytes.push(b'\n');

        let mut guard = self.conn.lock().await;
        let conn = self.ensure(&mut guard).await?;
        let deadline = Instant::now() + limit;
        let exchange = async {
            conn.stream
                .write_all(&bytes)
                .await
                .map_err(AgentError::Io)?;
            loop {
                let Frame::Text(t) = conn.next_frame().await? else {
                    continue;
                };
                match Response::decode(&t) {
                    Ok(r) if r.id().is_none() || r.id() == Some(&Value::from(id)) => {
                        return Ok(r);
                    }
                    Ok(r) => debug!(?r, "dropping stale agent reply"),
                    Err(e) => debug!(error = %e, "dropping undecodable agent output"),
                }
            }
        };
        let result = tokio::time::timeout_at(deadline, exchange).await;
        match result {
            Ok(Ok(Response::Return { value, .. })) => Ok(Some(value)),
            Ok(Ok(Response::Error { error, .. })) => Err(AgentError::Command {
                command: C::NAME,
                error,
            }),
            Ok(Err(AgentError::Closed)) if silence_ok => {
                *guard = None;
                Ok(None)
            }
            Ok(Err(e)) => {
                *guard = None;
                Err(e)
            }
            Err(_) => {
                if let Some(c) = guard.as_mut() {
                    c.synced = false;
                }
                if silence_ok {
                    Ok(None)
                } else {
                    Err(AgentError::Timeout {
                        command: C::NAME,
                        timeout: limit,
                    })
                }
            }
        }
    }

    /// `guest-ping`: `Ok` means the agent is alive.
    pub async fn ping(&self) -> Result<(), AgentError> {
        self.call(&GuestPing).await.map(|_| ())
    }

    /// `guest-info`: agent version and supported commands.
    pub async fn info(&self) -> Result<GuestAgentInfo, AgentError> {
        self.call(&GuestInfo).await
    }

    /// Whether the agent has Vireo's extensions: its `guest-info` lists the KVP, memory
    /// status and streamed-exec commands as enabled. (Commands added later are detected
    /// per call: an older agent answers them with [`ErrorKind::Unsupported`].)
    pub async fn supports_vireo_extensions(&self) -> Result<bool, AgentError> {
        let info = self.info().await?;
        Ok([
            VireoKvpSet::NAME,
            VireoKvpGet::NAME,
            VireoKvpList::NAME,
            VireoMemoryStatus::NAME,
            VireoExecRead::NAME,
        ]
        .iter()
        .all(|c| info.supports(c)))
    }

    /// `guest-get-osinfo`.
    pub async fn osinfo(&self) -> Result<GuestOsInfo, AgentError> {
        self.call(&GuestGetOsinfo).await
    }

    /// `guest-get-host-name`.
    pub async fn hostname(&self) -> Result<String, AgentError> {
        Ok(self.call(&GuestGetHostName).await?.host_name)
    }

    /// `guest-network-get-interfaces`.
    pub async fn interfaces(&self) -> Result<Vec<GuestNetworkInterface>, AgentError> {
        self.call(&GuestNetworkGetInterfaces).await
    }

    /// `guest-get-time`: guest clock in ns since the epoch.
    pub async fn get_time(&self) -> Result<i64, AgentError> {
        self.call(&GuestGetTime).await
    }

    /// `guest-set-time`: sets the guest clock to `ns` since the epoch (from its RTC when
    /// `None`).
    pub async fn set_time(&self, ns: Option<i64>) -> Result<(), AgentError> {
        self.call(&GuestSetTime { time: ns }).await.map(|_| ())
    }

    /// `guest-shutdown`. The agent does not answer on success, so silence (or the channel
    /// closing) for [`ClientOptions::shutdown_grace`] counts as success; an error reply
    /// is returned as such.
    pub async fn shutdown(&self, mode: ShutdownMode) -> Result<(), AgentError> {
        self.call_raw(
            &GuestShutdown { mode: Some(mode) },
            self.opts.shutdown_grace,
            true,
        )
        .await
        .map(|_| ())
    }

    /// `guest-exec`: starts `req` with output captured and returns the guest pid.
    pub async fn exec(&self, req: &RunRequest) -> Result<i64, AgentError> {
        let cmd = GuestExec {
            path: req.path.clone(),
            arg: Some(req.args.clone()),
            env: req.env.clone(),
            input_data: req
                .stdin
                .as_ref()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
            capture_output: Some(CaptureOutput::Flag(true)),
        };
        Ok(self.call(&cmd).await?.pid)
    }

    /// `guest-exec-status`, decoded. After it reports an exit the agent forgets `pid`.
    pub async fn exec_status(&self, pid: i64) -> Result<ExecStatus, AgentError> {
        decode_status(self.call(&GuestExecStatusCmd { pid }).await?)
    }

    /// `vireo-exec-read` (vireo-guest only): output produced since the last read.
    pub async fn exec_read(&self, pid: i64) -> Result<ExecStatus, AgentError> {
        decode_status(self.call(&VireoExecRead { pid }).await?)
    }

    /// `vireo-exec-signal` (vireo-guest only): sends `signal` to a running `exec` process
    /// (e.g. 2 for Ctrl-C, 9 to kill); its exit is then reported by the status calls.
    pub async fn exec_signal(&self, pid: i64, signal: i64) -> Result<(), AgentError> {
        self.call(&VireoExecSignal {
            pid,
            signal: Some(signal),
        })
        .await
        .map(|_| ())
    }

    /// Runs `req` in the guest and streams its output, ending with [`RunEvent::Exited`].
    ///
    /// With vireo-guest output arrives while the process runs (`vireo-exec-read`); with
    /// qemu-ga it arrives when the process exits. Dropping the stream stops polling but
    /// leaves the process running in the guest.
    pub fn run(
        &self,
        req: RunRequest,
    ) -> impl Stream<Item = Result<RunEvent, AgentError>> + Send + '_ {
        struct St {
            req: Option<RunRequest>,
            pid: i64,
            streaming: bool,
            delay: Duration,
            queue: VecDeque<RunEvent>,
            done: bool,
        }
        let st = St {
            req: Some(req),
            pid: 0,
            streaming: false,
            delay: self.opts.min_poll_interval,
            queue: VecDeque::new(),
            done: false,
        };
        futures::stream::unfold(st, move |mut st| async move {
            loop {
                if let Some(ev) = st.queue.pop_front() {
                    return Some((Ok(ev), st));
                }
                if st.done {
                    return None;
                }
                if let Some(req) = st.req.take() {
                    let streaming = match self.supports_vireo_extensions().await {
                        Ok(s) => s,
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                    };
                    match self.exec(&req).await {
                        Ok(pid) => {
                            st.pid = pid;
                            st.streaming = streaming;
                        }
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                    }
                    continue;
                }
                tokio::time::sleep(st.delay).await;
                let status = if st.streaming {
                    self.exec_read(st.pid).await
                } else {
                    self.exec_status(st.pid).await
                };
                match status {
                    Ok(s) => {
                        if s.stdout.is_empty() && s.stderr.is_empty() {
                            st.delay = (st.delay * 2).min(self.opts.max_poll_interval);
                        } else {
                            st.delay = self.opts.min_poll_interval;
                        }
                        if !s.stdout.is_empty() {
                            st.queue.push_back(RunEvent::Stdout(s.stdout));
                        }
                        if !s.stderr.is_empty() {
                            st.queue.push_back(RunEvent::Stderr(s.stderr));
                        }
                        if let Some(exit) = s.exit {
                            st.queue.push_back(RunEvent::Exited(exit));
                            st.done = true;
                        }
                    }
                    // A slow guest may miss one poll; the next one resyncs and retries.
                    Err(e) if e.kind() == ErrorKind::Timeout => {
                        debug!(pid = st.pid, "exec status poll timed out; retrying");
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }

    /// Runs `req` to completion and returns (stdout, stderr, exit).
    pub async fn run_collect(
        &self,
        req: RunRequest,
    ) -> Result<(Vec<u8>, Vec<u8>, ExecExit), AgentError> {
        use futures::StreamExt;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let stream = self.run(req);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev? {
                RunEvent::Stdout(d) => out.extend(d),
                RunEvent::Stderr(d) => err.extend(d),
                RunEvent::Exited(x) => return Ok((out, err, x)),
            }
        }
        Err(AgentError::Closed)
    }

    /// `guest-fsfreeze-freeze`: number of filesystems frozen.
    pub async fn fsfreeze_freeze(&self) -> Result<i64, AgentError> {
        self.call(&GuestFsfreezeFreeze).await
    }

    /// `guest-fsfreeze-freeze-list`: freezes the given mount points only.
    pub async fn fsfreeze_freeze_list(&self, mountpoints: &[String]) -> Result<i64, AgentError> {
        self.call(&GuestFsfreezeFreezeList {
            mountpoints: Some(mountpoints.to_vec()),
        })
        .await
    }

    /// `guest-fsfreeze-thaw`: number of filesystems thawed.
    pub async fn fsfreeze_thaw(&self) -> Result<i64, AgentError> {
        self.call(&GuestFsfreezeThaw).await
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FsfreezeStatus, AgentError> {
        self.call(&GuestFsfreezeStatus).await
    }

    /// `vireo-kvp-set`: publishes `key=value` to the guest (host pool).
    pub async fn kvp_set(&self, key: &str, value: &str) -> Result<(), AgentError> {
        protocol::validate_kvp_key(key).map_err(AgentError::InvalidInput)?;
        protocol::validate_kvp_value(value).map_err(AgentError::InvalidInput)?;
        self.call(&VireoKvpSet {
            key: key.into(),
            value: value.into(),
        })
        .await
        .map(|_| ())
    }

    /// `vireo-kvp-delete`: removes `key` from the host pool.
    pub async fn kvp_delete(&self, key: &str) -> Result<(), AgentError> {
        protocol::validate_kvp_key(key).map_err(AgentError::InvalidInput)?;
        self.call(&VireoKvpDelete { key: key.into() })
            .await
            .map(|_| ())
    }

    /// `vireo-kvp-get`: the value of `key` in `pool`, `None` when unset.
    pub async fn kvp_get(&self, pool: KvpPool, key: &str) -> Result<Option<String>, AgentError> {
        protocol::validate_kvp_key(key).map_err(AgentError::InvalidInput)?;
        Ok(self
            .call(&VireoKvpGet {
                key: key.into(),
                pool: Some(pool),
            })
            .await?
            .value)
    }

    /// `vireo-kvp-list`: all pairs of `pool`, sorted by key.
    pub async fn kvp_list(&self, pool: KvpPool) -> Result<Vec<KvpPair>, AgentError> {
        self.call(&VireoKvpList { pool }).await
    }

    /// `vireo-memory-status`: guest memory in bytes.
    pub async fn memory_status(&self) -> Result<MemoryStatus, AgentError> {
        self.call(&VireoMemoryStatus).await
    }
}

fn decode_b64(field: &'static str, s: Option<String>) -> Result<Vec<u8>, AgentError> {
    match s {
        None => Ok(Vec::new()),
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|source| AgentError::Base64 { field, source }),
    }
}

fn decode_status(s: GuestExecStatus) -> Result<ExecStatus, AgentError> {
    let truncated = s.out_truncated.unwrap_or(false) || s.err_truncated.unwrap_or(false);
    Ok(ExecStatus {
        exit: s.exited.then_some(ExecExit {
            code: s.exitcode,
            signal: s.signal,
            truncated,
        }),
        stdout: decode_b64("out-data", s.out_data)?,
        stderr: decode_b64("err-data", s.err_data)?,
    })
}
