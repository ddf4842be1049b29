//! Protocol compatibility: the same standard-service checks against Debian's real qemu-ga
//! 7.2 and against the vireo-guest binary, both serving a unix socket on this host (the
//! guest is the host here; commands that would change the host are disabled/simulated).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent::protocol::{FsfreezeStatus, GuestIpAddressType};
use agent::{AgentClient, ErrorKind, RunEvent, RunRequest, ShutdownMode};
use common::*;
use futures::StreamExt;

fn req(argv: &[&str]) -> RunRequest {
    RunRequest::from_argv(argv).unwrap()
}

/// Every standard service the worker uses, checked against facts of this host.
async fn standard_services(c: &AgentClient) {
    c.sync().await.unwrap();
    c.ping().await.unwrap();

    let info = c.info().await.unwrap();
    assert!(!info.version.is_empty());
    for cmd in [
        "guest-ping",
        "guest-exec",
        "guest-exec-status",
        "guest-get-osinfo",
    ] {
        assert!(info.supports(cmd), "{cmd} missing from {info:?}");
    }
    assert!(!info.supports("guest-shutdown") || info.version.ends_with("-vireo"));

    let os = c.osinfo().await.unwrap();
    assert_eq!(
        os.kernel_release.as_deref(),
        Some(proc_text("/proc/sys/kernel/osrelease").as_str())
    );
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let id = os_release
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .unwrap()
        .trim_matches('"');
    assert_eq!(os.id.as_deref(), Some(id));
    assert!(os.pretty_name.is_some());

    assert_eq!(
        c.hostname().await.unwrap(),
        proc_text("/proc/sys/kernel/hostname")
    );

    let ifs = c.interfaces().await.unwrap();
    let lo = ifs.iter().find(|i| i.name == "lo").expect("lo listed");
    let addrs = lo.ip_addresses.as_ref().expect("lo has addresses");
    assert!(addrs.iter().any(|a| a.ip_address == "127.0.0.1"
        && a.prefix == 8
        && a.ip_address_type == GuestIpAddressType::Ipv4));
    assert!(lo.statistics.is_some());

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let t = c.get_time().await.unwrap();
    assert!((t - now).abs() < 5_000_000_000, "guest time {t} vs {now}");

    // exec: output and exit code, the brief's example.
    let (out, err, exit) = c.run_collect(req(&["/bin/echo", "hi"])).await.unwrap();
    assert_eq!((out.as_slice(), err.as_slice()), (&b"hi\n"[..], &b""[..]));
    assert!(exit.success());

    let (out, err, exit) = c
        .run_collect(req(&[
            "/bin/sh",
            "-c",
            "printf out; printf err >&2; exit 7",
        ]))
        .await
        .unwrap();
    assert_eq!((out.as_slice(), err.as_slice()), (&b"out"[..], &b"err"[..]));
    assert_eq!((exit.code, exit.signal), (Some(7), None));

    // stdin goes through base64 both ways unchanged (checksummed).
    let data = pattern(300 * 1024, 42);
    let mut r = req(&["cat"]);
    r.stdin = Some(data.clone());
    let (out, _, exit) = c.run_collect(r).await.unwrap();
    assert!(exit.success());
    assert_eq!((out.len(), fnv(&out)), (data.len(), fnv(&data)));

    // environment replaces the agent's.
    let mut r = req(&["/bin/sh", "-c", "echo $FOO-$HOME"]);
    r.env = Some(vec!["FOO=bar".into()]);
    let (out, _, _) = c.run_collect(r).await.unwrap();
    assert_eq!(out, b"bar-\n");

    let (_, _, exit) = c
        .run_collect(req(&["/bin/sh", "-c", "kill -9 $$"]))
        .await
        .unwrap();
    assert_eq!((exit.code, exit.signal), (None, Some(9)));

    let e = c.exec(&req(&["/nonexistent/program"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    let e = c.exec_status(999_999_999).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");

    assert_eq!(c.fsfreeze_status().await.unwrap(), FsfreezeStatus::Thawed);
    // The session survives errors.
    c.ping().await.unwrap();
}

/// Real qemu-ga 7.2: every standard service decodes and matches the host; the Vireo
/// extensions are reported missing; a disabled command fails cleanly.
#[tokio::test]
async fn qemu_ga_standard_services() {
    let peer = start_qemu_ga();
    let c = client(&peer.socket);
    standard_services(&c).await;
    assert!(!c.supports_vireo_extensions().await.unwrap());
    let e = c.memory_status().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e = c.shutdown(ShutdownMode::Powerdown).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // qemu-ga only has the output at exit: one chunk, then the exit.
    let ev: Vec<_> = c
        .run(req(&["/bin/sh", "-c", "echo a; sleep 0.3; echo b"]))
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(
        ev[..2],
        [
            RunEvent::Stdout(b"a\nb\n".to_vec()),
            RunEvent::Exited(agent::ExecExit {
                code: Some(0),
                signal: None,
                truncated: false
            })
        ]
    );
    c.ping().await.unwrap();
}

/// The vireo-guest binary passes the same checks as qemu-ga, and adds its extensions.
#[tokio::test]
async fn vireo_guest_binary_standard_services_and_extensions() {
    let peer = start_vireo_guest();
    let c = client(&peer.socket);
    standard_services(&c).await;
    assert!(c.supports_vireo_extensions().await.unwrap());

    // Memory status is /proc/meminfo in bytes.
    let m = c.memory_status().await.unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    assert_eq!(m.total, total_kb * 1024);
    assert!(m.available > 0 && m.available <= m.total && m.committed > 0);

    // KVP host -> guest lands in a file guest scripts can cat.
    let kvp = peer.dir.path().join("kvp");
    c.kvp_set("vm.role", "database").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(kvp.join("host/vm.role")).unwrap(),
        "database"
    );
    // ... and `vireo-guest kvp get` prints it.
    let out = std::process::Command::new(vireo_guest_bin())
        .args(["kvp", "get", "vm.role", "--kvp-dir"])
        .arg(&kvp)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"database\n");

    // KVP guest -> host: published with the subcommand, read and listed by the host.
    let st = std::process::Command::new(vireo_guest_bin())
        .args(["kvp", "set", "app.state", "ready", "--kvp-dir"])
        .arg(&kvp)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        c.kvp_get(agent::KvpPool::Guest, "app.state").await.unwrap(),
        Some("ready".into())
    );
    assert_eq!(
        c.kvp_get(agent::KvpPool::Guest, "nope").await.unwrap(),
        None
    );
    let l = c.kvp_list(agent::KvpPool::Guest).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(
        (l[0].key.as_str(), l[0].value.as_str()),
        ("app.state", "ready")
    );
    c.kvp_delete("vm.role").await.unwrap();
    assert!(!kvp.join("host/vm.role").exists());

    // A bad key is refused by the client before sending and by the agent if sent anyway;
    // neither creates a file.
    let e = c.kvp_set("../evil", "x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = c
        .call(&agent::protocol::VireoKvpSet {
            key: "../evil".into(),
            value: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(!kvp.join("evil").exists() && !peer.dir.path().join("evil").exists());

    // Streaming: the first line arrives as its own chunk, before the process ends.
    let ev: Vec<_> = c
        .run(req(&["/bin/sh", "-c", "echo a; sleep 1; echo b; exit 3"]))
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(
        ev,
        [
            RunEvent::Stdout(b"a\n".to_vec()),
            RunEvent::Stdout(b"b\n".to_vec()),
            RunEvent::Exited(agent::ExecExit {
                code: Some(3),
                signal: None,
                truncated: false
            })
        ]
    );

    // A running process can be signalled; its end is reported with the signal.
    let pid = c.exec(&req(&["sleep", "30"])).await.unwrap();
    let e = c.exec_signal(pid, 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    c.exec_signal(pid, 9).await.unwrap();
    let exit = loop {
        if let Some(x) = c.exec_status(pid).await.unwrap().exit {
            break x;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((exit.code, exit.signal), (None, Some(9)));
    let e = c.exec_signal(pid, 9).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");

    // Simulated shutdown: no reply, reported as success.
    c.shutdown(ShutdownMode::Reboot).await.unwrap();
    c.ping().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The `vireo-guest kvp` subcommands refuse bad input with a message and change nothing;
/// a missing key exits 1 and a bad command line exits 2.
#[test]
fn vireo_guest_cli_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(vireo_guest_bin())
            .args(args)
            .arg("--kvp-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["kvp", "set", "../escape", "v"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must not start with"));
    let big = "v".repeat(5000);
    let out = run(&["kvp", "set", "k", &big]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(run(&["kvp", "get", "missing"]).status.code(), Some(1));
    assert_eq!(run(&["kvp", "frobnicate"]).status.code(), Some(2));
    assert_eq!(run(&["--bogus"]).status.code(), Some(2));
    let out = run(&["kvp", "set", "ok.key", "line1\nline2"]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("guest/ok.key")).unwrap(),
        "line1\nline2"
    );
    let out = run(&["kvp", "list", "--pool", "guest"]);
    assert_eq!(out.stdout, b"ok.key=line1\nline2\n");
}
