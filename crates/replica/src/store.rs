//! The replica side: a VM's recovery points as a chain of VHDX layers in one directory,
//! and the atomic application of a cycle.
//!
//! ```text
//!  <dir>/replica.json            state (format_version, vm, disk sizes, points); temp+fsync+rename
//!  <dir>/base/disk<i>.vhdx       point 0 (initial replication)
//!  <dir>/p-<seq>/disk<i>.avhdx   point <seq>: differencing layer on point <seq-1>
//!  <dir>/incoming-<seq>/         a cycle being applied (not a point)
//! ```
//!
//! Applying cycle `n`: the whole cycle is read and validated first ([`read_cycle`]); new
//! differencing layers are created in `incoming-<n>/` on top of the latest point, written,
//! flushed and closed; the directory is renamed to `p-<n>`; only then is `replica.json`
//! rewritten to list point `n`. A crash anywhere before that last rename leaves
//! `replica.json` listing point `n - 1` only, and [`ReplicaStore::open`] removes every
//! directory it does not list: a cycle is applied wholly or not at all.
//!
//! Initial replication: until the first complete cycle, partial cycles (no common cut)
//! are written in place into the base, which is never a recovery point ([`ReplicaStore::points`]
//! excludes it). They are validated record by record as they are written (the replica
//! applies them while they stream in); one that fails half way leaves grains in the base
//! that the primary still has marked and sends again, and does not move the sequence.
//!
//! Retention ([`points_to_drop`]): the latest point, plus the newest point of each of the
//! newest `max_points` buckets (an hour in production), plus the newest
//! application-consistent point of each of those buckets, plus pinned points. A dropped
//! point's layers are absorbed by the next point's layers, which are re-pointed below it
//! (`vhdx::absorb_parent`): the cost is the dropped layer's own data, never the base's.

use crate::cycle::{CycleError, CycleReader};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Version of `replica.json`; another version is refused.
pub const FORMAT_VERSION: u32 = 1;
const STATE: &str = "replica.json";

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Sequence number of the cycle that made it (0: initial copy).
    pub seq: u64,
    /// Unix milliseconds of the cut it shows.
    pub cut_unix_ms: u64,
    /// Directory of its layers, relative to the store.
    pub dir: String,
    /// File name of each disk's layer in `dir`.
    pub files: Vec<String>,
    /// Cut with the guest's file systems frozen (application-consistent).
    #[serde(default)]
    pub app_consistent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    format_version: u32,
    vm: String,
    disk_sizes: Vec<u64>,
    max_points: usize,
    points: Vec<Point>,
    /// Initial replication is running: the base holds partial cycles, no recovery point yet.
    #[serde(default)]
    initializing: bool,
    /// Retention bucket in milliseconds (one point kept per bucket; 0: every point its own).
    #[serde(default)]
    bucket_ms: u64,
    /// Points retention must keep (a VM or a test copy runs on them).
    #[serde(default)]
    pinned: Vec<u64>,
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The cycle was refused.
    #[error(transparent)]
    Cycle(#[from] CycleError),
    /// The input does not fit this replica (a cycle, an export, an existing copy).
    #[error("{0}")]
    Mismatch(String),
    /// An image operation failed.
    #[error("{op} {path}")]
    Image {
        /// What was being done.
        op: &'static str,
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<vhdx::Error>,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file cannot be used.
    #[error("state {path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Test fault injection.
    #[error("fault injected after {0} blocks")]
    Fault(usize),
}

/// Class of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input (damaged cycle, wrong VM, wrong sequence).
    InvalidInput,
    /// File or image I/O.
    Io,
    /// Persisted state unreadable.
    Corrupt,
}

impl StoreError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Cycle(CycleError::Invalid(_)) | StoreError::Mismatch(_) => {
                ErrorKind::InvalidInput
            }
            StoreError::State { .. } => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn img<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(vhdx::Error) -> StoreError + 'a {
    move |source| StoreError::Image {
        op,
        path: path.to_path_buf(),
        source: Box::new(source),
    }
}

/// Replaces `dir/name` with `data` so that a crash leaves the old or the new file, never
/// a part: a temporary file, fsync, rename, directory fsync.
pub(crate) fn write_durably(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let p = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(data).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, &p).map_err(io("renaming into", &p))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

/// The recovery points of one replicated VM.
pub struct ReplicaStore {
    dir: PathBuf,
    st: State,
}

impl ReplicaStore {
    /// Refuses a directory that already holds a store.
    fn refuse_existing(dir: &Path) -> Result<()> {
        if dir.join(STATE).exists() {
            return Err(StoreError::Mismatch(format!(
                "{} already holds a replica",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Records a new store whose point 0 is `files` in `base/`, and saves it.
    fn with_base(
        dir: &Path,
        vm: &str,
        disk_sizes: &[u64],
        max_points: usize,
        files: Vec<String>,
        initializing: bool,
    ) -> Result<Self> {
        let s = ReplicaStore {
            dir: dir.to_path_buf(),
            st: State {
                format_version: FORMAT_VERSION,
                vm: vm.to_string(),
                disk_sizes: disk_sizes.to_vec(),
                max_points: max_points.max(1),
                points: vec![Point {
                    seq: 0,
                    cut_unix_ms: 0,
                    dir: "base".into(),
                    files,
                    app_consistent: false,
                }],
                initializing,
                bucket_ms: 0,
                pinned: Vec::new(),
            },
        };
        s.save()?;
        Ok(s)
    }

    /// Creates a store for `vm` with empty base disks of `disk_sizes` (point 0), keeping at
    /// most `max_points` points (at least 1).
    pub fn create(dir: &Path, vm: &str, disk_sizes: &[u64], max_points: usize) -> Result<Self> {
        Self::refuse_existing(dir)?;
        let base = dir.join("base");
        std::fs::create_dir_all(&base).map_err(io("creating", &base))?;
        let mut files = Vec::new();
        for (i, &size) in disk_sizes.iter().enumerate() {
            let name = format!("disk{i}.vhdx");
            let p = base.join(&name);
            let _ = std::fs::remove_file(&p);
            let v = vhdx::Vhdx::create(
                &p,
                &vhdx::CreateOptions {
                    size,
                    block_size: 1 << 20,
                    ..Default::default()
                },
            )
            .map_err(img("creating", &p))?;
            v.close().map_err(img("closing", &p))?;
            files.push(name);
        }
        Self::with_base(dir, vm, disk_sizes, max_points, files, true)
    }

    /// Creates a store for `vm` whose base (point 0, a complete copy, not initializing) is
    /// a differencing layer on each existing image in `parents`: the disks of a VM that
    /// holds exactly the state the primary starts from (reverse replication after a planned
    /// failover, or an initial copy that already sits on this host). The parents are never
    /// written again; each must have the size in `disk_sizes`.
    pub fn create_over(
        dir: &Path,
        vm: &str,
        parents: &[PathBuf],
        disk_sizes: &[u64],
        max_points: usize,
    ) -> Result<Self> {
        Self::over(dir, vm, parents, disk_sizes, max_points, false)
    }

    /// Creates a store for `vm` whose base is a differencing layer on each image in
    /// `parents` that holds an *unknown* older state of the primary's disks (an old
    /// primary whose disks diverged after an unplanned failover, or an existing copy):
    /// the store is initializing; the primary compares checksums
    /// ([`crate::resync`]) against the base and its partial cycles write only the
    /// differing blocks into the base; the first complete cycle is the first point.
    pub fn create_resync_over(
        dir: &Path,
        vm: &str,
        parents: &[PathBuf],
        disk_sizes: &[u64],
        max_points: usize,
    ) -> Result<Self> {
        Self::over(dir, vm, parents, disk_sizes, max_points, true)
    }

    fn over(
        dir: &Path,
        vm: &str,
        parents: &[PathBuf],
        disk_sizes: &[u64],
        max_points: usize,
        initializing: bool,
    ) -> Result<Self> {
        Self::refuse_existing(dir)?;
        if parents.len() != disk_sizes.len() {
            return Err(StoreError::Mismatch(format!(
                "{} disks here, the primary has {}",
                parents.len(),
                disk_sizes.len()
            )));
        }
        let base = dir.join("base");
        std::fs::create_dir_all(&base).map_err(io("creating", &base))?;
        let mut files = Vec::new();
        for (i, (parent, &size)) in parents.iter().zip(disk_sizes).enumerate() {
            let name = format!("disk{i}.avhdx");
            let p = base.join(&name);
            let _ = std::fs::remove_file(&p);
            let v = vhdx::Vhdx::create(
                &p,
                &vhdx::CreateOptions {
                    disk_type: vhdx::DiskType::Differencing,
                    parent: Some(parent.clone()),
                    ..Default::default()
                },
            )
            .map_err(img("creating a layer on", parent))?;
            let got = v.size();
            v.close().map_err(img("closing", &p))?;
            if got != size {
                let _ = std::fs::remove_dir_all(&base);
                return Err(StoreError::Mismatch(format!(
                    "disk {i} ({}) has {got} bytes, the primary's has {size}",
                    parent.display()
                )));
            }
            files.push(name);
        }
        Self::with_base(dir, vm, disk_sizes, max_points, files, initializing)
    }

    /// Opens a store, removing any directory its state does not list (a cycle whose
    /// application was interrupted, a dropped point whose deletion was).
    pub fn open(dir: &Path) -> Result<Self> {
        let s = Self::peek(dir)?;
        for e in std::fs::read_dir(dir)
            .map_err(io("listing", dir))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let is_layer_dir = name.starts_with("incoming-") || name.starts_with("p-");
            if is_layer_dir && !s.st.points.iter().any(|pt| pt.dir == name) {
                tracing::info!(dir = %name, "removing an unfinished cycle or dropped point");
                std::fs::remove_dir_all(e.path()).map_err(io("removing", &e.path()))?;
            }
        }
        Ok(s)
    }

    /// Reads a store's state without touching its directory (status readers, which do not
    /// hold the lock a cycle is applied under: [`ReplicaStore::open`] would remove the
    /// layers of a cycle being applied).
    pub fn peek(dir: &Path) -> Result<Self> {
        let p = dir.join(STATE);
        let b = std::fs::read(&p).map_err(io("reading", &p))?;
        let st: State = serde_json::from_slice(&b).map_err(|e| StoreError::State {
            path: p.clone(),
            why: e.to_string(),
        })?;
        if st.format_version != FORMAT_VERSION {
            return Err(StoreError::State {
                path: p,
                why: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    st.format_version
                ),
            });
        }
        Ok(ReplicaStore {
            dir: dir.to_path_buf(),
            st,
        })
    }

    fn save(&self) -> Result<()> {
        let p = self.dir.join(STATE);
        let data = serde_json::to_vec_pretty(&self.st).map_err(|e| StoreError::State {
            path: p.clone(),
            why: e.to_string(),
        })?;
        write_durably(&self.dir, STATE, &data)
    }

    /// The replicated VM.
    pub fn vm(&self) -> &str {
        &self.st.vm
    }

    /// Recovery points, oldest first (the base, which holds the initial copy, is not one).
    pub fn points(&self) -> &[Point] {
        &self.st.points[1..]
    }

    /// Initial replication has not completed yet: there is no recovery point.
    pub fn initializing(&self) -> bool {
        self.st.initializing
    }

    /// Disk sizes.
    pub fn disk_sizes(&self) -> &[u64] {
        &self.st.disk_sizes
    }

    /// Store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets the retention: keep the newest point of each of the newest `points` buckets of
    /// `bucket_ms` milliseconds (the latest point is always kept; `bucket_ms` 0 keeps the
    /// newest `points` points). Takes effect at the next cycle.
    pub fn set_retention(&mut self, points: usize, bucket_ms: u64) -> Result<()> {
        self.st.max_points = points.max(1);
        self.st.bucket_ms = bucket_ms;
        self.save()
    }

    /// Keeps point `seq` from being pruned (a VM runs on it) or releases it.
    pub fn pin(&mut self, seq: u64, pinned: bool) -> Result<()> {
        self.st.pinned.retain(|&s| s != seq);
        if pinned {
            self.st.pinned.push(seq);
        }
        self.save()
    }

    /// The newest point.
    pub fn latest(&self) -> &Point {
        // Invariant: a store always has at least point 0 (or the point that replaced it).
        &self.st.points[self.st.points.len() - 1]
    }

    /// Leaf layer of each disk of point `seq` (open them read-only, or create a
    /// differencing layer on them to run a VM from the point).
    pub fn point_paths(&self, seq: u64) -> Option<Vec<PathBuf>> {
        let p = self.st.points.iter().find(|p| p.seq == seq)?;
        Some(
            p.files
                .iter()
                .map(|f| self.dir.join(&p.dir).join(f))
                .collect(),
        )
    }

    /// Reads, validates and applies a cycle: a complete one atomically (a new point or
    /// nothing), a partial one into the base as its records stream in (module docs);
    /// returns the new point.
    pub fn apply(&mut self, r: impl Read) -> Result<Point> {
        self.apply_inner(r, None, None)
    }

    /// [`ReplicaStore::apply`] that fails after writing `blocks` blocks (tests of atomicity).
    #[doc(hidden)]
    pub fn apply_with_fault(&mut self, r: impl Read, blocks: usize) -> Result<Point> {
        self.apply_inner(r, Some(blocks), None)
    }

    /// [`ReplicaStore::apply`] that waits `pause` once the new layers are written and
    /// before they become the point (tests that kill the host mid-apply).
    #[doc(hidden)]
    pub fn apply_with_pause(&mut self, r: impl Read, pause: std::time::Duration) -> Result<Point> {
        self.apply_inner(r, None, Some(pause))
    }

    fn apply_inner(
        &mut self,
        r: impl Read,
        fault: Option<usize>,
        pause: Option<std::time::Duration>,
    ) -> Result<Point> {
        let mut cr = CycleReader::new(r)?;
        if cr.header().partial {
            return self.apply_partial(cr, fault);
        }
        // A complete cycle is validated whole before anything is written.
        let h = cr.header().clone();
        let mut blocks = Vec::new();
        while let Some(b) = cr.next_block()? {
            blocks.push(b);
        }
        self.check_header(&h)?;
        let latest = self.latest().clone();
        let parents = self.point_paths(latest.seq).unwrap_or_default();
        let inc_name = format!("incoming-{}", h.seq);
        let inc = self.dir.join(&inc_name);
        if inc.exists() {
            std::fs::remove_dir_all(&inc).map_err(io("removing", &inc))?;
        }
        std::fs::create_dir_all(&inc).map_err(io("creating", &inc))?;
        let mut layers = Vec::new();
        let mut files = Vec::new();
        for (i, parent) in parents.iter().enumerate() {
            let name = format!("disk{i}.avhdx");
            let p = inc.join(&name);
            let v = vhdx::Vhdx::create(
                &p,
                &vhdx::CreateOptions {
                    disk_type: vhdx::DiskType::Differencing,
                    parent: Some(parent.clone()),
                    ..Default::default()
                },
            )
            .map_err(img("creating", &p))?;
            layers.push((v, p));
            files.push(name);
        }
        for (n, b) in blocks.iter().enumerate() {
            if fault == Some(n) {
                return Err(StoreError::Fault(n));
            }
            let (v, p) = &layers[b.disk as usize];
            match &b.data {
                Some(d) => v.write_at(d, b.off).map_err(img("writing", p))?,
                None => v
                    .write_zeroes(b.off, u64::from(b.len))
                    .map_err(img("zeroing", p))?,
            }
        }
        for (v, p) in layers {
            v.flush().map_err(img("flushing", &p))?;
            v.close().map_err(img("closing", &p))?;
        }
        sync_dir(&inc)?;
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
        let dir_name = format!("p-{}", h.seq);
        let dst = self.dir.join(&dir_name);
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(io("removing", &dst))?;
        }
        // Parent locators hold relative paths from the child (`../p-<n-1>/..`), valid after
        // the rename because both stay in the store directory.
        std::fs::rename(&inc, &dst).map_err(io("renaming", &inc))?;
        sync_dir(&self.dir)?;
        let point = Point {
            seq: h.seq,
            cut_unix_ms: h.cut_unix_ms,
            dir: dir_name,
            files,
            app_consistent: h.app_consistent,
        };
        self.st.points.push(point.clone());
        let was_initializing = self.st.initializing;
        self.st.initializing = false;
        if let Err(e) = self.save() {
            self.st.points.pop();
            self.st.initializing = was_initializing;
            return Err(e);
        }
        tracing::info!(vm = %self.st.vm, seq = h.seq, blocks = blocks.len(), "applied a replication cycle");
        // The cycle is applied (the point is listed): a retention failure must not make
        // the primary resend it. Dropping is idempotent and retried after the next cycle.
        if let Err(e) = self.prune() {
            tracing::warn!(vm = %self.st.vm, "dropping old recovery points: {}", crate::error_chain(&e));
        }
        Ok(point)
    }

    fn check_header(&self, h: &crate::cycle::CycleHeader) -> Result<()> {
        if h.vm != self.st.vm {
            return Err(StoreError::Mismatch(format!(
                "the cycle is for VM {:?}, this replica holds {:?}",
                h.vm, self.st.vm
            )));
        }
        if h.disk_sizes != self.st.disk_sizes {
            return Err(StoreError::Mismatch(format!(
                "the cycle's disks {:?} differ from the replica's {:?}",
                h.disk_sizes, self.st.disk_sizes
            )));
        }
        if h.seq != self.latest().seq + 1 {
            return Err(StoreError::Mismatch(format!(
                "cycle {} does not follow the latest point {} (a resync is needed)",
                h.seq,
                self.latest().seq
            )));
        }
        Ok(())
    }

    /// A partial cycle of the initial replication: written in place into the base as its
    /// records arrive and validate (it is not a recovery point, so atomicity does not
    /// matter; the writes are idempotent and the primary resends what was not
    /// acknowledged). It counts as applied, and is acknowledged, only once the end record
    /// validated and the base is flushed: streaming it overlaps the network with the writes.
    fn apply_partial<R: Read>(
        &mut self,
        mut cr: CycleReader<R>,
        fault: Option<usize>,
    ) -> Result<Point> {
        let h = cr.header().clone();
        self.check_header(&h)?;
        if !self.st.initializing || self.st.points.len() != 1 {
            return Err(StoreError::Mismatch(
                "a partial (initial replication) cycle, but initial replication is complete".into(),
            ));
        }
        let paths = self.point_paths(self.latest().seq).unwrap_or_default();
        let mut layers = Vec::new();
        for p in &paths {
            let v = vhdx::Vhdx::open(p, vhdx::OpenOptions { read_only: false })
                .map_err(img("opening", p))?;
            layers.push(v);
        }
        let mut n = 0usize;
        while let Some(b) = cr.next_block()? {
            if fault == Some(n) {
                return Err(StoreError::Fault(n));
            }
            n += 1;
            let (v, p) = (&layers[b.disk as usize], &paths[b.disk as usize]);
            match &b.data {
                Some(d) => v.write_at(d, b.off).map_err(img("writing", p))?,
                None => v
                    .write_zeroes(b.off, u64::from(b.len))
                    .map_err(img("zeroing", p))?,
            }
        }
        for (v, p) in layers.into_iter().zip(&paths) {
            v.flush().map_err(img("flushing", p))?;
            v.close().map_err(img("closing", p))?;
        }
        self.st.points[0].seq = h.seq;
        self.st.points[0].cut_unix_ms = h.cut_unix_ms;
        self.save()?;
        tracing::info!(vm = %self.st.vm, seq = h.seq, blocks = n, "applied a partial (initial replication) cycle");
        Ok(self.st.points[0].clone())
    }

    /// Drops the points retention does not keep (see [`ReplicaStore::set_retention`]): a
    /// dropped point's layers are absorbed by the next point's layers, which are then
    /// re-pointed below it (`vhdx::absorb_parent`): the cost is the dropped layer's data,
    /// never the base's. The base and the latest point stay.
    fn prune(&mut self) -> Result<()> {
        let drop = points_to_drop(
            &self.st.points[1..],
            self.st.max_points,
            self.st.bucket_ms,
            &self.st.pinned,
        );
        for seq in drop {
            let Some(i) = self.st.points.iter().position(|p| p.seq == seq) else {
                continue;
            };
            if i == 0 || i + 1 >= self.st.points.len() {
                continue;
            }
            let (old, next) = (self.st.points[i].clone(), self.st.points[i + 1].clone());
            // A layer a VM runs on (a test copy, a failed-over VM) is locked: that point
            // stays until the VM is gone; the others are still dropped.
            let absorbed = next.files.iter().zip(&old.files).try_for_each(|(f, of)| {
                let child = self.dir.join(&next.dir).join(f);
                let parent = self.dir.join(&old.dir).join(of);
                absorb(&child, &parent)
                    .map(|_| ())
                    .map_err(img("absorbing the dropped point into", &child))
            });
            if let Err(e) = absorbed {
                tracing::debug!(seq, "point not dropped yet: {}", crate::error_chain(&e));
                continue;
            }
            self.st.points.remove(i);
            self.save()?;
            let od = self.dir.join(&old.dir);
            if let Err(e) = std::fs::remove_dir_all(&od) {
                tracing::warn!("removing dropped point {}: {e}", od.display());
            }
        }
        Ok(())
    }
}

/// `child` takes over what its parent `expected_parent` holds and is re-pointed at the
/// grandparent (opened by its canonical path, so the recorded relative locator does not
/// pass through the dropped point's directory). `Ok(false)`: already done.
fn absorb(child: &Path, expected_parent: &Path) -> vhdx::Result<bool> {
    let v = vhdx::Vhdx::open(child, vhdx::OpenOptions { read_only: false })?;
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let Some(parent) = v.parent().cloned() else {
        return Err(vhdx::Error::Unsupported(format!(
            "{} has no parent",
            child.display()
        )));
    };
    if canon(parent.path()) != canon(expected_parent) {
        return Ok(false);
    }
    let Some(grand) = parent.parent().cloned() else {
        return Err(vhdx::Error::Unsupported(format!(
            "{} has no parent",
            parent.path().display()
        )));
    };
    let size = v.size();
    let mut off = 0;
    while off < size {
        let n = (4u64 << 20).min(size - off);
        v.pull_from_parent(off, n)?;
        off += n;
    }
    let g = vhdx::Vhdx::open(canon(grand.path()), vhdx::OpenOptions { read_only: true })?;
    v.set_parent(&g)?;
    v.close()?;
    Ok(true)
}

/// Retention policy (pure): the sequence numbers of `points` (oldest first) to drop when
/// the newest point of each of the newest `keep` buckets of `bucket_ms` is kept (bucket 0:
/// each point is its own bucket), plus the latest point and the `pinned` ones. A bucket
/// whose newest point is crash-consistent also keeps its newest application-consistent
/// point, so the schedule of those is never thinned away by the hourly one.
pub fn points_to_drop(points: &[Point], keep: usize, bucket_ms: u64, pinned: &[u64]) -> Vec<u64> {
    let mut kept_buckets: Vec<u64> = Vec::new();
    // Buckets (among the kept ones) that already hold an application-consistent point.
    let mut app_buckets: Vec<u64> = Vec::new();
    let mut drop = Vec::new();
    for (n, p) in points.iter().rev().enumerate() {
        let bucket = p.cut_unix_ms.checked_div(bucket_ms).unwrap_or(p.seq);
        let keep_it = if n == 0 {
            kept_buckets.push(bucket);
            true
        } else if kept_buckets.contains(&bucket) {
            p.app_consistent && !app_buckets.contains(&bucket)
        } else if kept_buckets.len() < keep.max(1) {
            kept_buckets.push(bucket);
            true
        } else {
            false
        };
        if keep_it && p.app_consistent {
            app_buckets.push(bucket);
        }
        if !keep_it && !pinned.contains(&p.seq) {
            drop.push(p.seq);
        }
    }
    drop.reverse();
    drop
}
