//! Splitting a QGA byte stream into JSON texts.
//!
//! Neither side of the protocol frames its messages: requests need not end with a newline
//! (libvirt sends none), and a stream can hold half a message left over from an earlier
//! session. [`Splitter`] tracks brace depth, strings and escapes to cut complete top-level
//! JSON objects out of the stream, skips anything between them, and reports every `0xFF`
//! byte as a [`Frame::Delimiter`] after throwing away the partial text it interrupted
//! (`0xFF` never occurs in UTF-8, so it cannot be part of valid JSON).

use crate::protocol::SYNC_DELIMITER;

/// Default cap on one JSON text (qemu-ga's own limit is 64 MiB).
pub const DEFAULT_MAX_TEXT: usize = 64 << 20;

/// Most nesting the splitter accepts (qemu-ga's limit is 1024).
const MAX_DEPTH: usize = 1024;

/// One item cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete top-level JSON object (not yet parsed).
    Text(Vec<u8>),
    /// A `0xFF` byte: the peer asks for a fresh start.
    Delimiter,
    /// A text went past the size or depth limit and was dropped; the splitter skips
    /// input up to the next `0xFF`.
    Overflow,
}

/// Incremental splitter; feed it bytes as they arrive.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    skipping: bool,
    max_text: usize,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TEXT)
    }
}

impl Splitter {
    /// A splitter dropping texts longer than `max_text` bytes.
    pub fn new(max_text: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            skipping: false,
            max_text,
        }
    }

    /// Forgets any partial text.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.skipping = false;
    }

    /// Whether a partial text is buffered.
    pub fn is_idle(&self) -> bool {
        self.depth == 0 && !self.skipping
    }

    /// Feeds `data`, appending complete frames to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            if b == SYNC_DELIMITER {
                self.reset();
                out.push(Frame::Delimiter);
                continue;
            }
            if self.skipping {
                continue;
            }
            if self.depth == 0 {
                // Between texts: only an object may start; anything else is noise
                // (whitespace, a stray reply fragment) and is skipped.
                if b == b'{' {
                    self.buf.clear();
                    self.buf.push(b);
                    self.depth = 1;
                }
                continue;
            }
            if self.buf.len() >= self.max_text {
                self.reset();
                self.skipping = true;
                out.push(Frame::Overflow);
                continue;
            }
            self.buf.push(b);
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        self.reset();
                        self.skipping = true;
                        out.push(Frame::Overflow);
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        out.push(Frame::Text(std::mem::take(&mut self.buf)));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        out
    }

    fn text(s: &str) -> Frame {
        Frame::Text(s.as_bytes().to_vec())
    }

    /// Objects are cut out whatever the chunking, with or without newlines.
    #[test]
    fn splits_objects_across_chunks() {
        let stream = br#"{"execute":"guest-ping"}{"a":"}{\"x"}  {"b":[1,{"c":2}]}
"#;
        let expect = vec![
            text(r#"{"execute":"guest-ping"}"#),
            text(r#"{"a":"}{\"x"}"#),
            text(r#"{"b":[1,{"c":2}]}"#),
        ];
        assert_eq!(split(&[stream]), expect);
        for cut in 0..stream.len() {
            assert_eq!(
                split(&[&stream[..cut], &stream[cut..]]),
                expect,
                "cut {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(split(&bytes), expect);
    }

    /// 0xFF drops the partial text and is reported; garbage between texts is skipped.
    #[test]
    fn delimiter_resets() {
        let out = split(&[b"garbage}] {\"half\": \"x", &[0xFF], b"{\"return\": 5}\n"]);
        assert_eq!(out, vec![Frame::Delimiter, text("{\"return\": 5}")]);
    }

    /// A text past the limit is dropped until the next delimiter.
    #[test]
    fn overflow() {
        let mut s = Splitter::new(16);
        let mut out = Vec::new();
        s.feed(b"{\"a\":\"0123456789abcdef\"}{\"b\":1}", &mut out);
        assert_eq!(out, vec![Frame::Overflow]);
        out.clear();
        s.feed(&[0xFF], &mut out);
        s.feed(b"{\"b\":1}", &mut out);
        assert_eq!(out, vec![Frame::Delimiter, text("{\"b\":1}")]);

        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.feed(&vec![b'['; 2000], &mut out);
        assert!(out.is_empty());
        s.feed(b"{", &mut out);
        s.feed(&vec![b'['; 2000], &mut out);
        assert_eq!(out, vec![Frame::Overflow]);
    }
}
