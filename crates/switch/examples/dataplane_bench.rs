//! Measures the forwarding decision alone (no I/O): frames per second through
//! `Dataplane::process` for 64-byte frames between learned ports, on one core.
//!
//! `cargo run --release -p switch --example dataplane_bench`

use std::time::Instant;

use switch::extension::Now;
use switch::{Backend, Dataplane, Mac, PortConfig, Registry, SwitchConfig, SwitchType, VlanMode};

fn frame(dst: Mac, src: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 50, 0, 0, 0, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 30, 0, 0]);
    f.resize(64, 0);
    f
}

fn main() {
    let mut c = SwitchConfig::new("bench", SwitchType::Private);
    for i in 0..4 {
        let mut p = PortConfig::new(
            &format!("p{i}"),
            Backend::Tap {
                ifname: format!("t{i}"),
            },
        );
        p.vlan = if i == 3 {
            VlanMode::Trunk {
                allowed: [10].into(),
                native: None,
            }
        } else {
            VlanMode::Access { vlan: 10 }
        };
        c.ports.push(p);
    }
    let mut dp = match Dataplane::new(&c, &Registry::with_builtins()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("building the switch: {e}");
            std::process::exit(1);
        }
    };
    for i in 0..4 {
        dp.set_link(i, true);
    }
    let a = Mac([2, 0, 0, 0, 0, 1]);
    let b = Mac([2, 0, 0, 0, 0, 2]);
    let fa = frame(b, a);
    let fb = frame(a, b);
    let mut out = 0u64;
    let mut sink = |_p: u32, bytes: &[u8]| {
        out += bytes.len() as u64;
        true
    };
    dp.process(0, &fa, Now::default(), &mut sink);
    dp.process(1, &fb, Now::default(), &mut sink);
    let n = 5_000_000u64;
    let t0 = Instant::now();
    for i in 0..n {
        let now = Now {
            mono_ns: i,
            unix_ns: 0,
        };
        if i % 2 == 0 {
            dp.process(0, &fa, now, &mut sink);
        } else {
            dp.process(1, &fb, now, &mut sink);
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "unicast 64 B, default pipeline: {:.2} Mframes/s ({:.0} ns/frame)",
        n as f64 / dt / 1e6,
        dt * 1e9 / n as f64
    );
    let bc = frame(Mac::BROADCAST, a);
    let t0 = Instant::now();
    for i in 0..n / 5 {
        dp.process(
            0,
            &bc,
            Now {
                mono_ns: i,
                unix_ns: 0,
            },
            &mut sink,
        );
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "broadcast 64 B to 2 access + 1 trunk (tagging): {:.2} Mframes/s in",
        (n / 5) as f64 / dt / 1e6
    );
}
