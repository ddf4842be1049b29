//! Shared helpers for the vhdx integration tests: real peers (qemu-img, qemu-io).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs a tool and returns stdout; panics with the tool's stderr on failure.
/// A missing tool fails the test naming the setup script.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {tool} ({e}): install it with scripts/setup.sh (Debian package qemu-utils)"
        )
    });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool and returns (success, stdout+stderr).
pub fn try_run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {tool} ({e}): install it with scripts/setup.sh (Debian package qemu-utils)"
        )
    });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// FNV-1a 64 of a buffer (for compact assertion messages).
pub fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Reads a whole image through the crate in 4 MiB pieces.
pub fn read_all(v: &vhdx::Vhdx) -> Vec<u8> {
    let mut out = vec![0u8; v.size() as usize];
    for (i, c) in out.chunks_mut(4 << 20).enumerate() {
        v.read_at(c, (i as u64) * (4 << 20)).unwrap();
    }
    out
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
