//! `vireo bench switch`: the switch dataplane against the kernel's Linux bridge, side by
//! side in one run, with a packet generator of our own.
//!
//! Topology (root namespace, raw Ethernet frames with EtherType 0x88b5 between locally
//! administered MACs, so no host stack answers them; IPv6 is off on every interface):
//!
//! ```text
//!  generator ── gA ══veth══ pA ─┐                   ┌─ pB ══veth══ gB ── counter / latency probe
//!                               └ Linux bridge  |  vireo-switch (AF_PACKET ports a, b)
//! ```
//!
//! Per round and per mode: frames of 60 bytes (64 on the wire with the FCS) and 1514 bytes
//! (1500-byte payload) are sent from `gA` with `sendmmsg` batches as fast as one core allows,
//! for `--seconds`; the rate is what `gB` receives (its kernel `rx_packets`). Then 64-byte
//! probes are sent one at a time and received on `gB`: one-way latency percentiles. The
//! generator is pinned to `--gen-cpu`, the switch process to `--switch-cpu` (the bridge
//! forwards in the generator's softirq). Needs root and a built `vireo-switch`.

use anyhow::{bail, Context};
use serde::Serialize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `vireo bench switch`.
#[derive(clap::Args, Debug)]
pub struct SwitchBenchArgs {
    /// The vireo-switch binary [default: next to this vireo binary].
    #[arg(long)]
    pub switch_bin: Option<PathBuf>,
    /// Seconds of traffic per measurement.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Rounds (bridge and switch alternate within each); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Latency probes per mode and round.
    #[arg(long, default_value_t = 500)]
    pub probes: usize,
    /// CPU the generator runs on.
    #[arg(long, default_value_t = 0)]
    pub gen_cpu: usize,
    /// CPU the switch process runs on.
    #[arg(long, default_value_t = 1)]
    pub switch_cpu: usize,
    /// Extra environment for the switch, NAME=VALUE (e.g. VIREO_SWITCH_BUSY_POLL=1).
    #[arg(long = "switch-env", value_name = "NAME=VALUE")]
    pub switch_env: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

const ETHERTYPE: u16 = 0x88b5;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const MAGIC: u32 = 0x5649_5245; // "VIRE"
const SIZES: [usize; 2] = [60, 1514];
const BATCH: usize = 64;

/// One throughput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    /// Frame size without FCS.
    pub frame_bytes: usize,
    /// Frames sent by the generator per second.
    pub sent_fps: f64,
    /// Frames received at the far end per second.
    pub fps: f64,
    /// Received frame bits per second / 1e9 (frame bytes without FCS).
    pub gbps: f64,
    /// CPU seconds per second the switch process used (0 for the bridge).
    pub switch_cpu: f64,
    /// CPU seconds per second the generator thread used (with the bridge this includes the
    /// bridge's forwarding, done in the sender's softirq).
    pub gen_cpu: f64,
    /// Forwarding CPU per received frame in nanoseconds: generator plus switch process.
    pub ns_per_frame: f64,
}

/// One-way latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Probes that never arrived (200 ms timeout).
    pub lost: usize,
}

/// A mode's results in one round.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// `bridge` or `switch`.
    pub mode: &'static str,
    /// Per frame size.
    pub rates: Vec<Rate>,
    /// 64-byte probes at low rate.
    pub latency: Latency,
}

/// Interfaces and processes of one run; removed on drop.
struct Topology {
    prefix: String,
    bridge: bool,
    switch: Option<Child>,
    dir: PathBuf,
}

impl Topology {
    fn ifname(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }

    fn create() -> anyhow::Result<Topology> {
        let prefix = format!("vbs{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("vireo-bench-switch.{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let t = Topology {
            prefix,
            bridge: false,
            switch: None,
            dir,
        };
        for (g, p) in [("gA", "pA"), ("gB", "pB")] {
            ip(&[
                "link",
                "add",
                &t.ifname(g),
                "type",
                "veth",
                "peer",
                "name",
                &t.ifname(p),
            ])?;
            for i in [g, p] {
                disable_ipv6(&t.ifname(i));
                ip(&["link", "set", &t.ifname(i), "up"])?;
            }
        }
        Ok(t)
    }

    fn bridge_up(&mut self) -> anyhow::Result<()> {
        let br = self.ifname("br");
        ip(&["link", "add", &br, "type", "bridge"])?;
        self.bridge = true;
        disable_ipv6(&br);
        ip(&["link", "set", &br, "up"])?;
        for p in ["pA", "pB"] {
            ip(&["link", "set", &self.ifname(p), "master", &br])?;
        }
        Ok(())
    }

    fn bridge_down(&mut self) {
        if self.bridge {
            let _ = ip(&["link", "del", &self.ifname("br")]);
            self.bridge = false;
        }
    }

    fn switch_up(&mut self, bin: &Path, cpu: usize, env: &[String]) -> anyhow::Result<u32> {
        let cfg = serde_json::json!({
            "name": "bench",
            "type": "private",
            "ports": [
                {"name": "a", "backend": {"kind": "packet", "ifname": self.ifname("pA")}},
                {"name": "b", "backend": {"kind": "packet", "ifname": self.ifname("pB")}},
            ]
        });
        let cfg_path = self.dir.join("switch.json");
        std::fs::write(&cfg_path, serde_json::to_vec(&cfg)?)?;
        let run_dir = self.dir.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        let log = std::fs::File::create(self.dir.join("switch.log"))?;
        let mut c = Command::new(bin);
        c.arg("--config")
            .arg(&cfg_path)
            .arg("--control")
            .arg(self.dir.join("control.sock"))
            .arg("--run-dir")
            .arg(&run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for e in env {
            let (k, v) = e
                .split_once('=')
                .with_context(|| format!("--switch-env {e:?}: expected NAME=VALUE"))?;
            c.env(k, v);
        }
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        self.switch = Some(child);
        pin(pid as libc::pid_t, cpu);
        Ok(pid)
    }

    fn switch_down(&mut self) {
        if let Some(mut c) = self.switch.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.switch_down();
        self.bridge_down();
        for g in ["gA", "gB"] {
            let _ = ip(&["link", "del", &self.ifname(g)]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2): run scripts/setup.sh")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn disable_ipv6(ifname: &str) {
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
}

fn pin(pid: libc::pid_t, cpu: usize) {
    // SAFETY: cpu_set_t is plain data; the libc macros write inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ifindex(name: &str) -> anyhow::Result<i32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: c is a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i as i32)
}

/// A raw packet socket bound to an interface (qdisc bypassed for sending).
fn packet_socket(ifname: &str) -> anyhow::Result<OwnedFd> {
    let idx = ifindex(ifname)?;
    let proto = ETHERTYPE.to_be() as i32;
    // SAFETY: plain socket call.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) })
            .context("AF_PACKET socket (root needed)")?;
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = idx;
    // SAFETY: binds with a correctly sized sockaddr_ll.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    let one: libc::c_int = 1;
    // SAFETY: passes an int and its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const libc::c_int as *const libc::c_void,
            4,
        );
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: passes a timeval and its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn frame(len: usize, src: [u8; 6], dst: [u8; 6], seq: u64) -> Vec<u8> {
    let mut f = vec![0u8; len.max(60)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&MAGIC.to_be_bytes());
    f[18..26].copy_from_slice(&seq.to_be_bytes());
    f[26..34].copy_from_slice(&mono_ns().to_be_bytes());
    f
}

fn send_one(fd: RawFd, f: &[u8]) -> std::io::Result<()> {
    // SAFETY: f is valid for its length.
    let n = unsafe { libc::send(fd, f.as_ptr() as *const libc::c_void, f.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receives until a probe with `seq` arrives (or the 200 ms timeout); returns its latency.
fn recv_probe(fd: RawFd, seq: u64, buf: &mut [u8]) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        let now = mono_ns();
        if n < 34 {
            if n < 0 {
                return None;
            }
            continue;
        }
        if buf[14..18] != MAGIC.to_be_bytes()
            || u64::from_be_bytes(buf[18..26].try_into().ok()?) != seq
        {
            continue;
        }
        let ts = u64::from_be_bytes(buf[26..34].try_into().ok()?);
        return Some(now.saturating_sub(ts));
    }
    None
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn rx_packets(ifname: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/rx_packets"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the ")" of the command name: state is field 3; utime 14, stime 15
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    ut + st
}

/// Sends `len`-byte frames A→B as fast as possible on `gen_cpu` for `secs`; counts what B
/// receives in the same window.
fn throughput(
    t: &Topology,
    len: usize,
    secs: u64,
    gen_cpu: usize,
    switch_pid: Option<u32>,
) -> anyhow::Result<Rate> {
    let tx = packet_socket(&t.ifname("gA"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let gen_ns = Arc::new(AtomicU64::new(0));
    let g2 = gen_ns.clone();
    let f = frame(len, MAC_A, MAC_B, 0);
    let (s2, n2) = (stop.clone(), sent.clone());
    let fd = tx.as_raw_fd();
    let h = std::thread::spawn(move || {
        pin(0, gen_cpu);
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|_| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data.
        let mut mh: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        for (h, v) in mh.iter_mut().zip(iov.iter_mut()) {
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        while !s2.load(Ordering::Relaxed) {
            // SAFETY: headers point at iovecs over `f`, alive for the call.
            let r = unsafe { libc::sendmmsg(fd, mh.as_mut_ptr(), BATCH as libc::c_uint, 0) };
            if r > 0 {
                n2.fetch_add(r as u64, Ordering::Relaxed);
                g2.store(thread_cpu_ns(), Ordering::Relaxed);
            }
        }
    });
    // let the pipeline fill, then measure a window
    std::thread::sleep(Duration::from_millis(300));
    let rx_if = t.ifname("gB");
    let (r0, s0, c0, t0, gc0) = (
        rx_packets(&rx_if),
        sent.load(Ordering::Relaxed),
        cpu_ticks(switch_pid),
        Instant::now(),
        gen_ns.load(Ordering::Relaxed),
    );
    std::thread::sleep(Duration::from_secs(secs));
    let (r1, s1, c1, el, gc1) = (
        rx_packets(&rx_if),
        sent.load(Ordering::Relaxed),
        cpu_ticks(switch_pid),
        t0.elapsed().as_secs_f64(),
        gen_ns.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    drop(tx);
    std::thread::sleep(Duration::from_millis(300)); // drain
                                                    // SAFETY: sysconf is always safe.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let fps = (r1 - r0) as f64 / el;
    let switch_cpu = (c1 - c0) as f64 / hz / el;
    let gen_cpu = gc1.saturating_sub(gc0) as f64 / 1e9 / el;
    Ok(Rate {
        frame_bytes: len,
        sent_fps: (s1 - s0) as f64 / el,
        fps,
        gbps: fps * len as f64 * 8.0 / 1e9,
        switch_cpu,
        gen_cpu,
        ns_per_frame: (switch_cpu + gen_cpu) * 1e9 / fps.max(1.0),
    })
}

fn latency(t: &Topology, probes: usize, gen_cpu: usize) -> anyhow::Result<Latency> {
    pin(0, gen_cpu);
    let tx = packet_socket(&t.ifname("gA"))?;
    let rx = packet_socket(&t.ifname("gB"))?;
    let mut buf = vec![0u8; 2048];
    let mut v = Vec::with_capacity(probes);
    let mut lost = 0;
    for i in 0..probes {
        let seq = 1_000_000 + i as u64;
        send_one(tx.as_raw_fd(), &frame(60, MAC_A, MAC_B, seq))?;
        match recv_probe(rx.as_raw_fd(), seq, &mut buf) {
            Some(ns) => v.push(ns as f64 / 1000.0),
            None => lost += 1,
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    Ok(Latency {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        lost,
    })
}

/// Teaches the forwarder where both MACs are and waits until A→B frames pass.
fn learn_and_wait(t: &Topology, timeout: Duration) -> anyhow::Result<()> {
    let a = packet_socket(&t.ifname("gA"))?;
    let b = packet_socket(&t.ifname("gB"))?;
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    let mut seq = 1;
    while start.elapsed() < timeout {
        send_one(b.as_raw_fd(), &frame(60, MAC_B, MAC_A, 0))?;
        send_one(a.as_raw_fd(), &frame(60, MAC_A, MAC_B, seq))?;
        if recv_probe(b.as_raw_fd(), seq, &mut buf).is_some() {
            return Ok(());
        }
        seq += 1;
    }
    bail!(
        "no frame crossed the forwarder within {}s",
        timeout.as_secs()
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Summary across rounds.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Every round's results.
    pub rounds: Vec<Vec<ModeResult>>,
    /// Median switch/bridge ratio of received frames/s, per frame size.
    pub ratio_fps: Vec<(usize, f64)>,
    /// Median frames/s per mode and size.
    pub median_fps: Vec<(&'static str, usize, f64)>,
}

/// Runs the benchmark.
pub fn run(a: SwitchBenchArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid is always safe.
    if unsafe { libc::geteuid() } != 0 {
        bail!("vireo bench switch needs root (it creates veth pairs and a bridge)");
    }
    let bin = match &a.switch_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("vireo-switch"))
            .context("no directory for vireo-switch")?,
    };
    if !bin.exists() {
        bail!(
            "no vireo-switch at {} (build it: cargo build --release -p vireo-switch, or pass --switch-bin)",
            bin.display()
        );
    }
    let mut t = Topology::create()?;
    let mut rounds = Vec::new();
    for r in 0..a.rounds {
        let mut res = Vec::new();
        for mode in ["bridge", "switch"] {
            let pid = if mode == "bridge" {
                t.bridge_up()?;
                None
            } else {
                Some(t.switch_up(&bin, a.switch_cpu, &a.switch_env)?)
            };
            let ok = learn_and_wait(&t, Duration::from_secs(15));
            if let Err(e) = ok {
                let log = std::fs::read_to_string(t.dir.join("switch.log")).unwrap_or_default();
                bail!("{mode}: {e}\n{log}");
            }
            let mut rates = Vec::new();
            for len in SIZES {
                rates.push(throughput(&t, len, a.seconds, a.gen_cpu, pid)?);
            }
            let lat = latency(&t, a.probes, a.gen_cpu)?;
            if !a.json {
                for x in &rates {
                    println!(
                        "round {r} {mode:6} {:4} B: {:>9.0} frames/s ({:6.2} Gbit/s), sent {:>9.0}/s, CPU generator {:.2} switch {:.2}, {:>5.0} ns/frame",
                        x.frame_bytes, x.fps, x.gbps, x.sent_fps, x.gen_cpu, x.switch_cpu, x.ns_per_frame
                    );
                }
                println!(
                    "round {r} {mode:6} latency 64 B: p50 {:.1} us, p99 {:.1} us, lost {}",
                    lat.p50_us, lat.p99_us, lat.lost
                );
            }
            res.push(ModeResult {
                mode,
                rates,
                latency: lat,
            });
            t.bridge_down();
            t.switch_down();
        }
        rounds.push(res);
    }
    let med = |mode: &str, len: usize| -> f64 {
        median(
            rounds
                .iter()
                .flat_map(|r| r.iter())
                .filter(|m| m.mode == mode)
                .flat_map(|m| m.rates.iter())
                .filter(|x| x.frame_bytes == len)
                .map(|x| x.fps)
                .collect(),
        )
    };
    let ratio = |len: usize| -> f64 {
        median(
            rounds
                .iter()
                .filter_map(|r| {
                    let get = |mode: &str| {
                        r.iter()
                            .find(|m| m.mode == mode)?
                            .rates
                            .iter()
                            .find(|x| x.frame_bytes == len)
                            .map(|x| x.fps)
                    };
                    Some(get("switch")? / get("bridge")?)
                })
                .collect(),
        )
    };
    let ratio_fps: Vec<(usize, f64)> = SIZES.iter().map(|&l| (l, ratio(l))).collect();
    let median_fps: Vec<(&'static str, usize, f64)> = ["bridge", "switch"]
        .iter()
        .flat_map(|&m| SIZES.iter().map(move |&l| (m, l)))
        .map(|(m, l)| (m, l, med(m, l)))
        .collect();
    let summary = Summary {
        ratio_fps,
        median_fps,
        rounds,
    };
    let med = |mode: &str, len: usize| -> f64 {
        summary
            .median_fps
            .iter()
            .find(|(m, l, _)| *m == mode && *l == len)
            .map(|x| x.2)
            .unwrap_or(f64::NAN)
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for (l, r) in &summary.ratio_fps {
            println!(
                "median {l:4} B: bridge {:.0} frames/s, switch {:.0} frames/s, ratio (per round, median) {r:.2}",
                med("bridge", *l),
                med("switch", *l)
            );
        }
    }
    Ok(())
}
