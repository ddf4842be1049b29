//! Consolidating a running disk's chain (`DiskService::consolidate`): a failover-like chain
//! leaf -> p4 -> p3 -> p2 -> p1 -> base (distinct, overlapping data and zeroed ranges in
//! every layer; the leaf in another directory than its parents) is consolidated live while
//! a writer keeps writing. Afterwards the leaf's parent is the base, the disk reads exactly
//! the chain's data plus every acknowledged write (SHA-256 against a model), through the
//! export and through the leaf reopened from disk, and the absorbed layers are reported and
//! left untouched. A kill -9 mid-job resumes after a restart; refusals while a mirror or a
//! checkpoint merge runs; a flat chain is a no-op; a checkpoint image stops it.

use nbd::Export;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::mirror::{DirSink, MirrorOptions};
use storage::{
    offline, CheckpointKind, DiskChain, DiskConfig, DiskService, ErrorKind, MergeKind, MergeState,
};
use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;
/// Differencing layers between the base and the leaf.
const MIDDLE: usize = 4;
const CHILD_ENV: &str = "STORAGE_CONSOLIDATE_CHILD";

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if sha(got) != sha(want) {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!("{what}: data differs (first at byte {at:?})");
    }
}

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = xorshift(seed);
    let mut d = vec![0u8; len];
    for c in d.chunks_mut(8) {
        let v = r().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    d
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Paths of a test: (vm dir, run dir, images bottom first: base, p1..p4, leaf).
fn layout(root: &Path) -> (PathBuf, PathBuf, Vec<PathBuf>) {
    let store = root.join("store");
    let mut imgs = vec![store.join("base.vhdx")];
    imgs.extend((1..=MIDDLE).map(|j| store.join(format!("p{j}.avhdx"))));
    imgs.push(root.join("failover").join("disk0.avhdx"));
    (root.join("vm"), root.join("run"), imgs)
}

/// Creates the chain of [`layout`] with `layers` images (base included; the last is the
/// leaf) and returns the model of what the leaf shows. Every layer writes a large unaligned
/// range overlapping its parent's, scattered small writes, and (every other layer) zeroes a
/// range over its parents' data.
fn build(root: &Path, layers: usize) -> (PathBuf, Vec<u8>) {
    let (vm, run, all) = layout(root);
    let mut imgs: Vec<PathBuf> = all[..layers - 1].to_vec();
    imgs.push(all[all.len() - 1].clone());
    for d in [&vm, &run, &root.join("store"), &root.join("failover")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut model = vec![0u8; SIZE as usize];
    for (j, p) in imgs.iter().enumerate() {
        let opts = CreateOptions {
            size: SIZE,
            disk_type: if j == 0 {
                DiskType::Dynamic
            } else {
                DiskType::Differencing
            },
            parent: (j > 0).then(|| imgs[j - 1].clone()),
            block_size: MIB as u32,
            ..Default::default()
        };
        let v = Vhdx::create(p, &opts).unwrap();
        let j = j as u64;
        let mut put = |off: u64, data: Vec<u8>| {
            v.write_at(&data, off).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        };
        put(
            j * 3 * MIB + j * 512,
            pattern(100 + j, (5 * MIB + j * 4096) as usize),
        );
        let mut r = xorshift(200 + j);
        for _ in 0..8 {
            let off = (r() % ((SIZE - 4096) / 512)) * 512;
            put(off, pattern(r(), 4096));
        }
        if j % 2 == 1 {
            let off = (j * 7 % 40) * MIB + 4096;
            v.write_zeroes(off, MIB + 8192).unwrap();
            model[off as usize..(off + MIB + 8192) as usize].fill(0);
        }
        v.close().unwrap();
    }
    let leaf = imgs[imgs.len() - 1].clone();
    assert_same(&view(&leaf), &model, "the built chain");
    (leaf, model)
}

/// What `p` shows, read through its own chain.
fn view(p: &Path) -> Vec<u8> {
    let v = Vhdx::open(p, OpenOptions { read_only: true }).unwrap();
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

fn start(root: &Path, leaf: &Path) -> Arc<DiskService> {
    let (vm, run, _) = layout(root);
    DiskService::start(
        &vm,
        &run,
        &[DiskConfig {
            path: leaf.to_path_buf(),
            read_only: false,
        }],
    )
    .unwrap()
}

fn read_all(chain: &DiskChain) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    chain.read_at(&mut b, 0).unwrap();
    b
}

fn wait_job(svc: &DiskService, id: &str) -> storage::MergeJob {
    for _ in 0..12000 {
        let st = svc.state();
        let j = st.jobs.iter().find(|j| j.id == id).unwrap();
        if !matches!(j.state, MergeState::Copying { .. }) {
            return j.clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("job {id} did not end: {:?}", svc.state().jobs);
}

/// The `i`th write of writer `seed`: offset and content (512 B to 64 KiB, unaligned too).
fn nth_write(seed: u64, i: u64) -> (u64, Vec<u8>) {
    let mut r = xorshift(seed.wrapping_mul(1_000_003).wrapping_add(i));
    let len = [512u64, 4096, 65536, 3 * 4096][(r() % 4) as usize];
    let off = (r() % ((SIZE - len) / 512)) * 512;
    (off, pattern(r(), len as usize))
}

/// Writer thread: writes [`nth_write`]s until stopped (at least `min`); returns how many.
fn writer(
    chain: Arc<DiskChain>,
    seed: u64,
    min: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) || i < min {
            let (off, data) = nth_write(seed, i);
            chain.write_at(&data, off, false).unwrap();
            i += 1;
        }
        i
    })
}

fn apply_writes(model: &mut [u8], seed: u64, n: u64) {
    for i in 0..n {
        let (off, data) = nth_write(seed, i);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
}

fn parent_of(p: &Path) -> Option<PathBuf> {
    let v = Vhdx::open(p, OpenOptions { read_only: true }).unwrap();
    v.parent().map(|x| x.path().to_path_buf())
}

fn same(a: &Path, b: &Path) -> bool {
    a.canonicalize().unwrap() == b.canonicalize().unwrap()
}

/// The whole chain absorbed live under a writer: the leaf ends on the base, the disk shows
/// the chain's data plus every write, the middle layers are reported in order and left
/// unchanged, and a restarted service serves the same.
#[test]
fn consolidates_a_deep_chain_live_while_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (leaf, mut model) = build(root, MIDDLE + 2);
    let (_, _, imgs) = layout(root);
    let middle: Vec<PathBuf> = imgs[1..=MIDDLE].to_vec();
    let middle_views: Vec<String> = middle.iter().map(|p| sha(&view(p))).collect();
    let rt = runtime();
    let _g = rt.enter();
    let svc = start(root, &leaf);
    let chain = svc.chain(0).unwrap();
    assert_same(&read_all(&chain), &model, "served before");
    let pending = svc.consolidation_pending().unwrap();
    let want: Vec<PathBuf> = middle.iter().rev().cloned().collect();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].iter().zip(&want).all(|(a, b)| same(a, b)));
    assert_eq!(pending[0].len(), MIDDLE);

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(chain.clone(), 7, 200, stop.clone());
    std::thread::sleep(Duration::from_millis(20));
    let job = svc.consolidate().unwrap().expect("a consolidation job");
    assert_eq!(job.kind, MergeKind::Consolidate);
    let end = wait_job(&svc, &job.id);
    stop.store(true, Ordering::SeqCst);
    let n = w.join().unwrap();
    apply_writes(&mut model, 7, n);
    assert_eq!(end.state, MergeState::Done, "{end:?}");
    eprintln!("{n} writes during the consolidation");

    // The leaf sits on the base; the absorbed layers are reported, in order, and untouched.
    let paths = chain.chain_paths();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(same(&paths[0], &leaf) && same(&paths[1], &imgs[0]));
    assert_eq!(end.absorbed.len(), MIDDLE, "{end:?}");
    assert!(end.absorbed.iter().zip(&want).all(|(a, b)| same(a, b)));
    for (p, s) in middle.iter().zip(&middle_views) {
        assert_eq!(&sha(&view(p)), s, "{} changed", p.display());
    }
    assert_same(&read_all(&chain), &model, "served after the consolidation");
    assert!(svc.consolidation_pending().unwrap()[0].is_empty());
    assert!(svc.consolidate().unwrap().is_none(), "nothing left to do");
    svc.close().unwrap();
    drop(svc);

    // The files alone: the leaf's parent is the base and it reads the same.
    assert!(same(&parent_of(&leaf).unwrap(), &imgs[0]));
    assert_same(&view(&leaf), &model, "leaf reopened from disk");
    // A restarted service: nothing resumes, same data.
    let svc = start(root, &leaf);
    assert!(svc.state().active_merge().is_none());
    assert_same(&read_all(&svc.chain(0).unwrap()), &model, "after a restart");
    svc.close().unwrap();
    drop(svc);
    // The absorbed layers can go (the caller deletes them): the leaf still opens.
    for p in &middle {
        std::fs::remove_file(p).unwrap();
    }
    assert_same(
        &view(&leaf),
        &model,
        "leaf reopened without the absorbed layers",
    );
}

/// A chain of the base alone, or a leaf already on the base: no job, live or offline.
#[test]
fn flat_chain_is_a_no_op() {
    for layers in [1, 2] {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let (path, model) = build(root, layers);
        let cfg = [DiskConfig {
            path: path.clone(),
            read_only: false,
        }];
        let (vm, _, _) = layout(root);
        assert!(offline::consolidate(&vm, &cfg).unwrap().is_none());
        let rt = runtime();
        let _g = rt.enter();
        let svc = start(root, &path);
        assert_eq!(
            svc.consolidation_pending().unwrap(),
            vec![Vec::<PathBuf>::new()]
        );
        assert!(svc.consolidate().unwrap().is_none(), "{layers} layers");
        assert!(svc.state().jobs.is_empty());
        assert_same(&read_all(&svc.chain(0).unwrap()), &model, "flat chain");
        svc.close().unwrap();
    }
}

/// The same job offline (VM off): closed files filled with `vhdx::absorb_parent`; a later
/// start serves the consolidated chain.
#[test]
fn consolidates_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (leaf, model) = build(root, MIDDLE + 2);
    let (vm, _, imgs) = layout(root);
    let cfg = [DiskConfig {
        path: leaf.clone(),
        read_only: false,
    }];
    let job = offline::consolidate(&vm, &cfg).unwrap().expect("a job");
    assert_eq!(job.state, MergeState::Done, "{job:?}");
    assert_eq!(job.absorbed.len(), MIDDLE);
    assert!(same(&parent_of(&leaf).unwrap(), &imgs[0]));
    assert_same(&view(&leaf), &model, "leaf after the offline consolidation");
    for p in &imgs[1..=MIDDLE] {
        assert!(p.exists(), "absorbed layers are not deleted");
    }
    assert!(offline::consolidate(&vm, &cfg).unwrap().is_none());
    let rt = runtime();
    let _g = rt.enter();
    let svc = start(root, &leaf);
    assert_eq!(svc.chain(0).unwrap().chain_paths().len(), 2);
    assert_same(&read_all(&svc.chain(0).unwrap()), &model, "served");
    svc.close().unwrap();
}

/// A cancelled consolidation blocks checkpoints, merges, mirrors and another consolidation
/// with a clear message, and finishes when resumed.
#[test]
fn cancel_resume_and_what_it_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (leaf, mut model) = build(root, MIDDLE + 2);
    let rt = runtime();
    let _g = rt.enter();
    let svc = start(root, &leaf);
    let chain = svc.chain(0).unwrap();
    let job = svc.consolidate().unwrap().unwrap();
    // Flag set before the job's thread looks at it: it stops at its first chunk.
    svc.cancel_job(&job.id).unwrap();
    let j = wait_job(&svc, &job.id);
    assert!(matches!(j.state, MergeState::Cancelled { .. }), "{j:?}");
    let busy = |e: storage::StorageError, what: &str| {
        assert_eq!(e.kind(), ErrorKind::Busy, "{what}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("consolidated") && msg.contains(&job.id),
            "{what}: {msg}"
        );
    };
    busy(
        svc.create_checkpoint(None, CheckpointKind::Production, None)
            .unwrap_err(),
        "checkpoint",
    );
    busy(svc.consolidate().unwrap_err(), "second consolidation");
    let dest = root.join("dest");
    let e = svc
        .mirror_disk(0, Box::new(DirSink::new(&dest)), MirrorOptions::default())
        .err()
        .expect("mirror refused");
    assert!(e.to_string().contains("merge job"), "{e}");
    fill(&chain, &mut model, 3, 5 * MIB + 512);
    let j = svc.resume_job(&job.id).unwrap();
    assert!(matches!(j.state, MergeState::Copying { .. }));
    let end = wait_job(&svc, &job.id);
    assert_eq!(end.state, MergeState::Done, "{end:?}");
    assert_eq!(end.absorbed.len(), MIDDLE);
    assert_eq!(chain.chain_paths().len(), 2);
    assert_same(&read_all(&chain), &model, "after the resumed job");
    // Checkpoints work again.
    svc.create_checkpoint(None, CheckpointKind::Production, None)
        .unwrap();
    svc.close().unwrap();
}

fn fill(chain: &DiskChain, model: &mut [u8], seed: u64, off: u64) {
    let d = pattern(seed, (2 * MIB) as usize);
    chain.write_at(&d, off, false).unwrap();
    model[off as usize..off as usize + d.len()].copy_from_slice(&d);
}

/// A checkpoint merge job (cancelled, so deterministic) refuses the consolidation; a
/// checkpoint image stops it (the checkpoint restores that image and what is under it);
/// once the checkpoint is gone the whole chain is consolidated.
#[test]
fn refused_during_a_checkpoint_merge_and_stopped_by_a_checkpoint_image() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (leaf, mut model) = build(root, MIDDLE + 2);
    let (_, _, imgs) = layout(root);
    let rt = runtime();
    let _g = rt.enter();
    let svc = start(root, &leaf);
    let chain = svc.chain(0).unwrap();
    let cp = svc
        .create_checkpoint(Some("cp".into()), CheckpointKind::Production, None)
        .unwrap();
    assert!(same(&cp.images[0], &leaf));
    fill(&chain, &mut model, 11, 9 * MIB + 4096);
    // The leaf's parent is the checkpoint's image: nothing may be absorbed.
    assert_eq!(
        svc.consolidation_pending().unwrap(),
        vec![Vec::<PathBuf>::new()]
    );
    assert!(svc.consolidate().unwrap().is_none());

    let merge = svc.remove_checkpoint("cp").unwrap().expect("a live merge");
    svc.cancel_job(&merge.id).unwrap();
    let j = wait_job(&svc, &merge.id);
    assert!(matches!(j.state, MergeState::Cancelled { .. }), "{j:?}");
    let e = svc.consolidate().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    let msg = e.to_string();
    assert!(
        msg.contains("checkpoint is being removed") && msg.contains(&merge.id),
        "{msg}"
    );
    svc.resume_job(&merge.id).unwrap();
    assert_eq!(wait_job(&svc, &merge.id).state, MergeState::Done);
    assert_same(&read_all(&chain), &model, "after the checkpoint merge");

    // The checkpoint's image is the leaf again: the whole chain goes now.
    let job = svc.consolidate().unwrap().expect("a job");
    let end = wait_job(&svc, &job.id);
    assert_eq!(end.state, MergeState::Done, "{end:?}");
    assert_eq!(end.absorbed.len(), MIDDLE);
    let paths = chain.chain_paths();
    assert!(same(&paths[paths.len() - 1], &imgs[0]) && paths.len() == 2);
    assert_same(&read_all(&chain), &model, "after the consolidation");
    svc.close().unwrap();
}

/// Refused while a storage mirror runs (rate-limited, so it is still running); allowed once
/// it is cancelled.
#[test]
fn refused_while_mirroring() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (leaf, model) = build(root, MIDDLE + 2);
    let rt = runtime();
    let _g = rt.enter();
    let svc = start(root, &leaf);
    let opts = MirrorOptions {
        max_bytes_per_sec: Some(MIB),
        ..Default::default()
    };
    let m = svc
        .mirror_disk(0, Box::new(DirSink::new(root.join("dest"))), opts)
        .unwrap();
    let e = svc.consolidate().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("mirrored"), "{e}");
    assert!(svc.state().jobs.is_empty());
    m.cancel().unwrap();
    let job = svc.consolidate().unwrap().expect("a job");
    assert_eq!(wait_job(&svc, &job.id).state, MergeState::Done);
    assert_same(&read_all(&svc.chain(0).unwrap()), &model, "after");
    svc.close().unwrap();
}

/// Child role (only with `STORAGE_CONSOLIDATE_CHILD` set): serves the chain, writes
/// (logging each acknowledged write), starts the consolidation and SIGKILLs itself once
/// the job has absorbed `seed % 4` layers and recorded progress into the next one.
#[test]
fn crash_child_role() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("STORAGE_CONSOLIDATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let root = PathBuf::from(root);
    let (_, _, imgs) = layout(&root);
    let rt = runtime();
    let _g = rt.enter();
    let svc = start(&root, &imgs[imgs.len() - 1]);
    let chain = svc.chain(0).unwrap();
    let mut acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("acks"))
        .unwrap();
    for i in 0..50 {
        let (off, data) = nth_write(seed, i);
        chain.write_at(&data, off, false).unwrap();
        writeln!(acks, "{i}").unwrap();
    }
    let job = svc.consolidate().unwrap().unwrap();
    let (want_absorbed, want_block) = ((seed % 4) as usize, 16 * (seed % 3));
    // The poller only decides; the writer kills between two writes, so that no write is
    // in flight (an unacknowledged write may land or not).
    let kill = Arc::new(AtomicBool::new(false));
    let (s, k) = (svc.clone(), kill.clone());
    std::thread::spawn(move || loop {
        let st = s.state();
        if let Some(j) = st.jobs.iter().find(|j| j.id == job.id) {
            let at = match j.state {
                MergeState::Copying { next_block } => next_block,
                _ => u64::MAX,
            };
            if (j.absorbed.len() >= want_absorbed && at >= want_block) || at == u64::MAX {
                eprintln!(
                    "killing at {} absorbed, state {:?}",
                    j.absorbed.len(),
                    j.state
                );
                k.store(true, Ordering::SeqCst);
                return;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    });
    for i in 50.. {
        if kill.load(Ordering::SeqCst) {
            // SAFETY: kill(2) of this very process, like the worker's SIGKILL.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let (off, data) = nth_write(seed, i);
        chain.write_at(&data, off, false).unwrap();
        writeln!(acks, "{i}").unwrap();
    }
}

/// Kill -9 of the serving process at several points of the job; the restarted service
/// serves every acknowledged write at once, resumes the job, and the result verifies.
#[test]
fn sigkill_mid_job_resumes_without_loss() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let mut unfinished = 0;
    for seed in 1..=6 {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let (leaf, mut model) = build(root, MIDDLE + 2);
        let (vm, _, imgs) = layout(root);
        let exe = std::env::current_exe().unwrap();
        let st = Command::new(exe)
            .args([
                "--exact",
                "crash_child_role",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, root)
            .env("STORAGE_CONSOLIDATE_SEED", seed.to_string())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "child ended with {st:?}");
        let acked: Vec<u64> = std::fs::read_to_string(root.join("acks"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        for &i in &acked {
            let (off, data) = nth_write(seed, i);
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let saved = storage::DiskState::load(&vm).unwrap().unwrap();
        let active = saved.active_merge().cloned();
        eprintln!(
            "seed {seed}: {} writes acknowledged, job at the kill: {:?}",
            acked.len(),
            active.as_ref().map(|j| (j.absorbed.len(), &j.state))
        );
        if let Some(j) = &active {
            assert_eq!(j.kind, MergeKind::Consolidate);
            unfinished += 1;
        }

        let rt = runtime();
        let _g = rt.enter();
        let svc = start(root, &leaf);
        let chain = svc.chain(0).unwrap();
        assert_same(
            &read_all(&chain),
            &model,
            &format!("seed {seed}: at the restart"),
        );
        let id = saved.jobs[0].id.clone();
        let end = wait_job(&svc, &id);
        assert_eq!(end.state, MergeState::Done, "seed {seed}: {end:?}");
        assert_eq!(end.absorbed.len(), MIDDLE, "seed {seed}: {end:?}");
        let want: Vec<&PathBuf> = imgs[1..=MIDDLE].iter().rev().collect();
        assert!(
            end.absorbed.iter().zip(want).all(|(a, b)| same(a, b)),
            "seed {seed}: {end:?}"
        );
        assert_eq!(chain.chain_paths().len(), 2, "seed {seed}");
        assert_same(&read_all(&chain), &model, &format!("seed {seed}: resumed"));
        svc.close().unwrap();
        drop(svc);
        assert!(same(&parent_of(&leaf).unwrap(), &imgs[0]));
        assert_same(&view(&leaf), &model, &format!("seed {seed}: leaf file"));
    }
    // The kill points are meant to fall inside the job; most must.
    assert!(
        unfinished >= 4,
        "only {unfinished} kills fell inside the job"
    );
}

/// A job cancelled while the VM ran is finished by the offline call once the VM is off
/// (same job, the layers it had absorbed already still reported).
#[test]
fn cancelled_job_finishes_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (leaf, mut model) = build(root, MIDDLE + 2);
    let (vm, _, imgs) = layout(root);
    {
        let rt = runtime();
        let _g = rt.enter();
        let svc = start(root, &leaf);
        let chain = svc.chain(0).unwrap();
        fill(&chain, &mut model, 21, 17 * MIB + 1024);
        let job = svc.consolidate().unwrap().unwrap();
        svc.cancel_job(&job.id).unwrap();
        let j = wait_job(&svc, &job.id);
        assert!(matches!(j.state, MergeState::Cancelled { .. }), "{j:?}");
        svc.close().unwrap();
    }
    let cfg = [DiskConfig {
        path: leaf.clone(),
        read_only: false,
    }];
    let before = storage::DiskState::load(&vm).unwrap().unwrap().jobs;
    let e = offline::remove(&vm, "any").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "offline removal refused: {e}");
    let end = offline::consolidate(&vm, &cfg).unwrap().expect("the job");
    assert_eq!(end.id, before[0].id);
    assert_eq!(end.state, MergeState::Done, "{end:?}");
    assert_eq!(end.absorbed.len(), MIDDLE, "{end:?}");
    assert!(same(&parent_of(&leaf).unwrap(), &imgs[0]));
    assert_same(&view(&leaf), &model, "leaf after the offline finish");
}

/// Several disks: one job consolidates every writable disk in turn (disk 1's layers after
/// disk 0's); a read-only disk's chain is left as it is.
#[test]
fn every_writable_disk_of_the_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (vm, run, _) = layout(root);
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let disks: Vec<(PathBuf, Vec<u8>)> = (0..3)
        .map(|d| build(&root.join(format!("d{d}")), 3 + d))
        .collect();
    let cfg: Vec<DiskConfig> = disks
        .iter()
        .enumerate()
        .map(|(d, (leaf, _))| DiskConfig {
            path: leaf.clone(),
            read_only: d == 2,
        })
        .collect();
    let rt = runtime();
    let _g = rt.enter();
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    let pending: Vec<usize> = svc
        .consolidation_pending()
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(pending, [1, 2, 0]);
    let job = svc.consolidate().unwrap().unwrap();
    let end = wait_job(&svc, &job.id);
    assert_eq!(end.state, MergeState::Done, "{end:?}");
    assert_eq!(end.absorbed.len(), 3, "{end:?}");
    for (d, (_, model)) in disks.iter().enumerate() {
        let chain = svc.chain(d).unwrap();
        let want = if d == 2 { 5 } else { 2 };
        assert_eq!(chain.chain_paths().len(), want, "disk {d}");
        assert_same(&read_all(&chain), model, &format!("disk {d}"));
    }
    svc.close().unwrap();
}
