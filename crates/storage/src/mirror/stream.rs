//! The mirror stream: [`StreamSink`] sends a chain over any `AsyncRead + AsyncWrite`
//! (a unix socket, TCP, mutual TLS), [`receive_chain`] writes it into a directory.
//!
//! Frames are `type: u8, len: u32 LE, payload`. Sender to receiver:
//!
//! | type | payload | reply |
//! |---|---|---|
//! | 1 BEGIN | JSON `{"version":1,"plan":ChainPlan}` | OK |
//! | 2 FILE_DATA | layer u32, offset u64, bytes | — |
//! | 3 FILE_END | layer u32, len u64, crc32c u32 | — |
//! | 4 ACTIVATE | — | — |
//! | 5 WRITE | offset u64, bytes | — |
//! | 6 ZERO | offset u64, len u64 | — |
//! | 7 FLUSH | — | OK |
//! | 8 CHECKSUMS | — | OK: u32 LE per MiB |
//! | 9 COMMIT | — | OK: JSON list of files |
//! | 10 ABORT | — | OK |
//! | 11 HELD_CHECKSUMS | runs of chunks (start u64, count u32) | OK: runs, then u32 LE per chunk |
//!
//! Replies: 100 OK (payload), 101 ERROR (kind u8, UTF-8 message). The receiver answers
//! the first failure (disk full included) with ERROR, removes what it created and closes;
//! the sender reports that error at its next write or round trip. Unreplied frames are
//! pipelined, so throughput is bounded by the slower end, not by round trips.
//!
//! HELD_CHECKSUMS (version 2) asks for the CRC32C of the listed MiBs (those the source's
//! active layer holds) and of every other MiB the receiver's active layer holds; its reply
//! is `nruns u32`, `nruns` × (start u64, count u32), then one u32 per chunk of the runs.
//! The receiver still answers CHECKSUMS (whole disk) for a version 1 sender.

use super::{ChainPlan, DirSink, MirrorError, MirrorErrorKind, MirrorResult, MirrorSink};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

/// Version spoken in BEGIN; the receiver accepts versions
/// [`MIN_PROTOCOL_VERSION`]`..=PROTOCOL_VERSION` and refuses others.
pub const PROTOCOL_VERSION: u32 = 2;
/// Oldest sender version a receiver accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

const BEGIN: u8 = 1;
const FILE_DATA: u8 = 2;
const FILE_END: u8 = 3;
const ACTIVATE: u8 = 4;
const WRITE: u8 = 5;
const ZERO: u8 = 6;
const FLUSH: u8 = 7;
const CHECKSUMS: u8 = 8;
const COMMIT: u8 = 9;
const ABORT: u8 = 10;
const HELD_CHECKSUMS: u8 = 11;
const OK: u8 = 100;
const ERROR: u8 = 101;
/// Most chunks of a disk (the largest virtual size a plan accepts).
const MAX_CHUNKS: u64 = (64 << 40) / super::COPY_CHUNK;
/// Largest payload accepted.
const MAX_FRAME: usize = (32 << 20) + 64;

fn kind_code(k: MirrorErrorKind) -> u8 {
    match k {
        MirrorErrorKind::DiskFull => 1,
        MirrorErrorKind::InvalidInput => 2,
        MirrorErrorKind::Busy => 3,
        MirrorErrorKind::Verify => 4,
        MirrorErrorKind::Protocol => 5,
        MirrorErrorKind::Cancelled => 6,
        _ => 7,
    }
}

fn code_kind(c: u8) -> MirrorErrorKind {
    match c {
        1 => MirrorErrorKind::DiskFull,
        2 => MirrorErrorKind::InvalidInput,
        3 => MirrorErrorKind::Busy,
        4 => MirrorErrorKind::Verify,
        5 => MirrorErrorKind::Protocol,
        6 => MirrorErrorKind::Cancelled,
        _ => MirrorErrorKind::Io,
    }
}

fn proto(e: impl std::fmt::Display) -> MirrorError {
    MirrorError::Protocol(e.to_string())
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut h = [0u8; 5];
    match s.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await?;
    Ok(Some((h[0], p)))
}

async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    t: u8,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; 5];
    h[0] = t;
    h[1..].copy_from_slice(&(len as u32).to_le_bytes());
    s.write_all(&h).await?;
    for p in parts {
        s.write_all(p).await?;
    }
    Ok(())
}

/// Sends a chain over a stream. Its methods block (they run on the mirror thread); it
/// needs a handle to the tokio runtime that drives the stream.
pub struct StreamSink<S> {
    rt: tokio::runtime::Handle,
    s: BufWriter<S>,
    failed: Option<MirrorError>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> StreamSink<S> {
    /// A sink over `stream`, driven by the runtime `rt`.
    pub fn new(rt: tokio::runtime::Handle, stream: S) -> StreamSink<S> {
        StreamSink {
            rt,
            s: BufWriter::with_capacity(1 << 20, stream),
            failed: None,
        }
    }

    /// Gives the stream back (after `commit`, to carry the next disk).
    pub fn into_inner(self) -> S {
        self.s.into_inner()
    }

    fn send(&mut self, t: u8, parts: &[&[u8]]) -> MirrorResult<()> {
        if let Some(e) = &self.failed {
            return Err(MirrorError::Protocol(format!("stream failed earlier: {e}")));
        }
        let r = self.rt.block_on(write_frame(&mut self.s, t, parts));
        if let Err(e) = r {
            return Err(self.fail(e));
        }
        Ok(())
    }

    /// A write failed: the receiver may have said why before closing.
    fn fail(&mut self, e: std::io::Error) -> MirrorError {
        let s = &mut self.s;
        let why = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), read_frame(s.get_mut())).await
        });
        let err = match why {
            Ok(Ok(Some((ERROR, p)))) => peer_error(&p),
            _ => MirrorError::Protocol(format!("the stream broke: {e}")),
        };
        self.failed = Some(MirrorError::Protocol(err.to_string()));
        err
    }

    fn round_trip(&mut self, t: u8, parts: &[&[u8]]) -> MirrorResult<Vec<u8>> {
        self.send(t, parts)?;
        let s = &mut self.s;
        let r = self.rt.block_on(async {
            s.flush().await?;
            read_frame(s.get_mut()).await
        });
        match r {
            Ok(Some((OK, p))) => Ok(p),
            Ok(Some((ERROR, p))) => {
                let e = peer_error(&p);
                self.failed = Some(MirrorError::Protocol(e.to_string()));
                Err(e)
            }
            Ok(Some((t, _))) => Err(proto(format!("unexpected reply type {t}"))),
            Ok(None) => Err(proto("the receiver closed the stream")),
            Err(e) => Err(self.fail(e)),
        }
    }
}

fn peer_error(p: &[u8]) -> MirrorError {
    let kind = code_kind(p.first().copied().unwrap_or(0));
    let msg = String::from_utf8_lossy(p.get(1..).unwrap_or_default()).into_owned();
    if kind == MirrorErrorKind::DiskFull {
        return MirrorError::DiskFull { what: msg };
    }
    MirrorError::Peer { kind, msg }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> MirrorSink for StreamSink<S> {
    fn begin(&mut self, plan: &ChainPlan) -> MirrorResult<()> {
        let j = serde_json::json!({ "version": PROTOCOL_VERSION, "plan": plan });
        let b = serde_json::to_vec(&j).map_err(proto)?;
        self.round_trip(BEGIN, &[&b]).map(|_| ())
    }

    fn file_data(&mut self, layer: usize, off: u64, data: &[u8]) -> MirrorResult<()> {
        for (i, c) in data.chunks(16 << 20).enumerate() {
            let o = off + (i as u64) * (16 << 20);
            self.send(
                FILE_DATA,
                &[&(layer as u32).to_le_bytes(), &o.to_le_bytes(), c],
            )?;
        }
        Ok(())
    }

    fn file_end(&mut self, layer: usize, len: u64, crc: u32) -> MirrorResult<()> {
        self.send(
            FILE_END,
            &[
                &(layer as u32).to_le_bytes(),
                &len.to_le_bytes(),
                &crc.to_le_bytes(),
            ],
        )
    }

    fn activate(&mut self) -> MirrorResult<()> {
        self.send(ACTIVATE, &[])
    }

    fn write(&mut self, off: u64, data: &[u8]) -> MirrorResult<()> {
        for (i, c) in data.chunks(16 << 20).enumerate() {
            let o = off + (i as u64) * (16 << 20);
            self.send(WRITE, &[&o.to_le_bytes(), c])?;
        }
        Ok(())
    }

    fn zero(&mut self, off: u64, len: u64) -> MirrorResult<()> {
        self.send(ZERO, &[&off.to_le_bytes(), &len.to_le_bytes()])
    }

    fn flush(&mut self) -> MirrorResult<()> {
        self.round_trip(FLUSH, &[]).map(|_| ())
    }

    fn checksums(&mut self) -> MirrorResult<Vec<u32>> {
        let p = self.round_trip(CHECKSUMS, &[])?;
        Ok(p.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn held_checksums(&mut self, chunks: &[u64]) -> MirrorResult<Vec<(u64, u32)>> {
        let mut req = Vec::new();
        encode_runs(&to_runs(chunks), &mut req);
        let p = self.round_trip(HELD_CHECKSUMS, &[&req])?;
        let nruns = u32_at(&p, 0)? as usize;
        let (all, used) = decode_runs(p.get(4..).unwrap_or_default(), nruns, MAX_CHUNKS)?;
        let sums = &p[4 + used..];
        if sums.len() != all.len() * 4 {
            return Err(proto("checksum reply of the wrong length"));
        }
        Ok(all
            .into_iter()
            .zip(sums.chunks_exact(4))
            .map(|(i, c)| (i, u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect())
    }

    fn commit(&mut self) -> MirrorResult<Vec<PathBuf>> {
        let p = self.round_trip(COMMIT, &[])?;
        serde_json::from_slice(&p).map_err(proto)
    }

    fn abort(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.round_trip(ABORT, &[]) {
                tracing::debug!("aborting the mirror stream: {e}");
            }
        }
    }
}

/// Sorted chunk indices as runs `(start, count)`.
fn to_runs(chunks: &[u64]) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for &c in chunks {
        match runs.last_mut() {
            Some((s, n)) if *s + u64::from(*n) == c && *n < u32::MAX => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    runs
}

fn encode_runs(runs: &[(u64, u32)], out: &mut Vec<u8>) {
    for (s, n) in runs {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
}

/// Decodes `count` runs from `p`; returns the chunks (checked: increasing, at most `max`
/// in all) and the bytes used.
fn decode_runs(p: &[u8], count: usize, max: u64) -> MirrorResult<(Vec<u64>, usize)> {
    let mut out: Vec<u64> = Vec::new();
    for r in 0..count {
        let s = u64_at(p, r * 12)?;
        let n = u32_at(p, r * 12 + 8)?;
        if out.last().is_some_and(|&l| s <= l)
            || (out.len() as u64).saturating_add(u64::from(n)) > max
            || s.checked_add(u64::from(n)).is_none()
        {
            return Err(proto("bad chunk runs"));
        }
        out.extend(s..s + u64::from(n));
    }
    Ok((out, count * 12))
}

fn u32_at(p: &[u8], at: usize) -> MirrorResult<u32> {
    p.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| proto("short frame"))
}

fn u64_at(p: &[u8], at: usize) -> MirrorResult<u64> {
    p.get(at..at + 8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .ok_or_else(|| proto("short frame"))
}

/// What one received frame asks of the sink; `Some(payload)` is replied OK.
fn apply_frame(sink: &mut DirSink, t: u8, p: &[u8]) -> MirrorResult<Option<Vec<u8>>> {
    match t {
        BEGIN => {
            let v: serde_json::Value = serde_json::from_slice(p).map_err(proto)?;
            let ver = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0);
            if !(u64::from(MIN_PROTOCOL_VERSION)..=u64::from(PROTOCOL_VERSION)).contains(&ver) {
                return Err(proto(format!(
                    "mirror protocol version {ver} is not supported (this host speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}); update both hosts to the same Vireo version"
                )));
            }
            let plan: ChainPlan =
                serde_json::from_value(v.get("plan").cloned().unwrap_or_default())
                    .map_err(proto)?;
            sink.begin(&plan)?;
            Ok(Some(Vec::new()))
        }
        FILE_DATA => {
            sink.file_data(u32_at(p, 0)? as usize, u64_at(p, 4)?, &p[12..])?;
            Ok(None)
        }
        FILE_END => {
            sink.file_end(u32_at(p, 0)? as usize, u64_at(p, 4)?, u32_at(p, 12)?)?;
            Ok(None)
        }
        ACTIVATE => sink.activate().map(|_| None),
        WRITE => {
            sink.write(u64_at(p, 0)?, &p[8..])?;
            Ok(None)
        }
        ZERO => sink.zero(u64_at(p, 0)?, u64_at(p, 8)?).map(|_| None),
        FLUSH => sink.flush().map(|_| Some(Vec::new())),
        CHECKSUMS => Ok(Some(
            sink.checksums()?
                .iter()
                .flat_map(|c| c.to_le_bytes())
                .collect(),
        )),
        HELD_CHECKSUMS => {
            if !p.len().is_multiple_of(12) {
                return Err(proto("short frame"));
            }
            let (chunks, _) = decode_runs(p, p.len() / 12, MAX_CHUNKS)?;
            let pairs = sink.held_checksums(&chunks)?;
            let idx: Vec<u64> = pairs.iter().map(|(i, _)| *i).collect();
            let runs = to_runs(&idx);
            let mut out = Vec::with_capacity(4 + runs.len() * 12 + pairs.len() * 4);
            out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            encode_runs(&runs, &mut out);
            for (_, c) in &pairs {
                out.extend_from_slice(&c.to_le_bytes());
            }
            Ok(Some(out))
        }
        COMMIT => {
            let files = sink.commit()?;
            Ok(Some(serde_json::to_vec(&files).map_err(proto)?))
        }
        t => Err(proto(format!("unknown frame type {t}"))),
    }
}

/// Receives one chain from `stream` into `dir` (the receiving end of [`StreamSink`]).
/// Returns the files written (active leaf first) once the sender committed. On any error
/// (disk full, bad frames, a cut stream, the sender's ABORT) every file created is
/// removed, the error is sent to the sender when the stream still works, and returned.
/// The stream can carry further chains afterwards.
pub async fn receive_chain<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: &mut S,
    dir: &Path,
) -> MirrorResult<Vec<PathBuf>> {
    let mut sink = Some(DirSink::new(dir));
    let r = receive_loop(stream, &mut sink).await;
    if let Err(e) = &r {
        if let Some(mut s) = sink.take() {
            let _ = tokio::task::spawn_blocking(move || s.abort()).await;
        }
        if !matches!(e, MirrorError::Cancelled) {
            let mut p = vec![kind_code(e.kind())];
            p.extend_from_slice(e.full_message().as_bytes());
            let _ = write_frame(stream, ERROR, &[&p]).await;
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
        }
    }
    r
}

async fn receive_loop<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: &mut S,
    slot: &mut Option<DirSink>,
) -> MirrorResult<Vec<PathBuf>> {
    loop {
        let (t, p) = read_frame(stream)
            .await
            .map_err(proto)?
            .ok_or_else(|| proto("the sender closed the stream before committing"))?;
        if t == ABORT {
            if let Some(mut s) = slot.take() {
                let _ = tokio::task::spawn_blocking(move || s.abort()).await;
            }
            write_frame(stream, OK, &[]).await.map_err(proto)?;
            stream.flush().await.map_err(proto)?;
            return Err(MirrorError::Cancelled);
        }
        let mut sink = slot
            .take()
            .ok_or_else(|| proto("the receiver has no sink"))?;
        let (sink, r) = tokio::task::spawn_blocking(move || {
            let r = apply_frame(&mut sink, t, &p);
            (sink, r)
        })
        .await
        .map_err(proto)?;
        *slot = Some(sink);
        if let Some(reply) = r? {
            write_frame(stream, OK, &[&reply]).await.map_err(proto)?;
            stream.flush().await.map_err(proto)?;
            if t == COMMIT {
                let files: Vec<PathBuf> = serde_json::from_slice(&reply).map_err(proto)?;
                return Ok(files);
            }
        }
    }
}
