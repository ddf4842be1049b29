//! Starting QEMU for a [`LaunchSpec`]: maps the VM's configuration onto a QEMU machine
//! (the generation table of the architecture map lives in `qemu::cmdline`), spawns it in its
//! own session, and restores a saved state when there is one.

use anyhow::{bail, Context};
use api::worker::LaunchSpec;
use api::{BootDevice, DiskBus, Generation, NicModel};
use qemu::cmdline::{
    self, DiskAttachment, DiskMedia, DiskSource, Firmware, MachineConfig, NicAttachment, NicBackend,
};
use qemu::process::QemuProcess;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// How long QEMU's NBD client holds guest I/O while it reconnects to the disk service.
/// Long enough to ride through every recovery that re-serves the disks: a worker restart on a
/// loaded host, or a failed migration switchover, where the source reopens its disks only
/// after the destination has released them (up to its lease, 13 s). With 10 s the guest
/// could see write errors there.
const NBD_RECONNECT_SECS: u32 = 60;

/// Unix ns just before QEMU was exec'd (0: re-attached).
pub static EXEC_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The QEMU we spawned, kept so that it is reaped when it exits.
static CHILD: Mutex<Option<QemuProcess>> = Mutex::new(None);

/// The QEMU machine for a launch.
pub fn machine_config(l: &LaunchSpec) -> anyhow::Result<MachineConfig> {
    let vm = &l.vm;
    let disk_boot = vm
        .boot_order
        .iter()
        .position(|b| *b == BootDevice::Disk)
        .map(|p| p as u32 + 1);
    let net_boot = vm
        .boot_order
        .iter()
        .position(|b| *b == BootDevice::Network)
        .map(|p| p as u32 + 1);
    let mut disks = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        disks.push(DiskAttachment {
            id: format!("disk{i}"),
            // Every disk goes through the disk service (crate::disks), whatever the bus.
            source: DiskSource::Nbd {
                socket_path: storage::socket_path(&l.run_dir, i),
                export: storage::export_name(i),
                reconnect_delay: NBD_RECONNECT_SECS,
                read_only: d.read_only,
            },
            bus: match d.bus {
                DiskBus::Ide => cmdline::DiskBus::Ide,
                DiskBus::Scsi => cmdline::DiskBus::Scsi,
                DiskBus::Virtio => cmdline::DiskBus::VirtioBlk,
            },
            media: DiskMedia::Disk,
            boot_index: if i == 0 { disk_boot } else { None },
        });
    }
    let nics = vm
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| NicAttachment {
            id: n.name.clone(),
            mac: n.mac.clone(),
            model: match n.model {
                NicModel::E1000 => cmdline::NicModel::E1000,
                NicModel::Virtio => cmdline::NicModel::VirtioNet,
            },
            // Every NIC listens on its own socket; vireod has the switch connect to it.
            backend: NicBackend::Stream {
                path: api::switch::nic_socket(&l.run_dir, &n.name),
                server: true,
            },
            boot_index: if i == 0 {
                net_boot.map(|b| b + 10)
            } else {
                None
            },
        })
        .collect();
    let firmware = match vm.generation {
        Generation::Gen1 => Firmware::Bios,
        Generation::Gen2 => {
            let vars = l
                .uefi_vars
                .clone()
                .context("generation 2 VM without a UEFI variable store")?;
            let ovmf = qemu::firmware::OvmfPaths::discover()
                .context("locating OVMF (install the ovmf package)")?;
            Firmware::Uefi {
                code: if vm.secure_boot {
                    ovmf.code_secboot
                } else {
                    ovmf.code
                },
                vars,
                secure_boot: vm.secure_boot,
            }
        }
    };
    Ok(MachineConfig {
        name: vm.name.clone(),
        uuid: vm.uuid,
        generation: match vm.generation {
            Generation::Gen1 => cmdline::Generation::Gen1,
            Generation::Gen2 => cmdline::Generation::Gen2,
        },
        accel: match l.accel {
            api::Accel::Kvm => cmdline::Accel::Kvm,
            api::Accel::Tcg => cmdline::Accel::Tcg,
        },
        cpu_model: None,
        cpus: vm.cpus,
        memory_mib: vm.memory >> 20,
        disks,
        nics,
        firmware,
        run_dir: l.run_dir.clone(),
        incoming: (l.restore_from.is_some() || l.incoming.is_some()).then(|| "defer".to_string()),
        start_paused: true,
        // Deflate on OOM: a guest whose demand was underestimated takes balloon pages back
        // rather than OOM (seen with small busybox guests, see docs/dynamic-memory.md).
        balloon: Some(cmdline::BalloonConfig {
            deflate_on_oom: true,
            ..Default::default()
        }),
        virtio_mem: l
            .virtio_mem_region
            .filter(|r| *r > 0)
            .map(|r| cmdline::VirtioMemConfig {
                max_mib: r >> 20,
                block_mib: 2,
                requested_mib: 0,
            }),
        rtc_localtime: false,
    })
}

/// Spawns QEMU (vCPUs stopped) and waits until its sockets exist. Returns its PID.
pub async fn spawn_qemu(l: &LaunchSpec) -> anyhow::Result<u32> {
    let cfg = machine_config(l)?;
    let mut args = cfg.to_args().context("building the QEMU command line")?;
    // VIREO_DEBUG_MONITOR=1: a second QMP monitor (`debug-qmp.sock`) for inspecting a stuck
    // guest (registers, screen) while the worker keeps its own connection. Vireo never uses it.
    if std::env::var_os("VIREO_DEBUG_MONITOR").is_some() {
        let sock = l.run_dir.join("debug-qmp.sock");
        args.extend([
            "-chardev".into(),
            format!(
                "socket,id=debugmon,path={},server=on,wait=off",
                sock.display()
            )
            .into(),
            "-mon".into(),
            "chardev=debugmon,mode=control".into(),
        ]);
    }
    let paths = cfg.paths();
    std::fs::write(
        l.run_dir.join("qemu.cmdline"),
        cfg.to_display_string().unwrap_or_default(),
    )
    .context("writing qemu.cmdline")?;
    EXEC_NS.store(api::worker::now_ns(), std::sync::atomic::Ordering::SeqCst);
    let mut p = QemuProcess::spawn(&qemu::process::default_binary(), &args, &paths)
        .context("starting QEMU")?;
    p.wait_ready(Duration::from_secs(30))
        .await
        .context("QEMU did not start")?;
    let pid = p.pid();
    *CHILD.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    Ok(pid)
}

/// Loads a saved state into a QEMU started with `-incoming defer`.
pub async fn restore(qmp: &qemu::qmp::QmpClient, saved: &Path) -> anyhow::Result<()> {
    let uri = format!(
        "exec:cat {}",
        crate::vm::shell_quote(&saved.to_string_lossy())
    );
    qmp.migrate_incoming(&uri)
        .await
        .context("QMP migrate-incoming")?;
    for _ in 0..6000 {
        let st = qmp.execute("query-status", None).await?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("inmigrate") => tokio::time::sleep(Duration::from_millis(50)).await,
            Some("paused") | Some("postmigrate") | Some("prelaunch") | Some("running") => {
                return Ok(())
            }
            other => bail!("restoring the saved state failed (QEMU status {other:?})"),
        }
    }
    bail!("restoring the saved state took more than 5 minutes")
}

/// Reaps QEMU if this worker spawned it.
pub fn reap(_pid: u32) {
    if let Some(mut p) = CHILD.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = p.is_alive();
    }
}
