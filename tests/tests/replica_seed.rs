//! Replica seeding and resync between two vireod hosts in network namespaces, with a real
//! generation 1 guest (256 MiB boot disk + 16 MiB data disk filled with random data):
//! - `export_import_initial_and_resync`: `vireo replica export` on the primary while the
//!   guest writes records, `vireo replica import --from` on the replica host; the guest
//!   rewrites MiBs after the export and goes quiet; `enable --initial export --start`: the
//!   compare finds exactly the 3 MiBs written since, only those are shipped (~2 MiB of
//!   272), and the first recovery point's data disk (read host-side from its VHDX chain over
//!   the seed) equals the guest's byte for byte; the seed's files are never written. Then
//!   `vireo replica resync` (while paused, after one tracked MiB): exactly that MiB is found
//!   different, about 1 MiB is shipped, the next point equals the disk again; with the VM
//!   off, both of its disks read host-side equal both points' (sha256 of each whole disk).
//!   Refusals that say what to do and change nothing: resync of a VM that is not replicated,
//!   export to a path that is a file, import from an empty directory, a missing path or a
//!   file, another VM's export, a second import.
//! - `existing_copy_initial`: a copy of the VM's disk files (taken while it was off) sits on
//!   the replica host; `enable --initial existing` fails its cycles with a message naming
//!   `vireo replica import` until `vireo replica import --disk` records the copy, then
//!   replicates by itself: 3 MiBs differ and are shipped, the point equals both disks
//!   (host-side, VM off), the copy's files are never written. Refusal: import of a disk file
//!   that does not exist.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vireo_e2e::guest_io::{files_in, find_disk, sha256_file, RECORD_WRITER};
use vireo_e2e::multihost::{Cluster, NsHost};
use vireo_e2e::replica_io::*;
use vireo_e2e::vm_setup::{define_gen1_vm, Gen1Disks, DATA_16M};
use vireo_e2e::*;

const MIB: u64 = 1 << 20;
/// The data disk of [`DATA_16M`], in 512-byte sectors.
const DATA_SECTORS: u64 = 32_768;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes fresh random data over MiBs `from..=to` of the 16 MiB data disk (fsync each).
fn fill_random(h: &NsHost, from: u64, to: u64) {
    let script = format!(
        "set -e; {} for i in $(seq {from} {to}); do head -c 1048576 /dev/urandom > /tmp/b; \
         dd if=/tmp/b of=$D bs=1048576 seek=$i conv=fsync 2>/dev/null; done; echo written",
        find_disk(DATA_SECTORS)
    );
    let (code, out) = h.exec("g", &script);
    assert_eq!(code, 0, "guest write failed: {out}");
}

/// Stops the record writer; returns its counter (the last record acknowledged).
fn stop_writer(h: &NsHost) -> u64 {
    let (code, out) = h.exec(
        "g",
        "kill $(cat /tmp/w.pid); sleep 0.3; sync; cat /tmp/counter",
    );
    assert_eq!(code, 0, "{out}");
    out.trim().parse().expect("counter")
}

/// sha256 of the whole data disk as the guest reads it, after `sync` and dropping its page
/// cache (so the bytes come from the disk service).
fn guest_data_sum(h: &NsHost) -> String {
    let (code, out) = h.exec(
        "g",
        &format!(
            "set -e; {} sync; echo 3 > /proc/sys/vm/drop_caches; dd if=$D bs=1048576 2>/dev/null | sha256sum | cut -c1-64",
            find_disk(DATA_SECTORS)
        ),
    );
    assert_eq!(code, 0, "{out}");
    out.trim().to_string()
}

/// A VHDX chain read host-side: (virtual size, sha256 of the whole disk).
fn chain_sum(leaf: &Path, scratch: &Path) -> (u64, String) {
    let b = raw_image(leaf, scratch);
    (b.len() as u64, sha256_hex(&b))
}

/// The newest recovery point of `g` on the replica host.
fn latest_point(row: &serde_json::Value) -> u64 {
    row["points"]
        .as_array()
        .and_then(|p| p.last())
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("no recovery point: {row}"))
}

/// Point `id` of the store: its boot disk (size, sha256) and its whole data disk.
fn point_disks(store: &Path, id: u64, scratch: &Path) -> ((u64, String), Vec<u8>) {
    let boot = chain_sum(&store.join(format!("p-{id}")).join("disk0.avhdx"), scratch);
    let data = point_data(store, id, scratch);
    assert_eq!(data.len() as u64, 16 * MIB, "point {id}: data disk size");
    (boot, data)
}

/// Turns `g` off on `h` and waits until it is off (its disks closed).
fn turn_off(h: &NsHost) {
    h.ok(&["vm", "turn-off", "g"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.show("g")["state"] != "off" {
        assert!(
            Instant::now() < deadline,
            "g does not turn off: {}",
            h.show("g")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two hosts, A trusting B and B trusting A, B accepting replicas from A into
/// `<dir>/replicas`; VM `g` defined on A (off). Returns its disks and their total size.
fn setup() -> (Cluster, PathBuf, Gen1Disks, u64) {
    let (c, rpath) = replica_pair(&[&[], &[]]);
    let boot_raw = guest_disk_lite(c.dir.path(), 1, GuestAgent::Vireo);
    let boot_bytes = std::fs::metadata(&boot_raw).unwrap().len();
    let disks = define_gen1_vm(&c.hosts[0], "g", &boot_raw, c.dir.path(), "256M", DATA_16M);
    (c, rpath, disks, boot_bytes + 16 * MIB)
}

/// The checks after an initial replication over a seed, the guest quiet since before
/// `enable` (its data disk read as `data_sum`, its last record `stopped`): the compare
/// covered every MiB of both disks and found `expect_differing` MiBs; the shipped bytes
/// are those MiBs at most (a tiny share of the disks); the first recovery point's data
/// disk is the guest's byte for byte and holds the last record. Returns (differing MiBs,
/// bytes shipped, point id, point's boot disk).
fn check_initial(
    c: &Cluster,
    store: &Path,
    disks_bytes: u64,
    expect_differing: u64,
    data_sum: &str,
    stopped: u64,
) -> (u64, u64, u64, (u64, String)) {
    let (a, b, scratch) = (&c.hosts[0], &c.hosts[1], c.dir.path());
    let st = wait_status(a, "the initial replication over the seed", 90, |v| {
        v["state"] == "replicating" && v["last_cut_unix_ms"].as_u64().is_some()
    });
    println!("A after the initial replication: {st}");
    assert!(st["last_error"].is_null(), "{st}");
    let shipped = st["bytes_shipped"].as_u64().expect("bytes_shipped");
    let blocks = st["resync_blocks"].as_u64().expect("resync figures");
    let differing = st["resync_differing_blocks"]
        .as_u64()
        .expect("resync figures");
    assert_eq!(blocks, disks_bytes.div_ceil(MIB), "{st}");
    assert_eq!(
        differing, expect_differing,
        "{differing} of {blocks} MiB differed from the seed: {st}"
    );
    assert!(
        shipped <= differing * MIB + 256 * 1024 && shipped * 32 < disks_bytes,
        "{shipped} bytes shipped for {differing} differing MiB (disks: {disks_bytes} bytes)"
    );
    let row = wait_status(b, "the first recovery point", 30, |v| {
        v["points"].as_array().is_some_and(|p| !p.is_empty())
    });
    assert_eq!(row["role"], "replica", "{row}");
    let id = latest_point(&row);
    let (boot, data) = point_disks(store, id, scratch);
    assert_eq!(
        sha256_hex(&data),
        data_sum,
        "point {id}: the data disk differs from the primary's"
    );
    let last = check_records(&data);
    assert!(
        last == stopped || last == stopped + 1,
        "point {id}: last record {last}, the writer's counter {stopped}"
    );
    (differing, shipped, id, boot)
}

#[test]
fn export_import_initial_and_resync() {
    let t0 = Instant::now();
    let (c, rpath, disks, disks_bytes) = setup();
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let scratch = c.dir.path();

    // Refusals before anything exists: they say what to do and change nothing.
    let e = a.fails(&["replica", "resync", "g"]);
    assert!(
        e.contains("not replicated from this host") && e.contains("vireo replica enable g"),
        "{e}"
    );
    assert!(status(a).is_empty(), "{:?}", status(a));
    let file = scratch.join("a-file");
    std::fs::write(&file, b"not a directory\n").unwrap();
    let e = a.fails(&["replica", "export", "g", "--to", s(&file)]);
    println!("export to a file: {e}");
    // The message names the path and says what to give instead.
    assert!(
        e.contains(&format!("--to {}", s(&file))) && e.contains("give a new or empty directory"),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory\n");
    let empty = scratch.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = b.fails(&["replica", "import", "g", "--from", s(&empty)]);
    println!("import from an empty directory: {e}");
    assert!(
        e.contains(s(&empty))
            && e.contains("no complete export")
            && e.contains("vireo replica export g --to DIR"),
        "{e}"
    );
    let missing = scratch.join("no-such-dir");
    let e = b.fails(&["replica", "import", "g", "--from", s(&missing)]);
    println!("import from a missing path: {e}");
    assert!(
        e.contains(s(&missing))
            && e.contains("does not exist")
            && e.contains("vireo replica export g --to DIR"),
        "{e}"
    );
    let e = b.fails(&["replica", "import", "g", "--from", s(&file)]);
    assert!(e.contains("is not a directory"), "{e}");
    assert!(files_in(&empty).is_empty());
    assert!(!missing.exists());
    assert!(
        !rpath.join("g").join("seed").exists(),
        "a refused import left a seed"
    );
    assert!(status(b).is_empty(), "{:?}", status(b));

    // The guest fills its data disk (MiB 0 gets the records), then is exported while the
    // record writer runs: the export need not be consistent.
    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    fill_random(a, 1, 15);
    let (code, out) = a.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let exp = scratch.join("export");
    let out = a.ok(&["replica", "export", "g", "--to", s(&exp)]);
    println!("{out}");
    assert!(out.contains("exported 2 disk(s) of g"), "{out}");
    assert!(out.contains("vireo replica import g --from"), "{out}");
    assert_eq!(files_in(&exp), ["disk0.vhdx", "disk1.vhdx", "export.json"]);
    let e = a.fails(&["replica", "export", "g", "--to", s(&exp)]);
    assert!(e.contains("already holds an export"), "{e}");
    let exported_data = sha256_hex(&raw_image(&exp.join("disk1.vhdx"), scratch));

    // Import on B: another VM's name is refused, then the real import, then a second.
    let e = b.fails(&["replica", "import", "other", "--from", s(&exp)]);
    assert!(e.contains("is an export of VM \"g\", not \"other\""), "{e}");
    assert!(!rpath.join("other").join("seed").exists());
    let out = b.ok(&["replica", "import", "g", "--from", s(&exp)]);
    println!("{out}");
    assert!(
        out.contains("imported the export of g") && out.contains("--initial export"),
        "{out}"
    );
    let seed = rpath.join("g").join("seed");
    assert_eq!(files_in(&seed), ["disk0.vhdx", "disk1.vhdx", "seed.json"]);
    let seed_sums: Vec<String> = ["disk0.vhdx", "disk1.vhdx"]
        .iter()
        .map(|f| sha256_file(&seed.join(f)))
        .collect();
    let e = b.fails(&["replica", "import", "g", "--from", s(&exp)]);
    assert!(e.contains("already holds a seed of g"), "{e}");

    // After the export the guest rewrites MiBs 8 and 9 and records (MiB 0); then it is
    // quiet.
    fill_random(a, 8, 9);
    std::thread::sleep(Duration::from_secs(1));
    let stopped = stop_writer(a);
    let data1 = guest_data_sum(a);
    assert_ne!(
        data1, exported_data,
        "the guest did not change its data disk after the export"
    );

    let out = a.ok(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "30s",
        "--initial",
        "export",
        "--start",
    ]);
    println!("{out}");
    assert!(out.contains("enabled"), "{out}");
    let store = rpath.join("g").join("store");
    let (differing, shipped, id1, boot1) =
        check_initial(&c, &store, disks_bytes, 3, &data1, stopped);
    for (f, sum) in ["disk0.vhdx", "disk1.vhdx"].iter().zip(&seed_sums) {
        assert_eq!(
            &sha256_file(&seed.join(f)),
            sum,
            "the seed's {f} was written"
        );
    }
    println!(
        "initial from export: {differing} of {} MiB differed, {shipped} bytes shipped for {disks_bytes} bytes of disks; point {id1}'s data disk == primary (record {stopped})",
        disks_bytes / MIB
    );

    // Resync while paused, after one tracked MiB: the compare finds exactly that MiB (the
    // guest writes nothing else, its boot disk included), the cycle ships it alone.
    let e = a.fails(&["replica", "resync", "nosuch"]);
    assert!(e.contains("not replicated from this host"), "{e}");
    let out = a.ok(&["replica", "pause", "g"]);
    assert!(out.contains("paused"), "{out}");
    let before = wait_status(a, "paused", 30, |v| v["state"] == "paused");
    let shipped0 = before["bytes_shipped"].as_u64().unwrap();
    let seq0 = before["last_seq"].as_u64().unwrap();
    fill_random(a, 12, 12);
    let data2 = guest_data_sum(a);
    let out = a.ok(&["replica", "resync", "g"]);
    println!("{out}");
    assert!(
        out.contains("checksum resync of g") && out.contains("only the differing blocks"),
        "{out}"
    );
    let row = status(a).into_iter().find(|v| v["vm"] == "g").unwrap();
    // Still paused (a pause wins), with the resync announced.
    assert_eq!(row["state"], "paused", "{row}");
    assert!(
        row["warning"]
            .as_str()
            .unwrap_or("")
            .contains("checksum resync runs when replication resumes"),
        "{row}"
    );
    assert_eq!(row["last_seq"].as_u64(), Some(seq0), "{row}");
    let t_resume = now_ms();
    a.ok(&["replica", "resume", "g"]);
    let st = wait_status(a, "the resync and its cycle", 60, |v| {
        v["state"] == "replicating" && v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_resume
    });
    println!("A after the resync: {st}");
    assert!(st["last_error"].is_null(), "{st}");
    let blocks = st["resync_blocks"].as_u64().unwrap();
    let differing = st["resync_differing_blocks"].as_u64().unwrap();
    assert_eq!(blocks, disks_bytes / MIB, "{st}");
    assert_eq!(
        differing, 1,
        "the resync should find exactly MiB 12 different: {st}"
    );
    let delta = st["bytes_shipped"].as_u64().unwrap() - shipped0;
    assert!(
        (MIB..MIB + 64 * 1024).contains(&delta),
        "the resync cycle shipped {delta} bytes for 1 differing MiB"
    );
    let row = wait_status(b, "the point after the resync", 30, |v| {
        v["last_cut_unix_ms"].as_u64().unwrap_or(0) > t_resume
    });
    let id2 = latest_point(&row);
    let (boot2, data) = point_disks(&store, id2, scratch);
    assert_eq!(
        sha256_hex(&data),
        data2,
        "point {id2}: the data disk differs from the primary's"
    );
    drop(data);

    // The guest was quiet since: with the VM off, both of its disks read host-side from
    // their VHDX chains equal the newest point's, and the boot disk the first point's.
    turn_off(a);
    let host_boot = chain_sum(&disks.boot, scratch);
    let host_data = chain_sum(&disks.data, scratch);
    assert_eq!(host_data.1, data2, "the primary's data disk read host-side");
    assert_eq!(
        boot2, host_boot,
        "point {id2}: the boot disk differs from the primary's"
    );
    assert_eq!(
        boot1, host_boot,
        "point {id1}: the boot disk differs from the primary's"
    );
    println!(
        "resync: {differing} of {blocks} MiB differed, {delta} bytes shipped; points {id1} and {id2} == primary (both disks)"
    );
    println!(
        "replica_seed export wall time: {:.0}s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn existing_copy_initial() {
    let t0 = Instant::now();
    let (c, rpath, disks, disks_bytes) = setup();
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let scratch = c.dir.path();

    // The guest fills its data disk; the VM is turned off and its disk files copied to
    // B's own directory (a copy restored from a backup, say).
    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    fill_random(a, 1, 15);
    turn_off(a);
    let old = b.dir.join("old");
    std::fs::create_dir_all(&old).unwrap();
    let copies = [old.join("web-0.vhdx"), old.join("web-1.vhdx")];
    std::fs::copy(&disks.boot, &copies[0]).unwrap();
    std::fs::copy(&disks.data, &copies[1]).unwrap();
    let copy_sums: Vec<String> = copies.iter().map(|p| sha256_file(p)).collect();
    let old_data = chain_sum(&copies[1], scratch).1;

    // Refused: a disk file that does not exist; nothing recorded.
    let missing = old.join("nosuch.vhdx");
    let e = b.fails(&[
        "replica",
        "import",
        "g",
        "--disk",
        s(&copies[0]),
        "--disk",
        s(&missing),
    ]);
    println!("import of a missing disk: {e}");
    assert!(
        e.contains(s(&missing)) && e.contains("does not exist") && e.contains("--disk FILE"),
        "{e}"
    );
    assert!(!rpath.join("g").join("seed").exists());
    assert!(status(b).is_empty(), "{:?}", status(b));

    // The guest runs again and rewrites MiBs 4 and 5 and records (MiB 0, empty in the
    // copy), then is quiet.
    a.ok(&["vm", "start", "g"]);
    a.wait_heartbeat("g");
    let (code, out) = a.exec("g", RECORD_WRITER);
    assert_eq!(code, 0, "{out}");
    fill_random(a, 4, 5);
    std::thread::sleep(Duration::from_secs(1));
    let stopped = stop_writer(a);
    let data1 = guest_data_sum(a);
    assert_ne!(data1, old_data);

    // Enabled before B has the seed: the cycles fail saying what to run on B.
    let out = a.ok(&[
        "replica",
        "enable",
        "g",
        "--to",
        &b.addr,
        "--interval",
        "30s",
        "--initial",
        "existing",
        "--start",
    ]);
    assert!(out.contains("enabled"), "{out}");
    let st = wait_status(a, "the cycles to fail without a seed", 30, |v| {
        v["last_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    let err = st["last_error"].as_str().unwrap();
    println!("without a seed: {err}");
    assert!(
        err.contains("no usable seed of g") && err.contains("vireo replica import g"),
        "{st}"
    );
    assert_eq!(st["bytes_shipped"].as_u64(), Some(0), "{st}");
    assert!(st["last_cut_unix_ms"].is_null(), "{st}");

    // B records the copy; replication goes on by itself.
    let out = b.ok(&[
        "replica",
        "import",
        "g",
        "--disk",
        s(&copies[0]),
        "--disk",
        s(&copies[1]),
    ]);
    println!("{out}");
    assert!(
        out.contains("recorded the existing copy of g (2 disk(s))")
            && out.contains("--initial existing"),
        "{out}"
    );
    let store = rpath.join("g").join("store");
    let (differing, shipped, id, boot) = check_initial(&c, &store, disks_bytes, 3, &data1, stopped);
    for (p, sum) in copies.iter().zip(&copy_sums) {
        assert_eq!(
            &sha256_file(p),
            sum,
            "the existing copy {} was written",
            p.display()
        );
    }

    // The guest was quiet since the cut: with the VM off, its disks read host-side equal
    // the point's.
    turn_off(a);
    let host_data = chain_sum(&disks.data, scratch);
    assert_eq!(host_data.1, data1, "the primary's data disk read host-side");
    assert_eq!(
        boot,
        chain_sum(&disks.boot, scratch),
        "point {id}: the boot disk differs from the primary's"
    );
    println!(
        "initial from an existing copy: {differing} of {} MiB differed, {shipped} bytes shipped for {disks_bytes} bytes of disks; point {id} == primary (both disks, record {stopped})",
        disks_bytes / MIB
    );
    println!(
        "replica_seed existing wall time: {:.0}s",
        t0.elapsed().as_secs_f64()
    );
}
