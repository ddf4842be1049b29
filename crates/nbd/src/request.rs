//! Transmission-phase requests: parsing the 28-byte header and validating it
//! against what was negotiated. Pure functions, no I/O.

use crate::error::Errno;
use crate::proto::*;

/// A request header as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Header {
    /// Parses a header; `None` when the magic is wrong (the stream is out of
    /// sync and the connection must be dropped).
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Option<Header> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return None;
        }
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&b[8..16]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&b[16..24]);
        Some(Header {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(cookie),
            offset: u64::from_be_bytes(offset),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Whether `len` bytes of payload follow this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }
}

/// What the connection negotiated, used to validate requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_fast_zero: bool,
    pub structured: bool,
    pub block_status: bool,
    pub max_payload: u32,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
        fast: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Validates a header: unknown commands and flags, read-only, sizes and
/// ranges. The error is what the client is told; the connection stays up.
pub(crate) fn validate(h: &Header, l: &Limits) -> Result<Op, (Errno, &'static str)> {
    let allowed = match h.kind {
        CMD_READ if l.structured => CMD_FLAG_DF,
        CMD_WRITE_ZEROES => {
            CMD_FLAG_NO_HOLE
                | if l.can_fast_zero {
                    CMD_FLAG_FAST_ZERO
                } else {
                    0
                }
        }
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
        _ => return Err((Errno::Inval, "unknown command")),
    } | CMD_FLAG_FUA;
    if h.flags & !allowed != 0 {
        return Err((Errno::Inval, "command flag not valid for this command"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && l.read_only {
        return Err((Errno::Perm, "export is read-only"));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > l.max_payload {
        return Err((Errno::Inval, "request larger than the maximum block size"));
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= l.size);
    let ranged = !matches!(h.kind, CMD_DISC | CMD_FLUSH);
    if ranged && !in_range {
        return Err(if h.kind == CMD_WRITE {
            (Errno::NoSpc, "write beyond the end of the export")
        } else {
            (Errno::Inval, "request beyond the end of the export")
        });
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        CMD_READ => Op::Read { offset, len },
        CMD_WRITE => Op::Write { offset, len, fua },
        CMD_DISC => Op::Disconnect,
        CMD_FLUSH => Op::Flush,
        CMD_TRIM => {
            if !l.can_trim {
                return Err((Errno::Inval, "trim not supported by this export"));
            }
            Op::Trim { offset, len, fua }
        }
        CMD_CACHE => Op::Cache { offset, len },
        CMD_WRITE_ZEROES => Op::WriteZeroes {
            offset,
            len,
            may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            fua,
        },
        CMD_BLOCK_STATUS => {
            if !l.block_status {
                return Err((Errno::Inval, "no metadata context negotiated"));
            }
            if len == 0 {
                return Err((Errno::Inval, "zero-length block status"));
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => return Err((Errno::Inval, "unknown command")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            read_only: false,
            can_trim: true,
            can_fast_zero: true,
            structured: true,
            block_status: true,
            max_payload: 32 << 20,
        }
    }

    fn hdr(kind: u16, flags: u16, offset: u64, len: u32) -> Header {
        Header {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn ranges_flags_and_read_only() {
        let l = limits();
        assert_eq!(
            validate(&hdr(CMD_READ, 0, 0, 4096), &l),
            Ok(Op::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            validate(&hdr(CMD_READ, 0, 1 << 20, 1), &l).unwrap_err().0,
            Errno::Inval
        );
        assert_eq!(
            validate(&hdr(CMD_WRITE, 0, 1 << 20, 1), &l).unwrap_err().0,
            Errno::NoSpc
        );
        assert_eq!(
            validate(&hdr(CMD_READ, 0, u64::MAX, 2), &l).unwrap_err().0,
            Errno::Inval
        );
        assert_eq!(validate(&hdr(99, 0, 0, 0), &l).unwrap_err().0, Errno::Inval);
        assert_eq!(
            validate(&hdr(CMD_FLUSH, CMD_FLAG_REQ_ONE, 0, 0), &l)
                .unwrap_err()
                .0,
            Errno::Inval
        );
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 0), &l).unwrap_err().0,
            Errno::Inval
        );
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert_eq!(
            validate(&hdr(CMD_TRIM, 0, 0, 512), &ro).unwrap_err().0,
            Errno::Perm
        );
        let small = Limits {
            max_payload: 4096,
            size: u64::MAX,
            ..l
        };
        assert_eq!(
            validate(&hdr(CMD_READ, 0, 0, 4097), &small).unwrap_err().0,
            Errno::Inval
        );
        assert!(validate(&hdr(CMD_WRITE_ZEROES, 0, 0, u32::MAX), &small).is_ok());
    }

    #[test]
    fn magic_checked() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        assert!(Header::parse(&b).is_none());
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[7] = 1;
        b[27] = 5;
        assert_eq!(
            Header::parse(&b),
            Some(hdr(CMD_WRITE, 0, 0, 5)).map(|h| Header { cookie: 0, ..h })
        );
    }

    proptest! {
        /// Random headers never panic, and anything accepted lies inside the export.
        #[test]
        fn random_headers_are_safe(raw in proptest::collection::vec(any::<u8>(), REQUEST_HEADER_LEN),
                                   size in 0u64..(1 << 40), ro in any::<bool>(), st in any::<bool>()) {
            let mut b = [0u8; REQUEST_HEADER_LEN];
            b.copy_from_slice(&raw);
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let h = Header::parse(&b).unwrap();
            let l = Limits { size, read_only: ro, structured: st, block_status: st, ..limits() };
            if let Ok(op) = validate(&h, &l) {
                match op {
                    Op::Read { offset, len } | Op::Write { offset, len, .. } | Op::Trim { offset, len, .. }
                    | Op::Cache { offset, len } | Op::WriteZeroes { offset, len, .. }
                    | Op::BlockStatus { offset, len, .. } => {
                        prop_assert!(offset + u64::from(len) <= size);
                    }
                    Op::Disconnect | Op::Flush => {}
                }
                let writes = matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. });
                prop_assert!(!(ro && writes), "write accepted on read-only export");
            }
        }
    }
}
