//! Fuzz the VHDX parser and open path: the input is a whole image file. Opening
//! must return an error or a usable handle (reads, block status, check) — never
//! panic, hang, allocate without bound or write to a read-only file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhdx::{OpenOptions, Vhdx};

fuzz_target!(|data: &[u8]| {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(_) => return,
    };
    let path = dir.path().join("f.vhdx");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(v) = Vhdx::open(&path, OpenOptions { read_only: true }) {
        let size = v.size();
        let mut buf = vec![0u8; 64 << 10];
        for k in 0..4u64 {
            let off = (size / 4 * k).min(size.saturating_sub(buf.len() as u64)) / 512 * 512;
            let n = (buf.len() as u64).min(size - off) as usize;
            let _ = v.read_at(&mut buf[..n], off);
        }
        let _ = v.block_status(0, size.min(1 << 30));
    }
    let _ = vhdx::check(&path, false);
    assert_eq!(std::fs::read(&path).ok().as_deref(), Some(data), "read-only open wrote to the file");
});
