//! A pcap (libpcap classic format, microsecond timestamps, Ethernet link type) writer, and a
//! reader for checking files.

use std::io::{self, Write};

/// Errors from [`read_pcap`].
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    /// Not a little- or big-endian microsecond pcap file.
    #[error("not a pcap file (magic {0:#010x})")]
    Magic(u32),
    /// The file ends inside a header or record.
    #[error("pcap file truncated at byte {0}")]
    Truncated(usize),
}

/// Snap length written in the header.
pub const SNAPLEN: u32 = 65535;

/// Writes frames to a pcap stream.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    w: W,
    frames: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the global header.
    pub fn new(mut w: W) -> io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&SNAPLEN.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        w.write_all(&h)?;
        Ok(PcapWriter { w, frames: 0 })
    }

    /// Appends one frame captured at `unix_ns` (nanoseconds since the Unix epoch).
    pub fn write_frame(&mut self, unix_ns: u64, frame: &[u8]) -> io::Result<()> {
        let incl = frame.len().min(SNAPLEN as usize);
        let mut r = [0u8; 16];
        r[0..4].copy_from_slice(&((unix_ns / 1_000_000_000) as u32).to_le_bytes());
        r[4..8].copy_from_slice(&((unix_ns % 1_000_000_000 / 1000) as u32).to_le_bytes());
        r[8..12].copy_from_slice(&(incl as u32).to_le_bytes());
        r[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.w.write_all(&r)?;
        self.w.write_all(&frame[..incl])?;
        self.frames += 1;
        Ok(())
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Reads a classic pcap file into `(timestamp_us, frame)` records.
pub fn read_pcap(b: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, PcapError> {
    if b.len() < 24 {
        return Err(PcapError::Truncated(b.len()));
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le = match magic {
        0xa1b2_c3d4 => true,
        0xd4c3_b2a1 => false,
        m => return Err(PcapError::Magic(m)),
    };
    let rd = |o: usize| -> u32 {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut off = 24;
    let mut out = Vec::new();
    while off < b.len() {
        if off + 16 > b.len() {
            return Err(PcapError::Truncated(off));
        }
        let ts = u64::from(rd(off)) * 1_000_000 + u64::from(rd(off + 4));
        let incl = rd(off + 8) as usize;
        off += 16;
        if off + incl > b.len() {
            return Err(PcapError::Truncated(off));
        }
        out.push((ts, b[off..off + incl].to_vec()));
        off += incl;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer writes, the reader reads back; garbage is refused.
    #[test]
    fn roundtrip() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        w.write_frame(1_500_000_000_123_456_000, &[1, 2, 3])
            .unwrap();
        w.write_frame(1_500_000_001_000_000_000, &[9; 100]).unwrap();
        assert_eq!(w.frames(), 2);
        let bytes = w.w;
        let r = read_pcap(&bytes).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (1_500_000_000_123_456, vec![1, 2, 3]));
        assert_eq!(r[1].1, vec![9; 100]);
        assert!(read_pcap(&bytes[..bytes.len() - 1]).is_err());
        assert!(matches!(read_pcap(&[0u8; 24]), Err(PcapError::Magic(0))));
    }
}
