//! Helpers shared by the replica end-to-end tests: the status rows, host-side reads of a
//! VHDX chain, and the check of the guest's checksummed 4 KiB records.

use crate::multihost::{Cluster, NsHost};
use crate::{bin, tail};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Hosts A and B (each daemon with its `env`), trusting each other, B accepting replicas
/// from A into the returned directory.
pub fn replica_pair(env: &[&[(&str, &str)]]) -> (Cluster, std::path::PathBuf) {
    let c = Cluster::start(2, env);
    c.trust(0, 1);
    c.trust(1, 0);
    let rpath = c.dir.path().join("replicas");
    c.hosts[1].ok(&[
        "host",
        "set",
        "--allow-replica-from",
        c.hosts[0].addr.split(':').next().expect("A's address"),
        "--replica-path",
        rpath.to_str().expect("test paths are UTF-8"),
    ]);
    (c, rpath)
}

/// `vireo replica status --json` on `h`.
pub fn status(h: &NsHost) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&h.ok(&["replica", "status", "--json"]))
        .expect("status json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits up to `secs` for the status row of VM `g` matching `pred`.
pub fn wait_status(
    h: &NsHost,
    what: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(h);
        if let Some(v) = s.iter().find(|v| v["vm"] == "g" && pred(v)) {
            return v.clone();
        }
        assert!(
            Instant::now() < deadline,
            "[{}] waited {secs}s for {what}: {s:#?}\nlog tail:\n{}",
            h.ns,
            tail(&h.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A VHDX chain (leaf `src`) as raw bytes, read host-side with `vireo disk convert`.
pub fn raw_image(src: &Path, scratch: &Path) -> Vec<u8> {
    let dst = scratch.join("read.raw");
    let _ = std::fs::remove_file(&dst);
    let o = Command::new(bin("vireo"))
        .args(["disk", "convert"])
        .arg(src)
        .arg(&dst)
        .args(["--format", "raw"])
        .output()
        .expect("vireo disk convert");
    assert!(
        o.status.success(),
        "reading {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let b = std::fs::read(&dst).expect("raw image");
    let _ = std::fs::remove_file(&dst);
    b
}

/// The data disk (index 1) of recovery point `id` of the replica store in `store`.
pub fn point_data(store: &Path, id: u64, scratch: &Path) -> Vec<u8> {
    raw_image(&store.join(format!("p-{id}")).join("disk1.avhdx"), scratch)
}

pub use crate::guest_io::sha256_hex;

/// Host-side check of the records in a raw data disk image: every non-empty record of the
/// 64 slots holds a valid checksum in its own slot. Returns the highest sequence number.
pub fn check_records(img: &[u8]) -> u64 {
    let mut max = 0;
    for k in 0..64usize {
        let rec = &img[k * 4096..(k + 1) * 4096];
        let t: Vec<u8> = rec[4000..].iter().copied().filter(|&b| b != 0).collect();
        if t.is_empty() {
            continue;
        }
        let t = String::from_utf8_lossy(&t).trim().to_string();
        let (seq, sum) = t
            .split_once(' ')
            .unwrap_or_else(|| panic!("slot {k}: {t:?}"));
        let seq: u64 = seq.parse().unwrap_or_else(|_| panic!("slot {k}: {t:?}"));
        assert_eq!(sha256_hex(&rec[..4000]), sum, "slot {k}: torn record {seq}");
        assert_eq!(seq % 64, k as u64, "slot {k} holds record {seq}");
        max = max.max(seq);
    }
    max
}

/// Waits (60 s at most) until the [`crate::guest_io::RECORD_WRITER`] in guest `g` on `h`
/// has written `n` records.
pub fn wait_records(h: &NsHost, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out) = h.exec("g", "cat /tmp/counter 2>/dev/null || echo 0");
        if out.trim().parse::<u64>().unwrap_or(0) >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's writer does not write: {out}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
