//! Hostile input to the parsers: corrupted variable stores, random signature lists and
//! certificates, and a QMP peer that speaks garbage. Nothing may panic or hang.

use std::time::Duration;

use proptest::prelude::*;
use qemu::firmware::siglist::{parse_signature_lists, x509_subject_cn};
use qemu::firmware::varstore::VarStore;
use qemu::{ErrorKind, QmpClient};
use tokio::io::AsyncWriteExt;

fn ms_vars() -> Vec<u8> {
    let ovmf = qemu::OvmfPaths::discover().expect("OVMF (scripts/setup.sh)");
    std::fs::read(
        ovmf.vars_microsoft
            .expect("OVMF_VARS_4M.ms.fd (scripts/setup.sh)"),
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random byte flips in the headers and variables of a real store: parse either fails
    /// cleanly or yields variables whose rewrite parses again.
    #[test]
    fn corrupted_store_never_panics(flips in proptest::collection::vec((0usize..0x6000, any::<u8>()), 1..16)) {
        let mut img = ms_vars();
        for (off, b) in flips {
            img[off] = b;
        }
        if let Ok(store) = VarStore::parse(img) {
            for v in store.live() {
                let _ = parse_signature_lists(&v.data);
            }
            if let Ok(out) = store.to_bytes() {
                prop_assert!(VarStore::parse(out).is_ok());
            }
        }
    }

    /// Random signature lists and certificates are refused or decoded, never a panic.
    #[test]
    fn random_siglists_and_certs(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_signature_lists(&data);
        let _ = x509_subject_cn(&data);
    }
}

/// Real db entries decode to the expected names after random truncation of the list.
#[test]
fn truncated_db_is_refused() {
    let store = VarStore::parse(ms_vars()).unwrap();
    let db = store
        .get("db", qemu::firmware::varstore::EFI_IMAGE_SECURITY_DATABASE)
        .unwrap();
    assert_eq!(parse_signature_lists(&db.data).unwrap().len(), 2);
    for cut in [1, 27, 28, 100, db.data.len() - 1] {
        assert!(parse_signature_lists(&db.data[..cut]).is_err(), "cut {cut}");
    }
}

async fn peer(script: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::Builder::new()
        .prefix("vqh")
        .tempdir_in("/tmp")
        .unwrap();
    let p = d.path().join("q.sock");
    let l = tokio::net::UnixListener::bind(&p).unwrap();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(script).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    (d, p)
}

/// A peer that is not QEMU: bad greeting, garbage after the greeting, or silence; the
/// client returns an error in bounded time.
#[tokio::test]
async fn garbage_peers_fail_cleanly() {
    let (_d, p) = peer(b"SSH-2.0-OpenSSH\r\n").await;
    let e = QmpClient::connect_with_timeout(&p, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

    let (_d, p) = peer(b"{\"QMP\": {\"capabilities\": []}}\r\n").await;
    let e = QmpClient::connect_with_timeout(&p, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

    let (_d, p) = peer(
        b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, \"package\": \"\"}, \"capabilities\": []}}\r\n\x00\xff not json\r\n",
    )
    .await;
    let e = QmpClient::connect_with_timeout(&p, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");

    let (_d, p) = peer(b"").await;
    let e = QmpClient::connect_with_timeout(&p, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
}
