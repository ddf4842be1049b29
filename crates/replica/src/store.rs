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
//! Retention: at most `max_points` points are kept; the oldest is dropped by merging the
//! whole chain below the next point into that point's layers (`vhdx::merge_into_child`,
//! which keeps the layer's identity so the points above stay linked). That copies the
//! base's data once per dropped point: correct, but costly for large disks.

use crate::cycle::{read_cycle, CycleError};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    format_version: u32,
    vm: String,
    disk_sizes: Vec<u64>,
    max_points: usize,
    points: Vec<Point>,
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The cycle was refused.
    #[error(transparent)]
    Cycle(#[from] CycleError),
    /// The cycle does not fit this replica.
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

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn img<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(vhdx::Error) -> StoreError + 'a {
    move |source| StoreError::Image {
        op,
        path: path.to_path_buf(),
        source: Box::new(source),
    }
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
    /// Creates a store for `vm` with empty base disks of `disk_sizes` (point 0), keeping at
    /// most `max_points` points (at least 1).
    pub fn create(dir: &Path, vm: &str, disk_sizes: &[u64], max_points: usize) -> Result<Self> {
        if dir.join(STATE).exists() {
            return Err(StoreError::Mismatch(format!(
                "{} already holds a replica",
                dir.display()
            )));
        }
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
                }],
            },
        };
        s.save()?;
        Ok(s)
    }

    /// Opens a store, removing any directory its state does not list (a cycle whose
    /// application was interrupted, a dropped point whose deletion was).
    pub fn open(dir: &Path) -> Result<Self> {
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
        let s = ReplicaStore {
            dir: dir.to_path_buf(),
            st,
        };
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

    fn save(&self) -> Result<()> {
        let p = self.dir.join(STATE);
        let tmp = self.dir.join("replica.json.tmp");
        let data = serde_json::to_vec_pretty(&self.st).map_err(|e| StoreError::State {
            path: p.clone(),
            why: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&data).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, &p).map_err(io("renaming into", &p))?;
        sync_dir(&self.dir)
    }

    /// The replicated VM.
    pub fn vm(&self) -> &str {
        &self.st.vm
    }

    /// Recovery points, oldest first.
    pub fn points(&self) -> &[Point] {
        &self.st.points
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

    /// Reads, validates and applies a cycle atomically; returns the new point.
    pub fn apply(&mut self, r: impl Read) -> Result<Point> {
        self.apply_inner(r, None)
    }

    /// [`ReplicaStore::apply`] that fails after writing `blocks` blocks (tests of atomicity).
    #[doc(hidden)]
    pub fn apply_with_fault(&mut self, r: impl Read, blocks: usize) -> Result<Point> {
        self.apply_inner(r, Some(blocks))
    }

    fn apply_inner(&mut self, r: impl Read, fault: Option<usize>) -> Result<Point> {
        let (h, blocks) = read_cycle(r)?;
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
        let latest = self.latest().clone();
        if h.seq != latest.seq + 1 {
            return Err(StoreError::Mismatch(format!(
                "cycle {} does not follow the latest point {} (a resync is needed)",
                h.seq, latest.seq
            )));
        }
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
        };
        self.st.points.push(point.clone());
        if let Err(e) = self.save() {
            self.st.points.pop();
            return Err(e);
        }
        tracing::info!(vm = %self.st.vm, seq = h.seq, blocks = blocks.len(), "applied a replication cycle");
        self.prune()?;
        Ok(point)
    }

    /// Drops the oldest points beyond `max_points` (see the module doc).
    fn prune(&mut self) -> Result<()> {
        while self.st.points.len() > self.st.max_points {
            let next = self.st.points[1].clone();
            for f in &next.files {
                let p = self.dir.join(&next.dir).join(f);
                vhdx::merge_into_child(&p, &|_, _| {}, &AtomicBool::new(false))
                    .map_err(img("merging the oldest point into", &p))?;
            }
            let old = self.st.points.remove(0);
            self.save()?;
            let od = self.dir.join(&old.dir);
            if let Err(e) = std::fs::remove_dir_all(&od) {
                tracing::warn!("removing dropped point {}: {e}", od.display());
            }
        }
        Ok(())
    }
}
