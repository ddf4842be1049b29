//! Encoding of transmission-phase replies: simple replies and structured
//! reply chunks. Each reply is one contiguous buffer so the writer sends it
//! whole and replies never interleave.

use crate::error::Errno;
use crate::export::Extent;
use crate::proto::*;

/// Most block status descriptors sent in one reply.
pub(crate) const MAX_DESCRIPTORS: usize = 8192;

fn simple_header(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A successful reply without payload (simple replies are allowed for
/// everything but READ even with structured replies).
pub(crate) fn ok(cookie: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIMPLE_REPLY_HEADER_LEN);
    simple_header(&mut v, cookie, 0);
    v
}

/// An error reply: a structured `NBD_REPLY_TYPE_ERROR` chunk with a message
/// when structured replies are on, else a simple reply.
pub(crate) fn error(structured: bool, cookie: u64, errno: Errno, msg: &str) -> Vec<u8> {
    let mut v = Vec::new();
    if structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        chunk_header(
            &mut v,
            cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            6 + msg.len() as u32,
        );
        v.extend_from_slice(&errno.code().to_be_bytes());
        v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        v.extend_from_slice(msg);
    } else {
        simple_header(&mut v, cookie, errno.code());
    }
    v
}

/// Length of the header that precedes read data.
pub(crate) fn read_header_len(structured: bool, len: u32) -> usize {
    match (structured, len) {
        (true, 0) => STRUCTURED_REPLY_HEADER_LEN,
        (true, _) => STRUCTURED_REPLY_HEADER_LEN + 8,
        (false, _) => SIMPLE_REPLY_HEADER_LEN,
    }
}

/// A buffer for a successful READ reply: header already encoded, followed by
/// `len` zero bytes for the data at `[read_header_len..]`. With structured
/// replies the data goes out as one `OFFSET_DATA` chunk marked done (the
/// data is complete before sending, so no error can follow), or a `NONE`
/// chunk for a zero-length read.
pub(crate) fn read_buffer(structured: bool, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let hl = read_header_len(structured, len);
    let mut v = Vec::with_capacity(hl + len as usize);
    if !structured {
        simple_header(&mut v, cookie, 0);
    } else if len == 0 {
        chunk_header(&mut v, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    } else {
        chunk_header(
            &mut v,
            cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            len + 8,
        );
        v.extend_from_slice(&offset.to_be_bytes());
    }
    v.resize(hl + len as usize, 0);
    v
}

/// Turns extents from an export into block status descriptors for
/// `[offset, offset+len)`: clipped to the range, contiguous from `offset`,
/// equal neighbours merged, at most one with `req_one`, at most
/// [`MAX_DESCRIPTORS`]. Never empty: an export that reports nothing usable
/// gets the whole range as allocated data (status 0 is always safe).
pub(crate) fn descriptors(
    extents: &[Extent],
    offset: u64,
    len: u32,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len);
    let mut pos = offset;
    let mut out: Vec<(u32, u32)> = Vec::new();
    for e in extents {
        if pos >= end {
            break;
        }
        if e.offset > pos {
            break; // a gap: report what is contiguous so far
        }
        let e_end = e.end().min(end);
        if e_end <= pos {
            continue;
        }
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        let n = (e_end - pos) as u32;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += n,
            _ => {
                if out.len() == MAX_DESCRIPTORS {
                    break;
                }
                out.push((n, flags));
            }
        }
        pos = e_end;
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// A block status reply for one metadata context, marked done.
pub(crate) fn block_status(cookie: u64, context: u32, descs: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descs.len();
    let mut v = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + len);
    chunk_header(
        &mut v,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        len as u32,
    );
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in descs {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_clip_merge_and_fill() {
        let ex = [
            Extent::hole(0, 100),
            Extent::hole(100, 50),
            Extent::data(150, 1000),
        ];
        assert_eq!(descriptors(&ex, 10, 200, false), vec![(140, 3), (60, 0)]);
        assert_eq!(descriptors(&ex, 10, 200, true), vec![(140, 3)]);
        assert_eq!(descriptors(&[], 0, 512, false), vec![(512, 0)]);
        assert_eq!(
            descriptors(&[Extent::data(600, 5)], 0, 512, false),
            vec![(512, 0)]
        );
        let gap = [Extent::zero(0, 10), Extent::data(20, 10)];
        assert_eq!(descriptors(&gap, 0, 30, false), vec![(10, 2)]);
    }

    #[test]
    fn encodings() {
        let r = read_buffer(true, 9, 4096, 3);
        assert_eq!(r.len(), 20 + 8 + 3);
        assert_eq!(&r[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[16..20], &11u32.to_be_bytes());
        let e = error(true, 9, Errno::Inval, "bad");
        assert_eq!(&e[20..24], &22u32.to_be_bytes());
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(error(false, 9, Errno::Perm, "x").len(), 16);
    }
}
