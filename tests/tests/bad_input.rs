//! Bad input gets a clear one-line error, a non-zero exit, and changes nothing.

use vireo_e2e::*;

fn names(h: &Host) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&h.ok(&["vm", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// Invalid VM definitions are refused with a cause and leave the inventory unchanged.
#[test]
fn refused_definitions() {
    let h = Host::start();
    let disk = h.dir.path().join("d.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let d = disk.to_str().unwrap();
    h.ok(&["vm", "new", "ok1", "--generation", "1", "--disk", d]);
    let before = names(&h);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "vm",
                "new",
                "x",
                "--generation",
                "2",
                "--disk",
                d,
                "--bus",
                "ide",
            ],
            "IDE",
        ),
        (
            &["vm", "new", "x", "--generation", "1", "--secure-boot", "on"],
            "Secure Boot",
        ),
        (
            &["vm", "new", "x", "--generation", "1", "--memory", "16M"],
            "32 MiB",
        ),
        (&["vm", "new", "ok1", "--generation", "1"], "already exists"),
        (
            &[
                "vm",
                "new",
                "x",
                "--generation",
                "1",
                "--disk",
                "/nonexistent/disk.vhdx",
            ],
            "does not exist",
        ),
        (
            &["vm", "new", "bad name", "--generation", "1"],
            "invalid VM name",
        ),
        (
            &["vm", "new", "x", "--generation", "1", "--cpus", "0"],
            "cpus",
        ),
        (
            &[
                "vm",
                "new",
                "x",
                "--generation",
                "1",
                "--disk",
                d,
                "--disk",
                d,
            ],
            "twice",
        ),
        (
            &["vm", "new", "x", "--generation", "1", "--memory", "lots"],
            "invalid size",
        ),
        (
            &["vm", "new", "x", "--generation", "1", "--stop-timeout", "0"],
            "timeout",
        ),
    ];
    for (args, needle) in cases {
        let e = h.fails(args);
        assert!(e.contains(needle), "{args:?}: expected {needle:?} in {e:?}");
    }
    // clap-level errors (generation 3, missing generation) exit non-zero too.
    assert!(!h
        .vireo(&["vm", "new", "x", "--generation", "3"])
        .status
        .success());
    assert!(!h.vireo(&["vm", "new", "x"]).status.success());
    assert_eq!(names(&h), before, "a refused command changed the inventory");
    let cfg = h.show("ok1");
    assert_eq!(cfg["memory"]["startup"], 512u64 << 20);
}

/// Commands on missing VMs, on VMs in the wrong state, and without a daemon.
#[test]
fn wrong_state_and_missing() {
    let h = Host::start();
    for args in [
        &["vm", "show", "ghost"][..],
        &["vm", "start", "ghost"],
        &["vm", "stop", "ghost"],
        &["vm", "delete", "ghost"],
        &["vm", "exec", "ghost", "--", "true"],
        &["vm", "set", "ghost", "--cpus", "2"],
    ] {
        let e = h.fails(args);
        assert!(e.contains("no VM named"), "{args:?}: {e}");
    }
    let disk = guest_disk_lite(h.dir.path(), 1, GuestAgent::None);
    h.ok(&[
        "vm",
        "new",
        "w",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    for (args, needle) in [
        (&["vm", "stop", "w"][..], "not running"),
        (&["vm", "pause", "w"], "not running"),
        (&["vm", "exec", "w", "--", "true"], "not running"),
        (&["vm", "kvp", "w", "set", "k", "v"], "not running"),
        (&["vm", "console", "w"], "not running"),
        (&["vm", "set", "w"], "nothing to change"),
        (&["vm", "set", "w", "--memory", "8M"], "32 MiB"),
    ] {
        let e = h.fails(args);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    h.ok(&["vm", "start", "w"]);
    for (args, needle) in [
        (&["vm", "start", "w"][..], "already running"),
        (&["vm", "set", "w", "--cpus", "2"], "running"),
        (&["vm", "delete", "w"], "running"),
        (&["vm", "kvp", "w", "set", "a/b", "v"], "KVP keys"),
    ] {
        let e = h.fails(args);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    assert_eq!(h.show("w")["cpus"], 1);
    // The stop timeout may change while running.
    h.ok(&["vm", "set", "w", "--stop-timeout", "30"]);
    assert_eq!(h.show("w")["stop_timeout_secs"], 30);
    h.ok(&["vm", "turn-off", "w"]);
    h.ok(&["vm", "set", "w", "--cpus", "2", "--memory", "1G"]);
    let v = h.show("w");
    assert_eq!(
        (v["cpus"].as_u64(), v["memory"]["startup"].as_u64()),
        (Some(2), Some(1 << 30))
    );
    // delete --keep-disks keeps the image; plain delete removes it.
    h.ok(&["vm", "delete", "w", "--keep-disks"]);
    assert!(disk.exists());
    h.ok(&[
        "vm",
        "new",
        "w2",
        "--generation",
        "1",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    h.ok(&["vm", "delete", "w2"]);
    assert!(!disk.exists());

    // No daemon at that socket: a clear cause.
    let o = std::process::Command::new(bin("vireo"))
        .args(["--socket", "/nonexistent/vireod.sock", "vm", "list"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is vireod running"));
}

/// The store survives kill -9 at any moment: configs committed before the kill are all
/// there after restart, none half-written.
#[test]
fn store_survives_kill9_during_writes() {
    let mut h = Host::start();
    for round in 0..5 {
        // Fire changes and kill the daemon while they are in flight.
        let sock = h.socket();
        let vireo = bin("vireo");
        let writers: Vec<_> = (0..8)
            .map(|i| {
                std::process::Command::new(&vireo)
                    .arg("--socket")
                    .arg(&sock)
                    .args(["vm", "new", &format!("r{round}-{i}"), "--generation", "1"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(5 * round as u64));
        h.kill_daemon();
        let acked: Vec<String> = writers
            .into_iter()
            .enumerate()
            .filter_map(|(i, mut c)| c.wait().unwrap().success().then(|| format!("r{round}-{i}")))
            .collect();
        h.restart_daemon();
        let now = names(&h);
        for a in &acked {
            assert!(now.contains(a), "acknowledged VM {a} lost after kill -9");
        }
        for n in &now {
            h.show(n);
        }
    }
}

/// A generation 2 VM whose disk has no boot loader runs, and `vm show` says why nothing
/// booted (OVMF's verdict from the serial console).
#[test]
fn blank_disk_reports_no_boot() {
    let h = Host::start();
    let disk = h.dir.path().join("blank.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    h.ok(&[
        "vm",
        "new",
        "blank",
        "--generation",
        "2",
        "--secure-boot-template",
        "microsoft-uefi-ca",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    h.ok(&["vm", "start", "blank"]);
    let v = h.wait_for(
        "blank",
        std::time::Duration::from_secs(120),
        "boot failure message",
        |v| {
            v["status_message"]
                .as_str()
                .unwrap_or("")
                .contains("did not boot")
        },
    );
    assert_eq!(v["state"], "running");
    h.ok(&["vm", "turn-off", "blank"]);
}
