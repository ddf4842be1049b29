//! The operator docs show commands that really work: the "A first VM" block of
//! docs/getting-started.md is run line by line against a real host.

use vireo_e2e::*;

/// Every `vireo ...` line of the getting-started walk-through succeeds, in order, on a real
/// guest; `vm console` (interactive in the docs) is driven through a pipe here.
#[test]
fn getting_started_walkthrough() {
    let doc = std::fs::read_to_string(repo_root().join("docs/getting-started.md"))
        .expect("docs/getting-started.md");
    let section = doc
        .split("## A first VM")
        .nth(1)
        .expect("section 'A first VM'");
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("code block");
    let h = Host::start();
    let disk = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    let mut ran = 0;
    for line in block.lines() {
        let cmd = line.split('#').next().unwrap_or("").trim();
        if cmd.is_empty() || cmd.starts_with("cargo xtask") {
            continue;
        }
        let cmd = cmd.replace("/var/lib/vireo/g1.img", disk.to_str().unwrap());
        let words: Vec<&str> = cmd.split_whitespace().collect();
        assert_eq!(words[0], "vireo", "unexpected doc line {line:?}");
        let args = &words[1..];
        if args.starts_with(&["vm", "console"]) {
            console_roundtrip(&h, args[2]);
        } else {
            if args.starts_with(&["vm", "exec"]) {
                h.wait_heartbeat(args[2]);
            }
            let out = h.ok(args);
            if args.starts_with(&["vm", "exec"]) {
                assert!(out.starts_with("Linux vireo-guest"), "uname output: {out}");
            }
        }
        ran += 1;
    }
    assert!(ran >= 7, "the walk-through ran only {ran} commands");
    assert_eq!(h.show("web1")["state"], "off");
}

/// Types a command into the serial console through a pipe and sees its output.
fn console_roundtrip(h: &Host, vm: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(bin("vireo"))
        .arg("--socket")
        .arg(h.socket())
        .args(["vm", "console", vm])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("vireo vm console");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"\necho console-$((40+2))\n")
            .expect("typing");
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    let out = child.wait_with_output().expect("console output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("console-42"),
        "console did not echo the command's output: {text:?}"
    );
}
