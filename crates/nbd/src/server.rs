//! The server: named exports, accept loops, and one task set per connection.
//!
//! Per connection, the reader task parses requests. A small READ or WRITE
//! (at most [`ServerConfig::inline_max`] bytes, no FUA) is first offered to
//! the export's non-blocking path ([`Export::try_read_at`]) on the reader
//! task itself, and its reply is written at once when the writer is idle: at
//! queue depth 1 a request then costs no thread hop at all. Everything else
//! (and whatever the export declines) runs on a blocking thread (at most
//! [`ServerConfig::io_threads_per_connection`] at once), which queues the
//! encoded reply to a single writer task, so replies go out whole, in
//! completion order. Memory is bounded: the reader takes a slot from
//! [`ServerConfig::max_in_flight`] and reserves the request's data bytes
//! from [`ServerConfig::max_buffered`] *before* reading a payload; both are
//! returned only when the reply has been written. A client that stops
//! reading replies therefore stops being read from, and nothing else.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::error::{Errno, Error, ErrorKind};
use crate::export::{Export, ZeroMode};
use crate::handshake::{self, HandshakeError, Negotiated};
use crate::proto::{BASE_ALLOCATION_ID, MAX_STRING, REQUEST_HEADER_LEN};
use crate::reply;
use crate::request::{self, Header, Limits, Op};
use crate::stats::{ExportStats, StatsCounters};

/// Limits and timeouts of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests of one connection parsed but not yet answered; the
    /// connection is not read further while all are taken.
    pub max_in_flight: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Request and reply data one connection may hold in memory; at least
    /// `max_payload` plus 64 KiB.
    pub max_buffered: usize,
    /// Export calls of one connection running at once on blocking threads.
    pub io_threads_per_connection: usize,
    /// Largest READ/WRITE offered to the export's non-blocking path on the
    /// connection's own task ([`Export::try_read_at`]); 0 turns it off.
    pub inline_max: u32,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to finish option negotiation.
    pub handshake_timeout: Duration,
    /// On shutdown or disconnect, time allowed to write outstanding replies.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            max_payload: 32 << 20,
            max_buffered: 64 << 20,
            io_threads_per_connection: 8,
            inline_max: 128 << 10,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Reserve for one block status reply in the memory budget.
const BLOCK_STATUS_COST: u32 = (reply::MAX_DESCRIPTORS * 8 + 64) as u32;
/// Reserve for an error or empty reply.
const SMALL_COST: u32 = 4096 + 64;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// Negotiation failed.
    #[error("handshake failed")]
    Handshake(#[source] HandshakeError),
    /// Reading a request or writing a reply failed.
    #[error("connection I/O")]
    Io(#[source] io::Error),
    /// A request did not start with the request magic.
    #[error("request has bad magic")]
    BadRequestMagic,
}

impl ConnectionError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectionError::Handshake(HandshakeError::Io(_)) | ConnectionError::Io(_) => {
                ErrorKind::Io
            }
            ConnectionError::Handshake(HandshakeError::UnknownExport { .. }) => ErrorKind::NotFound,
            _ => ErrorKind::Protocol,
        }
    }
}

#[derive(Clone)]
pub(crate) struct ExportEntry {
    pub export: Arc<dyn Export>,
    pub stats: Arc<StatsCounters>,
}

#[derive(Default)]
pub(crate) struct ExportTable {
    map: RwLock<BTreeMap<String, ExportEntry>>,
}

impl ExportTable {
    pub fn get(&self, name: &str) -> Option<ExportEntry> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }
    pub fn names(&self) -> Vec<String> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }
}

struct Inner {
    config: ServerConfig,
    exports: ExportTable,
    shutdown: CancellationToken,
    conn_slots: Arc<Semaphore>,
}

/// An NBD server for a set of named exports. Cheap to clone; all clones
/// share exports, limits and the shutdown token.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// A server with no exports.
    pub fn new(config: ServerConfig) -> Result<Server, Error> {
        if config.max_in_flight == 0 || config.io_threads_per_connection == 0 {
            return Err(Error::Config(
                "max_in_flight and io_threads_per_connection must be > 0",
            ));
        }
        if config.max_connections == 0 {
            return Err(Error::Config("max_connections must be > 0"));
        }
        if config.max_payload < 4096 {
            return Err(Error::Config("max_payload must be at least 4096"));
        }
        let need = config.max_payload as usize + BLOCK_STATUS_COST as usize;
        if config.max_buffered < need || config.max_buffered > (u32::MAX as usize) {
            return Err(Error::Config(
                "max_buffered must be >= max_payload + 64 KiB and < 4 GiB",
            ));
        }
        let conn_slots = Arc::new(Semaphore::new(config.max_connections));
        Ok(Server {
            inner: Arc::new(Inner {
                config,
                exports: ExportTable::default(),
                shutdown: CancellationToken::new(),
                conn_slots,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Serves `export` under `name` (`""` is the default export). Clients
    /// already connected are unaffected.
    pub fn add_export(
        &self,
        name: impl Into<String>,
        export: Arc<dyn Export>,
    ) -> Result<(), Error> {
        let name = name.into();
        if name.len() > MAX_STRING || name.contains('\0') {
            return Err(Error::InvalidExportName { name });
        }
        let mut map = self
            .inner
            .exports
            .map
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&name) {
            return Err(Error::DuplicateExport { name });
        }
        map.insert(
            name,
            ExportEntry {
                export,
                stats: Arc::default(),
            },
        );
        Ok(())
    }

    /// Stops offering an export to new clients; connected clients keep it
    /// until they disconnect. Returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        self.inner
            .exports
            .map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .is_some()
    }

    /// Names of the exports offered.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.exports.names()
    }

    /// Counters of an export.
    pub fn stats(&self, name: &str) -> Option<ExportStats> {
        self.inner.exports.get(name).map(|e| e.stats.snapshot())
    }

    /// The token that shuts the server down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Starts a graceful shutdown: accept loops stop, connections stop
    /// reading requests, finish and answer the ones in flight, flush their
    /// export and close. The `serve_*` calls return once that is done.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Accepts clients on a unix socket until shutdown, then closes the
    /// listener (a new server may bind the path) and waits for its
    /// connections to finish.
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<(), Error> {
        let l = Arc::new(listener);
        self.accept_loop(move || {
            let l = l.clone();
            async move {
                let (s, addr) = l.accept().await?;
                let peer = addr
                    .as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "unix".to_string());
                Ok((s, peer))
            }
        })
        .await
    }

    /// Accepts clients on a TCP listener (bind it to loopback) until
    /// shutdown, then waits for its connections to finish.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<(), Error> {
        let l = Arc::new(listener);
        self.accept_loop(move || {
            let l = l.clone();
            async move {
                let (s, addr) = l.accept().await?;
                // Latency matters more than packet count for small replies.
                let _ = s.set_nodelay(true);
                Ok((s, addr.to_string()))
            }
        })
        .await
    }

    /// Serves one already connected client (any byte stream) to the end.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        run_connection(self.inner.clone(), stream)
            .await
            .map_err(Error::Connection)
    }

    async fn accept_loop<F, Fut, S>(&self, mut accept: F) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<(S, String)>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tracker = TaskTracker::new();
        let shutdown = self.inner.shutdown.clone();
        loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                s = self.inner.conn_slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let inner = self.inner.clone();
                    let span = tracing::info_span!("nbd_conn", peer = %peer);
                    tracker.spawn(
                        async move {
                            let _slot = slot;
                            debug!("client connected");
                            match run_connection(inner, stream).await {
                                Ok(()) => debug!("client disconnected"),
                                Err(e) if e.kind() == ErrorKind::Io => {
                                    debug!(error = %e, "connection ended")
                                }
                                Err(e) => warn!(error = %e, cause = ?std::error::Error::source(&e), "connection dropped"),
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // EMFILE and friends: keep serving the clients we have.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Close the listening socket now, so a new server can take over the
        // path while these connections drain.
        drop(accept);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// Binds a unix socket at `path` for [`Server::serve_unix`]. A stale socket
/// left by a previous server (nobody accepts on it) is replaced, so a
/// restarted server takes over the same path; a live one is refused, and a
/// path that is not a socket is never touched.
pub fn bind_unix(path: impl AsRef<Path>) -> Result<UnixListener, Error> {
    use std::os::unix::fs::FileTypeExt;
    let path = path.as_ref();
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(Error::SocketInUse { path: shown }),
            Err(_) => std::fs::remove_file(path).map_err(|source| Error::Bind {
                path: shown.clone(),
                source,
            })?,
        },
        Ok(_) => return Err(Error::NotASocket { path: shown }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Bind {
                path: shown,
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| Error::Bind {
        path: shown,
        source,
    })
}

async fn run_connection<S>(inner: Arc<Inner>, mut stream: S) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &inner.config;
    let neg = tokio::select! {
        _ = inner.shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(
            cfg.handshake_timeout,
            handshake::negotiate(&mut stream, &inner.exports, cfg.max_payload, &inner.shutdown),
        ) => match r {
            Err(_) => return Err(ConnectionError::Handshake(HandshakeError::Timeout)),
            Ok(Err(e)) => return Err(ConnectionError::Handshake(e)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(n))) => n,
        },
    };
    let stats = neg.entry.stats.clone();
    StatsCounters::add(&stats.connections, 1);
    StatsCounters::add(&stats.total_connections, 1);
    let span = tracing::debug_span!("export", name = %neg.name);
    let r = transmission(inner.clone(), stream, neg)
        .instrument(span)
        .await;
    stats
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    r
}

/// A reply ready to send, holding the connection's budget until written.
struct Outgoing {
    bytes: Vec<u8>,
    _slot: OwnedSemaphorePermit,
    _budget: Option<OwnedSemaphorePermit>,
}

/// The connection's write half, shared by the writer task and the reader's
/// inline replies (whole replies are written under the lock).
type SharedWriter<W> = Arc<tokio::sync::Mutex<BufWriter<W>>>;

async fn writer_task<W: AsyncWrite + Unpin>(
    w: SharedWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    dead: CancellationToken,
) -> io::Result<()> {
    let r = async {
        while let Some(out) = rx.recv().await {
            let mut w = w.lock().await;
            w.write_all(&out.bytes).await?;
            drop(out);
            while let Ok(out) = rx.try_recv() {
                w.write_all(&out.bytes).await?;
            }
            w.flush().await?;
        }
        let mut w = w.lock().await;
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if r.is_err() {
        dead.cancel();
    }
    r
}

enum End {
    Eof,
    Disconnect,
    Shutdown,
    WriterGone,
}

/// Reads a request header; `Ok(false)` on a clean end of stream.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    hdr: &mut [u8; REQUEST_HEADER_LEN],
) -> io::Result<bool> {
    let mut got = 0;
    while got < hdr.len() {
        let n = rd.read(&mut hdr[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    Ok(true)
}

async fn transmission<S>(
    inner: Arc<Inner>,
    stream: S,
    neg: Negotiated,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = inner.config.clone();
    let export = neg.entry.export.clone();
    let stats = neg.entry.stats.clone();
    let flags = export.flags();
    let structured = neg.structured;
    let limits = Limits {
        size: export.size(),
        read_only: flags.read_only,
        can_trim: flags.can_trim,
        can_fast_zero: flags.can_fast_zero,
        structured,
        block_status: neg.block_status,
        max_payload: neg.max_payload,
    };
    debug!(
        size = limits.size,
        structured,
        block_status = neg.block_status,
        "transmission"
    );

    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let dead = CancellationToken::new();
    let wr: SharedWriter<_> = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        256 << 10,
        wr,
    )));
    let writer = tokio::spawn(writer_task(wr.clone(), rx, dead.clone()));
    let mut inline_run = 0u32;
    // Inline replies not flushed yet: more requests were already buffered, so the flush
    // waits until the reader runs dry (one write for a burst of replies).
    let mut unflushed = false;
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight));
    let budget = Arc::new(Semaphore::new(cfg.max_buffered));
    let io_slots = Arc::new(Semaphore::new(cfg.io_threads_per_connection));
    let shutdown = inner.shutdown.clone();

    let end: Result<End, ConnectionError> = async {
        loop {
            if unflushed && rd.buffer().is_empty() {
                wr.lock().await.flush().await.map_err(ConnectionError::Io)?;
                unflushed = false;
            }
            let mut raw = [0u8; REQUEST_HEADER_LEN];
            let more = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                _ = dead.cancelled() => return Ok(End::WriterGone),
                r = read_header(&mut rd, &mut raw) => r.map_err(ConnectionError::Io)?,
            };
            if !more {
                return Ok(End::Eof);
            }
            let Some(h) = Header::parse(&raw) else {
                return Err(ConnectionError::BadRequestMagic);
            };
            let checked = request::validate(&h, &limits);
            let cost = match checked {
                Ok(Op::Read { len, .. }) | Ok(Op::Write { len, .. }) => len.max(SMALL_COST),
                Ok(Op::BlockStatus { .. }) => BLOCK_STATUS_COST,
                _ => SMALL_COST,
            };
            // Backpressure: wait for room before reading any payload.
            let (slot, reserved) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                _ = dead.cancelled() => return Ok(End::WriterGone),
                p = async {
                    let s = slots.clone().acquire_owned().await;
                    let b = budget.clone().acquire_many_owned(cost).await;
                    (s, b)
                } => match p {
                    (Ok(s), Ok(b)) => (s, b),
                    _ => return Ok(End::WriterGone),
                },
            };
            let mut payload = Vec::new();
            if h.has_payload() {
                if matches!(checked, Ok(Op::Write { .. })) {
                    payload = vec![0u8; h.len as usize];
                    rd.read_exact(&mut payload).await.map_err(ConnectionError::Io)?;
                } else {
                    // Refused write: skip its data without buffering it.
                    let n = tokio::io::copy(&mut (&mut rd).take(u64::from(h.len)), &mut tokio::io::sink())
                        .await
                        .map_err(ConnectionError::Io)?;
                    if n != u64::from(h.len) {
                        return Err(ConnectionError::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
            let op = match checked {
                Ok(Op::Disconnect) => return Ok(End::Disconnect),
                Ok(op) => op,
                Err((errno, msg)) => {
                    debug!(cookie = h.cookie, kind = h.kind, offset = h.offset, len = h.len, %errno, msg, "request refused");
                    StatsCounters::add(&stats.errors, 1);
                    let bytes = reply::error(structured, h.cookie, errno, msg);
                    let _ = tx.send(Outgoing { bytes, _slot: slot, _budget: Some(reserved) });
                    continue;
                }
            };
            let cookie = h.cookie;
            let inline = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                try_inline(&*export, &stats, &op, &payload, structured, cookie, cfg.inline_max)
            }))
            .unwrap_or_else(|_| {
                warn!(cookie, "export call panicked");
                Some(reply::error(structured, cookie, Errno::Io, "internal error"))
            });
            if let Some(bytes) = inline {
                // Written now when the writer is idle (the common case at queue
                // depth 1), else queued behind the replies it is writing.
                match wr.try_lock() {
                    Ok(mut w) => {
                        let more_buffered = !rd.buffer().is_empty();
                        let written = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => None,
                            r = async {
                                w.write_all(&bytes).await?;
                                if !more_buffered {
                                    w.flush().await?;
                                    unflushed = false;
                                } else {
                                    unflushed = true;
                                }
                                io::Result::Ok(())
                            } => Some(r),
                        };
                        match written {
                            Some(Ok(())) => {}
                            Some(Err(e)) => return Err(ConnectionError::Io(e)),
                            // A reply cut in the middle: the stream is unusable.
                            None => return Err(ConnectionError::Io(io::ErrorKind::Interrupted.into())),
                        }
                        drop((slot, reserved));
                    }
                    Err(_) => {
                        let _ = tx.send(Outgoing { bytes, _slot: slot, _budget: Some(reserved) });
                    }
                }
                // Let other tasks run now and then when a client keeps the
                // reader busy with a stream of inline requests.
                inline_run += 1;
                if inline_run.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            let (tx, export, stats) = (tx.clone(), export.clone(), stats.clone());
            // Runs on a blocking thread and queues the reply itself (the
            // channel send is synchronous), saving a task hop per request.
            let job = move |io: OwnedSemaphorePermit| {
                let run = std::panic::AssertUnwindSafe(|| {
                    execute(&*export, &stats, op, payload, structured, cookie)
                });
                let bytes = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                    warn!(cookie, "export call panicked");
                    reply::error(structured, cookie, Errno::Io, "internal error")
                });
                let _ = tx.send(Outgoing { bytes, _slot: slot, _budget: Some(reserved) });
                drop(io);
            };
            match io_slots.clone().try_acquire_owned() {
                Ok(io) => {
                    tokio::task::spawn_blocking(move || job(io));
                }
                Err(_) => {
                    let io_slots = io_slots.clone();
                    tokio::spawn(async move {
                        if let Ok(io) = io_slots.acquire_owned().await {
                            tokio::task::spawn_blocking(move || job(io));
                        }
                    });
                }
            }
        }
    }
    .await;
    drop(tx);
    let failed = match end {
        Ok(end) => {
            match end {
                End::Eof => debug!("client closed the connection"),
                End::Disconnect => debug!("client sent NBD_CMD_DISC"),
                End::Shutdown => info!("server shutdown: draining connection"),
                End::WriterGone => debug!("client stopped accepting replies"),
            }
            let abort = writer.abort_handle();
            match tokio::time::timeout(cfg.drain_timeout, writer).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => debug!(error = %e, "writing replies failed"),
                Ok(Err(e)) => warn!(error = %e, "reply writer failed"),
                Err(_) => {
                    warn!("replies not drained in time; dropping connection");
                    abort.abort();
                }
            }
            None
        }
        Err(e) => {
            // Protocol violation or broken stream: hard disconnect.
            writer.abort();
            Some(e)
        }
    };
    // Wait for export calls still running (their replies are discarded),
    // then make completed writes durable before the client can reconnect.
    let _ = io_slots
        .acquire_many(cfg.io_threads_per_connection as u32)
        .await;
    if !limits.read_only {
        let ex = export.clone();
        match tokio::task::spawn_blocking(move || ex.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "flush at disconnect failed"),
            Err(e) => warn!(error = %e, "flush at disconnect panicked"),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Offers a small READ or WRITE to the export's non-blocking path; the encoded
/// reply when the export took it.
fn try_inline(
    export: &dyn Export,
    stats: &StatsCounters,
    op: &Op,
    payload: &[u8],
    structured: bool,
    cookie: u64,
    inline_max: u32,
) -> Option<Vec<u8>> {
    match *op {
        Op::Read { offset, len } if len <= inline_max => {
            let mut buf = reply::read_buffer(structured, cookie, offset, len);
            let hl = reply::read_header_len(structured, len);
            match export.try_read_at(&mut buf[hl..], offset)? {
                Ok(()) => {
                    StatsCounters::add(&stats.reads, 1);
                    StatsCounters::add(&stats.bytes_read, u64::from(len));
                    Some(buf)
                }
                Err(e) => Some(failed(stats, structured, cookie, "read", e)),
            }
        }
        Op::Write {
            offset,
            len,
            fua: false,
        } if len <= inline_max => match export.try_write_at(payload, offset)? {
            Ok(()) => {
                StatsCounters::add(&stats.writes, 1);
                StatsCounters::add(&stats.bytes_written, u64::from(len));
                Some(reply::ok(cookie))
            }
            Err(e) => Some(failed(stats, structured, cookie, "write", e)),
        },
        _ => None,
    }
}

/// Counts a failed export call and encodes its error reply.
fn failed(
    stats: &StatsCounters,
    structured: bool,
    cookie: u64,
    what: &str,
    e: io::Error,
) -> Vec<u8> {
    StatsCounters::add(&stats.errors, 1);
    let errno = Errno::from_io(&e);
    debug!(cookie, %errno, error = %e, "{what} failed");
    reply::error(structured, cookie, errno, &format!("{what} failed: {e}"))
}

/// Runs one validated request against the export and encodes its reply.
fn execute(
    export: &dyn Export,
    stats: &StatsCounters,
    op: Op,
    payload: Vec<u8>,
    structured: bool,
    cookie: u64,
) -> Vec<u8> {
    let fail = |what: &str, e: io::Error| failed(stats, structured, cookie, what, e);
    match op {
        Op::Read { offset, len } => {
            let mut buf = reply::read_buffer(structured, cookie, offset, len);
            let hl = reply::read_header_len(structured, len);
            match export.read_at(&mut buf[hl..], offset) {
                Ok(()) => {
                    StatsCounters::add(&stats.reads, 1);
                    StatsCounters::add(&stats.bytes_read, u64::from(len));
                    buf
                }
                Err(e) => fail("read", e),
            }
        }
        Op::Write { offset, len, fua } => match export.write_at(&payload, offset, fua) {
            Ok(()) => {
                StatsCounters::add(&stats.writes, 1);
                StatsCounters::add(&stats.bytes_written, u64::from(len));
                reply::ok(cookie)
            }
            Err(e) => fail("write", e),
        },
        Op::Flush => match export.flush() {
            Ok(()) => {
                StatsCounters::add(&stats.flushes, 1);
                reply::ok(cookie)
            }
            Err(e) => fail("flush", e),
        },
        Op::Trim { offset, len, fua } => {
            let r = if len == 0 {
                Ok(())
            } else {
                export.trim(offset, u64::from(len), fua)
            };
            match r {
                Ok(()) => {
                    StatsCounters::add(&stats.trims, 1);
                    reply::ok(cookie)
                }
                Err(e) => fail("trim", e),
            }
        }
        Op::Cache { offset, len } => match export.cache(offset, u64::from(len)) {
            Ok(()) => reply::ok(cookie),
            Err(e) => fail("cache", e),
        },
        Op::WriteZeroes {
            offset,
            len,
            may_trim,
            fast,
            fua,
        } => {
            let r = if len == 0 {
                Ok(())
            } else {
                export.write_zeroes(
                    offset,
                    u64::from(len),
                    ZeroMode {
                        may_trim,
                        fast,
                        fua,
                    },
                )
            };
            match r {
                Ok(()) => {
                    StatsCounters::add(&stats.zeroes, 1);
                    reply::ok(cookie)
                }
                // A refused fast zero is expected; not counted as a failure.
                Err(e) if fast && Errno::from_io(&e) == Errno::NotSup => {
                    reply::error(structured, cookie, Errno::NotSup, "fast zero not possible")
                }
                Err(e) => fail("write zeroes", e),
            }
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => match export.block_status(offset, u64::from(len)) {
            Ok(extents) => {
                StatsCounters::add(&stats.block_status, 1);
                let d = reply::descriptors(&extents, offset, len, req_one);
                reply::block_status(cookie, BASE_ALLOCATION_ID, &d)
            }
            Err(e) => fail("block status", e),
        },
        Op::Disconnect => reply::ok(cookie),
    }
}
