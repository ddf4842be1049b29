//! Hostile input: deterministic random mutations of valid images (bit flips,
//! field overwrites with checksums fixed up so deeper parsers are reached,
//! truncations, BAT entries pointing outside the file or into metadata, absurd
//! sizes) must give a clear error or a usable image — never a panic, a hang or a
//! write to a file opened read-only; and a rejected read-write open leaves the
//! file unchanged. This is the in-tree, stable-toolchain twin of
//! `fuzz/fuzz_targets/vhdx_open.rs`.

mod common;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: usize = 1 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Recomputes the CRC-32C of a checksummed structure (`len` bytes at `at`,
/// checksum at `at+4`) so a mutation gets past the checksum.
fn fix_crc(b: &mut [u8], at: usize, len: usize) {
    if at + len > b.len() {
        return;
    }
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

fn mutate(base: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    // Structure areas: headers, region tables, log, metadata, BAT.
    let areas: [(usize, usize); 6] = [
        (64 << 10, 4096),
        (128 << 10, 4096),
        (192 << 10, 64 << 10),
        (MIB, 64 << 10),
        (2 * MIB, 70 << 10),
        (3 * MIB, 64 << 10),
    ];
    let interesting: [u64; 9] = [
        0,
        1,
        0x8000_0000,
        u32::MAX as u64,
        u64::MAX,
        1 << 40,
        64 << 40,
        (64 << 40) + 512,
        3 << 20,
    ];
    match r.below(7) {
        0 => {
            for _ in 0..1 + r.below(8) {
                let (a, l) = areas[r.below(6) as usize];
                let i = a + r.below(l as u64) as usize;
                if i < b.len() {
                    b[i] ^= 1 << r.below(8);
                }
            }
        }
        1 | 2 => {
            // Overwrite a field, then fix the checksum of the header or region table.
            let (a, l) = areas[r.below(6) as usize];
            let i = (a + r.below(l as u64 / 4) as usize * 4).min(b.len().saturating_sub(8));
            let v = interesting[r.below(9) as usize]
                ^ if r.below(2) == 0 { 0 } else { r.below(1 << 20) };
            let w = if r.below(2) == 0 { 4 } else { 8 };
            b[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            fix_crc(&mut b, 64 << 10, 4096);
            fix_crc(&mut b, 128 << 10, 4096);
            fix_crc(&mut b, 192 << 10, 64 << 10);
            fix_crc(&mut b, 256 << 10, 64 << 10);
        }
        3 => {
            let n = r.below(b.len() as u64) as usize;
            b.truncate(n);
        }
        4 => {
            // BAT entry: fully present, pointing anywhere (outside the file, into metadata).
            let i = 3 * MIB + r.below(64) as usize * 8;
            let off = [0u64, 1, 2, 3, 4, 1 << 20, 1 << 30, 1 << 43][r.below(8) as usize];
            let st = [6u64, 7, 3, 5][r.below(4) as usize];
            b[i..i + 8].copy_from_slice(&((off << 20) | st).to_le_bytes());
        }
        5 => {
            // Metadata item values: block size, virtual size, sector sizes.
            let i = 2 * MIB + (64 << 10) + r.below(64) as usize;
            let v = interesting[r.below(9) as usize];
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        _ => {
            // A log GUID in the header makes the log parser run over garbage.
            let g: [u8; 16] = std::array::from_fn(|k| (r.next() >> (k % 8)) as u8);
            for h in [64 << 10, 128 << 10] {
                b[h + 48..h + 64].copy_from_slice(&g);
                fix_crc(&mut b, h, 4096);
            }
            if r.below(2) == 0 {
                let i = MIB + r.below(64 << 10) as usize;
                b[i] ^= 0x55;
            }
        }
    }
    b
}

fn exercise(path: &Path, read_only: bool) {
    if let Ok(v) = Vhdx::open(path, OpenOptions { read_only }) {
        let size = v.size();
        let mut buf = vec![0u8; 256 << 10];
        for k in 0..8u64 {
            let off = (size / 8 * k).min(size.saturating_sub(buf.len() as u64)) / 512 * 512;
            let n = (buf.len() as u64).min(size - off) as usize;
            let _ = v.read_at(&mut buf[..n], off);
        }
        let _ = v.block_status(0, size.min(1 << 30));
        if !read_only {
            let _ = v.write_at(&[1u8; 4096], 0);
            let _ = v.flush();
        }
    }
}

#[test]
fn mutated_images_never_panic_hang_or_write() {
    let d = tempfile::tempdir().unwrap();
    let seeds = d.path().join("seed");
    std::fs::create_dir(&seeds).unwrap();
    // Valid seeds: dynamic with data, and a differencing child (whose parent stays valid).
    let dynp = seeds.join("dyn.vhdx");
    let v = Vhdx::create(
        &dynp,
        &CreateOptions {
            size: 8 << 20,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    v.write_at(&common::pattern(1, 3 << 20), 512).unwrap();
    v.close().unwrap();
    let parent = d.path().join("parent.vhdx");
    Vhdx::create(
        &parent,
        &CreateOptions {
            size: 8 << 20,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let childp = d.path().join("child.vhdx");
    let c = Vhdx::create(
        &childp,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(parent),
            ..Default::default()
        },
    )
    .unwrap();
    c.write_at(&[7u8; 5000], 4096).unwrap();
    c.close().unwrap();
    let bases = [
        std::fs::read(&dynp).unwrap(),
        std::fs::read(&childp).unwrap(),
    ];
    let mut r = Rng(0x5EED_1234_ABCD_0001);
    let start = Instant::now();
    let mut n = 0u32;
    let (mut opened, mut refused) = (0u32, 0u32);
    while n < 600 && start.elapsed() < Duration::from_secs(25) {
        n += 1;
        let base = &bases[(n % 2) as usize];
        let m = mutate(base, &mut r);
        // Children are mutated in place next to their parent so the chain resolves.
        let path = d
            .path()
            .join(if n % 2 == 1 { "child.vhdx" } else { "m.vhdx" });
        std::fs::write(&path, &m).unwrap();
        let t = Instant::now();
        let ro = catch_unwind(AssertUnwindSafe(|| exercise(&path, true)));
        assert!(ro.is_ok(), "panic on mutation {n} (read-only)");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            m,
            "mutation {n}: a read-only open wrote to the file"
        );
        let rw_ok = Vhdx::open(&path, OpenOptions { read_only: false })
            .map(drop)
            .is_ok();
        if rw_ok {
            opened += 1;
            let rw = catch_unwind(AssertUnwindSafe(|| exercise(&path, false)));
            assert!(rw.is_ok(), "panic on mutation {n} (read-write)");
        } else {
            refused += 1;
            assert_eq!(
                std::fs::read(&path).unwrap(),
                m,
                "mutation {n}: a refused read-write open changed the file"
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "mutation {n} took {:?}",
            t.elapsed()
        );
    }
    eprintln!("{n} mutations: {opened} opened, {refused} refused");
    assert!(
        refused > n / 10,
        "mutations should mostly be caught ({refused}/{n})"
    );
}

/// Specific hostile cases give specific, clear errors.
#[test]
fn specific_corruptions_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.vhdx");
    Vhdx::create(
        &p,
        &CreateOptions {
            size: 8 << 20,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let good = std::fs::read(&p).unwrap();
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("not a VHDX file", Box::new(|b: &mut Vec<u8>| b[0] = b'X')),
        (
            "neither header",
            Box::new(|b: &mut Vec<u8>| {
                b[(64 << 10) + 20] ^= 1;
                b[(128 << 10) + 20] ^= 1;
            }),
        ),
        (
            "region table",
            Box::new(|b: &mut Vec<u8>| {
                b[(192 << 10) + 40] ^= 1;
                b[(256 << 10) + 40] ^= 1;
            }),
        ),
        (
            "virtual disk size has invalid value",
            Box::new(|b: &mut Vec<u8>| {
                // Virtual size item follows the file parameters item (8 bytes).
                let at = 2 * MIB + (64 << 10) + 8;
                b[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
            }),
        ),
        (
            "beyond the end of the file",
            Box::new(|b: &mut Vec<u8>| {
                let at = 3 * MIB;
                b[at..at + 8].copy_from_slice(&((1u64 << 43) | 6).to_le_bytes());
            }),
        ),
        (
            "inside a metadata region",
            Box::new(|b: &mut Vec<u8>| {
                let at = 3 * MIB;
                b[at..at + 8].copy_from_slice(&((2u64 << 20) | 6).to_le_bytes());
            }),
        ),
        (
            "beyond the end of the file",
            Box::new(|b: &mut Vec<u8>| b.truncate(3 * MIB + 4096)),
        ),
    ];
    for (want, f) in cases {
        let mut b = good.clone();
        f(&mut b);
        std::fs::write(&p, &b).unwrap();
        let e = Vhdx::open(&p, OpenOptions { read_only: false })
            .err()
            .unwrap_or_else(|| panic!("{want}: opened"));
        let chain = {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s += &format!(": {x}");
                src = x.source();
            }
            s
        };
        assert!(chain.contains(want), "expected {want:?} in {chain:?}");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b,
            "{want}: refused open changed the file"
        );
    }
}
