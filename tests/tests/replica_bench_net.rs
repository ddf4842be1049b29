//! Benchmark (ignored; prints figures, asserts no timing): Vireo Replica over the real
//! network path, two vireod hosts in their own network namespaces joined by veth, mutual TLS
//! between them (`vireo_e2e::multihost::Cluster`).
//!
//! 1. Initial replication throughput: a generation 1 guest whose data disk holds
//!    incompressible random data (written host-side before the VM starts) is replicated
//!    from host A to host B (`--interval 30s`, no bandwidth limit). Timed from
//!    `replica enable --start` to state `replicating` (A's status polled every 200 ms);
//!    bytes shipped from A's status; each round into a new replica path on B. Anchor in the
//!    same run, on the same link between the same namespaces, interleaved: a plain copy of
//!    the same VM disk files over mutual TLS (`openssl s_server -WWW` in A's namespace,
//!    `curl` with a client certificate in B's, the files fsynced on arrival), and the raw
//!    TCP capacity of the link (`iperf3`).
//! 2. Achieved RPO with a steady guest write load: the guest (TCG) writes 1 MiB blocks of a
//!    pre-generated random file at random offsets of its data disk (`conv=fsync`), paced
//!    to 10 MiB/s; A's `lag_secs` is sampled every 250 ms for each interval (continuous,
//!    then 30s); p50/p99/max lag, cycles, bytes shipped per byte the guest wrote.
//!
//! Run (build the release binaries first, the harness takes them next to the test binary):
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo test --release -p vireo-e2e --test replica_bench_net -- --ignored --nocapture
//! ```
//!
//! Overrides: `VIREO_BENCH_DATA_MIB` (data disk size, default 256),
//! `VIREO_BENCH_WRITE_MIB_S` (guest write rate, default 10), `VIREO_BENCH_RPO_SECS`
//! (sampling window per interval, default 120), `VIREO_BENCH_RPO_WARMUP_SECS` (writes
//! before sampling starts, default 10), `VIREO_BENCH_INTERVALS` (default
//! `continuous,30s`), `VIREO_BENCH_ROUNDS` (initial replications, each between two plain
//! copies, default 3).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vireo_e2e::guest_io::find_disk;
use vireo_e2e::multihost::{Cluster, NsHost};
use vireo_e2e::replica_io::status;
use vireo_e2e::*;

const MIB: u64 = 1 << 20;
/// Random source the guest writes from (MiB, in its /tmp).
const GUEST_SRC_MIB: u64 = 32;
const ANCHOR_PORT: &str = "9443";
const IPERF_PORT: &str = "5201";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A child process killed (and reaped) on drop, whatever the test did.
struct Reaped(Option<Child>);

impl Reaped {
    fn wait_bounded(&mut self, secs: u64) {
        let Some(c) = self.0.as_mut() else { return };
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.0 = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` in namespace `ns`, returning its output (panics on a spawn error).
fn in_ns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {cmd:?}: {e}"))
}

/// Waits (bounded) until something listens on TCP `port` in namespace `ns`.
fn wait_listen(ns: &str, port: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = in_ns(ns, &["ss", "-Hltn", &format!("sport = :{port}")]);
        if !String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} in {ns}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A self-signed certificate used by both ends of the anchor copy (server certificate and
/// client certificate: mutual TLS, like the hosts' channel).
fn anchor_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join("anchor-key.pem"), dir.join("anchor-cert.pem"));
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=vireo-bench",
            "-days",
            "1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req (openssl is installed by scripts/setup.sh)");
    assert!(
        o.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (key, cert)
}

/// One plain copy of `files` (in `src_dir`) from A's namespace to B's over mutual TLS:
/// `openssl s_server -WWW` serves them in A, `curl` fetches them in B into `dst_dir`, then
/// each copy is fsynced (timed with the transfer). Returns (bytes, seconds).
fn plain_copy(
    a: &NsHost,
    b: &NsHost,
    src_dir: &Path,
    files: &[&str],
    dst_dir: &Path,
    tls: (&Path, &Path),
) -> (u64, f64) {
    let (key, cert) = tls;
    std::fs::create_dir_all(dst_dir).expect("anchor dir");
    let listen = format!("{}:{ANCHOR_PORT}", a.addr.split(':').next().expect("addr"));
    let mut server = Reaped(Some(
        Command::new("ip")
            .args([
                "netns", "exec", &a.ns, "openssl", "s_server", "-quiet", "-WWW",
            ])
            .args(["-accept", &listen, "-naccept", &files.len().to_string()])
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .args(["-Verify", "1", "-CAfile"])
            .arg(cert)
            .current_dir(src_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    ));
    wait_listen(&a.ns, ANCHOR_PORT);
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        b.ns.clone(),
        "curl".into(),
        "-sS".into(),
        "-k".into(),
        "--cert".into(),
        path_str(cert).into(),
        "--key".into(),
        path_str(key).into(),
        "--max-time".into(),
        "600".into(),
    ];
    for f in files {
        args.push("-o".into());
        args.push(path_str(&dst_dir.join(f)).into());
        args.push(format!("https://{listen}/{f}"));
    }
    let t = Instant::now();
    let o = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let mut bytes = 0;
    for f in files {
        let p = dst_dir.join(f);
        let file = std::fs::File::open(&p).expect("copied file");
        file.sync_all().expect("fsync of the copy");
        bytes += file.metadata().expect("metadata").len();
    }
    let secs = t.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for f in files {
        let want = std::fs::metadata(src_dir.join(f)).expect("source").len();
        let got = std::fs::metadata(dst_dir.join(f)).expect("copy").len();
        assert_eq!(want, got, "{f}: copied {got} of {want} bytes");
        let _ = std::fs::remove_file(dst_dir.join(f));
    }
    server.wait_bounded(5);
    (bytes, secs)
}

/// Raw TCP throughput A -> B with iperf3 (no TLS, no disk), bits per second.
fn iperf(a: &NsHost, b: &NsHost) -> Option<f64> {
    let b_ip = b.addr.split(':').next().expect("addr");
    let mut server = Reaped(Some(
        Command::new("ip")
            .args([
                "netns", "exec", &b.ns, "iperf3", "-s", "-1", "-p", IPERF_PORT,
            ])
            .args(["-B", b_ip])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s"),
    ));
    wait_listen(&b.ns, IPERF_PORT);
    let o = in_ns(
        &a.ns,
        &["iperf3", "-c", b_ip, "-p", IPERF_PORT, "-t", "5", "-J"],
    );
    server.wait_bounded(5);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64()
}

/// The status row of VM `g` on `h`.
fn row(h: &NsHost) -> serde_json::Value {
    status(h)
        .into_iter()
        .find(|v| v["vm"] == "g")
        .unwrap_or(serde_json::Value::Null)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[i.clamp(1, v.len()) - 1]
}

/// The guest writer: 1 MiB blocks of /tmp/src at random MiB offsets of the data disk
/// (`conv=fsync`), paced to `rate` MiB/s by the guest's uptime; the count of blocks in
/// /tmp/wn, its start (centiseconds of uptime) in /tmp/wt0.
fn writer_script(data_sectors: u64, data_mib: u64, rate: u64) -> String {
    format!(
        r#"cat > /tmp/wr.sh <<'EOS'
{find}
R={rate}; n=0; echo 0 > /tmp/wn
read u _ < /proc/uptime; t0=${{u%.*}}${{u#*.}}; echo $t0 > /tmp/wt0
while true; do
  read u _ < /proc/uptime; t=${{u%.*}}${{u#*.}}
  if [ $(( (t - t0) * R )) -ge $(( n * 100 )) ]; then
    dd if=/tmp/src of=$D bs=1048576 skip=$((n % {src})) seek=$((RANDOM % {data_mib})) count=1 conv=fsync,notrunc 2>/dev/null
    n=$((n + 1)); echo $n > /tmp/wn
  else
    sleep 0.05
  fi
done
EOS
[ -s /tmp/src ] || head -c {src_bytes} /dev/urandom > /tmp/src
setsid sh /tmp/wr.sh >/dev/null 2>&1 &
echo $! > /tmp/wr.pid; echo started"#,
        find = find_disk(data_sectors),
        src = GUEST_SRC_MIB,
        src_bytes = GUEST_SRC_MIB * MIB,
    )
}

/// (blocks written since the writer started, guest uptime in centiseconds).
fn writer_progress(a: &NsHost) -> (u64, u64) {
    let (code, out) = a.exec(
        "g",
        "cat /tmp/wn; read u _ < /proc/uptime; echo ${u%.*}${u#*.}",
    );
    assert_eq!(code, 0, "{out}");
    let mut l = out.lines().map(|s| s.trim().parse::<u64>().unwrap_or(0));
    (l.next().unwrap_or(0), l.next().unwrap_or(0))
}

/// (Re-)enables replication of g at `interval` and waits until a complete cycle cut after
/// the enable has been applied (after a disable, the first cycle ships every block again).
fn enable(a: &NsHost, b: &NsHost, interval: &str) -> (Duration, serde_json::Value) {
    let t = Instant::now();
    let since = now_ms();
    a.ok(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        interval,
        "--start",
    ]);
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last_progress = -1.0;
    loop {
        let r = row(a);
        if r["state"] == "replicating" && r["last_cut_unix_ms"].as_u64().unwrap_or(0) >= since {
            return (t.elapsed(), r);
        }
        let p = r["initial_progress"].as_f64().unwrap_or(0.0);
        if p - last_progress >= 0.1 {
            println!(
                "  {:5.1}s  {} {:.0}% {} bytes shipped",
                t.elapsed().as_secs_f64(),
                r["state"],
                p * 100.0,
                r["bytes_shipped"]
            );
            last_progress = p;
        }
        assert!(
            Instant::now() < deadline,
            "replication at {interval} did not complete a cycle in 900 s: {r:#}\nlog tail:\n{}",
            tail(&a.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct RpoResult {
    interval: String,
    secs: f64,
    guest_mib_s: f64,
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
    cycles: u64,
    shipped: u64,
    written: u64,
    warnings: usize,
}

fn measure_rpo(
    a: &NsHost,
    interval: &str,
    writer: &str,
    window: u64,
    warmup: u64,
    rate: u64,
) -> RpoResult {
    let (code, out) = a.exec("g", writer);
    assert_eq!(code, 0, "starting the guest writer: {out}");
    std::thread::sleep(Duration::from_secs(warmup));
    let r0 = row(a);
    let (n0, u0) = writer_progress(a);
    let t0 = Instant::now();
    let mut lags = Vec::new();
    let mut warnings = 0;
    let mut last_print = Instant::now();
    while t0.elapsed() < Duration::from_secs(window) {
        let r = row(a);
        if let Some(l) = r["lag_secs"].as_f64() {
            lags.push(l);
        }
        if !r["warning"].is_null() || !r["last_error"].is_null() {
            warnings += 1;
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            println!(
                "  {interval} {:4.0}s: lag {:.2}s, {} cycles, {} bytes shipped{}",
                t0.elapsed().as_secs_f64(),
                r["lag_secs"].as_f64().unwrap_or(f64::NAN),
                r["cycles"],
                r["bytes_shipped"],
                if r["warning"].is_null() {
                    String::new()
                } else {
                    format!(", warning: {}", r["warning"])
                }
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let secs = t0.elapsed().as_secs_f64();
    let r1 = row(a);
    let (n1, u1) = writer_progress(a);
    let (code, out) = a.exec("g", "kill $(cat /tmp/wr.pid); echo stopped");
    assert_eq!(code, 0, "stopping the guest writer: {out}");
    lags.sort_by(f64::total_cmp);
    let written = (n1 - n0) * MIB;
    let guest_secs = (u1.saturating_sub(u0)) as f64 / 100.0;
    let guest_mib_s = if guest_secs > 0.0 {
        (n1 - n0) as f64 / guest_secs
    } else {
        f64::NAN
    };
    println!(
        "  {interval}: guest wrote {} MiB in {guest_secs:.1} s of its clock ({guest_mib_s:.2} MiB/s, target {rate}); {} lag samples",
        n1 - n0,
        lags.len()
    );
    RpoResult {
        interval: interval.to_string(),
        secs,
        guest_mib_s,
        samples: lags.len(),
        p50: pct(&lags, 50.0),
        p99: pct(&lags, 99.0),
        max: lags.last().copied().unwrap_or(f64::NAN),
        cycles: r1["cycles"].as_u64().unwrap_or(0) - r0["cycles"].as_u64().unwrap_or(0),
        shipped: r1["bytes_shipped"].as_u64().unwrap_or(0)
            - r0["bytes_shipped"].as_u64().unwrap_or(0),
        written,
        warnings,
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

#[test]
#[ignore = "benchmark: cargo test --release -p vireo-e2e --test replica_bench_net -- --ignored --nocapture"]
fn replica_over_the_network() {
    let data_mib = env_u64("VIREO_BENCH_DATA_MIB", 256);
    let rate = env_u64("VIREO_BENCH_WRITE_MIB_S", 10);
    let window = env_u64("VIREO_BENCH_RPO_SECS", 120);
    let warmup = env_u64("VIREO_BENCH_RPO_WARMUP_SECS", 10);
    let rounds = env_u64("VIREO_BENCH_ROUNDS", 3).max(1);
    let intervals: Vec<String> = std::env::var("VIREO_BENCH_INTERVALS")
        .unwrap_or_else(|_| "continuous,30s".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    println!(
        "binaries: {} (release: {})",
        bin_dir().display(),
        bin_dir().ends_with("release")
    );

    let c = Cluster::start(2, &[&[], &[]]);
    c.trust(0, 1);
    c.trust(1, 0);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let dir = c.dir.path();
    b.ok(&[
        "host",
        "set",
        "--allow-replica-from",
        a.addr.split(':').next().expect("addr"),
        "--replica-path",
        path_str(&dir.join("replicas-1")),
    ]);

    // The VM: the lite generation 1 test guest (boot disk converted to VHDX) and a data
    // disk of incompressible random data, made host-side before the VM starts.
    let boot_raw = guest_disk_lite(dir, 1, GuestAgent::Vireo);
    let (boot, data) = (dir.join("boot.vhdx"), dir.join("data.vhdx"));
    a.ok(&["disk", "convert", path_str(&boot_raw), path_str(&boot)]);
    let data_raw = dir.join("data.raw");
    {
        let mut src = std::fs::File::open("/dev/urandom")
            .expect("/dev/urandom")
            .take(data_mib * MIB);
        let mut dst = std::fs::File::create(&data_raw).expect("data.raw");
        std::io::copy(&mut src, &mut dst).expect("random data disk");
    }
    a.ok(&["disk", "convert", path_str(&data_raw), path_str(&data)]);
    std::fs::remove_file(&data_raw).expect("removing data.raw");
    a.ok(&[
        "vm",
        "new",
        "g",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        path_str(&boot),
        "--disk",
        path_str(&data),
    ]);
    a.ok(&["vm", "start", "g"]);
    let t_boot = Instant::now();
    a.wait_heartbeat("g");
    println!("guest up in {:.0} s", t_boot.elapsed().as_secs_f64());
    let file_bytes = |p: &Path| std::fs::metadata(p).expect("disk file").len();
    let (boot_len, data_len) = (file_bytes(&boot), file_bytes(&data));
    let disk_bytes = boot_len + data_len;
    println!("VM disk files: boot.vhdx {boot_len} + data.vhdx {data_len} = {disk_bytes} bytes");

    // 1. Initial replication vs a plain copy of the same files over the same link,
    // interleaved: copy, Vireo, copy, Vireo, ..., copy. Each Vireo round is a true initial
    // replication: B keeps each round's replica under a new replica path.
    let tls = anchor_cert(dir);
    let tls = (tls.0.as_path(), tls.1.as_path());
    let files = ["boot.vhdx", "data.vhdx"];
    let anchor_dir = b.dir.join("anchor");
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut copies: Vec<(u64, f64)> = Vec::new();
    let mut inits: Vec<(u64, f64, u64)> = Vec::new();
    for round in 1..=rounds {
        let (bytes, secs) = plain_copy(a, b, dir, &files, &anchor_dir, tls);
        println!(
            "plain copy {round}: {bytes} bytes in {secs:.2} s ({:.1} MiB/s)",
            mib_s(bytes, secs)
        );
        copies.push((bytes, secs));
        if round > 1 {
            a.ok(&["replica", "disable", "g"]);
        }
        let rp = dir.join(format!("replicas-{round}"));
        b.ok(&["host", "set", "--replica-path", path_str(&rp)]);
        let (t, r) = enable(a, b, "30s");
        let (bytes, secs) = (r["bytes_shipped"].as_u64().unwrap_or(0), t.as_secs_f64());
        let cycles = r["cycles"].as_u64().unwrap_or(0);
        println!(
            "Vireo initial replication {round}: {bytes} bytes shipped in {secs:.2} s ({:.1} MiB/s), {cycles} cycles; B received {}",
            mib_s(bytes, secs),
            row(b)["bytes_shipped"]
        );
        inits.push((bytes, secs, cycles));
    }
    let (bytes, secs) = plain_copy(a, b, dir, &files, &anchor_dir, tls);
    println!(
        "plain copy {}: {bytes} bytes in {secs:.2} s ({:.1} MiB/s)",
        rounds + 1,
        mib_s(bytes, secs)
    );
    copies.push((bytes, secs));
    let iperf_bps = iperf(a, b);
    println!("iperf3 A -> B: {iperf_bps:?} bit/s");

    // 2. Achieved RPO with the guest writing `rate` MiB/s. Changing the interval means
    // disable + enable: the replica's store is kept and the first cycle ships every block
    // of both disks in one cycle (timed too: the data path without the initial chunking).
    let writer = writer_script(data_mib * 2048, data_mib, rate);
    let mut current = "30s".to_string();
    let mut rpo = Vec::new();
    let mut full_cycles: Vec<(String, u64, f64)> = Vec::new();
    for interval in &intervals {
        if *interval != current {
            a.ok(&["replica", "disable", "g"]);
            let (t, r) = enable(a, b, interval);
            let bytes = r["bytes_shipped"].as_u64().unwrap_or(0);
            println!(
                "re-enabled at {interval}: first complete cycle (every block again) in {:.2} s, {bytes} bytes, {} cycles",
                t.as_secs_f64(),
                r["cycles"]
            );
            full_cycles.push((interval.clone(), bytes, t.as_secs_f64()));
            current = interval.clone();
        }
        rpo.push(measure_rpo(a, interval, &writer, window, warmup, rate));
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    a.ok(&["replica", "disable", "g"]);
    a.ok(&["vm", "turn-off", "g"]);

    // Results.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n.is_multiple_of(2) {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        } else {
            v[n / 2]
        }
    };
    let copy_med = median(copies.iter().map(|&(b, s)| mib_s(b, s)).collect());
    let init_med = median(inits.iter().map(|&(b, s, _)| mib_s(b, s)).collect());
    let init_secs_med = median(inits.iter().map(|&(_, s, _)| s).collect());
    let copy_secs_med = median(copies.iter().map(|&(_, s)| s).collect());
    println!();
    println!(
        "load average before the initial replications: {}; after the RPO runs: {}",
        load_before.trim(),
        load_after.trim()
    );
    println!(
        "VM: boot.vhdx {boot_len} + data.vhdx {data_len} = {disk_bytes} bytes of disk files ({data_mib} MiB of random data)"
    );
    println!();
    println!("| transfer A -> B, in run order | bytes | seconds | MiB/s |");
    println!("|---|---|---|---|");
    for (i, &(bytes, secs)) in copies.iter().enumerate() {
        println!(
            "| plain copy {} of the disk files (mutual TLS: `openssl s_server -WWW` -> `curl`, fsync) | {bytes} | {secs:.2} | {:.1} |",
            i + 1,
            mib_s(bytes, secs)
        );
        if let Some(&(bytes, secs, cycles)) = inits.get(i) {
            println!(
                "| Vireo initial replication {} (`enable --start` -> `replicating`, {cycles} cycles) | {bytes} | {secs:.2} | **{:.1}** |",
                i + 1,
                mib_s(bytes, secs)
            );
        }
    }
    for (interval, bytes, secs) in &full_cycles {
        println!(
            "| Vireo, every block in one cycle (disable + `enable --interval {interval}` on the kept replica) | {bytes} | {secs:.2} | {:.1} |",
            mib_s(*bytes, *secs)
        );
    }
    if let Some(bps) = iperf_bps {
        println!(
            "| iperf3 TCP, 5 s (no TLS, no disk) | | | {:.1} |",
            bps / 8.0 / MIB as f64
        );
    }
    println!();
    println!(
        "Vireo initial replication / plain copy (median MiB/s): **{:.2}** ({init_med:.1} / {copy_med:.1}); median time to a replica of the VM: {init_secs_med:.2} s vs {copy_secs_med:.2} s for the copy",
        init_med / copy_med
    );
    println!();
    println!(
        "| interval | window s | guest writes MiB/s (achieved) | cycles | lag p50 | lag p99 | lag max | samples | MiB shipped | shipped / written |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rpo {
        println!(
            "| {} | {:.0} | {:.2} | {} | {:.2} s | **{:.2} s** | {:.2} s | {} | {:.1} | {:.3} |",
            r.interval,
            r.secs,
            r.guest_mib_s,
            r.cycles,
            r.p50,
            r.p99,
            r.max,
            r.samples,
            r.shipped as f64 / MIB as f64,
            r.shipped as f64 / r.written.max(1) as f64
        );
        if r.warnings > 0 {
            println!(
                "({}: {} samples carried a warning or an error)",
                r.interval, r.warnings
            );
        }
    }
}
