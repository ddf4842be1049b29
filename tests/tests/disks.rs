//! VM disks created by vireod: `vm new --disk-size` makes a dynamic VHDX in the VM's
//! directory (raw only with `--disk-format raw`), `vm disk add --size | --path` adds more while
//! the VM is off, the guest sees the new disk's size and keeps what it writes across a
//! restart, and a checkpoint of a VM with a raw disk is refused naming `vireo disk convert`.

use vireo_e2e::guest_io::find_disk;
use vireo_e2e::*;

fn is_vhdx(p: &std::path::Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(b"vhdxfile"))
}

#[test]
fn new_disks_are_vhdx_and_raw_refuses_checkpoints() {
    let h = Host::start();
    let boot = guest_disk_lite(h.dir.path(), 1, GuestAgent::Vireo);
    let out = h.ok(&[
        "vm",
        "new",
        "d1",
        "--generation",
        "1",
        "--memory",
        "256M",
        "--disk",
        boot.to_str().unwrap(),
        "--disk-size",
        "48M",
        "--json",
    ]);
    let vm: serde_json::Value = serde_json::from_str(&out).unwrap();
    let disks = vm["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{out}");
    let new = std::path::PathBuf::from(disks[1]["path"].as_str().unwrap());
    assert!(
        new.starts_with(h.state_dir()),
        "new disk is in the VM directory: {new:?}"
    );
    assert!(is_vhdx(&new), "the new disk is a VHDX: {new:?}");
    let meta = std::fs::metadata(&new).unwrap();
    assert!(meta.len() < 16 << 20, "the new VHDX is dynamic (sparse)");

    // Bad input changes nothing.
    let e = h.fails(&["vm", "disk", "add", "d1", "--size", "0"]);
    assert!(
        e.contains("greater than zero") || e.contains("1 MiB"),
        "{e}"
    );
    let e = h.fails(&["vm", "disk", "add", "d1", "--size", "1000K"]);
    assert!(e.contains("MiB"), "{e}");
    let e = h.fails(&["vm", "disk", "add", "d1", "--path", "/nonexistent/x.vhdx"]);
    assert!(e.contains("x.vhdx"), "{e}");
    let e = h.fails(&["vm", "disk", "add", "nosuchvm", "--size", "8M"]);
    assert!(e.contains("nosuchvm"), "{e}");
    let e = h.fails(&[
        "vm",
        "new",
        "d2",
        "--generation",
        "1",
        "--disk-size",
        "12345",
    ]);
    assert!(e.contains("MiB"), "{e}");
    assert!(
        h.fails(&["vm", "show", "d2"]).contains("d2"),
        "a failed vm new leaves no VM"
    );
    assert_eq!(h.show("d1")["disks"].as_array().unwrap().len(), 2);

    // An explicitly raw disk, and an existing image by path.
    let out = h.ok(&[
        "vm", "disk", "add", "d1", "--size", "16M", "--format", "raw",
    ]);
    let raw = h.show("d1")["disks"][2]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.contains(&raw), "{out}");
    assert!(!is_vhdx(std::path::Path::new(&raw)));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 << 20);
    let extra = h.dir.path().join("extra.vhdx");
    h.ok(&["disk", "new", extra.to_str().unwrap(), "--size", "24M"]);
    h.ok(&["vm", "disk", "add", "d1", "--path", extra.to_str().unwrap()]);
    assert_eq!(h.show("d1")["disks"].as_array().unwrap().len(), 4);

    // The guest sees every disk; data written to the new VHDX survives a restart.
    h.ok(&["vm", "start", "d1"]);
    h.wait_heartbeat("d1");
    let e = h.fails(&["vm", "disk", "add", "d1", "--size", "8M"]);
    assert!(e.contains("running"), "{e}");
    let w = format!(
        "set -e; {} head -c 1048576 /dev/urandom > /tmp/b; dd if=/tmp/b of=$D bs=1048576 seek=5 conv=fsync 2>/dev/null; sha256sum /tmp/b | cut -d' ' -f1",
        find_disk(48 * 2048)
    );
    let (code, sum) = h.exec("d1", &w);
    assert_eq!(code, 0, "{sum}");
    for sectors in [16 * 2048, 24 * 2048] {
        let (code, o) = h.exec("d1", &format!("set -e; {} echo $D", find_disk(sectors)));
        assert_eq!(code, 0, "guest does not see the {sectors}-sector disk: {o}");
    }
    // The raw disk makes the VM unable to take checkpoints, with the way out named.
    let e = h.fails(&["checkpoint", "new", "d1", "--type", "production"]);
    assert!(
        e.contains("raw") && e.contains("vireo disk convert"),
        "refusal names the convert command: {e}"
    );
    h.ok(&["vm", "turn-off", "d1"]);
    h.ok(&["vm", "start", "d1"]);
    h.wait_heartbeat("d1");
    let r = format!(
        "set -e; {} dd if=$D bs=1048576 skip=5 count=1 2>/dev/null | sha256sum | cut -d' ' -f1",
        find_disk(48 * 2048)
    );
    let (code, back) = h.exec("d1", &r);
    assert_eq!(code, 0, "{back}");
    assert_eq!(back.trim(), sum.trim(), "data on the new VHDX disk");
    h.ok(&["vm", "turn-off", "d1"]);
}
