//! Helpers for real-QEMU tests: tool checks, machine configs, launching, serial capture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu::cmdline::{Accel, BalloonConfig, Firmware, Generation, MachineConfig};
use qemu::{QemuProcess, QmpClient};
use tokio::io::AsyncReadExt;

/// Fails (never skips) when a tool is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new(tool).is_file();
    assert!(
        found,
        "{tool} is missing: run scripts/setup.sh (installs qemu-system-x86, ovmf, shim-signed, dosfstools, mtools, gdisk)"
    );
}

/// A short-path temp dir (unix socket paths must stay under 108 bytes).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vq")
        .tempdir_in("/tmp")
        .expect("creating a temp dir in /tmp")
}

pub fn machine(generation: Generation, run_dir: &Path) -> MachineConfig {
    let firmware = match generation {
        Generation::Gen1 => Firmware::Bios,
        Generation::Gen2 => {
            let ovmf = qemu::OvmfPaths::discover().expect("OVMF (scripts/setup.sh)");
            let vars = run_dir.join("vars.fd");
            if !vars.exists() {
                qemu::firmware::prepare_vars_with(
                    &ovmf,
                    qemu::SecureBootTemplate::MicrosoftUefiCa,
                    &vars,
                )
                .expect("preparing vars");
            }
            Firmware::Uefi {
                code: ovmf.code_secboot.clone(),
                vars,
                secure_boot: true,
            }
        }
    };
    MachineConfig {
        name: "test-vm".into(),
        uuid: uuid::Uuid::new_v4(),
        generation,
        accel: Accel::Tcg,
        cpu_model: None,
        cpus: 1,
        memory_mib: 256,
        disks: vec![],
        nics: vec![],
        firmware,
        run_dir: run_dir.to_path_buf(),
        incoming: None,
        start_paused: false,
        balloon: Some(BalloonConfig::default()),
        virtio_mem: None,
        rtc_localtime: false,
    }
}

/// A running QEMU that is killed when dropped.
pub struct Vm {
    pub process: QemuProcess,
    pub qmp: QmpClient,
    pub config: MachineConfig,
    /// Leave QEMU running on drop (simulates the worker dying).
    pub keep: bool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.process.kill();
        }
    }
}

pub async fn launch(config: MachineConfig) -> Vm {
    require("qemu-system-x86_64");
    let args = config.to_args().expect("valid config");
    let paths = config.paths();
    let mut process =
        QemuProcess::spawn(&qemu::process::default_binary(), &args, &paths).expect("spawning QEMU");
    if let Err(e) = process.wait_ready(Duration::from_secs(20)).await {
        let _ = process.kill();
        panic!("QEMU did not start: {e}\nargs: {:?}", args);
    }
    let qmp = QmpClient::connect_retry(&paths.qmp, Duration::from_secs(10))
        .await
        .expect("QMP connect");
    Vm {
        process,
        qmp,
        config,
        keep: false,
    }
}

/// Collects serial console output in the background.
pub struct Serial {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Serial {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Serial {
    pub async fn connect(path: &Path) -> Serial {
        let mut s = tokio::net::UnixStream::connect(path)
            .await
            .expect("connecting serial socket");
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = buf.clone();
        let task = tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Serial { buf, task }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Waits until the console contains any of `needles`; returns the text. Panics on timeout.
    pub async fn wait_for(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let t = self.text();
            if needles.iter().any(|n| t.contains(n)) {
                return t;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("console never showed {needles:?}; got:\n{t}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A GPT disk with an EFI system partition holding `loader` as EFI/BOOT/BOOTX64.EFI.
pub fn esp_disk(dir: &Path, loader: &Path) -> PathBuf {
    for t in ["mkfs.vfat", "mmd", "mcopy", "sgdisk"] {
        require(t);
    }
    let esp = dir.join("esp.img");
    let disk = dir.join("disk.img");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("running a disk tool");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("mkfs.vfat").arg("-C").arg(&esp).arg("32768"));
    run(Command::new("mmd")
        .arg("-i")
        .arg(&esp)
        .args(["::/EFI", "::/EFI/BOOT"]));
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&esp)
        .arg(loader)
        .arg("::/EFI/BOOT/BOOTX64.EFI"));
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(40 << 20).unwrap();
    drop(f);
    run(Command::new("sgdisk")
        .args(["-n1:2048:+32M", "-t1:ef00"])
        .arg(&disk));
    let data = std::fs::read(&esp).unwrap();
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&data, 1 << 20).unwrap();
    disk
}

pub fn sha256(path: &Path) -> String {
    require("sha256sum");
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
