//! `vireo vm ...`: VM lifecycle, console, guest commands and key-value pairs.

use super::{host::accel_name, output};
use anyhow::{bail, Context};
use api::units::{format_size, parse_size};
use api::*;
use clap::{Args, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// On/off switch on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl From<OnOff> for bool {
    fn from(v: OnOff) -> bool {
        matches!(v, OnOff::On)
    }
}

/// Secure Boot template names.
#[derive(Clone, Copy, ValueEnum)]
pub enum Template {
    /// Microsoft Windows Production PCA only.
    MicrosoftWindows,
    /// Microsoft UEFI CA too (Linux via shim).
    MicrosoftUefiCa,
    /// No keys (setup mode).
    None,
}

impl From<Template> for SecureBootTemplate {
    fn from(t: Template) -> Self {
        match t {
            Template::MicrosoftWindows => SecureBootTemplate::MicrosoftWindows,
            Template::MicrosoftUefiCa => SecureBootTemplate::MicrosoftUefiCa,
            Template::None => SecureBootTemplate::None,
        }
    }
}

/// Accelerator names.
#[derive(Clone, Copy, ValueEnum)]
pub enum AccelArg {
    /// Probe: KVM at hardware speed, else TCG.
    Auto,
    /// Force KVM.
    Kvm,
    /// Force TCG.
    Tcg,
}

impl From<AccelArg> for AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        }
    }
}

/// Disk bus names.
#[derive(Clone, Copy, ValueEnum)]
pub enum BusArg {
    /// Emulated IDE (generation 1).
    Ide,
    /// Synthetic SCSI.
    Scsi,
    /// virtio-blk.
    Virtio,
}

impl From<BusArg> for DiskBus {
    fn from(b: BusArg) -> Self {
        match b {
            BusArg::Ide => DiskBus::Ide,
            BusArg::Scsi => DiskBus::Scsi,
            BusArg::Virtio => DiskBus::Virtio,
        }
    }
}

/// A VM name and `--json`.
#[derive(Args)]
pub struct NameJson {
    /// VM name.
    pub name: String,
    /// Print the VM as JSON.
    #[arg(long)]
    pub json: bool,
}

/// VM commands.
#[derive(Subcommand)]
pub enum VmCommand {
    /// Define a new VM.
    New {
        /// Name, unique on this host.
        name: String,
        /// 1 (BIOS, IDE) or 2 (UEFI, SCSI, Secure Boot).
        #[arg(long, short = 'g', value_parser = clap::value_parser!(u8).range(1..=2))]
        generation: u8,
        /// Virtual processors.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory, e.g. 512M or 2G.
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        memory: u64,
        /// Disk image (repeatable); the first one boots.
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// Bus of the disks (default: IDE for generation 1, SCSI for 2).
        #[arg(long, value_enum)]
        bus: Option<BusArg>,
        /// Also create a new disk of this size in the VM's directory (after any --disk).
        #[arg(long, value_parser = super::disk::parse_size)]
        disk_size: Option<u64>,
        /// Format of the --disk-size disk: VHDX (default; checkpoints need it) or raw.
        #[arg(long, value_enum, requires = "disk_size")]
        disk_format: Option<super::disk::NewFormatArg>,
        /// Secure Boot (generation 2; default on).
        #[arg(long, value_enum)]
        secure_boot: Option<OnOff>,
        /// Keys Secure Boot trusts.
        #[arg(long, value_enum)]
        secure_boot_template: Option<Template>,
        /// Accelerator.
        #[arg(long, value_enum)]
        accel: Option<AccelArg>,
        /// Seconds a graceful stop waits before turning the VM off.
        #[arg(long)]
        stop_timeout: Option<u64>,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM, with heartbeat and guest information.
    Show(NameJson),
    /// Start a VM (resumes a saved one).
    Start(NameJson),
    /// Stop gracefully: guest agent, ACPI fallback, turn off after the timeout.
    Stop {
        /// VM name.
        name: String,
        /// Seconds to wait before turning off (default: the VM's setting).
        #[arg(long)]
        timeout: Option<u64>,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn off at once (like pulling the plug); discards a saved state.
    TurnOff(NameJson),
    /// Restart the guest.
    Restart(NameJson),
    /// Pause the vCPUs.
    Pause(NameJson),
    /// Resume paused vCPUs.
    Resume(NameJson),
    /// Save memory and device state to disk and turn off; `start` resumes.
    Save(NameJson),
    /// Disks of a VM (add).
    Disk {
        #[command(subcommand)]
        cmd: super::disk::VmDiskCommand,
    },
    /// Delete a VM that is off (and its disks unless --keep-disks).
    Delete {
        /// VM name.
        name: String,
        /// Keep the disk images.
        #[arg(long)]
        keep_disks: bool,
    },
    /// Attach to the serial console (detach with Ctrl-]).
    Console {
        /// VM name.
        name: String,
    },
    /// Run a command in the guest through the agent (no guest network needed).
    Exec {
        /// VM name.
        name: String,
        /// Environment for the command (KEY=VALUE, repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Change a VM's configuration (hardware changes need the VM off).
    Set {
        /// VM name.
        name: String,
        /// Virtual processors.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. 2G.
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// Secure Boot.
        #[arg(long, value_enum)]
        secure_boot: Option<OnOff>,
        /// Secure Boot template.
        #[arg(long, value_enum)]
        secure_boot_template: Option<Template>,
        /// Accelerator.
        #[arg(long, value_enum)]
        accel: Option<AccelArg>,
        /// Graceful stop timeout in seconds (may change while running).
        #[arg(long)]
        stop_timeout: Option<u64>,
        /// Attach another disk image.
        #[arg(long)]
        add_disk: Vec<PathBuf>,
        /// Rename the VM.
        #[arg(long)]
        rename: Option<String>,
        #[command(flatten)]
        dynamic: super::memory::DynamicMemoryArgs,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Network adapters: add, set (switch, VLAN, guards, QoS), list, remove.
    #[command(subcommand)]
    Nic(super::nic::NicCommand),
    /// Live-migrate a running VM to a trusted host (`vireo host trust`).
    Move(super::migrate::MoveArgs),
    /// Move a running VM's disks (whole chains, checkpoints included) to another directory.
    MoveStorage(super::move_storage::MoveStorageArgs),
    /// Key-value pairs exchanged with the guest (needs vireo-guest).
    Kvp {
        /// VM name.
        name: String,
        #[command(subcommand)]
        action: KvpAction,
    },
}

/// KVP actions.
#[derive(Subcommand)]
pub enum KvpAction {
    /// Both pools (host → guest and guest → host).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One value the guest published.
    Get {
        /// Key.
        key: String,
    },
    /// Give the guest a pair.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

fn vm_path(name: &str, action: &str) -> String {
    let mut p = format!("/v1/vms/{}", urlencode(name));
    if !action.is_empty() {
        p.push('/');
        p.push_str(action);
    }
    p
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs a VM command; returns the process exit code.
pub async fn run(client: &Client, cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::New {
            name,
            generation,
            cpus,
            memory,
            disk,
            bus,
            disk_size,
            disk_format,
            secure_boot,
            secure_boot_template,
            accel,
            stop_timeout,
            json,
        } => {
            let vm_name = name.clone();
            let req = CreateVm {
                name,
                generation,
                cpus: Some(cpus),
                memory: Some(memory),
                disks: disk
                    .into_iter()
                    .map(|p| CreateDisk {
                        path: absolute(p),
                        bus: bus.map(Into::into),
                        read_only: false,
                    })
                    .collect(),
                secure_boot: secure_boot.map(Into::into),
                secure_boot_template: secure_boot_template.map(Into::into),
                accel: accel.map(Into::into),
                boot_order: None,
                stop_timeout_secs: stop_timeout,
            };
            let mut vm: VmInfo = client.post("/v1/vms", &req).await?;
            if let Some(size) = disk_size {
                let add = api::checkpoint::AddDisk {
                    size: Some(size),
                    format: disk_format.map(Into::into),
                    bus: bus.map(Into::into),
                    ..Default::default()
                };
                match super::disk::add_to_vm(client, &vm_name, &add).await {
                    Ok(v) => vm = v,
                    Err(e) => {
                        // Leave nothing half made: the VM without its disk goes.
                        let path = format!("{}?keep_disks=true", vm_path(&vm_name, ""));
                        let _ = client.delete::<serde_json::Value>(&path).await;
                        return Err(e);
                    }
                }
            }
            print_vm(&vm, json)?;
        }
        VmCommand::List { json } => {
            let vms: Vec<VmInfo> = client.get("/v1/vms").await?;
            if json {
                output::json(&vms)?;
            } else {
                let rows: Vec<Vec<String>> = vms
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            v.generation.to_string(),
                            v.state.as_str().to_string(),
                            heartbeat_name(v.heartbeat).to_string(),
                            v.cpus.to_string(),
                            format_size(v.memory.assigned),
                            accel_name(v.accel).to_string(),
                            v.uptime_secs.map(format_uptime).unwrap_or_default(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "NAME",
                        "GEN",
                        "STATE",
                        "HEARTBEAT",
                        "CPUS",
                        "MEMORY",
                        "ACCEL",
                        "UPTIME",
                    ],
                    &rows,
                );
            }
        }
        VmCommand::Show(a) => print_vm(&client.get(&vm_path(&a.name, "")).await?, a.json)?,
        VmCommand::Start(a) => {
            print_vm(&client.post(&vm_path(&a.name, "start"), &()).await?, a.json)?
        }
        VmCommand::Stop {
            name,
            timeout,
            json,
        } => {
            let vm: VmInfo = client
                .post(
                    &vm_path(&name, "stop"),
                    &StopRequest {
                        timeout_secs: timeout,
                    },
                )
                .await?;
            print_vm(&vm, json)?;
        }
        VmCommand::TurnOff(a) => print_vm(
            &client.post(&vm_path(&a.name, "turn-off"), &()).await?,
            a.json,
        )?,
        VmCommand::Restart(a) => print_vm(
            &client.post(&vm_path(&a.name, "restart"), &()).await?,
            a.json,
        )?,
        VmCommand::Pause(a) => {
            print_vm(&client.post(&vm_path(&a.name, "pause"), &()).await?, a.json)?
        }
        VmCommand::Resume(a) => print_vm(
            &client.post(&vm_path(&a.name, "resume"), &()).await?,
            a.json,
        )?,
        VmCommand::Save(a) => {
            print_vm(&client.post(&vm_path(&a.name, "save"), &()).await?, a.json)?
        }
        VmCommand::Delete { name, keep_disks } => {
            let path = format!("{}?keep_disks={keep_disks}", vm_path(&name, ""));
            let _: serde_json::Value = client.delete(&path).await?;
            println!(
                "deleted {name}{}",
                if keep_disks { " (disks kept)" } else { "" }
            );
        }
        VmCommand::Disk { cmd } => return super::disk::run_vm_disk(client, cmd).await,
        VmCommand::Console { name } => console(client, &name).await?,
        VmCommand::Exec { name, env, argv } => return exec(client, &name, env, argv).await,
        VmCommand::Set {
            name,
            cpus,
            memory,
            secure_boot,
            secure_boot_template,
            accel,
            stop_timeout,
            add_disk,
            rename,
            dynamic,
            json,
        } => {
            let memory = memory.or(dynamic.startup);
            let patch = VmPatch {
                cpus,
                memory,
                secure_boot: secure_boot.map(Into::into),
                secure_boot_template: secure_boot_template.map(Into::into),
                accel: accel.map(Into::into),
                boot_order: None,
                stop_timeout_secs: stop_timeout,
                add_disks: add_disk
                    .into_iter()
                    .map(|p| CreateDisk {
                        path: absolute(p),
                        bus: None,
                        read_only: false,
                    })
                    .collect(),
                name: rename,
                dynamic_memory: dynamic.dynamic_memory.map(Into::into),
                memory_minimum: dynamic.min,
                memory_maximum: dynamic.max,
                memory_buffer_percent: dynamic.buffer,
                memory_weight: dynamic.weight,
            };
            if patch.cpus.is_none()
                && patch.memory.is_none()
                && patch.secure_boot.is_none()
                && patch.secure_boot_template.is_none()
                && patch.accel.is_none()
                && patch.stop_timeout_secs.is_none()
                && patch.add_disks.is_empty()
                && patch.name.is_none()
                && !dynamic.any()
            {
                bail!("nothing to change: give at least one option (see `vireo vm set --help`)");
            }
            print_vm(&client.patch(&vm_path(&name, ""), &patch).await?, json)?;
        }
        VmCommand::Nic(c) => super::nic::run(client, c).await?,
        VmCommand::Move(a) => return super::migrate::move_vm(client, a).await,
        VmCommand::MoveStorage(a) => return super::move_storage::run(client, a).await,
        VmCommand::Kvp { name, action } => {
            match action {
                KvpAction::List { json } => {
                    let pools: KvpPools = client.get(&vm_path(&name, "kvp")).await?;
                    if json {
                        output::json(&pools)?;
                    } else {
                        let mut rows = Vec::new();
                        for (k, v) in &pools.host {
                            rows.push(vec!["host".to_string(), k.clone(), v.clone()]);
                        }
                        for (k, v) in &pools.guest {
                            rows.push(vec!["guest".to_string(), k.clone(), v.clone()]);
                        }
                        output::table(&["POOL", "KEY", "VALUE"], &rows);
                    }
                }
                KvpAction::Get { key } => {
                    let pools: KvpPools = client.get(&vm_path(&name, "kvp")).await?;
                    match pools.guest.get(&key) {
                    Some(v) => println!("{v}"),
                    None => bail!("the guest has published no key {key:?} (see `vireo vm kvp {name} list`)"),
                }
                }
                KvpAction::Set { key, value } => {
                    let _: KvpPools = client
                        .put(&vm_path(&name, "kvp"), &KvpSet { key, value })
                        .await?;
                }
            }
        }
    }
    Ok(0)
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

fn heartbeat_name(h: HeartbeatState) -> &'static str {
    match h {
        HeartbeatState::Ok => "ok",
        HeartbeatState::Lost => "lost",
        HeartbeatState::NoContact => "no-contact",
    }
}

fn format_uptime(s: u64) -> String {
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn print_vm(vm: &VmInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(vm);
    }
    let mut f = vec![
        ("name", vm.name.clone()),
        ("uuid", vm.uuid.to_string()),
        ("generation", vm.generation.to_string()),
        ("state", vm.state.as_str().to_string()),
        ("heartbeat", heartbeat_name(vm.heartbeat).to_string()),
        (
            "accelerator",
            format!("{} ({})", accel_name(vm.accel), vm.accel_reason),
        ),
        ("cpus", vm.cpus.to_string()),
        (
            "secure boot",
            if vm.secure_boot {
                format!("on ({})", vm.secure_boot_template.as_str())
            } else {
                "off".into()
            },
        ),
    ];
    f.extend(super::memory::show_fields(&vm.memory));
    for (i, d) in vm.disks.iter().enumerate() {
        f.push((
            "disk",
            format!(
                "{i}: {} ({:?}{})",
                d.path.display(),
                d.bus,
                if d.read_only { ", read-only" } else { "" }
            ),
        ));
    }
    if let Some(g) = &vm.guest {
        f.push(("guest agent", g.agent.clone().unwrap_or_default()));
        f.push(("guest os", g.os.clone().unwrap_or_default()));
        f.push(("guest kernel", g.kernel.clone().unwrap_or_default()));
        f.push(("guest hostname", g.hostname.clone().unwrap_or_default()));
        f.push(("guest addresses", g.ip_addresses.join(", ")));
    }
    if let Some(w) = &vm.worker {
        f.push((
            "processes",
            format!(
                "worker {}, qemu {}{}",
                w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                w.qemu_pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                if w.restarts > 0 {
                    format!(" (worker replaced {} times)", w.restarts)
                } else {
                    String::new()
                }
            ),
        ));
    }
    if let Some(u) = vm.uptime_secs {
        f.push(("uptime", format_uptime(u)));
    }
    f.push(("console log", vm.console_log.display().to_string()));
    if let Some(m) = &vm.status_message {
        f.push(("status", m.clone()));
    }
    output::fields(&f);
    Ok(())
}

async fn exec(
    client: &Client,
    name: &str,
    env: Vec<String>,
    argv: Vec<String>,
) -> anyhow::Result<i32> {
    let started: ExecStarted = client
        .post(
            &vm_path(name, "exec"),
            &ExecRequest {
                argv,
                env,
                stdin: None,
            },
        )
        .await?;
    let path = format!("{}/{}", vm_path(name, "exec"), started.pid);
    let mut delay = Duration::from_millis(20);
    loop {
        let out: ExecOutput = client.get(&path).await?;
        let mut so = std::io::stdout().lock();
        so.write_all(out.stdout.as_bytes())?;
        so.flush()?;
        drop(so);
        eprint!("{}", out.stderr);
        if out.exited {
            return Ok(match (out.exit_code, out.signal) {
                (Some(c), _) => c.clamp(0, 255) as i32,
                (None, Some(s)) => 128 + s.clamp(0, 127) as i32,
                _ => 1,
            });
        }
        if out.stdout.is_empty() && out.stderr.is_empty() {
            delay = (delay * 2).min(Duration::from_millis(250));
        } else {
            delay = Duration::from_millis(20);
        }
        tokio::time::sleep(delay).await;
    }
}

/// Detach key: Ctrl-].
const DETACH: u8 = 0x1d;

async fn console(client: &Client, name: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let info: serde_json::Value = client.get(&vm_path(name, "console")).await?;
    let sock = info
        .get("socket")
        .and_then(|s| s.as_str())
        .context("vireod gave no console socket")?
        .to_string();
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .with_context(|| format!("connecting to the console of {name}"))?;
    let tty = unsafe { libc_isatty(0) };
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    if tty {
        eprint!("connected to {name}'s serial console; detach with Ctrl-]\r\n");
    }
    let (mut rd, mut wr) = stream.into_split();
    let to_vm = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(i) = buf[..n].iter().position(|b| *b == DETACH) {
                let _ = wr.write_all(&buf[..i]).await;
                return true;
            }
            if wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // Input ended (not a terminal): give the guest a moment to answer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        false
    };
    let from_vm = async move {
        let mut stdout = tokio::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = stdout.flush().await;
                }
            }
        }
    };
    tokio::select! { _ = to_vm => {}, _ = from_vm => {} }
    if tty {
        eprint!("\r\ndetached from {name}\r\n");
    }
    Ok(())
}

unsafe fn libc_isatty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts the terminal in raw mode and restores it on drop.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            bail!("cannot read terminal settings");
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            bail!("cannot set the terminal to raw mode");
        }
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in enter().
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}
