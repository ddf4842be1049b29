//! `guest-test`: boots the test guests for real and checks what they report.
//!
//! Scenarios (all by default, in this order):
//! - `gen1`: pc + SeaBIOS + IDE disk + e1000; firmware, disk size seen by the guest, DHCP
//!   lease, serial shell, ACPI power button -> poweroff.
//! - `gen2`: q35 + OVMF Secure Boot (Microsoft keys) + virtio-scsi + virtio-net; the kernel
//!   reports Secure Boot enabled; same checks.
//! - `gen2-nosb-vhdx`: the generation 2 image written as VHDX, booted by plain OVMF.
//! - `qemu-ga`: generation 1 with Debian's qemu-ga: guest-sync, host name, guest-shutdown.
//! - `vireo-agent`: generation 2 (Secure Boot) with the static `vireo-guest`: the same checks.
//! - `net-tools`: generation 1 with the network test programs: `iperf3`, `dnsmasq`, `tcpdump`
//!   and the real `ip` run; an 802.1Q sub-interface is made with `ip link add ... type vlan`;
//!   iperf3 moves data over loopback; dnsmasq serves DHCP on the VLAN interface; busybox
//!   `ping` and `arping` reach QEMU's user-network gateway.
//! - `cache`: a second build is a cache hit (image untouched); a changed input rebuilds and
//!   lands in the initramfs; bad options are refused without touching the cache.

use crate::agent::AgentKind;
use crate::boot::{Guest, Machine, READY};
use crate::cache::{sha256_file, Cache};
use crate::image::{self, Generation, ImageSpec};
use crate::{cmd, repo_root};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::io::BufReader;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SCENARIOS: &[&str] = &[
    "gen1",
    "gen2",
    "gen2-nosb-vhdx",
    "qemu-ga",
    "vireo-agent",
    "net-tools",
    "cache",
];
const SIZE: u64 = 256 << 20;

/// Arguments of `guest-test`.
#[derive(clap::Args, Clone)]
pub struct TestArgs {
    /// Scenario to run (repeatable): gen1, gen2, gen2-nosb-vhdx, qemu-ga, vireo-agent,
    /// net-tools, cache.
    /// Default: all.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Agent for the gen1/gen2 scenarios (the agents have their own scenarios).
    #[arg(long, value_enum, default_value = "none")]
    agent: AgentKind,
    /// Seconds to wait for VIREO-GUEST-READY.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Cache directory [default: <repo>/.cache/guest]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Keep the work directory (serial logs, images).
    #[arg(long)]
    keep: bool,
}

struct Ctx {
    cache: Cache,
    work: PathBuf,
    timeout: Duration,
    agent: AgentKind,
}

/// Runs the selected scenarios; fails on the first failure.
pub fn run(a: &TestArgs) -> Result<()> {
    let scenarios: Vec<String> = if a.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        a.scenarios.clone()
    };
    for s in &scenarios {
        ensure!(
            SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?} (one of {SCENARIOS:?})"
        );
    }
    let cache_dir = a
        .cache_dir
        .clone()
        .unwrap_or_else(|| repo_root().join(".cache/guest"));
    let work = std::env::temp_dir().join(format!("vireo-guest-test.{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let ctx = Ctx {
        cache: Cache::open(&cache_dir)?,
        work: work.clone(),
        timeout: Duration::from_secs(a.timeout),
        agent: a.agent,
    };
    let mut res = Ok(());
    for s in &scenarios {
        let t = Instant::now();
        let r = match s.as_str() {
            "gen1" => boot_scenario(&ctx, Generation::One, true, false),
            "gen2" => boot_scenario(&ctx, Generation::Two, true, false),
            "gen2-nosb-vhdx" => boot_scenario(&ctx, Generation::Two, false, true),
            "qemu-ga" => agent_scenario(&ctx, Generation::One, AgentKind::QemuGa),
            "vireo-agent" => agent_scenario(&ctx, Generation::Two, AgentKind::Vireo),
            "net-tools" => net_tools_scenario(&ctx),
            _ => cache_scenario(&ctx),
        };
        match r {
            Ok(()) => println!("PASS {s} ({:.1}s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!("FAIL {s}: {e:#}");
                res = Err(anyhow::anyhow!("scenario {s} failed"));
                break;
            }
        }
    }
    if a.keep || res.is_err() {
        println!("work directory kept: {}", work.display());
    } else {
        let _ = fs::remove_dir_all(&work);
    }
    res
}

fn spec(generation: Generation, agent: AgentKind) -> ImageSpec {
    ImageSpec {
        generation,
        agent,
        agent_bin: None,
        size: SIZE,
        kernel_package: None,
        extra_files: Vec::new(),
        net_tools: true,
    }
}

fn machine(
    ctx: &Ctx,
    name: &str,
    generation: Generation,
    secure_boot: bool,
    image: PathBuf,
    format: &str,
) -> Machine {
    Machine {
        generation,
        secure_boot,
        image,
        format: format.to_owned(),
        memory_mib: 512,
        nic: true,
        qmp_socket: ctx.work.join(format!("{name}.qmp")),
        qga_socket: None,
        vars: ctx.work.join(format!("{name}.vars.fd")),
    }
}

/// Waits for READY and prints the boot timings.
fn wait_ready(g: &mut Guest, ctx: &Ctx, name: &str) -> Result<()> {
    let t = g.wait_for(READY, ctx.timeout)?;
    let uptime = g.line_value("VIREO-GUEST-UPTIME ").unwrap_or_default();
    println!(
        "  {name}: boot-to-ready {:.2}s (QEMU start to {READY}; guest kernel uptime {}s)",
        t.as_secs_f64(),
        uptime.trim()
    );
    Ok(())
}

/// Checks over the serial shell, then the ACPI power button.
fn common_checks(g: &mut Guest, name: &str) -> Result<()> {
    // The disk as the guest sees it: its size in 512-byte sectors.
    g.type_line("echo VIREO-T-DISK-$(cat /sys/block/sda/size)-$((6*7))")?;
    let want = format!("VIREO-T-DISK-{}-42", SIZE / 512);
    g.wait_for(&want, Duration::from_secs(20))
        .with_context(|| format!("{name}: the serial shell did not report the disk ({want})"))?;
    let t = g.wait_for("VIREO-GUEST-NET eth0 10.0.2.15", Duration::from_secs(40))?;
    println!("  {name}: DHCP lease on eth0 at {:.2}s", t.as_secs_f64());
    // Modules loaded from the initramfs (by name; present in every generation).
    g.type_line("echo VIREO-T-MODS-$(grep -c -E '^(ext4|8021q|virtio_console|evdev|e1000|sd_mod) ' /proc/modules)")?;
    g.wait_for("VIREO-T-MODS-6", Duration::from_secs(10))
        .with_context(|| format!("{name}: not all kernel modules are loaded"))?;
    g.type_line("echo VIREO-T-HOST-$(hostname)")?;
    g.wait_for("VIREO-T-HOST-vireo-guest", Duration::from_secs(10))?;
    let t0 = Instant::now();
    g.qmp("system_powerdown", None)?;
    g.wait_for("VIREO-GUEST-POWEROFF", Duration::from_secs(30))
        .context("the guest did not react to the ACPI power button")?;
    let st = g.wait_exit(Duration::from_secs(30))?;
    ensure!(st.success(), "QEMU exited with {st} after poweroff");
    println!(
        "  {name}: ACPI power button to QEMU exit {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn boot_scenario(ctx: &Ctx, generation: Generation, secure_boot: bool, vhdx: bool) -> Result<()> {
    let name = match (generation, secure_boot, vhdx) {
        (Generation::One, ..) => "gen1",
        (_, true, _) => "gen2",
        _ => "gen2-nosb-vhdx",
    };
    let built = image::build(&repo_root(), &ctx.cache, &spec(generation, ctx.agent))?;
    let out = ctx
        .work
        .join(format!("{name}.{}", if vhdx { "vhdx" } else { "raw" }));
    image::export(&ctx.cache, &built, &out)?;
    if vhdx {
        let info = cmd::stdout(cmd::command(
            "qemu-img",
            ["info", "--output=json", &out.to_string_lossy()],
        ))?;
        let v: serde_json::Value = serde_json::from_str(&info)?;
        ensure!(
            v["format"] == "vhdx",
            "{} is not VHDX: {info}",
            out.display()
        );
        ensure!(
            v["virtual-size"] == SIZE,
            "VHDX virtual size is {}",
            v["virtual-size"]
        );
        let mut c = cmd::command("qemu-img", ["compare", "-q", "-f", "raw", "-F", "vhdx"]);
        c.arg(&built.image).arg(&out);
        cmd::run(c).context("the VHDX does not hold the same data as the raw image")?;
    }
    let m = machine(
        ctx,
        name,
        generation,
        secure_boot,
        out,
        if vhdx { "vhdx" } else { "raw" },
    );
    let mut g = Guest::spawn(&m, &ctx.work.join(format!("{name}.serial.log")))?;
    wait_ready(&mut g, ctx, name)?;
    let fw = g.line_value("VIREO-GUEST-FIRMWARE=").unwrap_or_default();
    let sb = g.line_value("VIREO-GUEST-SECUREBOOT=").unwrap_or_default();
    let (want_fw, want_sb) = match (generation, secure_boot) {
        (Generation::One, _) => ("bios", "unsupported"),
        (_, true) => ("uefi", "enabled"),
        (_, false) => ("uefi", "disabled"),
    };
    ensure!(
        fw == want_fw && sb == want_sb,
        "{name}: firmware {fw:?} secure boot {sb:?}, want {want_fw} {want_sb}"
    );
    if want_sb == "enabled" {
        ensure!(
            g.serial().contains("secureboot: Secure boot enabled"),
            "{name}: the kernel did not log 'secureboot: Secure boot enabled'"
        );
    }
    println!("  {name}: firmware {fw}, secure boot {sb}");
    common_checks(&mut g, name)
}

fn agent_scenario(ctx: &Ctx, generation: Generation, agent: AgentKind) -> Result<()> {
    let name = agent.name();
    let built = image::build(&repo_root(), &ctx.cache, &spec(generation, agent))?;
    let out = ctx.work.join(format!("{name}.raw"));
    image::export(&ctx.cache, &built, &out)?;
    let mut m = machine(ctx, name, generation, true, out, "raw");
    m.nic = false;
    let qga = ctx.work.join(format!("{name}.qga"));
    m.qga_socket = Some(qga.clone());
    let mut g = Guest::spawn(&m, &ctx.work.join(format!("{name}.serial.log")))?;
    wait_ready(&mut g, ctx, name)?;
    ensure!(
        g.line_value("VIREO-GUEST-AGENT=").as_deref() == Some(name),
        "agent marker missing"
    );
    // The agent may take a moment after READY; guest-sync with a fresh id resynchronises.
    let t0 = Instant::now();
    let s =
        UnixStream::connect(&qga).with_context(|| format!("connecting to {}", qga.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let id = u64::from(std::process::id()) * 1000 + 7;
    let mut synced = false;
    while t0.elapsed() < Duration::from_secs(40) {
        if let Ok(v) = crate::boot::json_call(
            &mut r,
            &mut w,
            "guest-sync",
            Some(serde_json::json!({ "id": id })),
        ) {
            if v == id {
                synced = true;
                break;
            }
        }
    }
    ensure!(synced, "{name} did not answer guest-sync within 40s");
    println!(
        "  {name}: guest-sync answered {:.2}s after READY",
        t0.elapsed().as_secs_f64()
    );
    let host = crate::boot::json_call(&mut r, &mut w, "guest-get-host-name", None)?;
    ensure!(
        host["host-name"] == "vireo-guest",
        "guest-get-host-name returned {host}"
    );
    let info = crate::boot::json_call(&mut r, &mut w, "guest-info", None)?;
    println!("  {name}: version {}", info["version"]);
    // guest-shutdown sends no reply; qemu-ga runs the guest's /sbin/shutdown.
    let t0 = Instant::now();
    let req =
        serde_json::json!({ "execute": "guest-shutdown", "arguments": { "mode": "powerdown" } });
    std::io::Write::write_all(&mut w, format!("{req}\n").as_bytes())?;
    if agent == AgentKind::QemuGa {
        g.wait_for("VIREO-GUEST-SHUTDOWN poweroff", Duration::from_secs(30))?;
    }
    let st = g.wait_exit(Duration::from_secs(30))?;
    ensure!(st.success(), "QEMU exited with {st}");
    println!(
        "  {name}: guest-shutdown to QEMU exit {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `command` on the serial shell; succeeds when it exits 0 and its output contains
/// `want` (a fixed string). The output is printed to the console before the verdict.
fn shell_check(g: &mut Guest, tag: &str, command: &str, want: &str) -> Result<()> {
    g.type_line(&format!(
        "{{ {command} ; }} >/tmp/t.out 2>&1; r=$?; cat /tmp/t.out; grep -qF -- '{want}' /tmp/t.out && m=ok || m=no; echo VIREO-T-''{tag}-$r-$m"
    ))?;
    g.wait_for(&format!("VIREO-T-{tag}-"), Duration::from_secs(60))
        .with_context(|| format!("`{command}` did not finish"))?;
    let verdict = g.line_value(&format!("VIREO-T-{tag}-")).unwrap_or_default();
    ensure!(
        verdict.trim() == "0-ok",
        "`{command}`: exit status and match {verdict:?} (want 0-ok, output containing {want:?}); serial:\n{}",
        g.serial()
    );
    println!("  net-tools: {command} -> ok");
    Ok(())
}

fn net_tools_scenario(ctx: &Ctx) -> Result<()> {
    let name = "net-tools";
    let built = image::build(
        &repo_root(),
        &ctx.cache,
        &spec(Generation::One, AgentKind::None),
    )?;
    let out = ctx.work.join(format!("{name}.raw"));
    image::export(&ctx.cache, &built, &out)?;
    let m = machine(ctx, name, Generation::One, false, out, "raw");
    let mut g = Guest::spawn(&m, &ctx.work.join(format!("{name}.serial.log")))?;
    wait_ready(&mut g, ctx, name)?;
    g.wait_for("VIREO-GUEST-NET eth0 10.0.2.15", Duration::from_secs(60))?;
    shell_check(&mut g, "IPERF", "iperf3 --version", "iperf 3.")?;
    shell_check(&mut g, "DNSMASQ", "dnsmasq --version", "Dnsmasq version 2.")?;
    shell_check(&mut g, "TCPDUMP", "tcpdump --version", "libpcap version")?;
    shell_check(&mut g, "IPVER", "ip -V", "iproute2-")?;
    shell_check(
        &mut g,
        "VLAN",
        "ip link add link eth0 name eth0.10 type vlan id 10 && ip addr add 192.168.10.1/24 dev eth0.10 && ip link set eth0.10 up && ip -d link show eth0.10",
        "vlan protocol 802.1Q id 10",
    )?;
    // DHCP server on the VLAN interface: running, its DHCP socket (port 67) open.
    shell_check(
        &mut g,
        "DHCPD",
        "dnsmasq --port=0 --interface=eth0.10 --bind-interfaces --dhcp-range=192.168.10.50,192.168.10.60,1h --pid-file=/run/dnsmasq.pid && sleep 1 && kill -0 $(cat /run/dnsmasq.pid) && netstat -lnu",
        "0.0.0.0:67 ",
    )?;
    // iperf3 over loopback moves real data (a receiver summary with a byte count).
    shell_check(
        &mut g,
        "IPERFRUN",
        "iperf3 -s -1 -D -p 5201 && sleep 1 && iperf3 -c 127.0.0.1 -p 5201 -t 1 -f m",
        "receiver",
    )?;
    shell_check(
        &mut g,
        "PING",
        "ping -c 1 -W 10 10.0.2.2",
        "1 packets received",
    )?;
    shell_check(
        &mut g,
        "ARPING",
        "arping -c 1 -w 10 -I eth0 10.0.2.2",
        "Received 1 response",
    )?;
    let t0 = Instant::now();
    g.qmp("system_powerdown", None)?;
    g.wait_for("VIREO-GUEST-POWEROFF", Duration::from_secs(30))?;
    let st = g.wait_exit(Duration::from_secs(30))?;
    ensure!(st.success(), "QEMU exited with {st} after poweroff");
    println!(
        "  {name}: ACPI power button to QEMU exit {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn stamp(p: &Path) -> Result<(i64, i64, u64)> {
    let m = fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
    Ok((m.mtime(), m.mtime_nsec(), m.ino()))
}

/// Lists the files of the initramfs inside a generation 1 image and reads one of them.
fn initramfs_file(ctx: &Ctx, image: &Path, guest_path: &str) -> Result<Vec<u8>> {
    let dir = ctx.work.join("unpack");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let gz = dir.join("initrd.img.gz");
    let mut c = cmd::command("mcopy", ["-n", "-i"]);
    c.arg(format!("{}@@{}", image.display(), crate::disk::PART_OFFSET))
        .arg("::/initrd.img")
        .arg(&gz)
        .env("MTOOLS_SKIP_CHECK", "1");
    cmd::run(c)?;
    cmd::run({
        let mut c = cmd::command("gzip", ["-d"]);
        c.arg(&gz);
        c
    })?;
    let cpio = fs::read(dir.join("initrd.img"))?;
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    let mut child = std::process::Command::new("cpio")
        .args([
            "-i",
            "-d",
            "--quiet",
            "--no-absolute-filenames",
            guest_path.trim_start_matches('/'),
        ])
        .current_dir(&root)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cpio not found: run scripts/setup.sh")?;
    if let Some(mut i) = child.stdin.take() {
        std::io::Write::write_all(&mut i, &cpio)?;
    }
    ensure!(child.wait()?.success(), "cpio failed");
    fs::read(root.join(guest_path.trim_start_matches('/')))
        .with_context(|| format!("{guest_path} not in the initramfs"))
}

fn cache_scenario(ctx: &Ctx) -> Result<()> {
    let repo = repo_root();
    let marker = ctx.work.join("marker");
    let nonce = format!("{}-{:?}", std::process::id(), Instant::now());
    fs::write(&marker, format!("first {nonce}\n"))?;
    let mut s = spec(Generation::One, AgentKind::None);
    s.extra_files
        .push(("/etc/vireo-test-marker".into(), marker.clone()));

    let mut created = Vec::new();
    let result = (|| -> Result<()> {
        let t = Instant::now();
        let a = image::build(&repo, &ctx.cache, &s)?;
        created.push(a.key.clone());
        ensure!(!a.hit, "a fresh input gave a cache hit");
        println!("  cache: first build {:.2}s", t.elapsed().as_secs_f64());
        let before = stamp(&a.image)?;
        let sum = sha256_file(&a.image)?;
        let out1 = ctx.work.join("cache-1.raw");
        image::export(&ctx.cache, &a, &out1)?;

        let t = Instant::now();
        let b = image::build(&repo, &ctx.cache, &s)?;
        ensure!(
            b.hit && b.key == a.key,
            "the same inputs did not hit the cache"
        );
        ensure!(
            stamp(&b.image)? == before,
            "the cached image was rewritten on a hit"
        );
        println!(
            "  cache: second build (hit) {:.2}s",
            t.elapsed().as_secs_f64()
        );
        let out2 = ctx.work.join("cache-2.raw");
        image::export(&ctx.cache, &b, &out2)?;
        ensure!(
            sha256_file(&out1)? == sum && sha256_file(&out2)? == sum,
            "exported copies differ from the cache"
        );
        ensure!(
            initramfs_file(ctx, &out2, "/etc/vireo-test-marker")?
                == format!("first {nonce}\n").as_bytes()
        );

        fs::write(&marker, format!("second {nonce}\n"))?;
        let c = image::build(&repo, &ctx.cache, &s)?;
        created.push(c.key.clone());
        ensure!(!c.hit && c.key != a.key, "a changed input did not rebuild");
        ensure!(
            stamp(&a.image)? == before,
            "rebuilding touched the other cache entry"
        );
        ensure!(
            initramfs_file(ctx, &c.image, "/etc/vireo-test-marker")?
                == format!("second {nonce}\n").as_bytes()
        );
        println!(
            "  cache: changed input -> new key {} (was {})",
            c.key, a.key
        );

        // Bad input: refused, and no cache entry for it appears (others may share the cache,
        // so look at what new entries contain rather than at their number).
        let entries = || -> Vec<PathBuf> {
            fs::read_dir(ctx.cache.images())
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let before_bad = entries();
        let mut bad = spec(Generation::One, AgentKind::None);
        bad.size = 10 << 20;
        ensure!(
            image::build(&repo, &ctx.cache, &bad).is_err(),
            "a 10 MiB image was accepted"
        );
        let mut bad = spec(Generation::One, AgentKind::None);
        bad.extra_files
            .push(("relative/path".into(), marker.clone()));
        ensure!(
            image::build(&repo, &ctx.cache, &bad).is_err(),
            "a relative extra-file path was accepted"
        );
        let mut bad = spec(Generation::One, AgentKind::Vireo);
        bad.agent_bin = Some(PathBuf::from("/bin/dash"));
        let err = match image::build(&repo, &ctx.cache, &bad) {
            Ok(_) => bail!("a dynamically linked agent was accepted"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains("dynamically linked"),
            "unexpected error: {err}"
        );
        let dash = sha256_file(Path::new("/bin/dash"))?;
        for p in entries().into_iter().filter(|p| !before_bad.contains(p)) {
            let text = fs::read_to_string(&p).unwrap_or_default();
            ensure!(
                !text.contains("size 10485760")
                    && !text.contains("relative/path")
                    && !text.contains(&dash),
                "a refused build left {} in the cache",
                p.display()
            );
        }
        Ok(())
    })();
    for key in created {
        for ext in ["raw", "inputs", "vhdx"] {
            let _ = fs::remove_file(ctx.cache.images().join(format!("{key}.{ext}")));
        }
    }
    result
}
