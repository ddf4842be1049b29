//! Deterministic operation stream shared by the `vhdx-torture` helper and the
//! crash test that checks its results.

/// Size the image toggles between (the writes stay below `SMALL`).
pub const SMALL: u64 = 16 << 20;
/// Larger size used by resize operations.
pub const LARGE: u64 = 24 << 20;

/// One operation.
#[derive(Debug, Clone, Copy)]
pub enum TOp {
    /// Write `len` bytes of `data(seed, len)` at `off`.
    Write { off: u64, len: usize, seed: u64 },
    /// Flush.
    Flush,
    /// Resize to the given size, then flush.
    Resize(u64),
}

/// xorshift64* generator.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The i-th operation given the current size.
    pub fn op(&mut self, i: u64, size: u64) -> TOp {
        match self.u64() % 10 {
            0..=6 => {
                let len = 1 + (self.u64() % (256 << 10)) as usize;
                let off = self.u64() % (SMALL - len as u64);
                TOp::Write {
                    off,
                    len,
                    seed: i.wrapping_mul(7919) ^ self.u64(),
                }
            }
            7 | 8 => TOp::Flush,
            _ => TOp::Resize(if size == SMALL { LARGE } else { SMALL }),
        }
    }
}

/// Bytes written by a write op.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut g = Gen::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&g.u64().to_le_bytes());
    }
    out.truncate(len);
    out
}
