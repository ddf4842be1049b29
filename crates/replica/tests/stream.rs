//! Shipping a cycle while it streams (version 2 of the shipping protocol, and version 1
//! applied as it arrives): partial and complete cycles applied and acknowledged, a cycle
//! cut off before its end refused (the point does not move), an unknown version refused by
//! name. Over an in-memory duplex stream: the framing is what is tested, TLS has its own
//! test.

use replica::{
    answer_cycle, receive_streamed, send_cycle_from, CycleHeader, CycleWriter, ReplicaStore,
    StreamSender,
};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 4 << 20;

fn cycle(seq: u64, partial: bool, fill: u8) -> Vec<u8> {
    let h = CycleHeader {
        vm: "vm1".into(),
        seq,
        cut_unix_ms: seq,
        disk_sizes: vec![SIZE],
        partial,
        app_consistent: false,
    };
    let mut w = CycleWriter::new(Vec::new(), &h).unwrap();
    for g in 0..16u64 {
        // Varied data so LZ4 leaves something to check.
        let d: Vec<u8> = (0..65536u32)
            .map(|i| (i as u8) ^ fill ^ (g as u8))
            .collect();
        w.add(0, g * 65536, &d).unwrap();
    }
    w.finish().unwrap()
}

/// The replica side of one connection: applies what streams in, answers.
async fn serve(mut s: DuplexStream, dir: PathBuf) -> Result<u64, String> {
    let r = receive_streamed(&mut s, 1 << 30, move |rd| {
        ReplicaStore::open(&dir)
            .and_then(|mut st| st.apply(rd))
            .map(|p| p.seq)
            .map_err(|e| replica::error_chain(&e))
    })
    .await;
    match r {
        Ok((_, outcome)) => {
            answer_cycle(&mut s, outcome.clone()).await.unwrap();
            outcome
        }
        Err(e) => Err(replica::error_chain(&e)),
    }
}

fn latest(dir: &Path) -> u64 {
    ReplicaStore::open(dir).unwrap().latest().seq
}

#[tokio::test]
async fn streamed_cycles_apply_and_truncated_ones_do_not() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("store");
    ReplicaStore::create(&dir, "vm1", &[SIZE], 4).unwrap();

    // Version 2, a partial cycle sent in uneven pieces.
    let (mut a, b) = tokio::io::duplex(64 << 10);
    let server = tokio::spawn(serve(b, dir.clone()));
    let c = cycle(1, true, 1);
    let mut tx = StreamSender::begin(&mut a).await.unwrap();
    for piece in c.chunks(7777) {
        tx.send(piece).await.unwrap();
    }
    assert_eq!(tx.sent(), c.len() as u64);
    assert_eq!(tx.finish().await.unwrap(), 1);
    assert_eq!(server.await.unwrap(), Ok(1));
    assert_eq!(latest(&dir), 1);

    // Version 2, cut off before its end (the cut failed): refused, nothing moves.
    let (mut a, b) = tokio::io::duplex(64 << 10);
    let server = tokio::spawn(serve(b, dir.clone()));
    let c = cycle(2, true, 2);
    let mut tx = StreamSender::begin(&mut a).await.unwrap();
    tx.send(&c[..c.len() - 10]).await.unwrap();
    // No `finish`: the stream just ends.
    drop(a);
    assert!(server.await.unwrap().is_err());
    assert_eq!(latest(&dir), 1);

    // Version 1 (an older primary), streamed from a reader: a complete cycle, the first
    // recovery point.
    let (mut a, b) = tokio::io::duplex(64 << 10);
    let server = tokio::spawn(serve(b, dir.clone()));
    let c = cycle(2, false, 3);
    let seq = send_cycle_from(&mut a, &mut &c[..], c.len() as u64)
        .await
        .unwrap();
    assert_eq!(seq, 2);
    assert_eq!(server.await.unwrap(), Ok(2));
    let st = ReplicaStore::open(&dir).unwrap();
    assert!(!st.initializing());
    let v = vhdx::Vhdx::open(
        &st.point_paths(2).unwrap()[0],
        vhdx::OpenOptions { read_only: true },
    )
    .unwrap();
    let mut got = vec![0u8; 65536];
    v.read_at(&mut got, 5 * 65536).unwrap();
    let want: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ 3 ^ 5).collect();
    assert_eq!(got, want);

    // A damaged complete cycle over version 2: refused with the reason, no new point.
    let (mut a, b) = tokio::io::duplex(64 << 10);
    let server = tokio::spawn(serve(b, dir.clone()));
    let mut c = cycle(3, false, 4);
    let n = c.len();
    c[n / 2] ^= 0x40;
    let mut tx = StreamSender::begin(&mut a).await.unwrap();
    tx.send(&c).await.unwrap();
    let e = tx.finish().await.unwrap_err();
    assert!(e.to_string().contains("invalid replication cycle"), "{e}");
    assert!(server.await.unwrap().is_err());
    assert_eq!(latest(&dir), 2);
}

/// A version this host does not speak is refused by name, not as garbage.
#[tokio::test]
async fn unknown_versions_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("store");
    ReplicaStore::create(&dir, "vm1", &[SIZE], 4).unwrap();
    let (mut a, b) = tokio::io::duplex(64 << 10);
    let server = tokio::spawn(serve(b, dir.clone()));
    a.write_all(b"VRPSHIP9").await.unwrap();
    let mut line = String::new();
    a.read_to_string(&mut line).await.unwrap();
    assert!(
        line.contains("unsupported replication stream version"),
        "{line}"
    );
    let e = server.await.unwrap().unwrap_err();
    assert!(e.contains("version"), "{e}");
}
