//! Helpers the replica integration tests share: deterministic test data and whole-disk
//! reads of a served chain or a VHDX file, compared by sha256.

use nbd::Export;
use sha2::{Digest, Sha256};
use std::path::Path;

/// `len` bytes of xorshift noise from `seed` (incompressible, reproducible).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; len];
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// The whole virtual disk of a VHDX file.
pub fn read_image(p: &Path) -> Vec<u8> {
    let v = vhdx::Vhdx::open(p, vhdx::OpenOptions { read_only: true }).unwrap();
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

/// The whole virtual disk of a served chain.
pub fn read_chain(c: &storage::DiskChain) -> Vec<u8> {
    let mut b = vec![0u8; c.size() as usize];
    c.read_at(&mut b, 0).unwrap();
    b
}

/// Hex sha256 of `b`.
pub fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}
