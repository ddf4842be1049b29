//! Fixed newstyle option negotiation (the handshake phase).
//!
//! ```text
//!  S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//!  C: client flags
//!  loop:
//!    C: IHAVEOPT option length data
//!    ├─ EXPORT_NAME ─────────> S: size flags [zeroes] ──> transmission
//!    ├─ GO ──> S: INFO… ACK ─────────────────────────────> transmission
//!    ├─ ABORT ─> S: ACK ─────────────────────────────────> closed
//!    └─ INFO | LIST | STRUCTURED_REPLY | LIST/SET_META_CONTEXT | STARTTLS | other
//!         ─> S: replies, ACK or error ─> loop
//! ```
//!
//! Memory is bounded: option data above [`MAX_OPTION_DATA`] is skipped
//! without buffering and refused, options past [`MAX_OPTIONS`] or data past
//! [`MAX_OPTION_DISCARD`] end the connection.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::export::{BlockSize, ExportFlags};
use crate::proto::*;
use crate::server::{ExportEntry, ExportTable};

/// Largest option payload the server buffers.
pub(crate) const MAX_OPTION_DATA: u32 = 64 << 10;
/// Largest option payload the server skips (and refuses) rather than
/// dropping the connection.
pub(crate) const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// Most options one connection may send.
pub(crate) const MAX_OPTIONS: u32 = 4096;

/// Why a handshake ended without a negotiated export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket failed or the client went away.
    #[error("handshake I/O")]
    Io(#[source] io::Error),
    /// An option did not start with `IHAVEOPT`.
    #[error("option has bad magic {found:#x}")]
    BadMagic {
        /// What was received.
        found: u64,
    },
    /// The client set flags the server does not know.
    #[error("client sent unknown flags {flags:#x}")]
    BadClientFlags {
        /// Client flags.
        flags: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an unknown export (the protocol has no
    /// error reply for it, so the connection is closed).
    #[error("client asked for unknown export {name:?}")]
    UnknownExport {
        /// Requested name.
        name: String,
    },
    /// An option payload was too large to skip.
    #[error("option {option} has {len} bytes of data")]
    OptionTooLarge {
        /// Option number.
        option: u32,
        /// Announced length.
        len: u32,
    },
    /// The client sent more options than allowed.
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// The server is shutting down.
    #[error("server shutting down")]
    Shutdown,
}

/// Result of a successful negotiation.
pub(crate) struct Negotiated {
    pub name: String,
    pub entry: ExportEntry,
    pub structured: bool,
    pub block_status: bool,
    pub max_payload: u32,
}

/// Transmission flags for an export.
pub(crate) fn transmission_flags(f: &ExportFlags, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if f.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_WRITE_ZEROES;
        if f.can_trim {
            flags |= FLAG_SEND_TRIM;
        }
        if f.can_fast_zero {
            flags |= FLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    if f.can_multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if f.rotational {
        flags |= FLAG_ROTATIONAL;
    }
    flags
}

/// Block size constraints made consistent and clamped to the server's
/// maximum payload.
pub(crate) fn effective_block_size(b: BlockSize, server_max: u32) -> BlockSize {
    let minimum = if b.minimum.is_power_of_two() && b.minimum <= 65536 {
        b.minimum
    } else {
        1
    };
    let preferred = if b.preferred.is_power_of_two() {
        b.preferred.max(minimum)
    } else {
        4096.max(minimum)
    };
    let mut maximum = b.maximum.min(server_max);
    maximum -= maximum % minimum;
    let maximum = maximum.max(minimum);
    BlockSize {
        minimum,
        preferred: preferred.min(maximum.max(minimum)),
        maximum,
    }
}

fn take_u32(d: &[u8], at: usize) -> Option<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_str(d: &[u8], at: usize, len: usize) -> Result<String, &'static str> {
    if len > MAX_STRING {
        return Err("string longer than 4096 bytes");
    }
    let b = d
        .get(at..at + len)
        .ok_or("string runs past the option data")?;
    if b.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: export name and requested info types.
pub(crate) fn parse_info_request(d: &[u8]) -> Result<(String, Vec<u16>), &'static str> {
    let nlen = take_u32(d, 0).ok_or("option data too short")? as usize;
    let name = take_str(d, 4, nlen)?;
    let at = 4 + nlen;
    let n = d
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or("missing info count")?;
    let rest = &d[at + 2..];
    if rest.len() != 2 * n as usize {
        return Err("info request count does not match option length");
    }
    Ok((
        name,
        rest.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Parses `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` data:
/// export name and queries.
pub(crate) fn parse_meta_request(d: &[u8]) -> Result<(String, Vec<String>), &'static str> {
    let nlen = take_u32(d, 0).ok_or("option data too short")? as usize;
    let name = take_str(d, 4, nlen)?;
    let mut at = 4 + nlen;
    let n = take_u32(d, at).ok_or("missing query count")?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let qlen = take_u32(d, at).ok_or("query runs past the option data")? as usize;
        queries.push(take_str(d, at + 4, qlen)?);
        at += 4 + qlen;
    }
    if at != d.len() {
        return Err("trailing bytes after the queries");
    }
    Ok((name, queries))
}

/// The metadata contexts a query selects (LIST semantics: `base:` selects
/// every context of the namespace).
fn contexts_for(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

struct Conn<'a, S> {
    s: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        self.s.write_all(bytes).await.map_err(HandshakeError::Io)
    }
    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), HandshakeError> {
        self.send(&option_reply(option, kind, data)).await
    }
    async fn error(&mut self, option: u32, kind: u32, msg: &str) -> Result<(), HandshakeError> {
        tracing::debug!(option, kind, msg, "refusing option");
        self.reply(option, kind, msg.as_bytes()).await
    }
    async fn flush(&mut self) -> Result<(), HandshakeError> {
        self.s.flush().await.map_err(HandshakeError::Io)
    }
}

/// Runs the handshake on `s`. `Ok(None)` means the client aborted cleanly.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    table: &ExportTable,
    max_payload: u32,
    shutdown: &CancellationToken,
) -> Result<Option<Negotiated>, HandshakeError> {
    let mut c = Conn { s };
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    c.send(&greeting).await?;
    c.flush().await?;
    let client_flags = c.s.read_u32().await.map_err(HandshakeError::Io)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags {
            flags: client_flags,
        });
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // Export name for which base:allocation was selected.
    let mut meta_for: Option<String> = None;

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; 16];
        c.s.read_exact(&mut hdr).await.map_err(HandshakeError::Io)?;
        let magic = u64::from_be_bytes(hdr[..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic { found: magic });
        }
        let option = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        if len > MAX_OPTION_DATA {
            if len > MAX_OPTION_DISCARD || option == OPT_EXPORT_NAME {
                return Err(HandshakeError::OptionTooLarge { option, len });
            }
            let skipped = tokio::io::copy(
                &mut (&mut *c.s).take(u64::from(len)),
                &mut tokio::io::sink(),
            )
            .await
            .map_err(HandshakeError::Io)?;
            if skipped != u64::from(len) {
                return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            c.error(option, REP_ERR_TOO_BIG, "option data too large")
                .await?;
            c.flush().await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        c.s.read_exact(&mut data)
            .await
            .map_err(HandshakeError::Io)?;

        if shutdown.is_cancelled() && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::Shutdown);
            }
            c.error(option, REP_ERR_SHUTDOWN, "server is shutting down")
                .await?;
            c.flush().await?;
            continue;
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = match take_str(&data, 0, data.len()) {
                    Ok(n) => n,
                    Err(_) => {
                        return Err(HandshakeError::UnknownExport {
                            name: String::from_utf8_lossy(&data).into_owned(),
                        })
                    }
                };
                let Some(entry) = table.get(&name) else {
                    return Err(HandshakeError::UnknownExport { name });
                };
                let flags = transmission_flags(&entry.export.flags(), structured);
                let mut v = Vec::with_capacity(10 + 124);
                v.extend_from_slice(&entry.export.size().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    v.resize(10 + 124, 0);
                }
                c.send(&v).await?;
                c.flush().await?;
                let bs = effective_block_size(entry.export.block_size(), max_payload);
                let block_status = meta_for.as_deref() == Some(name.as_str());
                return Ok(Some(Negotiated {
                    name,
                    entry,
                    structured,
                    block_status,
                    max_payload: bs.maximum,
                }));
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = c.reply(option, REP_ACK, &[]).await;
                let _ = c.flush().await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    c.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                } else {
                    for name in table.names() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        c.reply(option, REP_SERVER, &d).await?;
                    }
                    c.reply(option, REP_ACK, &[]).await?;
                }
            }
            OPT_STARTTLS => {
                c.error(option, REP_ERR_POLICY, "TLS is not offered on this socket")
                    .await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    c.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    structured = true;
                    c.reply(option, REP_ACK, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_info_request(&data) {
                    Ok(v) => v,
                    Err(msg) => {
                        c.error(option, REP_ERR_INVALID, msg).await?;
                        c.flush().await?;
                        continue;
                    }
                };
                let Some(entry) = table.get(&name) else {
                    c.error(option, REP_ERR_UNKNOWN, "no such export").await?;
                    c.flush().await?;
                    continue;
                };
                let ex = &entry.export;
                let flags = transmission_flags(&ex.flags(), structured);
                let bs = effective_block_size(ex.block_size(), max_payload);
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&ex.size().to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                c.reply(option, REP_INFO, &d).await?;
                for info in &infos {
                    match *info {
                        INFO_NAME => {
                            let mut d = INFO_NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(name.as_bytes());
                            c.reply(option, REP_INFO, &d).await?;
                        }
                        INFO_DESCRIPTION => {
                            if let Some(desc) = ex.description() {
                                let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                                d.extend_from_slice(&desc.as_bytes()[..desc.len().min(MAX_STRING)]);
                                c.reply(option, REP_INFO, &d).await?;
                            }
                        }
                        _ => {}
                    }
                }
                // Sent whether asked or not: clients must honour it anyway.
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&bs.minimum.to_be_bytes());
                d.extend_from_slice(&bs.preferred.to_be_bytes());
                d.extend_from_slice(&bs.maximum.to_be_bytes());
                c.reply(option, REP_INFO, &d).await?;
                c.reply(option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    c.flush().await?;
                    let block_status = meta_for.as_deref() == Some(name.as_str());
                    return Ok(Some(Negotiated {
                        name,
                        entry,
                        structured,
                        block_status,
                        max_payload: bs.maximum,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = option == OPT_LIST_META_CONTEXT;
                if !structured {
                    c.error(
                        option,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    c.flush().await?;
                    continue;
                }
                let (name, queries) = match parse_meta_request(&data) {
                    Ok(v) => v,
                    Err(msg) => {
                        c.error(option, REP_ERR_INVALID, msg).await?;
                        c.flush().await?;
                        continue;
                    }
                };
                if table.get(&name).is_none() {
                    c.error(option, REP_ERR_UNKNOWN, "no such export").await?;
                    c.flush().await?;
                    continue;
                }
                let selected = if list && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| contexts_for(q, list))
                };
                if !list {
                    meta_for = selected.then(|| name.clone());
                }
                if selected {
                    let id: u32 = if list { 0 } else { BASE_ALLOCATION_ID };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    c.reply(option, REP_META_CONTEXT, &d).await?;
                }
                c.reply(option, REP_ACK, &[]).await?;
            }
            _ => {
                c.error(option, REP_ERR_UNSUP, "option not supported")
                    .await?;
            }
        }
        c.flush().await?;
    }
    Err(HandshakeError::TooManyOptions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request_parsing() {
        assert_eq!(
            parse_info_request(&info(b"disk", &[3, 1])).unwrap(),
            ("disk".into(), vec![3, 1])
        );
        let mut bad = info(b"disk", &[3]);
        bad.push(0);
        assert!(parse_info_request(&bad).is_err());
        assert!(parse_info_request(&info(b"a\0b", &[])).is_err());
        assert!(parse_info_request(&[0, 0, 0, 9, b'x']).is_err());
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let (name, q) = parse_meta_request(&d).unwrap();
        assert_eq!(name, "");
        assert_eq!(q.len(), 2);
        d[7] = 3; // claims three queries
        assert!(parse_meta_request(&d).is_err());
    }

    #[test]
    fn block_size_is_sane() {
        let b = effective_block_size(
            BlockSize {
                minimum: 3,
                preferred: 0,
                maximum: u32::MAX,
            },
            1 << 25,
        );
        assert_eq!(
            b,
            BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 25
            }
        );
        let b = effective_block_size(
            BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1000,
            },
            1 << 25,
        );
        assert_eq!(
            b,
            BlockSize {
                minimum: 512,
                preferred: 512,
                maximum: 512
            }
        );
    }

    proptest! {
        /// Arbitrary option payloads never panic the parsers.
        #[test]
        fn parsers_never_panic(d in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&d);
            let _ = parse_meta_request(&d);
        }
        /// Well-formed requests round-trip.
        #[test]
        fn info_roundtrip(name in "[a-z0-9/]{0,40}", reqs in proptest::collection::vec(any::<u16>(), 0..10)) {
            let (n, r) = parse_info_request(&info(name.as_bytes(), &reqs)).unwrap();
            prop_assert_eq!(n, name);
            prop_assert_eq!(r, reqs);
        }
    }
}
