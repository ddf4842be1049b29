//! Accelerator probe: is `/dev/kvm` usable at hardware speed, and which accelerator to use.
//!
//! A `/dev/kvm` that opens is not enough: under nested virtualization without VT-x/AMD-V
//! exposed to the host, KVM still exists but runs guest code hundreds of times slower than
//! hardware (about 600 ns per instruction), and QEMU with `-accel kvm` hangs or aborts.
//! [`probe_kvm`] therefore creates a tiny VM of its own with a real-mode counting loop,
//! runs it under a hard time budget and declares KVM usable only if the loop finished at
//! hardware speed. The probe never hangs: a vCPU that overruns the budget is kicked out of
//! `KVM_RUN` with a signal, and abandoned (its thread finishes on its own) if it does not
//! come back.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use serde::{Deserialize, Serialize};

use crate::cmdline::Accel;

/// Iterations of the probe loop (`dec ecx; jnz`): about 1 ms on hardware.
const LOOP_ITERATIONS: u32 = 1_000_000;
/// Hard budget for the probe vCPU.
const RUN_BUDGET: Duration = Duration::from_millis(300);
/// The loop must finish within this to call KVM usable (hardware: < 5 ms).
const USABLE_THRESHOLD: Duration = Duration::from_millis(50);
/// Guest memory of the probe VM.
const GUEST_MEM_SIZE: usize = 0x10000;
/// Guest physical address of the probe code.
const CODE_ADDR: u64 = 0x1000;

/// Result of [`probe_kvm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelProbe {
    /// KVM runs guest code at hardware speed and QEMU may use it.
    pub usable: bool,
    /// Human-readable explanation (shown by `vireo host info` and in logs).
    pub reason: String,
    /// Time the probe loop took inside `KVM_RUN`, when it finished within the budget.
    pub measured: Option<Duration>,
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelRequest {
    /// KVM when the probe says it is usable, TCG otherwise.
    #[default]
    Auto,
    /// KVM, even if the probe says it is not usable (explicit override).
    Kvm,
    /// TCG (software emulation).
    Tcg,
}

impl fmt::Display for AccelRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelRequest::Auto => "auto",
            AccelRequest::Kvm => "kvm",
            AccelRequest::Tcg => "tcg",
        })
    }
}

impl std::str::FromStr for AccelRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelRequest::Auto),
            "kvm" => Ok(AccelRequest::Kvm),
            "tcg" => Ok(AccelRequest::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?} (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// Chooses the accelerator for a request, given the probe result. Returns the choice and why.
pub fn choose_accel(requested: AccelRequest, probe: &AccelProbe) -> (Accel, String) {
    match requested {
        AccelRequest::Tcg => (Accel::Tcg, "tcg requested".to_string()),
        AccelRequest::Kvm if probe.usable => (Accel::Kvm, "kvm requested".to_string()),
        AccelRequest::Kvm => (
            Accel::Kvm,
            format!(
                "kvm requested explicitly although the probe says it is not usable ({})",
                probe.reason
            ),
        ),
        AccelRequest::Auto if probe.usable => (
            Accel::Kvm,
            format!("auto: kvm is usable ({})", probe.reason),
        ),
        AccelRequest::Auto => (
            Accel::Tcg,
            format!("auto: kvm is not usable, using tcg ({})", probe.reason),
        ),
    }
}

/// [`probe_kvm`] run once per process; later calls return the first result.
pub fn probe_kvm_cached() -> &'static AccelProbe {
    static PROBE: OnceLock<AccelProbe> = OnceLock::new();
    PROBE.get_or_init(probe_kvm)
}

/// Probes `/dev/kvm` by running a real-mode loop in a tiny VM under a time budget.
///
/// Blocks for at most about half a second. Never panics on host errors; they become
/// `usable: false` with the error in `reason`.
pub fn probe_kvm() -> AccelProbe {
    probe_kvm_at(Path::new("/dev/kvm"))
}

/// [`probe_kvm`] on another device node (tests, containers with a relocated `/dev`).
pub fn probe_kvm_at(dev: &Path) -> AccelProbe {
    let flags = cpu_virt_flag();
    let flag_note = match flags {
        Some(f) => format!("cpu flag {f} present"),
        None => "no vmx/svm cpu flag".to_string(),
    };
    let outcome = run_probe_vm(dev);
    let probe = match outcome {
        Err(e) => AccelProbe {
            usable: false,
            reason: format!("{e}; {flag_note}"),
            measured: None,
        },
        Ok(ProbeRun::Finished(d)) if d <= USABLE_THRESHOLD => AccelProbe {
            usable: true,
            reason: format!("probe loop of {LOOP_ITERATIONS} iterations ran in {d:?}; {flag_note}"),
            measured: Some(d),
        },
        Ok(ProbeRun::Finished(d)) => AccelProbe {
            usable: false,
            reason: format!(
                "kvm is too slow: probe loop of {LOOP_ITERATIONS} iterations took {d:?} \
                 (hardware: < 5 ms; nested virtualization without VT-x?); {flag_note}"
            ),
            measured: Some(d),
        },
        Ok(ProbeRun::Overran(progress)) => {
            let rate = match progress {
                Some((spent, done)) if done > 0 => format!(
                    " (ran {done} iterations in {spent:?}, about {} ns per iteration)",
                    spent.as_nanos() / u128::from(done)
                ),
                Some((spent, _)) => format!(" (no iteration completed in {spent:?})"),
                None => String::new(),
            };
            AccelProbe {
                usable: false,
                reason: format!(
                    "kvm is too slow: probe loop of {LOOP_ITERATIONS} iterations did not finish \
                     in {RUN_BUDGET:?}{rate} (hardware: < 5 ms; nested virtualization without \
                     VT-x?); {flag_note}"
                ),
                measured: None,
            }
        }
    };
    tracing::info!(usable = probe.usable, reason = %probe.reason, "kvm probe");
    probe
}

/// Reads `/proc/cpuinfo` for the `vmx` or `svm` flag.
fn cpu_virt_flag() -> Option<&'static str> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = info.lines().find(|l| l.starts_with("flags"))?;
    let mut words = flags.split_whitespace();
    if words.clone().any(|w| w == "vmx") {
        Some("vmx")
    } else if words.any(|w| w == "svm") {
        Some("svm")
    } else {
        None
    }
}

enum ProbeRun {
    Finished(Duration),
    /// Over budget; (time in KVM_RUN, iterations done) when the vCPU came back.
    Overran(Option<(Duration, u64)>),
}

/// Anonymous guest memory, unmapped on drop.
struct GuestMem {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain anonymous memory owned by this value; moving it between
// threads is fine, and the KVM VM holding a reference to it lives in the same thread.
unsafe impl Send for GuestMem {}

impl GuestMem {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: anonymous private mapping, no file, length > 0; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(GuestMem { ptr, len })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: bounds checked above; the mapping is writable and owned by self.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.ptr as *mut u8).add(offset),
                bytes.len(),
            )
        };
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap in `new`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The signal used to kick the probe vCPU out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs an empty handler (without `SA_RESTART`) for the kick signal, unless someone else
/// already handles it. Returns whether kicking is possible.
fn install_kick_handler() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct to query, then with a valid handler; the
        // handler is async-signal-safe (does nothing).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(kick_signal(), std::ptr::null(), &mut old) != 0 {
                return false;
            }
            if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
                return false;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_handler as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) == 0
        }
    })
}

#[derive(Debug)]
enum VcpuOutcome {
    Halted(Duration),
    /// Stopped by the kick: time spent in KVM_RUN and iterations done.
    Interrupted(Duration, u64),
    Failed(String),
}

fn run_probe_vm(dev: &Path) -> Result<ProbeRun, String> {
    let cpath = std::ffi::CString::new(dev.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", dev.display()))?;
    let kvm =
        Kvm::new_with_path(&cpath).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(format!(
            "{} is not a usable KVM device (KVM_GET_API_VERSION returned {version})",
            dev.display()
        ));
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    let mut mem = GuestMem::new(GUEST_MEM_SIZE).map_err(|e| format!("mmap guest memory: {e}"))?;
    // Real mode: mov ecx, N ; l: dec ecx ; jnz l ; hlt
    let n = LOOP_ITERATIONS.to_le_bytes();
    let code = [
        0x66, 0xB9, n[0], n[1], n[2], n[3], // mov ecx, imm32
        0x66, 0x49, // dec ecx
        0x75, 0xFC, // jnz -4
        0xF4, // hlt
    ];
    mem.write(CODE_ADDR as usize, &code);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: GUEST_MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region points at `mem`, which outlives `vm` (both move into the vCPU thread
    // and `vm` is dropped first there).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS failed: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;

    let can_kick = install_kick_handler();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_thread = stop.clone();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let outcome = (|| {
                let mut spent = Duration::ZERO;
                loop {
                    if stop_thread.load(Ordering::SeqCst) {
                        let left = vcpu.get_regs().map(|r| r.rcx & 0xffff_ffff).unwrap_or(0);
                        let done = u64::from(LOOP_ITERATIONS).saturating_sub(left);
                        return VcpuOutcome::Interrupted(spent, done);
                    }
                    let t = Instant::now();
                    let exit = vcpu.run();
                    spent += t.elapsed();
                    match exit {
                        Ok(VcpuExit::Hlt) => return VcpuOutcome::Halted(spent),
                        Ok(other) => {
                            return VcpuOutcome::Failed(format!("unexpected exit {other:?}"))
                        }
                        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                        Err(e) => return VcpuOutcome::Failed(format!("KVM_RUN failed: {e}")),
                    }
                }
            })();
            drop(vcpu);
            drop(vm);
            drop(mem);
            // The receiver may be gone when the probe gave up; nothing to do then.
            let _ = tx.send(outcome);
        })
        .map_err(|e| format!("spawning the probe thread: {e}"))?;

    let first = rx.recv_timeout(RUN_BUDGET);
    let outcome = match first {
        Ok(o) => Some(o),
        Err(_) => {
            stop.store(true, Ordering::SeqCst);
            // Kick until the thread leaves KVM_RUN (a kick can land just before it enters).
            let deadline = Instant::now() + Duration::from_millis(200);
            let mut got = None;
            while Instant::now() < deadline {
                if can_kick {
                    use std::os::unix::thread::JoinHandleExt;
                    // SAFETY: the pthread_t stays valid until the handle is joined or dropped.
                    unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
                }
                if let Ok(o) = rx.recv_timeout(Duration::from_millis(10)) {
                    got = Some(o);
                    break;
                }
            }
            got
        }
    };
    match outcome {
        Some(VcpuOutcome::Halted(d)) => {
            let _ = handle.join();
            Ok(ProbeRun::Finished(d))
        }
        Some(VcpuOutcome::Interrupted(spent, done)) => {
            let _ = handle.join();
            Ok(ProbeRun::Overran(Some((spent, done))))
        }
        Some(VcpuOutcome::Failed(e)) => {
            let _ = handle.join();
            Err(e)
        }
        None => {
            // The vCPU did not come back; abandon the thread (it ends when the loop ends).
            tracing::warn!("kvm probe vcpu did not leave KVM_RUN; abandoning its thread");
            drop(handle);
            Ok(ProbeRun::Overran(None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(usable: bool) -> AccelProbe {
        AccelProbe {
            usable,
            reason: "r".into(),
            measured: None,
        }
    }

    /// Auto follows the probe; explicit requests are honoured whatever the probe says.
    #[test]
    fn choose_follows_probe_and_overrides() {
        assert_eq!(choose_accel(AccelRequest::Auto, &probe(true)).0, Accel::Kvm);
        assert_eq!(
            choose_accel(AccelRequest::Auto, &probe(false)).0,
            Accel::Tcg
        );
        let (a, why) = choose_accel(AccelRequest::Kvm, &probe(false));
        assert_eq!(a, Accel::Kvm);
        assert!(why.contains("explicitly"), "{why}");
        assert_eq!(choose_accel(AccelRequest::Tcg, &probe(true)).0, Accel::Tcg);
    }

    /// Requests parse from their CLI spelling and refuse anything else.
    #[test]
    fn request_parses() {
        assert_eq!("auto".parse::<AccelRequest>(), Ok(AccelRequest::Auto));
        assert_eq!("kvm".parse::<AccelRequest>(), Ok(AccelRequest::Kvm));
        assert!("hvf".parse::<AccelRequest>().is_err());
    }
}
