//! Storage mirror (`storage::mirror`) under concurrent writers: a disk with a checkpoint is
//! mirrored into a directory (with the export switched to the new files) and over a byte
//! stream; every write made during the copy is in the destination (checked against an
//! in-memory model by SHA-256, and the new VHDX checked by `qemu-img check`); cancel and a
//! full destination (a small tmpfs) leave the source untouched and no partial files.

use nbd::Export;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use storage::mirror::{
    receive_chain, DirSink, DiskMirror, MirrorErrorKind, MirrorOptions, MirrorPhase, StreamSink,
};
use storage::{CheckpointKind, DiskChain, DiskConfig, DiskService};
use vhdx::{CreateOptions, DiskType, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const WRITERS: u64 = 4;

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// A VM directory with one 64 MiB dynamic VHDX (24 MiB of data) served by a
/// `DiskService`, then a production checkpoint (so the chain is base <- leaf) and 4 MiB
/// more written into the leaf. Returns (vm dir, service, model).
fn served_disk(rt: &tokio::runtime::Runtime, root: &Path) -> (Arc<DiskService>, Vec<u8>) {
    let src = root.join("src");
    let run = root.join("run");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let base = src.join("disk0.vhdx");
    let v = Vhdx::create(
        &base,
        &CreateOptions {
            size: SIZE,
            disk_type: DiskType::Dynamic,
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for (i, m) in model.chunks_mut(MIB as usize).enumerate().take(24) {
        m.fill(i as u8 + 1);
        v.write_at(m, i as u64 * MIB).unwrap();
    }
    v.close().unwrap();
    let _g = rt.enter();
    let svc = DiskService::start(
        root,
        &run,
        &[DiskConfig {
            path: base,
            read_only: false,
        }],
    )
    .unwrap();
    svc.create_checkpoint(Some("cp1".into()), CheckpointKind::Production, None)
        .unwrap();
    let c = svc.chain(0).unwrap();
    for i in 30..34u64 {
        let b = vec![0x70 + i as u8; MIB as usize];
        c.write_at(&b, i * MIB, false).unwrap();
        model[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&b);
    }
    (svc, model)
}

/// Writers hammering disjoint regions of the export with distinct patterns (4 KiB, mixed
/// with trims of 64 KiB), recording every acknowledged write in the shared model.
struct Writers {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn start_writers(chain: Arc<DiskChain>, model: Arc<Mutex<Vec<u8>>>) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads = (0..WRITERS)
        .map(|w| {
            let (c, m, s, n) = (chain.clone(), model.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                let region = SIZE / WRITERS;
                let mut seq = 0u64;
                while !s.load(Ordering::SeqCst) {
                    seq += 1;
                    let x = seq.wrapping_mul(2654435761).wrapping_add(w * 7919);
                    let off = w * region + (x % (region / 4096)) * 4096;
                    if seq.is_multiple_of(17) {
                        let off = off / (64 << 10) * (64 << 10);
                        let len = (64 << 10).min(w * region + region - off);
                        c.trim(off, len, false).unwrap();
                        m.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
                    } else {
                        let mut b = vec![(seq as u8) | 1; 4096];
                        b[..8].copy_from_slice(&seq.to_le_bytes());
                        b[8..16].copy_from_slice(&off.to_le_bytes());
                        // Model and disk updated under one lock: the model is what the
                        // disk holds once the write is acknowledged.
                        let mut g = m.lock().unwrap();
                        c.write_at(&b, off, false).unwrap();
                        g[off as usize..off as usize + 4096].copy_from_slice(&b);
                    }
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    Writers {
        stop,
        count,
        threads,
    }
}

impl Writers {
    fn wait_for(&self, n: u64) {
        let start = self.count.load(Ordering::Relaxed);
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while self.count.load(Ordering::Relaxed) < start + n {
            assert!(std::time::Instant::now() < end, "writers made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        self.count.load(Ordering::Relaxed)
    }
}

fn read_all(e: &dyn Export) -> Vec<u8> {
    let mut b = vec![0u8; e.size() as usize];
    e.read_at(&mut b, 0).unwrap();
    b
}

fn read_chain(leaf: &Path) -> Vec<u8> {
    let c = DiskChain::open(leaf, true).unwrap();
    let b = read_all(&c);
    c.close().unwrap();
    b
}

/// The base is checked by `qemu-img check` (QEMU opens no differencing VHDX), every
/// layer by the vhdx crate's checker (chain resolved, clean log, no errors).
fn check_images(files: &[PathBuf]) {
    for p in files {
        let r = vhdx::check(p, false).unwrap();
        assert!(
            r.errors.is_empty() && !r.log_replay_needed,
            "{}: {r:?}",
            p.display()
        );
    }
    let base = files.last().unwrap();
    let o = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(base)
        .output()
        .expect("qemu-img is missing: run scripts/setup.sh (qemu-utils)");
    assert!(
        o.status.success(),
        "qemu-img check {}: {}",
        base.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn move_to_directory_under_writers_switches_and_loses_nothing() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let (svc, model) = served_disk(&rt, tmp.path());
    let old_chain = svc.chain(0).unwrap().chain_paths();
    assert_eq!(old_chain.len(), 2);
    let model = Arc::new(Mutex::new(model));
    let w = start_writers(svc.chain(0).unwrap(), model.clone());
    w.wait_for(200);
    let dest = tmp.path().join("dest");
    let m = svc
        .mirror_disk(0, Box::new(DirSink::new(&dest)), MirrorOptions::default())
        .unwrap();
    // Checkpoints are refused while mirroring.
    let e = svc
        .create_checkpoint(None, CheckpointKind::Production, None)
        .unwrap_err();
    assert_eq!(e.kind(), storage::ErrorKind::Busy, "{e}");
    let p = m.wait_converged(Duration::from_secs(60));
    assert!(p.converged, "{p:?}");
    assert!(p.bytes_copied >= 28 * MIB, "{p:?}");
    w.wait_for(500);
    // Writers keep going through the switch.
    let out = svc.complete_move(0, m).unwrap();
    w.wait_for(200);
    let n = w.stop();
    assert!(n > 900);
    assert_eq!(out.files.len(), 2);
    assert!(out.files.iter().all(|f| f.starts_with(&dest)));
    // The export serves the new chain, and the state file names it.
    let c = svc.chain(0).unwrap();
    assert_eq!(c.chain_paths(), out.files);
    assert_eq!(svc.state().leaves[0], out.files[0]);
    assert!(svc.state().checkpoints[0].images[0].starts_with(&dest));
    let want = sha(&model.lock().unwrap());
    assert_eq!(sha(&read_all(c.as_ref())), want);
    // The old files are intact but no longer used; the new ones stand alone.
    svc.close().unwrap();
    for f in &old_chain {
        assert!(f.exists());
        std::fs::remove_file(f).unwrap();
    }
    check_images(&out.files);
    assert_eq!(sha(&read_chain(&out.files[0])), want);
}

#[test]
fn stream_sink_receiver_gets_a_verified_copy() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let (svc, model) = served_disk(&rt, tmp.path());
    let model = Arc::new(Mutex::new(model));
    let w = start_writers(svc.chain(0).unwrap(), model.clone());
    w.wait_for(200);
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let dest = tmp.path().join("remote");
    let d2 = dest.clone();
    let recv = rt.spawn(async move { receive_chain(&mut b, &d2).await });
    let sink = StreamSink::new(rt.handle().clone(), a);
    let m = svc
        .mirror_disk(0, Box::new(sink), MirrorOptions::default())
        .unwrap();
    assert!(m.wait_converged(Duration::from_secs(60)).converged);
    w.wait_for(300);
    // Host migration: writers stop (the guest is paused), then complete.
    let n = w.stop();
    assert!(n > 500);
    let out = m.complete().unwrap();
    let got = rt.block_on(recv).unwrap().unwrap();
    assert_eq!(got, out.files);
    // The source still serves and nothing moved there.
    let c = svc.chain(0).unwrap();
    assert!(c.leaf().unwrap().starts_with(tmp.path().join("src")));
    let want = sha(&model.lock().unwrap());
    assert_eq!(sha(&read_all(c.as_ref())), want);
    assert_eq!(sha(&read_chain(&got[0])), want);
    check_images(&got);
    // Mirroring ended: checkpoints work again.
    svc.create_checkpoint(None, CheckpointKind::Production, None)
        .unwrap();
    svc.close().unwrap();
}

#[test]
fn cancel_leaves_source_untouched_and_no_partial_files() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let (svc, model) = served_disk(&rt, tmp.path());
    let before = files_in(&tmp.path().join("src"));
    let dest = tmp.path().join("dest");
    let opts = MirrorOptions {
        max_bytes_per_sec: Some(8 * MIB),
        ..Default::default()
    };
    let m = svc
        .mirror_disk(0, Box::new(DirSink::new(&dest)), opts)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let p = m.progress();
    assert_eq!(p.phase, MirrorPhase::Frozen, "{p:?}");
    assert!(p.bytes_copied > 0 && p.bytes_remaining > 0, "{p:?}");
    m.cancel().unwrap();
    assert!(!dest.exists(), "left {:?}", files_in(&dest));
    assert_eq!(files_in(&tmp.path().join("src")), before);
    let c = svc.chain(0).unwrap();
    assert_eq!(sha(&read_all(c.as_ref())), sha(&model));
    // Dropping a running mirror cancels it too; an existing destination file is refused.
    let m = svc
        .mirror_disk(0, Box::new(DirSink::new(&dest)), MirrorOptions::default())
        .unwrap();
    drop(m);
    assert!(!dest.exists());
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("disk0.vhdx"), b"keep").unwrap();
    let e = svc
        .mirror_disk(0, Box::new(DirSink::new(&dest)), MirrorOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.kind(), MirrorErrorKind::InvalidInput, "{e}");
    assert_eq!(std::fs::read(dest.join("disk0.vhdx")).unwrap(), b"keep");
    assert_eq!(files_in(&dest), vec!["disk0.vhdx".to_string()]);
    svc.close().unwrap();
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_destination_is_a_clean_error() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let (svc, model) = served_disk(&rt, tmp.path());
    let small = tmp.path().join("small");
    let _fs = Tmpfs::mount(&small, "12m");
    // Directory sink.
    let dest = small.join("d");
    let m = svc
        .mirror_disk(0, Box::new(DirSink::new(&dest)), MirrorOptions::default())
        .unwrap();
    let _ = m.wait_converged(Duration::from_secs(30));
    let e = m.complete().unwrap_err();
    assert_eq!(e.kind(), MirrorErrorKind::DiskFull, "{}", e.full_message());
    assert!(!dest.exists(), "left {:?}", files_in(&dest));
    // Stream: the receiver reports it, the sender gets the same class.
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let d2 = small.join("r");
    let recv = rt.spawn(async move { receive_chain(&mut b, &d2).await });
    let m = svc
        .mirror_disk(
            0,
            Box::new(StreamSink::new(rt.handle().clone(), a)),
            MirrorOptions::default(),
        )
        .unwrap();
    let _ = m.wait_converged(Duration::from_secs(30));
    let e = m.complete().unwrap_err();
    assert_eq!(e.kind(), MirrorErrorKind::DiskFull, "{}", e.full_message());
    let re = rt.block_on(recv).unwrap().unwrap_err();
    assert_eq!(
        re.kind(),
        MirrorErrorKind::DiskFull,
        "{}",
        re.full_message()
    );
    assert!(files_in(&small.join("r")).is_empty());
    // The source is untouched and serves on.
    let c = svc.chain(0).unwrap();
    assert_eq!(sha(&read_all(c.as_ref())), sha(&model));
    assert!(c.leaf().unwrap().starts_with(tmp.path().join("src")));
    svc.close().unwrap();
}

#[test]
fn mirror_start_is_refused_twice() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let (svc, _) = served_disk(&rt, tmp.path());
    let m = svc
        .mirror_disk(
            0,
            Box::new(DirSink::new(tmp.path().join("a"))),
            MirrorOptions::default(),
        )
        .unwrap();
    let e = DiskMirror::start(
        svc.chain(0).unwrap(),
        Box::new(DirSink::new(tmp.path().join("b"))),
        MirrorOptions::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), MirrorErrorKind::Busy);
    assert!(!tmp.path().join("b").exists());
    m.cancel().unwrap();
    svc.close().unwrap();
}

/// How [`Corrupt`] damages the copy.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flips a byte of the first frozen-layer chunk on its way to the sink.
    FrozenByte,
    /// Flips a byte of the first active-layer write.
    ActiveByte,
    /// Writes a MiB at the destination where the source's leaf holds nothing.
    ExtraMib,
}

/// A [`DirSink`] whose input is damaged once, as a faulty transport or disk would.
struct Corrupt {
    inner: DirSink,
    damage: Damage,
    done: bool,
}

impl storage::mirror::MirrorSink for Corrupt {
    fn begin(&mut self, plan: &storage::mirror::ChainPlan) -> storage::mirror::MirrorResult<()> {
        self.inner.begin(plan)
    }
    fn file_data(&mut self, l: usize, off: u64, d: &[u8]) -> storage::mirror::MirrorResult<()> {
        if matches!(self.damage, Damage::FrozenByte) && !self.done && d.len() > 100 {
            self.done = true;
            let mut b = d.to_vec();
            b[100] ^= 1;
            return self.inner.file_data(l, off, &b);
        }
        self.inner.file_data(l, off, d)
    }
    fn file_end(&mut self, l: usize, len: u64, crc: u32) -> storage::mirror::MirrorResult<()> {
        self.inner.file_end(l, len, crc)
    }
    fn activate(&mut self) -> storage::mirror::MirrorResult<()> {
        self.inner.activate()?;
        if matches!(self.damage, Damage::ExtraMib) {
            // The source's leaf holds 30..34 MiB and the writers' regions, never 60 MiB.
            self.inner.write(60 * MIB, &vec![0x5a; MIB as usize])?;
        }
        Ok(())
    }
    fn write(&mut self, off: u64, d: &[u8]) -> storage::mirror::MirrorResult<()> {
        if matches!(self.damage, Damage::ActiveByte) && !self.done && !d.is_empty() {
            self.done = true;
            let mut b = d.to_vec();
            b[0] ^= 1;
            return self.inner.write(off, &b);
        }
        self.inner.write(off, d)
    }
    fn zero(&mut self, off: u64, len: u64) -> storage::mirror::MirrorResult<()> {
        self.inner.zero(off, len)
    }
    fn flush(&mut self) -> storage::mirror::MirrorResult<()> {
        self.inner.flush()
    }
    fn checksums(&mut self) -> storage::mirror::MirrorResult<Vec<u32>> {
        self.inner.checksums()
    }
    fn held_checksums(&mut self, c: &[u64]) -> storage::mirror::MirrorResult<Vec<(u64, u32)>> {
        self.inner.held_checksums(c)
    }
    fn commit(&mut self) -> storage::mirror::MirrorResult<Vec<PathBuf>> {
        self.inner.commit()
    }
    fn abort(&mut self) {
        self.inner.abort()
    }
}

/// Verification still covers every byte after its optimizations: a flipped byte in a
/// frozen layer (caught by the CRC of the bytes received), in the active layer, or data
/// the destination holds where the source's leaf holds none (caught by the per-MiB
/// comparison over the ranges either active layer holds) fails the move with `Verify`;
/// the export stays on the source, unchanged, and no destination file is left.
#[test]
fn damaged_copy_fails_verification_and_changes_nothing() {
    let rt = rt();
    for damage in [Damage::FrozenByte, Damage::ActiveByte, Damage::ExtraMib] {
        let tmp = tempfile::tempdir().unwrap();
        let (svc, model) = served_disk(&rt, tmp.path());
        let old_chain = svc.chain(0).unwrap().chain_paths();
        let dest = tmp.path().join("dest");
        let sink = Corrupt {
            inner: DirSink::new(&dest),
            damage,
            done: false,
        };
        let m = svc
            .mirror_disk(0, Box::new(sink), MirrorOptions::default())
            .unwrap();
        m.wait_converged(Duration::from_secs(60));
        let e = svc.complete_move(0, m).unwrap_err();
        assert_eq!(e.kind(), MirrorErrorKind::Verify, "{damage:?}: {e}");
        let c = svc.chain(0).unwrap();
        assert_eq!(c.chain_paths(), old_chain, "{damage:?}");
        assert_eq!(sha(&read_all(c.as_ref())), sha(&model), "{damage:?}");
        assert!(
            files_in(&dest).is_empty(),
            "{damage:?}: {:?}",
            files_in(&dest)
        );
        // Mirroring ended: checkpoints work again.
        svc.create_checkpoint(None, CheckpointKind::Production, None)
            .unwrap();
        svc.close().unwrap();
    }
}
