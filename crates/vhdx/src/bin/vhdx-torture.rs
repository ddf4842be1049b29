//! Test helper for the crash test: applies a deterministic stream of writes,
//! flushes and resizes to an image and prints `S <i>` before operation `i` and
//! `A <i>` once a flush or resize that follows it has completed. The test kills
//! it with SIGKILL at random points and checks the image.
//!
//! Usage: vhdx-torture IMAGE SEED

use std::io::Write;

#[path = "../../tests/common/torture_ops.rs"]
#[allow(dead_code)]
mod torture_ops;

use torture_ops::{Gen, TOp};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: vhdx-torture IMAGE SEED");
        std::process::exit(2);
    }
    let seed: u64 = match args[2].parse() {
        Ok(s) => s,
        Err(_) => {
            eprintln!("SEED must be a number");
            std::process::exit(2);
        }
    };
    let v = match vhdx::Vhdx::open(&args[1], vhdx::OpenOptions { read_only: false }) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("open: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut g = Gen::new(seed);
    for i in 0.. {
        let op = g.op(i, v.size());
        let _ = writeln!(out, "S {i}");
        let _ = out.flush();
        let r = match op {
            TOp::Write { off, len, seed } => v.write_at(&torture_ops::data(seed, len), off),
            TOp::Flush => v.flush(),
            TOp::Resize(n) => v.resize(n).and_then(|_| v.flush()),
        };
        if let Err(e) = r {
            eprintln!("op {i} {op:?}: {e}");
            std::process::exit(1);
        }
        if !matches!(op, TOp::Write { .. }) {
            let _ = writeln!(out, "A {i}");
            let _ = out.flush();
        }
    }
}
