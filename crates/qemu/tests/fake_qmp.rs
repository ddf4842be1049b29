//! The QMP client against the fake peer: concurrency, events, errors, timeouts,
//! disconnects and re-attach.

use std::time::Duration;

use qemu::qmp::{EventKind, MigrationStatus, QmpError, RunState};
use qemu::testing::{FakeQmp, Reply};
use qemu::{ErrorKind, QmpClient};
use serde_json::json;

fn sock() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::Builder::new()
        .prefix("vqf")
        .tempdir_in("/tmp")
        .unwrap();
    let p = d.path().join("qmp.sock");
    (d, p)
}

/// 200 concurrent callers each get their own reply (ids demultiplexed by one reader).
#[tokio::test]
async fn concurrent_callers_get_their_replies() {
    let (_d, p) = sock();
    let fake = FakeQmp::start(&p).await.unwrap();
    let q = QmpClient::connect(&p).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.balloon(i << 20).await.unwrap();
            q.query_status().await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, RunState::Running);
    }
    let got = fake.received();
    assert_eq!(got.iter().filter(|(c, _)| c == "balloon").count(), 200);
    assert_eq!(got[0].0, "qmp_capabilities");
}

/// Typed helpers map onto the right commands and state changes; events arrive in order.
#[tokio::test]
async fn helpers_and_events() {
    let (_d, p) = sock();
    let fake = FakeQmp::start(&p).await.unwrap();
    let q = QmpClient::connect(&p).await.unwrap();
    let mut ev = q.events();
    q.stop().await.unwrap();
    assert_eq!(fake.status(), "paused");
    assert_eq!(ev.recv().await.unwrap().kind(), EventKind::Stop);
    q.cont().await.unwrap();
    assert_eq!(ev.recv().await.unwrap().kind(), EventKind::Resume);
    q.balloon(512 << 20).await.unwrap();
    assert_eq!(q.query_balloon().await.unwrap(), 512 << 20);
    q.migrate_set_capabilities(&[("events", true)])
        .await
        .unwrap();
    q.migrate("unix:/nowhere").await.unwrap();
    let info = q
        .wait_migration(Duration::from_millis(10), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    fake.emit("GUEST_PANICKED", json!({"action": "pause"}));
    let e = q
        .wait_event(&mut ev, "GUEST_PANICKED", |_| true, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(e.data["action"], "pause");
    let caps = fake
        .received()
        .into_iter()
        .find(|(c, _)| c == "migrate-set-capabilities")
        .unwrap();
    assert_eq!(
        caps.1,
        json!({"capabilities": [{"capability": "events", "state": true}]})
    );
}

/// QEMU errors keep their class; a hung command times out and the connection stays usable;
/// bad property objects are refused before anything is sent.
#[tokio::test]
async fn errors_and_timeouts() {
    let (_d, p) = sock();
    let fake = FakeQmp::start(&p).await.unwrap();
    let q = QmpClient::connect(&p).await.unwrap();
    let e = q.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    fake.reply(
        "device_add",
        Reply::Error {
            class: "GenericError".into(),
            desc: "Duplicate device ID 'x'".into(),
        },
    );
    let e = q.device_add("e1000", "x", json!({})).await.unwrap_err();
    assert!(
        matches!(&e, QmpError::Command { command, desc, .. } if command == "device_add" && desc.contains("Duplicate")),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Refused);
    fake.reply("query-status", Reply::Hang);
    let e = q
        .execute_with_timeout("query-status", None, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(q.query_balloon().await.is_ok());
    let before = fake.received().len();
    assert!(q.netdev_add("stream", "n0", json!(5)).await.is_err());
    assert_eq!(fake.received().len(), before);
}

/// When QEMU closes the socket, waiting and later callers get Disconnected; a new client
/// attaches with a fresh greeting; quit counts a close as success.
#[tokio::test]
async fn disconnect_and_reattach() {
    let (_d, p) = sock();
    let fake = FakeQmp::start(&p).await.unwrap();
    let q = QmpClient::connect(&p).await.unwrap();
    fake.reply("query-status", Reply::Hang);
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.query_status().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.disconnect();
    let e = waiter.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
    assert_eq!(q.stop().await.unwrap_err().kind(), ErrorKind::Disconnected);
    assert!(q.is_closed());

    let q2 = QmpClient::connect(&p).await.unwrap();
    assert_eq!(fake.connections(), 2);
    assert_eq!(q2.greeting().version.major, 7);
    q2.quit().await.unwrap();
    assert_eq!(fake.status(), "shutdown");

    // A missing socket is NotFound.
    let e = QmpClient::connect(p.with_file_name("nope.sock"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}
