//! Bounded random test of the whole connection state machine: random
//! mixtures of garbage, options (valid and not) and requests (valid and
//! not) are fed to `serve_connection` over an in-memory stream. Every
//! session must end (no hang), no task may panic, and the server must still
//! serve a normal client afterwards.

use std::sync::Arc;
use std::time::Duration;

use nbd::{MemExport, Server, ServerConfig};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    option(7, &d)
}

fn set_meta() -> Vec<u8> {
    let q = b"base:allocation";
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(q.len() as u32).to_be_bytes());
    d.extend_from_slice(q);
    option(10, &d)
}

fn request(kind: u16, flags: u16, offset: u64, len: u32, with_payload: bool) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&7u64.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    if with_payload && kind == 1 {
        v.resize(v.len() + len as usize, 0xa5);
    }
    v
}

fn segment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..48),
        (0u32..13, vec(any::<u8>(), 0..40)).prop_map(|(o, d)| option(o, &d)),
        Just(option(8, &[])),
        Just(set_meta()),
        Just(go("")),
        Just(go("missing")),
        (
            0u16..10,
            0u16..64,
            0u64..(2 << 20),
            0u32..(128 << 10),
            any::<bool>()
        )
            .prop_map(|(k, f, o, l, p)| request(k, f, o, l, p)),
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u32>())
            .prop_map(|(k, f, o, l)| request(k, f, o, l, false)),
    ]
}

fn server() -> Server {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let s = Server::new(cfg).unwrap();
    s.add_export("", Arc::new(MemExport::new(1 << 20))).unwrap();
    s
}

async fn session(server: &Server, flags: u32, segments: &[Vec<u8>]) {
    let (client, server_io) = tokio::io::duplex(64 << 10);
    let srv = server.clone();
    let task = tokio::spawn(async move { srv.serve_connection(server_io).await });
    let (mut rd, mut wr) = tokio::io::split(client);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let mut bytes = flags.to_be_bytes().to_vec();
    for s in segments {
        bytes.extend_from_slice(s);
    }
    let _ = wr.write_all(&bytes).await;
    let _ = wr.shutdown().await;
    let done = tokio::time::timeout(Duration::from_secs(20), task).await;
    let joined = done.expect("session did not end");
    assert!(
        !joined.as_ref().is_err_and(|e| e.is_panic()),
        "connection task panicked"
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader did not end");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random sessions end without panics or hangs.
    #[test]
    fn random_sessions_terminate(flags in prop_oneof![Just(3u32), Just(1u32), any::<u32>()],
                                 segs in vec(segment(), 0..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let s = server();
        rt.block_on(session(&s, flags, &segs));
        // The same server still answers a well-formed client.
        rt.block_on(async {
            let (client, server_io) = tokio::io::duplex(64 << 10);
            let srv = s.clone();
            let task = tokio::spawn(async move { srv.serve_connection(server_io).await });
            let (mut rd, mut wr) = tokio::io::split(client);
            let mut greet = [0u8; 18];
            rd.read_exact(&mut greet).await.unwrap();
            wr.write_all(&3u32.to_be_bytes()).await.unwrap();
            wr.write_all(&option(1, b"")).await.unwrap();
            let mut info = [0u8; 10];
            rd.read_exact(&mut info).await.unwrap();
            assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), 1 << 20);
            wr.write_all(&request(2, 0, 0, 0, false)).await.unwrap();
            task.await.unwrap().unwrap();
        });
    }
}
