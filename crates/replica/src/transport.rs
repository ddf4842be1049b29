//! Carrying a cycle over a byte stream (in Vireo: the mutual-TLS host channel of the
//! `migration` crate, opened with `PeerClient::open_stream`; any `AsyncRead + AsyncWrite`
//! works, which is how the tests run it).
//!
//! ```text
//!  primary -> replica:  "VRPSHIP1" | len u64 | cycle (len bytes)
//!                  or:  "VRPSHIP2" | (n u32 | n bytes of the cycle)* | 0 u32
//!  replica -> primary:  one JSON line: {"applied": seq} or {"error": "..."}
//! ```
//! Version 2 carries a cycle whose length is not known when it starts: the primary ships
//! it while the worker is still cutting it. The replica accepts both and refuses another
//! version by name; a primary learns that the replica speaks version 2 from the daemon's
//! channel (`replica-cycle2`), so an older replica only ever sees version 1.
//! The primary commits its change tracker only after `{"applied": seq}`; any other outcome
//! (error, broken stream, timeout) aborts the cycle and its grains are shipped again.

use crate::store::{Point, ReplicaStore, StoreError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 8] = b"VRPSHIP1";
const MAGIC2: &[u8; 8] = b"VRPSHIP2";
/// Largest frame of version 2.
const MAX_FRAME: u32 = 16 << 20;

/// What went wrong while shipping a cycle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The stream broke.
    #[error("replication stream")]
    Io(#[source] std::io::Error),
    /// The other end does not speak this protocol or sent too much.
    #[error("replication stream: {0}")]
    Protocol(String),
    /// The replica refused the cycle.
    #[error("the replica refused the cycle: {0}")]
    Refused(String),
    /// Applying it here failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Applied(u64),
    Error(String),
}

/// Primary side: sends `cycle` and waits for the replica's answer; returns the applied
/// sequence number.
pub async fn send_cycle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cycle: &[u8],
) -> Result<u64, TransportError> {
    s.write_all(MAGIC).await.map_err(TransportError::Io)?;
    s.write_u64_le(cycle.len() as u64)
        .await
        .map_err(TransportError::Io)?;
    s.write_all(cycle).await.map_err(TransportError::Io)?;
    s.flush().await.map_err(TransportError::Io)?;
    read_answer(s).await
}

/// Replica side: receives one cycle (at most `max_len` bytes, either version), applies it
/// to `store` and answers. Nothing is applied unless the whole cycle arrived; then as
/// [`ReplicaStore::apply`] does.
pub async fn receive_cycle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    store: &mut ReplicaStore,
    max_len: u64,
) -> Result<Point, TransportError> {
    let buf = Incoming::start(s, max_len).await?.read_all(s).await?;
    match store.apply(&buf[..]) {
        Ok(p) => {
            answer(s, &Answer::Applied(p.seq)).await?;
            Ok(p)
        }
        Err(e) => {
            answer(s, &Answer::Error(full_message(&e))).await?;
            Err(e.into())
        }
    }
}

async fn answer<S: AsyncWrite + Unpin>(s: &mut S, a: &Answer) -> Result<(), TransportError> {
    let mut line = serde_json::to_vec(a).map_err(|e| TransportError::Protocol(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).await.map_err(TransportError::Io)?;
    s.flush().await.map_err(TransportError::Io)
}

fn full_message(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// Replica side, first half of [`receive_cycle`]: reads one shipped cycle (at most
/// `max_len` bytes) without applying it (the daemon applies it off the async runtime and
/// then calls [`answer_cycle`]).
pub async fn read_shipped<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    max_len: u64,
) -> Result<Vec<u8>, TransportError> {
    Incoming::start(s, max_len).await?.read_all(s).await
}

/// Replica side, second half: the outcome of applying a cycle read with [`read_shipped`].
pub async fn answer_cycle<S: AsyncWrite + Unpin>(
    s: &mut S,
    outcome: Result<u64, String>,
) -> Result<(), TransportError> {
    let a = match outcome {
        Ok(seq) => Answer::Applied(seq),
        Err(e) => Answer::Error(e),
    };
    answer(s, &a).await
}

/// Bytes handed to the applying thread at a time, and how many such pieces may wait for
/// it: the network runs ahead of the writes by at most 8 MiB.
const PIPE_CHUNK: u64 = 1 << 20;
const PIPE_DEPTH: usize = 8;
/// A cycle whose bytes stop coming this long is given up: the replica holds the VM's lock
/// while it streams a cycle in, and a failover must not wait forever on a dead primary.
const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Primary side: [`send_cycle`] of the `len` bytes of `r` (a cycle file), streamed
/// rather than read whole first.
pub async fn send_cycle_from<S, R>(s: &mut S, r: &mut R, len: u64) -> Result<u64, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    s.write_all(MAGIC).await.map_err(TransportError::Io)?;
    s.write_u64_le(len).await.map_err(TransportError::Io)?;
    let mut buf = vec![0u8; PIPE_CHUNK as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(PIPE_CHUNK) as usize;
        r.read_exact(&mut buf[..n])
            .await
            .map_err(TransportError::Io)?;
        s.write_all(&buf[..n]).await.map_err(TransportError::Io)?;
        left -= n as u64;
    }
    s.flush().await.map_err(TransportError::Io)?;
    read_answer(s).await
}

async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> Result<u64, TransportError> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(TransportError::Io)?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 64 << 10 {
            return Err(TransportError::Protocol("answer line too long".into()));
        }
    }
    match serde_json::from_slice::<Answer>(&line)
        .map_err(|e| TransportError::Protocol(format!("bad answer: {e}")))?
    {
        Answer::Applied(seq) => Ok(seq),
        Answer::Error(e) => Err(TransportError::Refused(e)),
    }
}

/// The cycle bytes as they arrive, for the applying thread (blocking reads; end of
/// stream when the network side stops, which a cycle reader sees as a truncation).
struct PipeReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Replica side, streaming: reads one shipped cycle (at most `max_len` bytes) and hands
/// its bytes, as they arrive, to `apply` running on a blocking thread, so the network
/// overlaps the validation and the writes. Returns the cycle's length and what `apply`
/// returned (answer it with [`answer_cycle`]). When `apply` stops early (it refused the
/// cycle) the rest of the cycle is still read, so the primary gets the answer. A broken
/// stream is an error even if `apply` succeeded.
pub async fn receive_streamed<S, T, F>(
    s: &mut S,
    max_len: u64,
    apply: F,
) -> Result<(u64, T), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(&mut dyn std::io::Read) -> T + Send + 'static,
{
    let mut inc = Incoming::start(s, max_len).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(PIPE_DEPTH);
    let job = tokio::task::spawn_blocking(move || {
        let mut r = PipeReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        apply(&mut r)
    });
    let mut tx = Some(tx);
    let mut broken = None;
    loop {
        let piece = match tokio::time::timeout(STALL, inc.next(s)).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                broken = Some(e);
                break;
            }
            Err(_) => {
                broken = Some(TransportError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data for {} s", STALL.as_secs()),
                )));
                break;
            }
        };
        if let Some(t) = &tx {
            if t.send(piece).await.is_err() {
                tx = None;
            }
        }
    }
    // The applying thread sees the end of the stream (a truncation when it broke).
    drop(tx);
    let out = job
        .await
        .map_err(|e| TransportError::Protocol(format!("applying the cycle: {e}")))?;
    if let Some(e) = broken {
        return Err(e);
    }
    Ok((inc.total, out))
}

/// How the cycle's bytes come.
enum Framing {
    /// Version 1: this many bytes left.
    Len(u64),
    /// Version 2: frames until an empty one.
    Frames,
}

/// The replica's view of one shipped cycle: its pieces as they arrive.
struct Incoming {
    framing: Framing,
    total: u64,
    max_len: u64,
    done: bool,
}

impl Incoming {
    /// Reads the magic (and, in version 1, the length).
    async fn start<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        max_len: u64,
    ) -> Result<Self, TransportError> {
        let mut m = [0u8; 8];
        s.read_exact(&mut m).await.map_err(TransportError::Io)?;
        let framing = if &m == MAGIC {
            let len = s.read_u64_le().await.map_err(TransportError::Io)?;
            if len > max_len {
                let msg = format!("a cycle of {len} bytes exceeds the limit of {max_len}");
                answer(s, &Answer::Error(msg.clone())).await?;
                return Err(TransportError::Protocol(msg));
            }
            Framing::Len(len)
        } else if &m == MAGIC2 {
            Framing::Frames
        } else if m.starts_with(b"VRPSHIP") {
            let msg = format!(
                "unsupported replication stream version {:?} (this host speaks 1 and 2): upgrade it",
                char::from(m[7])
            );
            answer(s, &Answer::Error(msg.clone())).await?;
            return Err(TransportError::Protocol(msg));
        } else {
            return Err(TransportError::Protocol(
                "not a replication stream (bad magic)".into(),
            ));
        };
        Ok(Incoming {
            framing,
            total: 0,
            max_len,
            done: false,
        })
    }

    /// The next piece of the cycle, `None` at its end.
    async fn next<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        if self.done {
            return Ok(None);
        }
        let n = match self.framing {
            Framing::Len(left) => {
                let n = left.min(PIPE_CHUNK);
                self.framing = Framing::Len(left - n);
                n
            }
            Framing::Frames => {
                let n = s.read_u32_le().await.map_err(TransportError::Io)?;
                if n > MAX_FRAME {
                    return Err(TransportError::Protocol(format!("a frame of {n} bytes")));
                }
                u64::from(n)
            }
        };
        if n == 0 {
            self.done = true;
            return Ok(None);
        }
        self.total += n;
        if self.total > self.max_len {
            return Err(TransportError::Protocol(format!(
                "a cycle of more than {} bytes exceeds the limit",
                self.max_len
            )));
        }
        let mut b = vec![0u8; n as usize];
        s.read_exact(&mut b).await.map_err(TransportError::Io)?;
        Ok(Some(b))
    }

    /// Every remaining piece, in one buffer.
    async fn read_all<S: AsyncRead + Unpin>(
        mut self,
        s: &mut S,
    ) -> Result<Vec<u8>, TransportError> {
        let mut buf = Vec::new();
        while let Some(b) = self.next(s).await? {
            buf.extend_from_slice(&b);
        }
        Ok(buf)
    }
}

/// Primary side, version 2: a cycle shipped while it is being cut (its length unknown at
/// the start). Call [`StreamSender::send`] with its bytes as they come and
/// [`StreamSender::finish`] once the cut is complete; dropping the sender instead (the
/// cut failed) leaves the replica with a truncated cycle, which it refuses.
pub struct StreamSender<'a, S> {
    s: &'a mut S,
    sent: u64,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> StreamSender<'a, S> {
    /// Starts a version 2 stream on `s`.
    pub async fn begin(s: &'a mut S) -> Result<Self, TransportError> {
        s.write_all(MAGIC2).await.map_err(TransportError::Io)?;
        Ok(StreamSender { s, sent: 0 })
    }

    /// Ships the next bytes of the cycle.
    pub async fn send(&mut self, b: &[u8]) -> Result<(), TransportError> {
        for f in b.chunks(MAX_FRAME as usize) {
            self.s
                .write_u32_le(f.len() as u32)
                .await
                .map_err(TransportError::Io)?;
            self.s.write_all(f).await.map_err(TransportError::Io)?;
            self.sent += f.len() as u64;
        }
        Ok(())
    }

    /// Bytes shipped so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Ends the cycle and waits for the replica's answer; returns the applied sequence.
    pub async fn finish(self) -> Result<u64, TransportError> {
        self.s.write_u32_le(0).await.map_err(TransportError::Io)?;
        self.s.flush().await.map_err(TransportError::Io)?;
        read_answer(self.s).await
    }
}

/// Writes one JSON line (control messages of the replica channels).
pub async fn write_json<S: AsyncWrite + Unpin, T: Serialize>(
    s: &mut S,
    v: &T,
) -> Result<(), TransportError> {
    let mut line = serde_json::to_vec(v).map_err(|e| TransportError::Protocol(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).await.map_err(TransportError::Io)?;
    s.flush().await.map_err(TransportError::Io)
}

/// Reads one JSON line of at most `max` bytes.
pub async fn read_json<S: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    s: &mut S,
    max: usize,
) -> Result<T, TransportError> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(TransportError::Io)?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > max {
            return Err(TransportError::Protocol("control line too long".into()));
        }
    }
    serde_json::from_slice(&line).map_err(|e| TransportError::Protocol(format!("bad message: {e}")))
}

/// The message of an error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    full_message(e)
}
