//! Booting test guests under QEMU with TCG: the machine profiles (command lines), a running
//! guest with its serial console captured, QMP and qemu-ga over unix sockets.

use crate::image::Generation;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Secure Boot capable OVMF code (needs SMM and the secure pflash).
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
/// Variable store template with Microsoft's keys enrolled (Secure Boot on).
pub const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
/// OVMF without Secure Boot.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Empty variable store template.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The serial marker of a booted guest.
pub const READY: &str = "VIREO-GUEST-READY";

/// A machine to boot.
pub struct Machine {
    /// Generation 1 or 2.
    pub generation: Generation,
    /// Generation 2 only: Secure Boot with Microsoft's keys (else plain OVMF).
    pub secure_boot: bool,
    /// Disk image.
    pub image: PathBuf,
    /// Its format for QEMU (`raw`, `vhdx`).
    pub format: String,
    /// Guest memory.
    pub memory_mib: u32,
    /// A NIC on QEMU's user network with `restrict=on` (no traffic leaves QEMU).
    pub nic: bool,
    /// QMP socket (server).
    pub qmp_socket: PathBuf,
    /// qemu-ga channel socket (server), if any.
    pub qga_socket: Option<PathBuf>,
    /// Writable copy of the OVMF variable store (generation 2).
    pub vars: PathBuf,
}

/// The QEMU arguments for `m`, serial console on stdio.
pub fn qemu_args(m: &Machine) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    push(&[
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    push(&["-m", &m.memory_mib.to_string(), "-smp", "1"]);
    push(&[
        "-serial",
        "stdio",
        "-qmp",
        &format!("unix:{},server=on,wait=off", m.qmp_socket.display()),
    ]);
    let disk = format!(
        "file={},format={},if=none,id=disk0",
        m.image.display(),
        m.format
    );
    match m.generation {
        Generation::One => {
            push(&["-machine", "pc"]);
            push(&[
                "-drive",
                &disk,
                "-device",
                "ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=0",
            ]);
            if m.nic {
                push(&[
                    "-netdev",
                    "user,id=net0,restrict=on",
                    "-device",
                    "e1000,netdev=net0",
                ]);
            }
        }
        Generation::Two => {
            let code = if m.secure_boot {
                OVMF_CODE_SECBOOT
            } else {
                OVMF_CODE
            };
            push(&["-machine", "q35,smm=on"]);
            if m.secure_boot {
                push(&["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            }
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
            ]);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", m.vars.display()),
            ]);
            push(&["-device", "virtio-scsi-pci,id=scsi0", "-drive", &disk]);
            push(&["-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0"]);
            if m.nic {
                push(&[
                    "-netdev",
                    "user,id=net0,restrict=on",
                    "-device",
                    "virtio-net-pci,netdev=net0",
                ]);
            }
        }
    }
    if let Some(q) = &m.qga_socket {
        push(&["-device", "virtio-serial-pci,id=vser0"]);
        push(&[
            "-chardev",
            &format!("socket,id=qga0,path={},server=on,wait=off", q.display()),
        ]);
        push(&[
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }
    a
}

/// Copies the OVMF variable store template the machine needs to `m.vars`.
pub fn prepare_vars(m: &Machine) -> Result<()> {
    if m.generation == Generation::Two {
        let template = if m.secure_boot {
            OVMF_VARS_MS
        } else {
            OVMF_VARS
        };
        let code = if m.secure_boot {
            OVMF_CODE_SECBOOT
        } else {
            OVMF_CODE
        };
        crate::cmd::require_file(Path::new(code), "ovmf")?;
        crate::cmd::require_file(Path::new(template), "ovmf")?;
        fs::copy(template, &m.vars).with_context(|| format!("copying {template}"))?;
    }
    Ok(())
}

/// A running guest; killed on drop.
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    serial: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    started: Instant,
    qmp_socket: PathBuf,
}

impl Guest {
    /// Starts QEMU for `m`, logging the serial console to `log`.
    pub fn spawn(m: &Machine, log: &Path) -> Result<Guest> {
        prepare_vars(m)?;
        let mut c = Command::new("qemu-system-x86_64");
        c.args(qemu_args(m))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("qemu-system-x86_64 not found: run scripts/setup.sh (as root)")
            }
            Err(e) => return Err(e).context("starting qemu-system-x86_64"),
        };
        let started = Instant::now();
        let serial = Arc::new(Mutex::new(Vec::new()));
        let mut out = child.stdout.take().context("qemu stdout")?;
        let mut err = child.stderr.take().context("qemu stderr")?;
        let mut logf = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let buf = serial.clone();
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let _ = logf.write_all(&chunk[..n]);
                if let Ok(mut b) = buf.lock() {
                    b.extend_from_slice(&chunk[..n]);
                }
            }
            let mut rest = Vec::new();
            let _ = err.read_to_end(&mut rest);
            if !rest.is_empty() {
                let _ = logf.write_all(b"\n--- qemu stderr ---\n");
                let _ = logf.write_all(&rest);
                if let Ok(mut b) = buf.lock() {
                    b.extend_from_slice(b"\n--- qemu stderr ---\n");
                    b.extend_from_slice(&rest);
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Guest {
            child,
            stdin,
            serial,
            reader: Some(reader),
            started,
            qmp_socket: m.qmp_socket.clone(),
        })
    }

    /// The serial output so far (lossy UTF-8).
    pub fn serial(&self) -> String {
        match self.serial.lock() {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        }
    }

    fn tail(&self) -> String {
        let s = self.serial();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Waits until the serial output contains `needle`; returns the time since start.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial().contains(needle) {
                return Ok(self.started.elapsed());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "QEMU exited ({st}) before {needle:?}; serial tail:\n{}",
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} within {}s; serial tail:\n{}",
                    timeout.as_secs(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What follows `prefix` on the first serial line containing it (a marker may follow a
    /// shell prompt on the same line).
    pub fn line_value(&self, prefix: &str) -> Option<String> {
        self.serial().lines().find_map(|l| {
            let l = l.trim_end_matches('\r');
            l.find(prefix).map(|i| l[i + prefix.len()..].to_owned())
        })
    }

    /// Types `text` on the serial console.
    pub fn type_line(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("serial input closed")?;
        stdin.write_all(text.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Sends one QMP command (after capability negotiation) and returns its `return` value.
    pub fn qmp(&self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        let s = UnixStream::connect(&self.qmp_socket)
            .with_context(|| format!("connecting to QMP at {}", self.qmp_socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line)?; // greeting
        json_call(&mut r, &mut w, "qmp_capabilities", None)?;
        json_call(&mut r, &mut w, execute, arguments)
    }

    /// Waits for QEMU to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "QEMU still running after {}s; serial tail:\n{}",
                    timeout.as_secs(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// One JSON command/response exchange (QMP or qemu-ga), skipping QMP events.
pub fn json_call(
    r: &mut impl BufRead,
    w: &mut impl Write,
    execute: &str,
    arguments: Option<Value>,
) -> Result<Value> {
    let mut req = serde_json::json!({ "execute": execute });
    if let Some(a) = arguments {
        req["arguments"] = a;
    }
    w.write_all(format!("{req}\n").as_bytes())?;
    w.flush()?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)
            .with_context(|| format!("waiting for the reply to {execute}"))?
            == 0
        {
            bail!("connection closed before the reply to {execute}");
        }
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{ff}');
        if line.is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("bad JSON reply {line:?}"))?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = v.get("error") {
            bail!("{execute} failed: {err}");
        }
    }
}

/// Arguments of `guest-boot`.
#[derive(clap::Args, Clone)]
pub struct BootArgs {
    /// Image to boot.
    #[arg(long)]
    pub image: PathBuf,
    /// Machine generation (1 or 2).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub generation: u8,
    /// Generation 2: Secure Boot off (plain OVMF, empty variable store).
    #[arg(long)]
    pub no_secure_boot: bool,
    /// Add a qemu-ga channel served at this unix socket.
    #[arg(long)]
    pub qga_socket: Option<PathBuf>,
    /// Only print the QEMU command line.
    #[arg(long)]
    pub print: bool,
}

/// `guest-boot`: runs QEMU in the foreground with the serial console on this terminal
/// (Ctrl-A X quits).
pub fn boot_cmd(a: &BootArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vireo-guest-boot.{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let format = if a.image.extension().is_some_and(|e| e == "vhdx") {
        "vhdx"
    } else {
        "raw"
    };
    let m = Machine {
        generation: Generation::from_number(a.generation)?,
        secure_boot: !a.no_secure_boot,
        image: a.image.clone(),
        format: format.to_owned(),
        memory_mib: 512,
        nic: true,
        qmp_socket: dir.join("qmp.sock"),
        qga_socket: a.qga_socket.clone(),
        vars: dir.join("OVMF_VARS.fd"),
    };
    let mut args = qemu_args(&m);
    if let Some(i) = args.iter().position(|x| x == "stdio") {
        args[i] = "mon:stdio".to_owned();
    }
    println!("qemu-system-x86_64 {}", args.join(" "));
    if a.print {
        let _ = fs::remove_dir_all(&dir);
        return Ok(());
    }
    prepare_vars(&m)?;
    let st = Command::new("qemu-system-x86_64").args(&args).status();
    let _ = fs::remove_dir_all(&dir);
    let st = st.context("starting qemu-system-x86_64 (scripts/setup.sh installs it)")?;
    if !st.success() {
        bail!("QEMU exited with {st}");
    }
    Ok(())
}
