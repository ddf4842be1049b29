//! Secure Boot templates under real OVMF: Debian's shim boots with `microsoft-uefi-ca`
//! and `none`, and is refused with `microsoft-windows` (the derived store still enforces
//! Secure Boot and no longer trusts the Microsoft UEFI CA).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use qemu::cmdline::{
    DiskAttachment, DiskBus, DiskFormat, DiskMedia, DiskSource, Firmware, Generation,
};
use qemu::firmware::{list_variables, prepare_vars_with, template_vars};
use qemu::{detect_boot_refusal, OvmfPaths, SecureBootTemplate};

const SHIM: &str = "/usr/lib/shim/shimx64.efi.signed";
/// shim printed this after it started and looked for grub next to itself.
const SHIM_RAN: &str = "grubx64.efi";
const REFUSED: &str = "Access Denied";

async fn boot(template: SecureBootTemplate, dir: &Path, disk: &Path) -> String {
    let ovmf = OvmfPaths::discover().expect("OVMF (scripts/setup.sh)");
    let run = dir.join(format!("{template:?}"));
    std::fs::create_dir(&run).unwrap();
    let vars = run.join("vars.fd");
    prepare_vars_with(&ovmf, template, &vars).unwrap();
    let mut cfg = machine(Generation::Gen2, &run);
    cfg.firmware = Firmware::Uefi {
        code: template.code(&ovmf).to_path_buf(),
        vars,
        secure_boot: template.secure_boot(),
    };
    cfg.disks.push(DiskAttachment {
        id: "os".into(),
        source: DiskSource::File {
            path: disk.to_path_buf(),
            format: DiskFormat::Raw,
            read_only: true,
        },
        bus: DiskBus::Scsi,
        media: DiskMedia::Disk,
        boot_index: Some(0),
    });
    cfg.start_paused = true;
    let vm = launch(cfg).await;
    let serial = Serial::connect(&vm.config.paths().serial).await;
    vm.qmp.cont().await.unwrap();
    let text = serial
        .wait_for(&[SHIM_RAN, REFUSED], Duration::from_secs(180))
        .await;
    vm.qmp.quit().await.unwrap();
    text
}

/// The three templates against Debian's signed shim, plus the store contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_against_debian_shim() {
    require(SHIM);
    let dir = tempdir();
    let disk = esp_disk(dir.path(), Path::new(SHIM));
    let ovmf = OvmfPaths::discover().expect("OVMF (scripts/setup.sh)");

    // Store contents: db of the windows template holds only the Windows PCA.
    let db = |t| {
        list_variables(template_vars(&ovmf, t).unwrap())
            .unwrap()
            .into_iter()
            .find(|v| v.name == "db")
            .map(|v| v.entries)
    };
    assert_eq!(
        db(SecureBootTemplate::MicrosoftWindows).unwrap(),
        vec!["X509 CN=Microsoft Windows Production PCA 2011".to_string()]
    );
    let ms = db(SecureBootTemplate::MicrosoftUefiCa).unwrap();
    assert!(ms.contains(&"X509 CN=Microsoft Corporation UEFI CA 2011".to_string()));
    assert_eq!(db(SecureBootTemplate::None), None);

    let ms = boot(SecureBootTemplate::MicrosoftUefiCa, dir.path(), &disk).await;
    assert!(ms.contains(SHIM_RAN), "{ms}");
    assert_eq!(detect_boot_refusal(&ms), None, "{ms}");

    let win = boot(SecureBootTemplate::MicrosoftWindows, dir.path(), &disk).await;
    let refusal = detect_boot_refusal(&win).expect("windows-only store must refuse shim");
    assert!(refusal.contains("failed to load Boot0001"), "{refusal}");
    assert!(refusal.ends_with("Access Denied"), "{refusal}");
    assert!(!win.contains(SHIM_RAN), "{win}");

    let none = boot(SecureBootTemplate::None, dir.path(), &disk).await;
    assert!(none.contains(SHIM_RAN), "{none}");
    assert_eq!(detect_boot_refusal(&none), None);
}

/// A per-VM store is never overwritten, and a corrupt template is refused without
/// leaving a file behind.
#[test]
fn prepare_vars_refuses_bad_input() {
    let ovmf = OvmfPaths::discover().expect("OVMF (scripts/setup.sh)");
    let dir = tempdir();
    let dest = dir.path().join("vars.fd");
    prepare_vars_with(&ovmf, SecureBootTemplate::MicrosoftWindows, &dest).unwrap();
    let sum = sha256(&dest);
    let err = prepare_vars_with(&ovmf, SecureBootTemplate::None, &dest).unwrap_err();
    assert!(matches!(err, qemu::FirmwareError::Exists(_)), "{err}");
    assert_eq!(sha256(&dest), sum, "existing store changed");

    let bad_src = dir.path().join("garbage.fd");
    std::fs::write(&bad_src, vec![0x5au8; 540672]).unwrap();
    let bad = OvmfPaths {
        vars_microsoft: Some(bad_src),
        ..ovmf
    };
    let dest2 = dir.path().join("vars2.fd");
    let err = prepare_vars_with(&bad, SecureBootTemplate::MicrosoftWindows, &dest2).unwrap_err();
    assert_eq!(err.kind(), qemu::ErrorKind::Corrupt, "{err}");
    assert!(!dest2.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
