//! A worker killed with SIGKILL at any moment loses no acknowledged write and leaves the
//! chain in the right state. The child role of this test binary plays the worker: it serves a
//! disk with `DiskService`, writes (allocating new blocks, without flushing), creates a
//! checkpoint, removes it with a live merge while still writing, and SIGKILLs itself at a
//! point chosen by a seed. After each acknowledged write it appends the write to an ack log
//! (page cache survives the process). The parent restarts the service on the same directory
//! (merge resumes), waits for the merge, and checks every byte against the acks, through the
//! chain and through `qemu-img` once the base image is the leaf again.
//!
//! Odd seeds remove an inner checkpoint instead: checkpoints a, b, c are taken between
//! writes and b is removed while the writes go on (c's image, inside the running chain,
//! takes over b's layer live). After the restart the job finishes, the running disk holds
//! every acknowledged write and checkpoints a and c still read as they were taken.

use nbd::Export;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use storage::{CheckpointKind, DiskConfig, DiskService, MergeState};
use vhdx::{CreateOptions, DiskType, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const CHILD_ENV: &str = "STORAGE_CRASH_CHILD";

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// The `i`th write of run `seed`: offset, length and content.
fn nth_write(seed: u64, i: u64) -> (u64, Vec<u8>) {
    let mut r = xorshift(seed.wrapping_mul(1_000_003).wrapping_add(i));
    let len = [512u64, 4096, 65536, 3 * 4096][(r() % 4) as usize];
    let off = (r() % ((SIZE - len) / 512)) * 512;
    let mut data = vec![0u8; len as usize];
    for c in data.chunks_mut(8) {
        let v = r().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    (off, data)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn dirs(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (root.join("vm"), root.join("run"), root.join("data.vhdx"))
}

/// Child role (only when `STORAGE_CRASH_CHILD` is set): the worker that gets killed.
#[test]
fn crash_child_role() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("STORAGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let root = PathBuf::from(root);
    let (vm, run, base) = dirs(&root);
    let rt = runtime();
    let _g = rt.enter();
    let svc = DiskService::start(
        &vm,
        &run,
        &[DiskConfig {
            path: base,
            read_only: false,
        }],
    )
    .unwrap();
    let chain = svc.chain(0).unwrap();
    let mut acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("acks"))
        .unwrap();
    let mut r = xorshift(seed);
    let total = 300 + r() % 300;
    let cp_at = 50 + r() % 100;
    let rm_at = cp_at + 40 + r() % 100;
    let inner = seed % 2 == 1;
    // Inner removals of this small disk finish within a few writes: kill close to the start.
    let kill_at = rm_at + r() % if inner { 6 } else { total - rm_at };
    for i in 0..total {
        if i == cp_at {
            svc.create_checkpoint(Some("cp".into()), CheckpointKind::Production, None)
                .unwrap();
        }
        if inner && (i == cp_at + 10 || i == cp_at + 20) {
            let name = if i == cp_at + 10 { "b" } else { "c" };
            svc.create_checkpoint(Some(name.into()), CheckpointKind::Production, None)
                .unwrap();
        }
        if i == rm_at {
            svc.remove_checkpoint(if inner { "b" } else { "cp" })
                .unwrap();
        }
        if i == kill_at {
            // SAFETY: kill(2) of this very process, like the worker's SIGKILL.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let (off, data) = nth_write(seed, i);
        chain.write_at(&data, off, false).unwrap();
        writeln!(acks, "{i}").unwrap();
    }
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

fn run_once(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (vm, run, base) = dirs(root);
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let opts = CreateOptions {
        size: SIZE,
        disk_type: DiskType::Dynamic,
        block_size: MIB as u32,
        ..Default::default()
    };
    Vhdx::create(&base, &opts).unwrap().close().unwrap();

    let exe = std::env::current_exe().unwrap();
    let st = Command::new(exe)
        .args([
            "--exact",
            "crash_child_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .env("STORAGE_CRASH_SEED", seed.to_string())
        .status()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "child ended with {st:?}");

    let acked: Vec<u64> = std::fs::read_to_string(root.join("acks"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut model = vec![0u8; SIZE as usize];
    for &i in &acked {
        let (off, data) = nth_write(seed, i);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }

    let unfinished = storage::DiskState::load(&vm)
        .unwrap()
        .is_some_and(|s| s.active_merge().is_some());
    eprintln!("seed {seed}: job unfinished at the kill: {unfinished}");
    // The restarted "worker": same directory, resumes the merge.
    let rt = runtime();
    let _g = rt.enter();
    let svc = DiskService::start(
        &vm,
        &run,
        &[DiskConfig {
            path: base.clone(),
            read_only: false,
        }],
    )
    .unwrap();
    let chain = svc.chain(0).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    chain.read_at(&mut got, 0).unwrap();
    let first_diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "seed {seed}: {} acked writes, state {:?}: data differs at byte {:?} right after the restart",
        acked.len(),
        svc.state(),
        first_diff
    );
    for _ in 0..3000 {
        let s = svc.state();
        if !s
            .jobs
            .iter()
            .any(|j| matches!(j.state, MergeState::Copying { .. }))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let s = svc.state();
    assert!(
        s.jobs.iter().all(|j| j.state == MergeState::Done),
        "seed {seed}: merge did not finish: {s:?}"
    );
    if seed % 2 == 1 {
        return check_inner(seed, root, &svc, &model, &acked);
    }
    assert_eq!(s.leaves, vec![base.clone()], "seed {seed}: {s:?}");
    assert!(s.checkpoints.is_empty(), "seed {seed}: {s:?}");
    chain.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "seed {seed}: data differs after the resumed merge"
    );
    svc.close().unwrap();
    // Nothing but the base image and the state are left of the chain.
    let left: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with("vhdx"))
        .collect();
    assert_eq!(left, vec!["data.vhdx".to_string()], "seed {seed}");
    // An independent reader of the merged base.
    let raw = root.join("out.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&base)
        .arg(&raw)
        .status()
        .expect("qemu-img is missing: run scripts/setup.sh (qemu-utils)");
    assert!(st.success());
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "seed {seed}: qemu-img reads other data from the merged base"
    );
}

/// Kill -9 of the serving process at seeded points across unflushed allocating writes,
/// checkpoint create, live merge start and mirrored writes during the merge.
#[test]
fn sigkill_at_any_point_loses_no_acknowledged_write() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    for seed in 1..=8 {
        let t = std::time::Instant::now();
        run_once(seed);
        eprintln!("seed {seed}: {:?}", t.elapsed());
    }
}

/// Inner removal (odd seeds): b is gone, a and c read as taken, the disk as acknowledged.
fn check_inner(seed: u64, root: &Path, svc: &DiskService, model: &[u8], acked: &[u64]) {
    let s = svc.state();
    let names: Vec<_> = s.checkpoints.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["cp", "c"], "seed {seed}: {s:?}");
    assert_eq!(
        s.find("c").unwrap().parent,
        Some(s.find("cp").unwrap().id.clone())
    );
    let mut got = vec![0u8; SIZE as usize];
    svc.chain(0).unwrap().read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "seed {seed}: data differs after the resumed removal"
    );
    let imgs: Vec<PathBuf> = ["cp", "c"]
        .iter()
        .map(|n| s.find(n).unwrap().images[0].clone())
        .collect();
    svc.close().unwrap();
    // The checkpoints' models: every write before their creation (writes are sequential).
    let mut r = xorshift(seed);
    let _total = 300 + r() % 300;
    let cp_at = 50 + r() % 100;
    for (img, at) in imgs.iter().zip([cp_at, cp_at + 20]) {
        let mut m = vec![0u8; SIZE as usize];
        for i in acked.iter().copied().filter(|&i| i < at) {
            let (off, data) = nth_write(seed, i);
            m[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let v = Vhdx::open(img, vhdx::OpenOptions { read_only: true }).unwrap();
        let mut b = vec![0u8; SIZE as usize];
        v.read_at(&mut b, 0).unwrap();
        assert!(
            b == m,
            "seed {seed}: checkpoint image {} changed",
            img.display()
        );
    }
    let left = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("vhdx"))
        .count();
    // base, c's image (the layer after b), the leaf: b's layer is gone.
    assert_eq!(left, 3, "seed {seed}: layers left");
}
