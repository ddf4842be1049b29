//! Carrying a cycle over a byte stream (in Vireo: the mutual-TLS host channel of the
//! `migration` crate, opened with `PeerClient::open_stream`; any `AsyncRead + AsyncWrite`
//! works, which is how the tests run it).
//!
//! ```text
//!  primary -> replica:  "VRPSHIP1" | len u64 | cycle (len bytes)
//!  replica -> primary:  one JSON line: {"applied": seq} or {"error": "..."}
//! ```
//! The primary commits its change tracker only after `{"applied": seq}`; any other outcome
//! (error, broken stream, timeout) aborts the cycle and its grains are shipped again.

use crate::store::{Point, ReplicaStore, StoreError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 8] = b"VRPSHIP1";

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

/// Replica side: receives one cycle (at most `max_len` bytes), applies it to `store` and
/// answers. The store is changed only if the whole cycle arrived and validated.
pub async fn receive_cycle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    store: &mut ReplicaStore,
    max_len: u64,
) -> Result<Point, TransportError> {
    let mut m = [0u8; 8];
    s.read_exact(&mut m).await.map_err(TransportError::Io)?;
    if &m != MAGIC {
        return Err(TransportError::Protocol(
            "not a replication stream (bad magic)".into(),
        ));
    }
    let len = s.read_u64_le().await.map_err(TransportError::Io)?;
    if len > max_len {
        let msg = format!("a cycle of {len} bytes exceeds the limit of {max_len}");
        answer(s, &Answer::Error(msg.clone())).await?;
        return Err(TransportError::Protocol(msg));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.map_err(TransportError::Io)?;
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
    let mut m = [0u8; 8];
    s.read_exact(&mut m).await.map_err(TransportError::Io)?;
    if &m != MAGIC {
        return Err(TransportError::Protocol(
            "not a replication stream (bad magic)".into(),
        ));
    }
    let len = s.read_u64_le().await.map_err(TransportError::Io)?;
    if len > max_len {
        let msg = format!("a cycle of {len} bytes exceeds the limit of {max_len}");
        answer(s, &Answer::Error(msg.clone())).await?;
        return Err(TransportError::Protocol(msg));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.map_err(TransportError::Io)?;
    Ok(buf)
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
