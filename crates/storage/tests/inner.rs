//! Removing an inner checkpoint (one with children) from a served disk while a writer keeps
//! writing: every child image takes over the removed layer, is re-pointed at its parent, and
//! shows exactly what it showed before; the running disk holds every acknowledged write; the
//! removed layer's file is gone; the same works offline and for a cancelled-then-resumed job.

use nbd::Export;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use storage::{offline, CheckpointKind, DiskChain, DiskConfig, DiskService, MergeKind, MergeState};
use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn setup(dir: &Path) -> (PathBuf, PathBuf, [DiskConfig; 1]) {
    let (vm, run, base) = (dir.join("vm"), dir.join("run"), dir.join("data.vhdx"));
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let opts = CreateOptions {
        size: SIZE,
        disk_type: DiskType::Dynamic,
        block_size: MIB as u32,
        ..Default::default()
    };
    Vhdx::create(&base, &opts).unwrap().close().unwrap();
    (
        vm,
        run,
        [DiskConfig {
            path: base,
            read_only: false,
        }],
    )
}

fn fill(chain: &DiskChain, model: &mut [u8], off: u64, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect();
    chain.write_at(&data, off, false).unwrap();
    model[off as usize..off as usize + len].copy_from_slice(&data);
}

fn view(p: &Path) -> Vec<u8> {
    let v = Vhdx::open(p, OpenOptions { read_only: true }).unwrap();
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

fn wait_done(svc: &DiskService) -> MergeState {
    for _ in 0..6000 {
        if let Some(j) = svc.state().jobs.last() {
            if !matches!(j.state, MergeState::Copying { .. }) {
                return j.state.clone();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("job did not end: {:?}", svc.state().jobs);
}

/// Writer thread: 4 KiB writes spread over the disk until stopped; returns them in order.
fn writer(chain: Arc<DiskChain>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(u64, u8)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) || i < 50 {
            let off = (i * 5 * MIB + i * 8192) % (SIZE - 4096);
            let b = (i % 200) as u8 + 40;
            chain.write_at(&[b; 4096], off, false).unwrap();
            out.push((off, b));
            i += 1;
        }
        out
    })
}

/// Tree a → b → c (writes between each), remove b while the VM runs on c and writes: c's
/// image (inside the running chain) takes over b's layer live. Then, with the service
/// stopped, apply b's sibling scenario: apply c, create d on it, remove c offline (its
/// children are d's image and the leaf). Every checkpoint and the running disk read back
/// their models; removed layers are deleted.
#[test]
fn remove_inner_checkpoint_live_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, run, cfg) = setup(dir.path());
    let rt = runtime();
    let _g = rt.enter();
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    let chain = svc.chain(0).unwrap();
    let mut m = vec![0u8; SIZE as usize];
    fill(&chain, &mut m, 0, (6 * MIB) as usize, 1);
    svc.create_checkpoint(Some("a".into()), CheckpointKind::Production, None)
        .unwrap();
    let ma = m.clone();
    fill(&chain, &mut m, 4 * MIB + 512, (9 * MIB) as usize, 2);
    fill(&chain, &mut m, 30 * MIB, 4096, 3);
    chain
        .write_zeroes(2 * MIB, MIB, Default::default())
        .unwrap();
    m[(2 * MIB) as usize..(3 * MIB) as usize].fill(0);
    svc.create_checkpoint(Some("b".into()), CheckpointKind::Production, None)
        .unwrap();
    let mb = m.clone();
    fill(&chain, &mut m, 8 * MIB, (3 * MIB) as usize, 4);
    svc.create_checkpoint(Some("c".into()), CheckpointKind::Production, None)
        .unwrap();
    let mc = m.clone();
    fill(&chain, &mut m, 40 * MIB, (2 * MIB) as usize, 5);
    let st = svc.state();
    let x = st.find("b").unwrap().images[0].clone();
    let c_img = st.find("c").unwrap().images[0].clone();
    assert_eq!(sha(&view(&x)), sha(&mb));

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(chain.clone(), stop.clone());
    let job = svc.remove_checkpoint("b").unwrap().expect("a merge job");
    assert_eq!(job.kind, MergeKind::IntoChildren);
    let end = wait_done(&svc);
    stop.store(true, Ordering::SeqCst);
    for (off, b) in w.join().unwrap() {
        m[off as usize..off as usize + 4096].fill(b);
    }
    assert_eq!(end, MergeState::Done, "{:?}", svc.state());
    let st = svc.state();
    let names: Vec<_> = st.checkpoints.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(
        st.find("c").unwrap().parent,
        Some(st.find("a").unwrap().id.clone())
    );
    assert!(!x.exists(), "removed layer deleted");
    let mut back = vec![0u8; SIZE as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert_eq!(sha(&back), sha(&m), "running disk after the live removal");
    assert!(!chain.chain_paths().contains(&x));
    // Checkpoint create works again (the chain is back to normal).
    svc.create_checkpoint(Some("d".into()), CheckpointKind::Production, None)
        .unwrap();
    let md = m.clone();
    fill(&chain, &mut m, 12 * MIB, MIB as usize, 6);
    svc.close().unwrap();
    drop(chain);
    drop(svc);
    assert_eq!(
        sha(&view(&c_img)),
        sha(&mc),
        "checkpoint c after removing b"
    );
    assert_eq!(sha(&view(&cfg[0].path)), sha(&ma), "checkpoint a");

    // Offline: the VM "runs" on c again with d as a sibling branch; c is inner (children: d's
    // image and the new leaf). Remove it with the service stopped.
    let c = offline::apply(&vm, "c").unwrap();
    assert_eq!(c.name, "c");
    let d_img = storage::DiskState::load(&vm)
        .unwrap()
        .unwrap()
        .find("d")
        .unwrap()
        .images[0]
        .clone();
    offline::remove(&vm, "c").unwrap();
    let st = storage::DiskState::load(&vm).unwrap().unwrap();
    assert!(st.find("c").is_none());
    assert_eq!(st.current, Some(st.find("a").unwrap().id.clone()));
    assert!(!c_img.exists());
    assert_eq!(
        sha(&view(&d_img)),
        sha(&md),
        "checkpoint d after removing c"
    );
    assert_eq!(
        sha(&view(&st.leaves[0])),
        sha(&mc),
        "running disk = c's state"
    );
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    let chain = svc.chain(0).unwrap();
    chain.read_at(&mut back, 0).unwrap();
    assert_eq!(sha(&back), sha(&mc));
    svc.close().unwrap();
}

/// The VM runs on the inner checkpoint itself (applied, with a child): the leaf absorbs the
/// layer live under writes, while the child's image (not in the running chain) is filled
/// offline; cancel then resume in between.
#[test]
fn remove_current_inner_checkpoint_with_cancel_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, run, cfg) = setup(dir.path());
    let rt = runtime();
    let _g = rt.enter();
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    let chain = svc.chain(0).unwrap();
    let mut m = vec![0u8; SIZE as usize];
    fill(&chain, &mut m, 0, (4 * MIB) as usize, 1);
    svc.create_checkpoint(Some("a".into()), CheckpointKind::Production, None)
        .unwrap();
    fill(&chain, &mut m, MIB, (20 * MIB) as usize, 2);
    svc.create_checkpoint(Some("b".into()), CheckpointKind::Production, None)
        .unwrap();
    let mb = m.clone();
    fill(&chain, &mut m, 10 * MIB, (5 * MIB) as usize, 3);
    svc.create_checkpoint(Some("c".into()), CheckpointKind::Production, None)
        .unwrap();
    let mc = m.clone();
    svc.close().unwrap();
    drop(chain);
    drop(svc);
    offline::apply(&vm, "b").unwrap();
    let st = storage::DiskState::load(&vm).unwrap().unwrap();
    let x = st.find("b").unwrap().images[0].clone();
    let c_img = st.find("c").unwrap().images[0].clone();

    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    let chain = svc.chain(0).unwrap();
    let mut m = mb.clone();
    fill(&chain, &mut m, 30 * MIB, MIB as usize, 9);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(chain.clone(), stop.clone());
    let job = svc.remove_checkpoint("b").unwrap().unwrap();
    let _ = svc.cancel_job(&job.id);
    let end = wait_done(&svc);
    if matches!(end, MergeState::Cancelled { .. }) {
        assert!(
            svc.state().find("b").is_some(),
            "cancel keeps the checkpoint"
        );
        let mut back = vec![0u8; SIZE as usize];
        chain.read_at(&mut back, 0).unwrap();
        svc.resume_job(&job.id).unwrap();
        assert_eq!(wait_done(&svc), MergeState::Done);
    } else {
        assert_eq!(end, MergeState::Done);
    }
    stop.store(true, Ordering::SeqCst);
    for (off, b) in w.join().unwrap() {
        m[off as usize..off as usize + 4096].fill(b);
    }
    let st = svc.state();
    assert!(st.find("b").is_none());
    assert_eq!(st.current, Some(st.find("a").unwrap().id.clone()));
    assert_eq!(st.find("c").unwrap().parent, st.current);
    let mut back = vec![0u8; SIZE as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert_eq!(sha(&back), sha(&m), "running disk");
    svc.close().unwrap();
    assert!(!x.exists());
    assert_eq!(sha(&view(&c_img)), sha(&mc), "checkpoint c");
    // A restart serves the same bytes through the re-pointed chain.
    let svc = DiskService::start(&vm, &run, &cfg).unwrap();
    svc.chain(0).unwrap().read_at(&mut back, 0).unwrap();
    assert_eq!(sha(&back), sha(&m), "after restart");
    svc.close().unwrap();
}
