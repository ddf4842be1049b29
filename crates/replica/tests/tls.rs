//! A cycle shipped over the hosts' mutual-TLS channel (the `migration` crate's identities
//! and TLS configurations, real TCP on loopback): applied and acknowledged; a damaged cycle
//! is refused with the replica's reason and changes nothing; a primary whose pin does not
//! match the replica's certificate never gets to send.

use migration::tls::{client_config, server_config, ALPN_STREAM, SERVER_NAME};
use migration::HostIdentity;
use replica::{receive_cycle, send_cycle, CycleHeader, CycleWriter, ReplicaStore};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 1 << 20;

fn cycle(seq: u64, fill: u8) -> Vec<u8> {
    let h = CycleHeader {
        vm: "vm1".into(),
        seq,
        cut_unix_ms: seq,
        disk_sizes: vec![SIZE],
        partial: false,
        app_consistent: false,
    };
    let mut w = CycleWriter::new(Vec::new(), &h).unwrap();
    w.add(0, 65536, &[fill; 65536]).unwrap();
    w.finish().unwrap()
}

#[tokio::test]
async fn cycle_over_mutual_tls() {
    let d = tempfile::tempdir().unwrap();
    let primary = HostIdentity::load_or_create(&d.path().join("p"), "primary").unwrap();
    let replica_id = HostIdentity::load_or_create(&d.path().join("r"), "replica").unwrap();
    let rdir = d.path().join("store");
    ReplicaStore::create(&rdir, "vm1", &[SIZE], 4).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acc = tokio_rustls::TlsAcceptor::from(server_config(&replica_id).unwrap());
    let server = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..3 {
            let (tcp, _) = l.accept().await.unwrap();
            let Ok(mut tls) = acc.accept(tcp).await else {
                results.push(Err("handshake".to_string()));
                continue;
            };
            let mut store = ReplicaStore::open(&rdir).unwrap();
            let r = receive_cycle(&mut tls, &mut store, 64 << 20).await;
            results.push(r.map(|p| p.seq).map_err(|e| e.to_string()));
        }
        results
    });
    let connect = |pin: String| {
        let cfg = client_config(&primary, Some(&pin), ALPN_STREAM).unwrap();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
                .await
        }
    };
    let mut s = connect(replica_id.fingerprint().to_string()).await.unwrap();
    assert_eq!(send_cycle(&mut s, &cycle(1, 5)).await.unwrap(), 1);
    let mut bad = cycle(2, 6);
    let n = bad.len();
    bad[n - 1] ^= 1;
    let mut s = connect(replica_id.fingerprint().to_string()).await.unwrap();
    let e = send_cycle(&mut s, &bad).await.unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    let wrong_pin = primary.fingerprint().to_string();
    assert!(
        connect(wrong_pin).await.is_err(),
        "a wrong pin must fail the handshake"
    );
    let r = server.await.unwrap();
    assert_eq!(r[0], Ok(1));
    assert!(r[1].is_err());
    let store = ReplicaStore::open(&d.path().join("store")).unwrap();
    assert_eq!(store.latest().seq, 1);
    let v = vhdx::Vhdx::open(
        &store.point_paths(1).unwrap()[0],
        vhdx::OpenOptions { read_only: true },
    )
    .unwrap();
    let mut b = vec![0u8; 65536];
    v.read_at(&mut b, 65536).unwrap();
    assert!(b.iter().all(|&x| x == 5));
}
