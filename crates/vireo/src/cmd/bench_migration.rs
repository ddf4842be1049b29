//! `vireo bench migration`: shared-nothing live migration with Vireo (`vm move
//! --include-storage`) against libvirt (`virsh migrate --live --copy-storage-all`), side by
//! side in one run, same guest image, same memory size, same dirtying load.
//!
//! Everything runs on this machine, in one private network namespace made by the bench
//! (`vbench-PID`, loopback only):
//!
//! ```text
//!  vireod A (127.0.0.1:7601) ══ mutual TLS ══ vireod B (127.0.0.1:7602)
//!  libvirtd A ═══ QEMU migration + NBD (127.0.0.1:49152..) ═══ libvirtd B
//! ```
//!
//! Each libvirtd runs in its own mount and UTS namespace (its own `/etc/libvirt`,
//! `/run/libvirt`, `/var/lib/libvirt`, host name and host UUID), so libvirt sees two hosts.
//! Both guests run the same load: a shell loop that rewrites `--dirty-mib` MiB of tmpfs every
//! second, and a ticker that prints `@` on the serial port every 20 ms. The bench reads
//! both hosts' serial consoles and takes the longest silence between ticks during a
//! migration as the **guest-observed gap** (QEMU's own downtime figure is reported too).
//! Bytes sent are the loopback bytes of the namespace during the migration (everything:
//! memory, disks, control, TLS). Rounds alternate engine and direction (A→B, B→A); the
//! other engine's guest is paused while one is measured.
//!
//! Needs root, a built `vireod` next to this binary, and libvirt (`scripts/setup.sh
//! --bench`; see docs/benchmarks.md).

use anyhow::{bail, Context};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Arguments of `vireo bench migration`.
#[derive(clap::Args, Debug)]
pub struct MigrationBenchArgs {
    /// Bootable generation 1 raw guest image with a serial shell
    /// (`cargo xtask guest-image --generation 1 --out FILE.raw`).
    #[arg(long)]
    pub image: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// MiB of guest memory the load rewrites every second (0: idle guest).
    #[arg(long, default_value_t = 16)]
    pub dirty_mib: u64,
    /// Migrations per engine; directions alternate A→B, B→A.
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Directory for the hosts' state and disks (a temporary directory is made inside).
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// The vireod binary [default: next to this vireo binary].
    #[arg(long)]
    pub vireod_bin: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// `vireo` or `libvirt`.
    pub engine: &'static str,
    /// `A->B` or `B->A`.
    pub direction: &'static str,
    /// Wall time of the migration command, seconds.
    pub total_secs: f64,
    /// Longest silence of the guest's 20 ms ticker during the migration, ms.
    pub guest_gap_ms: f64,
    /// Longest silence in the 3 s before the migration (noise floor), ms.
    pub baseline_gap_ms: f64,
    /// QEMU's downtime figure, ms.
    pub qemu_downtime_ms: Option<f64>,
    /// Loopback bytes in the bench namespace during the migration.
    pub bytes_sent: u64,
}

/// Medians per engine and the ratios Vireo / libvirt.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every migration, in the order run.
    pub samples: Vec<Sample>,
    /// Median total time (Vireo, libvirt), s.
    pub total_secs: (f64, f64),
    /// Median guest-observed gap (Vireo, libvirt), ms.
    pub guest_gap_ms: (f64, f64),
    /// Median bytes sent (Vireo, libvirt).
    pub bytes_sent: (f64, f64),
    /// Load average at the start.
    pub loadavg: String,
}

const NS_PREFIX: &str = "vbench-";
const VIREO_PORTS: [u16; 2] = [7601, 7602];
const TICK: u8 = b'@';

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The dirtying load and the ticker, one shell line without single quotes.
fn load_line(dirty_mib: u64) -> String {
    let dirty = if dirty_mib > 0 {
        format!(
            "head -c {dirty_mib}M /dev/urandom >/tmp/src; (while :; do cp /tmp/src /tmp/dst; sleep 1; done) & "
        )
    } else {
        String::new()
    };
    format!("{dirty}while :; do echo @; usleep 20000; done >/dev/ttyS0")
}

/// Both engines' hosts, torn down on drop.
struct Bench {
    ns: String,
    dir: PathBuf,
    me: PathBuf,
    vireod: Vec<Child>,
    libvirtd: Vec<Child>,
    vireo_state: [PathBuf; 2],
    lv_root: [PathBuf; 2],
}

impl Drop for Bench {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = Command::new("virsh")
                .args(["-c", &self.lv_uri(i), "destroy", "g"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = self
                .vireo(i, &["vm", "turn-off", "g"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for c in self.vireod.iter_mut().chain(self.libvirtd.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Workers and QEMU processes of the Vireo hosts (their own sessions).
        kill_in_netns(&self.ns);
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills every process left in network namespace `ns` (workers, QEMU).
fn kill_in_netns(ns: &str) {
    if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                // SAFETY: kill(2) with a pid read from `ip netns pids`; no memory involved.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
}

impl Bench {
    fn vireo(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new(&self.me);
        c.arg("--socket")
            .arg(self.vireo_state[i].join("vireod.sock"))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn vireo_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        run_ok(&mut self.vireo(i, args))
    }

    fn lv_uri(&self, i: usize) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.lv_root[i].join("run/libvirt-sock").display()
        )
    }

    fn virsh(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        run_ok(
            Command::new("virsh")
                .arg("-c")
                .arg(self.lv_uri(i))
                .args(args),
        )
    }

    fn lo_tx_bytes(&self) -> u64 {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat", "/proc/net/dev"])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| l.trim_start().starts_with("lo:"))
                    .and_then(|l| l.split(':').nth(1).map(str::to_owned))
            })
            .and_then(|rest| rest.split_whitespace().nth(8).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    fn start(a: &MigrationBenchArgs) -> anyhow::Result<Bench> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("vireo bench migration needs root (network namespace, libvirtd)");
        }
        for t in ["virsh", "libvirtd", "unshare", "ip", "qemu-img"] {
            if !which(t) {
                bail!("`{t}` is missing: the migration bench compares with libvirt; install it with `sudo scripts/setup.sh --bench` (or `apt-get install --no-install-recommends libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu`; see docs/benchmarks.md, section \"Live migration\")");
            }
        }
        if !a.image.is_file() {
            bail!(
                "no guest image at {} (make one with `cargo xtask guest-image --generation 1 --out FILE.raw`)",
                a.image.display()
            );
        }
        let me = std::env::current_exe().context("locating this binary")?;
        let vireod = match &a.vireod_bin {
            Some(p) => p.clone(),
            None => me.with_file_name("vireod"),
        };
        if !vireod.is_file() {
            bail!(
                "no vireod at {} (cargo build -p vireod, or --vireod-bin)",
                vireod.display()
            );
        }
        std::fs::create_dir_all(&a.work_dir)
            .with_context(|| format!("creating {}", a.work_dir.display()))?;
        let dir = a.work_dir.join(format!("vbm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ns = format!("{NS_PREFIX}{}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
        let mut b = Bench {
            ns: ns.clone(),
            dir: dir.clone(),
            me,
            vireod: Vec::new(),
            libvirtd: Vec::new(),
            vireo_state: [dir.join("va"), dir.join("vb")],
            lv_root: [dir.join("la"), dir.join("lb")],
        };
        run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
        for (i, port) in VIREO_PORTS.iter().enumerate() {
            let d = b.vireo_state[i].clone();
            std::fs::create_dir_all(&d)?;
            let log = std::fs::File::create(d.join("vireod.log"))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&vireod)
                .arg("--state-dir")
                .arg(d.join("s"))
                .arg("--socket")
                .arg(d.join("vireod.sock"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .context("starting vireod")?;
            b.vireod.push(child);
            b.libvirtd.push(spawn_libvirtd(&ns, &b.lv_root[i], i)?);
        }
        for i in 0..2 {
            wait_socket(&b.vireo_state[i].join("vireod.sock"), "vireod")?;
            wait_socket(&b.lv_root[i].join("run/libvirt-sock"), "libvirtd")?;
        }
        for (i, j) in [(0, 1), (1, 0)] {
            let info: serde_json::Value =
                serde_json::from_str(&b.vireo_ok(j, &["host", "show", "--json"])?)?;
            let fp = info["fingerprint"].as_str().unwrap_or_default().to_string();
            b.vireo_ok(
                i,
                &[
                    "host",
                    "trust",
                    &format!("127.0.0.1:{}", VIREO_PORTS[j]),
                    "--fingerprint",
                    &fp,
                ],
            )?;
        }
        Ok(b)
    }
}

fn wait_socket(p: &Path, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not come up ({} never answered)", p.display())
}

/// A libvirtd in `ns` with its own mount and UTS namespace rooted at `root`.
fn spawn_libvirtd(ns: &str, root: &Path, i: usize) -> anyhow::Result<Child> {
    for d in ["etc/qemu", "run", "lib/images", "cache", "log"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(
        root.join("etc/libvirtd.conf"),
        format!(
            "unix_sock_dir = \"{}\"\nhost_uuid = \"7e5b1a3c-0000-4000-8000-00000000000{i}\"\nlog_outputs = \"3:file:{}\"\n",
            root.join("run").display(),
            root.join("log/libvirtd.log").display()
        ),
    )?;
    std::fs::write(
        root.join("etc/qemu.conf"),
        "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
         security_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = \"file\"\n",
    )?;
    let r = root.display();
    let script = format!(
        "hostname vbench-libvirt-{i} && mkdir -p /run/libvirt && \
         mount --bind {r}/etc /etc/libvirt && mount --bind {r}/run /run/libvirt && \
         mount --bind {r}/lib /var/lib/libvirt && mount --bind {r}/cache /var/cache/libvirt && \
         mount --bind {r}/log /var/log/libvirt && \
         exec libvirtd -f /etc/libvirt/libvirtd.conf -p {r}/libvirtd.pid"
    );
    let log = std::fs::File::create(root.join("libvirtd.out"))?;
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "unshare",
            "-m",
            "-u",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting libvirtd")
}

/// Reads the serial consoles at `paths` (connecting whenever a socket appears) and records
/// when each chunk holding a tick arrived.
struct Observer {
    stop: Arc<AtomicBool>,
    ticks: Arc<Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    fn start(paths: Vec<PathBuf>) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let (s, t) = (stop.clone(), ticks.clone());
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<Option<std::os::unix::net::UnixStream>> =
                paths.iter().map(|_| None).collect();
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                for (i, p) in paths.iter().enumerate() {
                    if conns[i].is_none() {
                        if let Ok(c) = std::os::unix::net::UnixStream::connect(p) {
                            let _ = c.set_nonblocking(true);
                            conns[i] = Some(c);
                        }
                        continue;
                    }
                    if let Some(c) = conns[i].as_mut() {
                        match c.read(&mut buf) {
                            Ok(0) => conns[i] = None,
                            Ok(n) => {
                                if buf[..n].contains(&TICK) {
                                    t.lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push(Instant::now());
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => conns[i] = None,
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Observer {
            stop,
            ticks,
            thread: Some(thread),
        }
    }

    /// Longest interval between ticks that falls in `[from, to]`, ms.
    fn max_gap(&self, from: Instant, to: Instant) -> f64 {
        let t = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
        t.windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max)
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// Waits until the guest's serial shell on `sock` answers, then starts `line` in it.
fn libvirt_console_start(sock: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut c = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => bail!("libvirt guest console {}: {e}", sock.display()),
        }
    };
    c.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut last_probe = Instant::now() - Duration::from_secs(10);
    loop {
        if Instant::now() > deadline {
            bail!(
                "the libvirt guest's shell never answered on its serial console:\n{}",
                String::from_utf8_lossy(&seen[seen.len().saturating_sub(500)..])
            );
        }
        if last_probe.elapsed() > Duration::from_secs(3) {
            c.write_all(b"echo BENCH-$((40+2))\n")?;
            last_probe = Instant::now();
        }
        if let Ok(n) = c.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        if seen.windows(8).any(|w| w == b"BENCH-42") {
            break;
        }
    }
    c.write_all(format!("setsid sh -c '{line}' >/dev/null 2>&1 </dev/null &\n").as_bytes())?;
    // Stay connected until the ticker shows (QEMU may drop input still queued at a hang-up).
    let until = Instant::now() + Duration::from_secs(60);
    let mut ticks = 0;
    while ticks < 5 {
        if Instant::now() > until {
            bail!("the libvirt guest's load did not start (no ticks on its serial console)");
        }
        if let Ok(n) = c.read(&mut buf) {
            ticks += buf[..n].iter().filter(|&&b| b == TICK).count();
        }
    }
    Ok(())
}

fn wait_vireo_heartbeat(b: &Bench, i: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&b.vireo_ok(i, &["vm", "show", "g", "--json"])?)?;
        if v["heartbeat"] == "ok" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the Vireo guest never answered its agent: {v}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn vireo_console(b: &Bench, i: usize, uuid: &str) -> PathBuf {
    b.vireo_state[i]
        .join("s/run")
        .join(uuid)
        .join("console.sock")
}

fn qcow2_create(path: &Path, size: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string()),
    )?;
    Ok(())
}

fn parse_ms(s: &str, key: &str) -> Option<f64> {
    s.lines()
        .find(|l| l.trim_start().starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs the benchmark.
pub fn run(a: MigrationBenchArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let b = Bench::start(&a)?;
    let size = std::fs::metadata(&a.image)
        .with_context(|| format!("reading {}", a.image.display()))?
        .len();
    let line = load_line(a.dirty_mib);

    // Vireo guest on A, in its own directory (the directory moves with the VM).
    let vdisk = b.dir.join("d0");
    std::fs::create_dir_all(&vdisk)?;
    let vimg = vdisk.join("g.vhdx");
    b.vireo_ok(
        0,
        &[
            "disk",
            "convert",
            &a.image.display().to_string(),
            &vimg.display().to_string(),
        ],
    )?;
    let mem = format!("{}M", a.memory_mib);
    b.vireo_ok(
        0,
        &[
            "vm",
            "new",
            "g",
            "--generation",
            "1",
            "--memory",
            &mem,
            "--disk",
            &vimg.display().to_string(),
        ],
    )?;
    b.vireo_ok(0, &["vm", "start", "g"])?;
    // libvirt guest on A: the same image as qcow2, IDE, the same memory, serial on a socket.
    let lv_img = |i: usize| b.lv_root[i].join("lib/images/g.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&a.image)
            .arg(lv_img(0)),
    )?;
    qcow2_create(&lv_img(1), size)?;
    let xml = format!(
        "<domain type='qemu'><name>g</name><memory unit='MiB'>{m}</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><features><acpi/></features>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
         <source file='/var/lib/libvirt/images/g.qcow2'/><target dev='hda' bus='ide'/></disk>\
         <serial type='unix'><source mode='bind' path='/run/libvirt/console.sock'/><target port='0'/></serial>\
         <video><model type='none'/></video><memballoon model='none'/></devices></domain>",
        m = a.memory_mib
    );
    let xml_path = b.dir.join("g.xml");
    std::fs::write(&xml_path, xml)?;
    b.virsh(0, &["define", &xml_path.display().to_string()])?;
    b.virsh(0, &["start", "g"])?;
    let lv_console = |i: usize| b.lv_root[i].join("run/console.sock");

    eprintln!("booting both guests (TCG)...");
    libvirt_console_start(&lv_console(0), &line)?;
    wait_vireo_heartbeat(&b, 0)?;
    let vm: serde_json::Value =
        serde_json::from_str(&b.vireo_ok(0, &["vm", "show", "g", "--json"])?)?;
    let uuid = vm["uuid"].as_str().unwrap_or_default().to_string();
    b.vireo_ok(
        0,
        &[
            "vm",
            "exec",
            "g",
            "--",
            "sh",
            "-c",
            &format!("setsid sh -c '{line}' >/dev/null 2>&1 </dev/null &"),
        ],
    )?;

    let mut samples = Vec::new();
    let mut vireo_at = 0usize;
    let mut lv_at = 0usize;
    for r in 0..a.runs {
        for engine in ["vireo", "libvirt"] {
            let (src, dst) = if engine == "vireo" {
                (vireo_at, 1 - vireo_at)
            } else {
                (lv_at, 1 - lv_at)
            };
            // Pause the other engine's guest, resume this one and let its load settle.
            if engine == "vireo" {
                b.virsh(lv_at, &["suspend", "g"])?;
                if r > 0 {
                    b.vireo_ok(vireo_at, &["vm", "resume", "g"])?;
                }
            } else {
                b.vireo_ok(vireo_at, &["vm", "pause", "g"])?;
                b.virsh(lv_at, &["resume", "g"])?;
            }
            let consoles = if engine == "vireo" {
                vec![vireo_console(&b, src, &uuid), vireo_console(&b, dst, &uuid)]
            } else {
                vec![lv_console(src), lv_console(dst)]
            };
            let obs = Observer::start(consoles);
            std::thread::sleep(Duration::from_secs(4));
            let t_base = Instant::now() - Duration::from_secs(3);
            let bytes0 = b.lo_tx_bytes();
            let t0 = Instant::now();
            let direction = if src == 0 { "A->B" } else { "B->A" };
            let qemu_downtime_ms;
            if engine == "vireo" {
                let dest_dir = b.dir.join(format!("d{}", r + 1));
                let out = b.vireo_ok(
                    src,
                    &[
                        "vm",
                        "move",
                        "g",
                        "--to",
                        &format!("127.0.0.1:{}", VIREO_PORTS[dst]),
                        "--include-storage",
                        "--destination-path",
                        &dest_dir.display().to_string(),
                        "--json",
                    ],
                )?;
                let j: serde_json::Value = serde_json::from_str(&out)?;
                if j["phase"] != "completed" {
                    bail!("Vireo migration did not complete: {j}");
                }
                qemu_downtime_ms = j["downtime_ms"].as_f64();
                vireo_at = dst;
            } else {
                run_ok(
                    Command::new("virsh")
                        .arg("-c")
                        .arg(b.lv_uri(src))
                        .args(["migrate", "--live", "--copy-storage-all", "g"])
                        .arg(b.lv_uri(dst))
                        .args([
                            "--migrateuri",
                            "tcp://127.0.0.1",
                            "--listen-address",
                            "127.0.0.1",
                        ]),
                )?;
                qemu_downtime_ms = None;
                lv_at = dst;
            }
            let t1 = Instant::now();
            let bytes = b.lo_tx_bytes().saturating_sub(bytes0);
            std::thread::sleep(Duration::from_secs(3));
            let t_end = Instant::now();
            let gap = obs.max_gap(t0, t_end);
            let base = obs.max_gap(t_base, t0);
            obs.finish();
            let qemu_downtime_ms = match engine {
                "libvirt" => b
                    .virsh(dst, &["domjobinfo", "g", "--completed"])
                    .ok()
                    .and_then(|s| parse_ms(&s, "Total downtime")),
                _ => qemu_downtime_ms,
            };
            if engine == "libvirt" {
                // The next migration back needs an empty image of the same size there.
                qcow2_create(&lv_img(src), size)?;
            }
            let s = Sample {
                engine: if engine == "vireo" {
                    "vireo"
                } else {
                    "libvirt"
                },
                direction,
                total_secs: (t1 - t0).as_secs_f64(),
                guest_gap_ms: gap,
                baseline_gap_ms: base,
                qemu_downtime_ms,
                bytes_sent: bytes,
            };
            eprintln!(
                "{:7} {}: {:.2} s, guest gap {:.0} ms (noise floor {:.0} ms), QEMU downtime {} ms, {:.1} MiB sent",
                s.engine,
                s.direction,
                s.total_secs,
                s.guest_gap_ms,
                s.baseline_gap_ms,
                s.qemu_downtime_ms.map(|d| format!("{d:.0}")).unwrap_or("-".into()),
                s.bytes_sent as f64 / 1048576.0
            );
            samples.push(s);
        }
    }
    let of = |e: &str, f: &dyn Fn(&Sample) -> f64| {
        median(samples.iter().filter(|s| s.engine == e).map(f).collect())
    };
    let report = Report {
        total_secs: (
            of("vireo", &|s| s.total_secs),
            of("libvirt", &|s| s.total_secs),
        ),
        guest_gap_ms: (
            of("vireo", &|s| s.guest_gap_ms),
            of("libvirt", &|s| s.guest_gap_ms),
        ),
        bytes_sent: (
            of("vireo", &|s| s.bytes_sent as f64),
            of("libvirt", &|s| s.bytes_sent as f64),
        ),
        samples,
        loadavg,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "shared-nothing live migration, {} MiB guest, {} MiB/s dirtied, {} runs each (load {})",
            a.memory_mib, a.dirty_mib, a.runs, report.loadavg
        );
        println!(
            "{:<22}{:>10}{:>10}{:>8}",
            "median", "vireo", "libvirt", "ratio"
        );
        let row = |n: &str, (v, l): (f64, f64), unit: f64, fmt: usize| {
            println!(
                "{:<22}{:>10.*}{:>10.*}{:>8.2}",
                n,
                fmt,
                v / unit,
                fmt,
                l / unit,
                v / l
            )
        };
        row("total time (s)", report.total_secs, 1.0, 2);
        row("guest-observed gap (ms)", report.guest_gap_ms, 1.0, 0);
        row("bytes sent (MiB)", report.bytes_sent, 1048576.0, 1);
    }
    drop(b);
    Ok(())
}
