//! DiskChain and DiskService against real NBD clients (libnbd's nbdinfo, nbdcopy, nbdsh) and
//! under concurrent writers: checkpoint switch and live merge never lose or misplace a write.

use nbd::Export;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use storage::{CheckpointKind, DiskChain, DiskConfig, DiskService, MergeState};
use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        ok.unwrap_or(false),
        "{name} is missing: run scripts/setup.sh (libnbd-bin, python3-libnbd)"
    );
}

fn create(path: &Path, parent: Option<&Path>) -> Vhdx {
    let opts = CreateOptions {
        size: if parent.is_some() { 0 } else { SIZE },
        disk_type: if parent.is_some() {
            DiskType::Differencing
        } else {
            DiskType::Dynamic
        },
        block_size: MIB as u32,
        parent: parent.map(Path::to_path_buf),
        ..Default::default()
    };
    Vhdx::create(path, &opts).unwrap()
}

fn write(v: &Vhdx, model: &mut [u8], off: u64, len: usize, byte: u8) {
    v.write_at(&vec![byte; len], off).unwrap();
    model[off as usize..off as usize + len].fill(byte);
}

/// base <- mid <- top with overlapping writes in each layer; returns (top path, model).
fn three_layers(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut model = vec![0u8; SIZE as usize];
    let (a, b, c) = (
        dir.join("base.vhdx"),
        dir.join("mid.avhdx"),
        dir.join("top.avhdx"),
    );
    let v = create(&a, None);
    write(&v, &mut model, 0, 3 * MIB as usize, 0xa1);
    write(&v, &mut model, 20 * MIB, 4096, 0xa2);
    v.close().unwrap();
    let v = create(&b, Some(&a));
    write(&v, &mut model, MIB, 512, 0xb1);
    write(&v, &mut model, 30 * MIB + 7 * 512, 70_000, 0xb2);
    v.close().unwrap();
    let v = create(&c, Some(&b));
    write(&v, &mut model, 2 * MIB - 4096, 8192, 0xc1);
    write(&v, &mut model, 63 * MIB, MIB as usize, 0xc2);
    v.close().unwrap();
    (c, model)
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

struct Served {
    rt: tokio::runtime::Runtime,
    server: nbd::Server,
    sock: PathBuf,
}

fn serve(chain: Arc<DiskChain>, sock: PathBuf) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = nbd::Server::new(nbd::ServerConfig::default()).unwrap();
    server.add_export("disk0", chain).unwrap();
    let s = server.clone();
    let p = sock.clone();
    rt.spawn(async move {
        let l = nbd::bind_unix(&p).unwrap();
        s.serve_unix(l).await.unwrap();
    });
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Served { rt, server, sock }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.shutdown();
        let _ = &self.rt;
    }
}

fn uri(s: &Served) -> String {
    format!("nbd+unix:///disk0?socket={}", s.sock.display())
}

/// A 3-layer chain read through NBD with nbdcopy equals the layered model byte for byte,
/// and nbdinfo --map reports holes exactly where no layer holds data.
#[test]
fn three_layer_chain_with_nbdcopy_and_nbdinfo_map() {
    tool("nbdcopy");
    tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (top, model) = three_layers(dir.path());
    let chain = Arc::new(DiskChain::open(&top, true).unwrap());
    assert_eq!(chain.chain_paths().len(), 3);
    let s = serve(chain, dir.path().join("d.sock"));
    let out = dir.path().join("out.raw");
    let st = Command::new("nbdcopy")
        .arg(uri(&s))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy failed");
    let back = std::fs::read(&out).unwrap();
    assert_eq!(
        sha(&back),
        sha(&model),
        "nbdcopy output differs from the model"
    );

    let o = Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(uri(&s))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut pos = 0u64;
    for e in map.as_array().unwrap() {
        let (off, len, ty) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        assert_eq!(off, pos, "map is contiguous");
        if ty & 1 == 1 {
            // A hole must read as zeroes in the model.
            assert!(
                model[off as usize..(off + len) as usize]
                    .iter()
                    .all(|b| *b == 0),
                "hole at {off:#x} has data"
            );
        }
        pos = off + len;
    }
    assert_eq!(pos, SIZE);
    // Data written only in the top layer is not a hole; untouched space is.
    let kind_at = |x: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                x >= o && x < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
    };
    assert_eq!(
        kind_at(63 * MIB),
        Some(0),
        "top-layer data reported as data"
    );
    assert_eq!(
        kind_at(40 * MIB).map(|t| t & 1),
        Some(1),
        "untouched range reported as hole"
    );
}

/// nbdsh drives every command on a writable chain: writes land in the leaf only (parents
/// unchanged), trim and zero read back as zeroes, flush persists, out-of-range is refused.
#[test]
fn nbdsh_commands_on_writable_chain() {
    tool("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let (top, mut model) = three_layers(dir.path());
    let mid_before = sha(&read_all(&dir.path().join("mid.avhdx")));
    let chain = Arc::new(DiskChain::open(&top, false).unwrap());
    let s = serve(chain.clone(), dir.path().join("d.sock"));
    let script = r#"
import nbd, errno
h.pwrite(b"\x5a" * 65536, 5 * 1048576)
h.pwrite(b"\x5b" * 4096, 0, nbd.CMD_FLAG_FUA)
h.trim(1048576, 1048576)
h.zero(1048576, 30 * 1048576)
h.flush()
assert h.pread(65536, 5 * 1048576) == b"\x5a" * 65536
assert h.pread(4096, 1048576) == b"\0" * 4096
assert h.can_trim() and h.can_multi_conn() and not h.is_read_only()
h.set_strict_mode(0)
try:
    h.pread(4096, 64 * 1048576)
    raise SystemExit("out-of-range read succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
try:
    h.pwrite(b"x" * 512, 64 * 1048576 - 256)
    raise SystemExit("write across the end succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
seen = []
h.block_status(4 * 1048576, 0, lambda ctx, off, ents, err: seen.extend(ents))
assert seen and seen[1] & 1 == 0, seen
"#;
    // Debian's binding is for /usr/bin/python3, not another python3 on PATH.
    let o = Command::new("nbdsh")
        .env("PATH", "/usr/bin:/bin")
        .args(["--base-allocation", "-u", &uri(&s), "-c", script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nbdsh: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    drop(s);
    model[5 * MIB as usize..5 * MIB as usize + 65536].fill(0x5a);
    model[..4096].fill(0x5b);
    model[MIB as usize..2 * MIB as usize].fill(0);
    model[30 * MIB as usize..31 * MIB as usize].fill(0);
    let mut back = vec![0u8; SIZE as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert_eq!(sha(&back), sha(&model));
    drop(chain);
    assert_eq!(
        sha(&read_all(&dir.path().join("mid.avhdx"))),
        mid_before,
        "a parent was modified"
    );
    let v = Vhdx::open(&top, OpenOptions { read_only: true }).unwrap();
    let mut b2 = vec![0u8; SIZE as usize];
    v.read_at(&mut b2, 0).unwrap();
    assert_eq!(
        sha(&b2),
        sha(&model),
        "data not durable in the leaf after reopen"
    );
}

fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Per-sector log of acknowledged writes: (value, issued, acknowledged).
type Log = Vec<(u64, Instant, Instant)>;

/// Writers hammer the export while a checkpoint switch happens: the frozen parent holds every
/// write acknowledged before the switch started and none issued after it ended; the chain
/// reads back every sector's last acknowledged value.
#[test]
fn switch_under_load_places_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    create(&base, None).close().unwrap();
    let chain = Arc::new(DiskChain::open(&base, false).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(1));
    const THREADS: u64 = 4;
    const SECTORS: u64 = 64; // per thread, 4 KiB each, spread over blocks
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (chain, stop, counter) = (chain.clone(), stop.clone(), counter.clone());
            std::thread::spawn(move || {
                let mut logs: Vec<Log> = vec![Vec::new(); SECTORS as usize];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let s = (i * 7 + t) % SECTORS;
                    let off = (t * SECTORS + s) * 256 * 1024;
                    let v = counter.fetch_add(1, Ordering::SeqCst);
                    let mut buf = vec![0u8; 4096];
                    buf[..8].copy_from_slice(&v.to_le_bytes());
                    let issued = Instant::now();
                    chain.write_at(&buf, off, false).unwrap();
                    logs[s as usize].push((v, issued, Instant::now()));
                    i += 1;
                }
                logs
            })
        })
        .collect();
    // Wait for real load (not a fixed time: a loaded CI machine may not schedule the
    // writers for a while), bounded.
    let wait_for = |n: u64| {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while counter.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for(400);
    let t0 = Instant::now();
    let leaf = dir.path().join("leaf.avhdx");
    let frozen = chain.switch_to_child(&leaf, |_| Ok(())).unwrap();
    let t1 = Instant::now();
    wait_for(counter.load(Ordering::SeqCst) + 400);
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<Vec<Log>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    chain.flush().unwrap();
    assert_eq!(frozen, base);
    let parent = Vhdx::open(&base, OpenOptions { read_only: true }).unwrap();
    let (mut before, mut after) = (0, 0);
    for (t, per) in logs.iter().enumerate() {
        for (s, log) in per.iter().enumerate() {
            let off = (t as u64 * SECTORS + s as u64) * 256 * 1024;
            let mut b = [0u8; 8];
            parent.read_at(&mut b, off).unwrap();
            let pv = u64::from_le_bytes(b);
            let last_before = log
                .iter()
                .filter(|w| w.2 < t0)
                .map(|w| w.0)
                .max()
                .unwrap_or(0);
            assert!(
                pv >= last_before,
                "write {last_before} acknowledged before the switch is missing from the parent"
            );
            assert!(
                !log.iter().any(|w| w.1 > t1 && w.0 == pv),
                "write {pv} issued after the switch is in the parent"
            );
            chain.read_at(&mut b, off).unwrap();
            let last = log.last().map(|w| w.0).unwrap_or(0);
            assert_eq!(
                u64::from_le_bytes(b),
                last,
                "chain lost the last write of a sector"
            );
            before += log.iter().filter(|w| w.2 < t0).count();
            after += log.iter().filter(|w| w.1 > t1).count();
        }
    }
    assert!(
        before > 100 && after > 100,
        "load too light: {before} before, {after} after"
    );
}

fn service_disk(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let vm = dir.join("vm");
    let run = dir.join("run");
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let base = dir.join("data.vhdx");
    create(&base, None).close().unwrap();
    (vm, run, base)
}

fn wait_job(svc: &DiskService, done: impl Fn(&MergeState) -> bool) -> MergeState {
    for _ in 0..3000 {
        if let Some(j) = svc.state().jobs.last() {
            if done(&j.state) {
                return j.state.clone();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "merge job did not reach the expected state: {:?}",
        svc.state().jobs
    );
}

/// Checkpoint, write, remove the checkpoint with a live merge while writers keep writing:
/// afterwards the base image is the leaf again and holds every last acknowledged write.
/// A second service opened mid-merge (as after a kill -9) resumes and finishes the merge.
#[test]
fn live_merge_under_load_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, run, base) = service_disk(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let cfg = [DiskConfig {
        path: base.clone(),
        read_only: false,
    }];
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    assert!(storage::socket_path(&run, 0).exists());
    let chain = svc.chain(0).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let fill = |chain: &DiskChain, model: &mut [u8], off: u64, len: usize, b: u8| {
        chain.write_at(&vec![b; len], off, false).unwrap();
        model[off as usize..off as usize + len].fill(b);
    };
    fill(&chain, &mut model, 0, 8 * MIB as usize, 1);
    let cp = svc
        .create_checkpoint(Some("one".into()), CheckpointKind::Production, None)
        .unwrap();
    assert_eq!(cp.images, vec![base.clone()]);
    fill(&chain, &mut model, 4 * MIB, 40 * MIB as usize, 2);
    let leaf = svc.state().leaves[0].clone();
    assert_ne!(leaf, base);
    // Concurrent writer during the merge.
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (chain, stop) = (chain.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut writes = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (i * 3 * MIB + i * 4096) % (SIZE - 4096);
                let b = (i % 250) as u8 + 3;
                chain.write_at(&[b; 4096], off, false).unwrap();
                writes.push((off, b));
                i += 1;
            }
            writes
        })
    };
    let job = svc
        .remove_checkpoint("one")
        .unwrap()
        .expect("a live merge job");
    assert_eq!(job.target, base);
    wait_job(&svc, |s| matches!(s, MergeState::Done));
    stop.store(true, Ordering::SeqCst);
    for (off, b) in w.join().unwrap() {
        model[off as usize..off as usize + 4096].fill(b);
    }
    let st = svc.state();
    assert_eq!(st.leaves[0], base, "the merge target is the leaf again");
    assert!(st.checkpoints.is_empty());
    assert!(!leaf.exists(), "merged layer deleted");
    let mut back = vec![0u8; SIZE as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert_eq!(
        sha(&back),
        sha(&model),
        "export differs from the model after the merge"
    );
    chain.flush().unwrap();
    svc.shutdown();
    drop(chain);
    drop(svc);

    // Interrupted merge: persist a job half way, reopen as a restarted worker would.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    let chain = svc.chain(0).unwrap();
    let mut b = vec![0u8; SIZE as usize];
    chain.read_at(&mut b, 0).unwrap();
    assert_eq!(
        sha(&b),
        sha(&model),
        "restart after the merge serves the merged base"
    );
    svc.create_checkpoint(Some("two".into()), CheckpointKind::Production, None)
        .unwrap();
    fill(&chain, &mut model, 10 * MIB, 30 * MIB as usize, 0x77);
    svc.remove_checkpoint("two").unwrap().unwrap();
    // Simulate kill -9 right after the first blocks: stop the job, then forget the service.
    svc.cancel_job(&svc.state().jobs.last().unwrap().id)
        .unwrap();
    let st = wait_job(&svc, |s| !matches!(s, MergeState::Copying { .. }));
    if let MergeState::Cancelled { next_block } = st {
        // Turn the persisted job back into "running" as a crash would have left it.
        let mut s = svc.state();
        s.jobs.last_mut().unwrap().state = MergeState::Copying { next_block };
        chain.flush().unwrap();
        svc.shutdown();
        drop(chain);
        drop(svc);
        std::thread::sleep(std::time::Duration::from_millis(200));
        s.save(&vm).unwrap();
        let svc = DiskService::start(&vm, &run, &cfg).unwrap();
        wait_job(&svc, |s| matches!(s, MergeState::Done));
        assert_eq!(svc.state().leaves[0], base);
        let chain = svc.chain(0).unwrap();
        chain.read_at(&mut b, 0).unwrap();
        assert_eq!(sha(&b), sha(&model), "resumed merge lost data");
        svc.shutdown();
    } else {
        assert!(matches!(st, MergeState::Done), "{st:?}");
    }
}

/// A raw disk is served, but a checkpoint is refused with a message naming `vireo disk convert`.
#[test]
fn raw_disk_refuses_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, run, _) = service_disk(dir.path());
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![7u8; MIB as usize]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let svc = DiskService::start(
        &vm,
        &run,
        &[DiskConfig {
            path: raw.clone(),
            read_only: false,
        }],
    )
    .unwrap();
    let e = svc
        .create_checkpoint(None, CheckpointKind::Production, None)
        .unwrap_err();
    assert!(e.to_string().contains("vireo disk convert"), "{e}");
    assert_eq!(e.kind(), storage::ErrorKind::Unsupported);
    assert_eq!(
        std::fs::read(&raw).unwrap(),
        vec![7u8; MIB as usize],
        "refusal changed the disk"
    );
    assert!(svc.state().checkpoints.is_empty());
    svc.shutdown();
}
