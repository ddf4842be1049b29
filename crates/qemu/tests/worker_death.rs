//! QEMU outlives a worker killed with SIGKILL, and a new "worker" re-attaches through the
//! pidfile and the QMP socket. The worker is this test binary re-executed as a child.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use qemu::cmdline::{DiskAttachment, DiskBus, DiskFormat, DiskMedia, DiskSource, Generation};
use qemu::qmp::RunState;
use qemu::{QemuProcess, QmpClient, RunPaths};

const ENV: &str = "VIREO_QEMU_TEST_WORKER_DIR";

/// Not a test on its own: when re-executed with VIREO_QEMU_TEST_WORKER_DIR, plays the worker
/// (spawns QEMU, holds QMP, then waits to be killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_fake_worker() {
    let Some(dir) = std::env::var_os(ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let cfg = machine(Generation::Gen1, &dir);
    let args = cfg.to_args().unwrap();
    let mut p = QemuProcess::spawn(&qemu::process::default_binary(), &args, &cfg.paths()).unwrap();
    p.wait_ready(Duration::from_secs(20)).await.unwrap();
    let q = QmpClient::connect_retry(&cfg.paths().qmp, Duration::from_secs(10))
        .await
        .unwrap();
    q.query_status().await.unwrap();
    std::fs::write(dir.join("ready"), b"1").unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// kill -9 of the worker leaves QEMU running; attach + QMP reconnect work; QEMU is then
/// quit cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_survives_worker_sigkill() {
    require("qemu-system-x86_64");
    let dir = tempdir();
    let mut worker = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_fake_worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, dir.path())
        .spawn()
        .unwrap();
    let ready = dir.path().join("ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if std::time::Instant::now() > deadline || worker.try_wait().unwrap().is_some() {
            let _ = worker.kill();
            panic!("fake worker never got QEMU running");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill().unwrap(); // SIGKILL
    worker.wait().unwrap();

    let paths = RunPaths::new(dir.path());
    let mut p = QemuProcess::attach(&paths).expect("QEMU died with its worker");
    let guard = scopeguard(p.pid());
    assert!(p.is_alive());
    let q = QmpClient::connect_retry(&paths.qmp, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(q.query_status().await.unwrap().status, RunState::Running);
    q.quit().await.unwrap();
    assert!(p.wait_exit(Duration::from_secs(30)).await);
    drop(guard);
}

/// Kills the pid on drop if a test fails midway.
struct Guard(u32);
impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid we own; ESRCH is fine.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}
fn scopeguard(pid: u32) -> Guard {
    Guard(pid)
}

/// An NBD disk source (the disk service's shape) works: QEMU reads through NBD the pattern
/// written into the image, checked by QEMU's own qemu-io over HMP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_disk_source_reads_data() {
    require("qemu-nbd");
    require("qemu-io");
    let dir = tempdir();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 65536 65536"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    let sock = dir.path().join("nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "os", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cfg = machine(Generation::Gen1, dir.path());
    cfg.disks.push(DiskAttachment {
        id: "os".into(),
        source: DiskSource::Nbd {
            socket_path: sock.clone(),
            export: "os".into(),
            reconnect_delay: 10,
            read_only: false,
        },
        bus: DiskBus::VirtioBlk,
        media: DiskMedia::Disk,
        boot_index: Some(0),
    });
    let _ = DiskFormat::Raw;
    let mut vm = launch(cfg).await;
    // HMP qemu-io prints to QEMU's stdout (qemu.log), flushed when QEMU exits.
    for cmd in [
        "qemu-io drv-os \"read -P 0xab 65536 65536\"",
        "qemu-io drv-os \"read -P 0xab 0 4096\"",
    ] {
        vm.qmp.human_monitor_command(cmd).await.unwrap();
    }
    vm.qmp.quit().await.unwrap();
    assert!(vm.process.wait_exit(Duration::from_secs(30)).await);
    let log = std::fs::read_to_string(&vm.config.paths().log).unwrap();
    // The first read matches the pattern, the second (zeros) does not.
    assert!(
        log.contains("read 65536/65536 bytes at offset 65536"),
        "{log}"
    );
    assert_eq!(
        log.matches("Pattern verification failed").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("Pattern verification failed at offset 0"),
        "{log}"
    );
    let _ = nbd.kill();
    let _ = nbd.wait();
}
