//! `test-suite`: builds every test binary of the workspace once, then runs them in
//! parallel lanes with a per-binary time limit, printing one line per binary with its
//! wall time and the whole output of any that fails.
//!
//! Why not plain `cargo test --workspace`: it runs the ~60 test binaries one after
//! another, so the crate tests (CPU-light, mostly waiting on peers like qemu-img) and
//! the end-to-end tests (TCG guests) never overlap, and CI pays their sum. Here the
//! end-to-end binaries share the machine with at most `--e2e-jobs` of their own kind
//! (their guests are CPU-heavy and some checks are time-bounded), while crate tests
//! fill the other lanes. Binaries start longest-first, using the wall times of the
//! previous run (`target/test-times.json`, else the committed hints in
//! `xtask/test-times.json`).

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Options of `cargo xtask test-suite`.
#[derive(Args, Clone)]
pub struct SuiteArgs {
    /// Test binaries run at the same time.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// End-to-end (vireo-e2e) binaries run at the same time, at most.
    #[arg(long, default_value_t = 1)]
    e2e_jobs: usize,
    /// `--test-threads` given to each binary.
    #[arg(long, default_value_t = 2)]
    test_threads: usize,
    /// A binary still running after this many seconds is killed (with its processes) and fails.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Run only binaries whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
}

/// One test executable produced by cargo.
#[derive(Clone)]
struct TestBin {
    /// `package::target` (or `package (lib)`), as printed.
    name: String,
    exe: PathBuf,
    manifest_dir: PathBuf,
    package: String,
    e2e: bool,
}

/// How one binary ended.
struct Outcome {
    name: String,
    secs: f64,
    ok: bool,
    summary: String,
    log: PathBuf,
}

const E2E_PACKAGE: &str = "vireo-e2e";
/// Crate test binaries that boot TCG guests themselves: they share the end-to-end lanes
/// (a third guest-heavy binary beside two end-to-end ones starves the time-bounded checks).
const GUEST_BOOTING: &[&str] = &["xtask::guest_boot"];

/// Runs the suite; fails when any binary fails.
pub fn run(args: &SuiteArgs, root: &Path) -> Result<()> {
    let t0 = Instant::now();
    let mut bins = build(root)?;
    if let Some(f) = &args.filter {
        bins.retain(|b| b.name.contains(f.as_str()));
    }
    if bins.is_empty() {
        bail!("no test binary matched");
    }
    let times_path = root.join("target/test-times.json");
    // A fresh clone (CI) has no previous run: the committed hints order it instead.
    let previous: BTreeMap<String, f64> = std::fs::read(&times_path)
        .or_else(|_| std::fs::read(root.join("xtask/test-times.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    // Longest first; never-seen binaries count as long end-to-end or short crate tests.
    let guess = |b: &TestBin| {
        previous
            .get(&b.name)
            .copied()
            .unwrap_or(if b.e2e { 60.0 } else { 5.0 })
    };
    bins.sort_by(|a, b| guess(b).total_cmp(&guess(a)));
    let logs = root.join("target/test-logs");
    std::fs::create_dir_all(&logs).context("creating target/test-logs")?;
    println!(
        "{} test binaries, {} lanes ({} for end-to-end), --test-threads={}",
        bins.len(),
        args.jobs,
        args.e2e_jobs,
        args.test_threads
    );

    let queue = Mutex::new(Queue {
        waiting: bins.into(),
        e2e_running: 0,
    });
    let wake = Condvar::new();
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| {
                while let Some(bin) = next(&queue, &wake, args.e2e_jobs.max(1)) {
                    let o = run_one(&bin, args, &logs);
                    report(&o);
                    if bin.e2e {
                        lock(&queue).e2e_running -= 1;
                    }
                    wake.notify_all();
                    lock(&outcomes).push(o);
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());

    // Doctests cannot be prebuilt with --no-run; they are few and quick.
    let doc = Instant::now();
    let doc_ok = Command::new("cargo")
        .args(["test", "--workspace", "--doc", "--quiet"])
        .current_dir(root)
        .status()
        .context("running cargo test --doc")?
        .success();
    println!(
        "{} {:>6.1}s  doctests",
        if doc_ok { "ok    " } else { "FAILED" },
        doc.elapsed().as_secs_f64()
    );

    let mut times = previous;
    for o in &outcomes {
        times.insert(o.name.clone(), o.secs);
    }
    if let Ok(j) = serde_json::to_vec_pretty(&times) {
        let _ = std::fs::write(&times_path, j);
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    println!(
        "suite: {} binaries in {:.0} s wall ({:.0} s of test time)",
        outcomes.len(),
        t0.elapsed().as_secs_f64(),
        outcomes.iter().map(|o| o.secs).sum::<f64>()
    );
    if failed.is_empty() && doc_ok {
        return Ok(());
    }
    for o in &failed {
        println!("failed: {} (log {})", o.name, o.log.display());
    }
    bail!(
        "{} test binaries failed{}",
        failed.len(),
        if doc_ok { "" } else { ", doctests failed" }
    )
}

struct Queue {
    waiting: VecDeque<TestBin>,
    e2e_running: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The next binary this lane may start: the longest waiting one, skipping end-to-end
/// binaries while `e2e_max` of them run; waits when only those remain. While one
/// end-to-end binary runs, a second starts only when no other kind is waiting: the
/// crate tests go first, then the lane they leave idle helps with the guests.
fn next(queue: &Mutex<Queue>, wake: &Condvar, e2e_max: usize) -> Option<TestBin> {
    let mut q = lock(queue);
    loop {
        if q.waiting.is_empty() {
            return None;
        }
        let others_waiting = q.waiting.iter().any(|b| !b.e2e);
        let allowed = q.e2e_running == 0 || (q.e2e_running < e2e_max && !others_waiting);
        if let Some(i) = q.waiting.iter().position(|b| allowed || !b.e2e) {
            let bin = q.waiting.remove(i)?;
            if bin.e2e {
                q.e2e_running += 1;
            }
            return Some(bin);
        }
        q = wake.wait(q).unwrap_or_else(|p| p.into_inner());
    }
}

/// Builds all test binaries and lists them from cargo's JSON messages.
fn build(root: &Path) -> Result<Vec<TestBin>> {
    println!("== building test binaries");
    let mut child = Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--quiet",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test --no-run")?;
    let out = child.stdout.take().context("cargo's stdout")?;
    let names = package_names(root)?;
    let mut bins = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) = (v["executable"].as_str(), v["manifest_path"].as_str())
        else {
            continue;
        };
        let manifest_dir = Path::new(manifest)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.to_path_buf());
        let package = names
            .get(Path::new(manifest))
            .cloned()
            .with_context(|| format!("{manifest} is not a workspace package"))?;
        let target = v["target"]["name"].as_str().unwrap_or("?");
        let kind = v["target"]["kind"][0].as_str().unwrap_or("?");
        let name = match kind {
            "lib" | "proc-macro" => format!("{package} (lib)"),
            "bin" => format!("{package} (bin {target})"),
            _ => format!("{package}::{target}"),
        };
        let e2e = package == E2E_PACKAGE || GUEST_BOOTING.contains(&name.as_str());
        bins.push(TestBin {
            name,
            exe: PathBuf::from(exe),
            manifest_dir,
            e2e,
            package,
        });
    }
    if !child.wait().context("waiting for cargo")?.success() {
        bail!("building the test binaries failed (see cargo's errors above)");
    }
    Ok(bins)
}

/// Package names of the workspace by manifest path, from `cargo metadata` (cargo's
/// own reading of each Cargo.toml, so workspace inheritance and odd layouts are right).
fn package_names(root: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let out = Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed");
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
    let mut names = BTreeMap::new();
    for p in v["packages"].as_array().into_iter().flatten() {
        if let (Some(name), Some(manifest)) = (p["name"].as_str(), p["manifest_path"].as_str()) {
            names.insert(PathBuf::from(manifest), name.to_string());
        }
    }
    Ok(names)
}

/// Runs one binary the way `cargo test` does (cwd = its package, CARGO_* set), in its
/// own process group so a timeout kills the daemons and guests it started too.
fn run_one(bin: &TestBin, args: &SuiteArgs, logs: &Path) -> Outcome {
    let log = logs.join(format!(
        "{}.log",
        bin.name.replace([' ', '(', ')', ':', '/'], "_")
    ));
    let t = Instant::now();
    let result = (|| -> Result<bool> {
        let file = std::fs::File::create(&log)?;
        let mut child = Command::new(&bin.exe)
            .arg(format!("--test-threads={}", args.test_threads))
            .current_dir(&bin.manifest_dir)
            .env("CARGO_MANIFEST_DIR", &bin.manifest_dir)
            .env("CARGO_PKG_NAME", &bin.package)
            .env("RUST_BACKTRACE", "1")
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()?;
        let deadline = t + Duration::from_secs(args.timeout_secs);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st.success());
            }
            if Instant::now() > deadline {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .and_then(|mut f| {
                        use std::io::Write;
                        writeln!(f, "\n[test-suite] killed after {} s", args.timeout_secs)
                    })?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    let secs = t.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let summary = text
        .lines()
        .filter(|l| l.starts_with("test result:"))
        .filter_map(|l| l.split(". ").nth(1))
        .next()
        .map(|s| s.split(';').next().unwrap_or(s).to_string())
        .unwrap_or_default();
    let ok = match result {
        Ok(ok) => ok,
        Err(e) => {
            let _ = std::fs::write(&log, format!("[test-suite] could not run: {e:#}\n"));
            false
        }
    };
    Outcome {
        name: bin.name.clone(),
        secs,
        ok,
        summary,
        log,
    }
}

fn report(o: &Outcome) {
    println!(
        "{} {:>6.1}s  {}  {}",
        if o.ok { "ok    " } else { "FAILED" },
        o.secs,
        o.name,
        o.summary
    );
    if !o.ok {
        let text = std::fs::read_to_string(&o.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(400);
        println!("---- output of {} ----", o.name);
        for l in &lines[from..] {
            println!("{l}");
        }
        println!("---- end of {} ----", o.name);
    }
}
