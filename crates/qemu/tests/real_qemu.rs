//! Real QEMU (TCG) driven through the crate: lifecycle over QMP, save/restore through
//! migration, re-attach, and the generation 1 / 2 command lines reaching firmware.

mod common;

use std::time::Duration;

use common::*;
use qemu::cmdline::{
    DiskAttachment, DiskBus, DiskFormat, DiskMedia, DiskSource, Generation, NicAttachment,
    NicBackend, NicModel, VirtioMemConfig,
};
use qemu::qmp::{MigrationStatus, RunState};
use qemu::{QemuProcess, QmpClient};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// stop/cont change the run state and emit STOP/RESUME; a paused VM saved with
/// `migrate exec:cat > FILE` restores with `-incoming defer` + `migrate-incoming` and its
/// low memory is byte-identical after the restore; quit ends QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_save_and_restore() {
    let dir = tempdir();
    let vm = launch(machine(Generation::Gen1, dir.path())).await;
    let q = &vm.qmp;
    assert!(q.greeting().version.major >= 7);
    assert_eq!(q.query_status().await.unwrap().status, RunState::Running);

    let mut ev = q.events();
    q.stop().await.unwrap();
    q.wait_event(&mut ev, "STOP", |_| true, T).await.unwrap();
    let st = q.query_status().await.unwrap();
    assert_eq!((st.status, st.running), (RunState::Paused, false));
    q.cont().await.unwrap();
    q.wait_event(&mut ev, "RESUME", |_| true, T).await.unwrap();
    assert!(q.query_status().await.unwrap().running);
    let cpus = q.query_cpus_fast().await.unwrap();
    assert_eq!(cpus.len(), 1);

    // Let the firmware run a little, then freeze and save.
    tokio::time::sleep(Duration::from_millis(500)).await;
    q.stop().await.unwrap();
    let before = dir.path().join("before.bin");
    q.execute(
        "pmemsave",
        Some(json!({"val": 0, "size": 0x9f000, "filename": before.to_str().unwrap()})),
    )
    .await
    .unwrap();
    let state = dir.path().join("it's state.bin");
    let (save_uri, restore_uri) = qemu::qmp::state_file_uris(&state, &q.greeting().version);
    q.migrate(&save_uri).await.unwrap();
    let info = q
        .wait_migration(Duration::from_millis(50), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
    assert!(std::fs::metadata(&state).unwrap().len() > 1 << 20);
    q.quit().await.unwrap();
    let mut vm = vm;
    assert!(vm.process.wait_exit(T).await, "QEMU did not exit on quit");
    drop(vm);

    let run2 = dir.path().join("r2");
    std::fs::create_dir(&run2).unwrap();
    let mut cfg = machine(Generation::Gen1, &run2);
    cfg.incoming = Some("defer".into());
    cfg.start_paused = true;
    let vm2 = launch(cfg).await;
    let q2 = &vm2.qmp;
    assert_eq!(q2.query_status().await.unwrap().status, RunState::Inmigrate);
    q2.migrate_incoming(&restore_uri).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = q2.query_status().await.unwrap();
        if s.status != RunState::Inmigrate {
            assert_eq!(s.status, RunState::Paused);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "restore never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = dir.path().join("after.bin");
    q2.execute(
        "pmemsave",
        Some(json!({"val": 0, "size": 0x9f000, "filename": after.to_str().unwrap()})),
    )
    .await
    .unwrap();
    let a = std::fs::read(&before).unwrap();
    assert!(a.iter().any(|&b| b != 0), "saved memory is all zeros");
    assert_eq!(
        sha256(&before),
        sha256(&after),
        "memory differs after restore"
    );
    q2.cont().await.unwrap();
    assert!(q2.query_status().await.unwrap().running);
    q2.quit().await.unwrap();
}

/// A second client can attach after the first one is gone (greeting each time), a client
/// that tries while another holds the socket times out instead of hanging, QEMU runs in its
/// own session, and the pidfile re-attach finds the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_client_death() {
    let dir = tempdir();
    let vm = launch(machine(Generation::Gen1, dir.path())).await;
    let paths = vm.config.paths();
    let first = vm.qmp.clone();
    assert!(first.query_status().await.unwrap().running);

    // Someone else while the socket is taken: no greeting, clean timeout.
    let busy = QmpClient::connect_with_timeout(&paths.qmp, Duration::from_millis(500)).await;
    assert_eq!(busy.unwrap_err().kind(), qemu::ErrorKind::Timeout);

    let mut vm = vm;
    vm.keep = true;
    let pid = vm.process.pid();
    drop(first);
    drop(vm);

    let second = QmpClient::connect_retry(&paths.qmp, T).await.unwrap();
    assert!(second.query_status().await.unwrap().running);
    drop(second);
    let third = QmpClient::connect_retry(&paths.qmp, T).await.unwrap();
    assert!(third.query_status().await.unwrap().running);

    let mut attached = QemuProcess::attach(&paths).unwrap();
    assert_eq!(attached.pid(), pid);
    // SAFETY: getsid on a pid.
    let sid = unsafe { libc::getsid(pid as libc::pid_t) };
    assert_eq!(sid, pid as libc::pid_t, "QEMU is not in its own session");

    // A bogus pidfile is refused.
    let bogus = dir.path().join("bogus");
    std::fs::create_dir(&bogus).unwrap();
    std::fs::write(
        qemu::RunPaths::new(&bogus).pidfile,
        std::process::id().to_string(),
    )
    .unwrap();
    assert!(QemuProcess::attach(&qemu::RunPaths::new(&bogus)).is_err());

    third.quit().await.unwrap();
    assert!(attached.wait_exit(T).await);
    assert!(!attached.is_alive());
    assert!(third.execute("query-status", None).await.is_err());
}

/// The generation 1 argv starts: i440fx with an IDE disk, an e1000 on a stream socket, VGA,
/// balloon; SCSI hot-add and unplug work over QMP; the balloon answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen1_machine_starts() {
    let dir = tempdir();
    let img = dir.path().join("empty.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut cfg = machine(Generation::Gen1, dir.path());
    cfg.disks.push(DiskAttachment {
        id: "boot".into(),
        source: DiskSource::File {
            path: img.clone(),
            format: DiskFormat::Raw,
            read_only: false,
        },
        bus: DiskBus::Ide,
        media: DiskMedia::Disk,
        boot_index: Some(0),
    });
    cfg.nics.push(NicAttachment {
        id: "nic0".into(),
        mac: "52:54:00:00:00:01".into(),
        model: NicModel::E1000,
        backend: NicBackend::Stream {
            path: dir.path().join("nic0.sock"),
            server: true,
        },
        boot_index: Some(1),
    });
    let vm = launch(cfg).await;
    let q = &vm.qmp;
    assert!(q.query_status().await.unwrap().running);
    let pci = q.human_monitor_command("info pci").await.unwrap();
    assert!(pci.contains("IDE controller"), "{pci}");
    assert!(pci.contains("Ethernet controller"), "{pci}");
    assert!(pci.contains("VGA controller"), "{pci}");
    let blk = q.human_monitor_command("info block").await.unwrap();
    assert!(blk.contains("drv-boot"), "{blk}");
    assert!(dir.path().join("nic0.sock").exists());
    assert_eq!(q.query_balloon().await.unwrap(), 256 << 20);
    q.balloon(200 << 20).await.unwrap();
    let v = q
        .qom_get(
            "/machine/peripheral/balloon0",
            "guest-stats-polling-interval",
        )
        .await
        .unwrap();
    assert_eq!(v, json!(2));

    // Hot-add a SCSI data disk (controller first), then unplug it.
    let data = dir.path().join("data.raw");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    q.device_add("virtio-scsi-pci", "scsi0", serde_json::Value::Null)
        .await
        .unwrap();
    let disk = DiskAttachment {
        id: "data1".into(),
        source: DiskSource::File {
            path: data,
            format: DiskFormat::Raw,
            read_only: false,
        },
        bus: DiskBus::Scsi,
        media: DiskMedia::Disk,
        boot_index: None,
    };
    let (blockdevs, driver, props) = qemu::disk_hotplug_args(&disk, 0, None).unwrap();
    for b in blockdevs {
        q.blockdev_add(b).await.unwrap();
    }
    q.device_add(driver, &disk.id, props).await.unwrap();
    let blk = q.human_monitor_command("info block").await.unwrap();
    assert!(blk.contains("drv-data1"), "{blk}");
    let mut ev = q.events();
    q.device_del("data1").await.unwrap();
    let e = q
        .wait_event(&mut ev, "DEVICE_DELETED", |d| d["device"] == "data1", T)
        .await
        .unwrap();
    assert_eq!(e.kind(), qemu::qmp::EventKind::DeviceDeleted);
    // A refused command carries QEMU's class.
    let err = q.device_del("nope").await.unwrap_err();
    assert_eq!(err.kind(), qemu::ErrorKind::NotFound, "{err}");
    q.quit().await.unwrap();
}

/// The generation 2 argv starts: q35 + SMM + Secure Boot OVMF from a per-VM vars copy,
/// virtio-scsi disk, virtio-net, virtio-mem, hotplug ports (a NIC is hot-added on `hp0`); OVMF reaches its boot manager
/// (seen on the serial socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen2_machine_reaches_firmware() {
    let dir = tempdir();
    let img = dir.path().join("empty.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut cfg = machine(Generation::Gen2, dir.path());
    cfg.disks.push(DiskAttachment {
        id: "os".into(),
        source: DiskSource::File {
            path: img,
            format: DiskFormat::Raw,
            read_only: false,
        },
        bus: DiskBus::Scsi,
        media: DiskMedia::Disk,
        boot_index: Some(0),
    });
    cfg.nics.push(NicAttachment {
        id: "nic0".into(),
        mac: "52:54:00:00:00:02".into(),
        model: NicModel::VirtioNet,
        backend: NicBackend::None,
        boot_index: None,
    });
    cfg.virtio_mem = Some(VirtioMemConfig {
        max_mib: 256,
        block_mib: 2,
        requested_mib: 0,
    });
    cfg.start_paused = true;
    let vm = launch(cfg).await;
    let q = &vm.qmp;
    assert_eq!(q.query_status().await.unwrap().status, RunState::Prelaunch);
    let serial = Serial::connect(&vm.config.paths().serial).await;
    q.cont().await.unwrap();
    serial.wait_for(&["BdsDxe"], Duration::from_secs(120)).await;
    assert!(q.query_status().await.unwrap().running);
    let pci = q.human_monitor_command("info pci").await.unwrap();
    assert!(pci.contains("SCSI controller"), "{pci}");
    assert!(pci.contains("Ethernet controller"), "{pci}");
    assert!(!pci.contains("IDE controller"), "{pci}");
    let size = q
        .qom_get("/machine/peripheral/vmem0", "size")
        .await
        .unwrap();
    assert_eq!(size, json!(0));
    // Hot-add a NIC on a hotplug port.
    q.device_add(
        "virtio-net-pci",
        "nic1",
        json!({"bus": "hp0", "mac": "52:54:00:00:00:03"}),
    )
    .await
    .unwrap();
    q.quit().await.unwrap();
}
