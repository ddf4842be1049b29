//! The dataplane thread: owns the [`Dataplane`] and every port's I/O, runs a poll loop,
//! and executes control commands sent as closures (so one thread owns all switch state).
//!
//! Loop: poll(eventfd + port descriptors) → run queued commands → for each readable port
//! read a batch of frames and forward each through the dataplane, queuing copies on the
//! output ports → flush every port with output (one write for a stream port's whole batch,
//! one `send` through the transmit ring for packet ports) → connect/accept stream peers →
//! age the FDB once a second. While frames keep coming, and for [`DENSE_SPIN`] after a
//! dense batch, the loop polls its ports without sleeping in `poll(2)`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use switch::extension::Now;
use switch::qos::Drr;
use switch::{Dataplane, PortId};

use crate::backend::{LinkEvent, PortIo};
use crate::persist;
use crate::sys;

/// Weight of a source port without `qos.min_weight` in the fair share of a congested output.
pub const DEFAULT_FLOW_WEIGHT: u32 = 10;
/// Frames kept per source port in an output port's backlog.
const BACKLOG_PER_FLOW: usize = 512;
/// DRR quantum per unit of weight, in bytes.
const DRR_QUANTUM: usize = 1514;

/// A command run on the dataplane thread.
pub type Command = Box<dyn FnOnce(&mut Engine) + Send>;

/// State owned by the dataplane thread.
pub struct Engine {
    /// The forwarding engine.
    pub dp: Dataplane,
    /// Port I/O by port id.
    pub io: Vec<Option<PortIo>>,
    /// Where the switch persists its configuration.
    pub run_dir: PathBuf,
    /// Set to stop the loop.
    pub stop: bool,
    /// Per output port: frames waiting for room, scheduled by source-port weight
    /// (`qos.min_weight`) with deficit round robin.
    backlog: Vec<Option<Drr<Vec<u8>>>>,
    origin: Instant,
}

/// Handle for sending commands to the dataplane thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    kick: std::sync::Arc<OwnedFd>,
}

impl EngineHandle {
    /// Runs `f` on the dataplane thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Option<R> {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let cmd: Command = Box::new(move |e| {
            let _ = rtx.send(f(e));
        });
        self.tx.send(cmd).ok()?;
        sys::eventfd_kick(self.kick.as_raw_fd());
        rrx.await.ok()
    }
}

impl Engine {
    /// Monotonic and wall-clock time for the dataplane.
    pub fn now(&self) -> Now {
        Now {
            mono_ns: self.origin.elapsed().as_nanos() as u64,
            unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        }
    }

    /// Opens the backend of port `id` (after the dataplane added it). A backend that cannot
    /// be opened leaves the port down; the error is returned.
    pub fn open_port(&mut self, id: PortId) -> std::io::Result<()> {
        let Some(slot) = self.dp.port(id) else {
            return Ok(());
        };
        let backend = slot.cfg.backend.clone();
        let io = PortIo::open(&backend)?;
        let up = io.is_up();
        let i = id as usize;
        if self.io.len() <= i {
            self.io.resize_with(i + 1, || None);
        }
        self.io[i] = Some(io);
        self.dp.set_link(id, up);
        Ok(())
    }

    /// Closes and forgets the backend of port `id`.
    pub fn close_port(&mut self, id: PortId) {
        if let Some(b) = self.backlog.get_mut(id as usize) {
            *b = None;
        }
        if let Some(Some(mut io)) = self.io.get_mut(id as usize).map(Option::take) {
            let _ = io.flush();
            io.close();
        }
    }

    /// Persists the current configuration to the run directory.
    pub fn persist(&self) -> anyhow::Result<()> {
        persist::save(&self.run_dir, &self.dp.config())
    }
}

/// Starts the dataplane thread.
pub fn start(
    dp: Dataplane,
    run_dir: PathBuf,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let kick = std::sync::Arc::new(sys::eventfd()?);
    let (tx, rx) = mpsc::channel::<Command>();
    let mut engine = Engine {
        dp,
        io: Vec::new(),
        run_dir,
        stop: false,
        backlog: Vec::new(),
        origin: Instant::now(),
    };
    let ids: Vec<PortId> = engine.dp.ports().iter().map(|p| p.id).collect();
    for id in ids {
        if let Err(e) = engine.open_port(id) {
            let name = engine
                .dp
                .port(id)
                .map(|p| p.cfg.name.clone())
                .unwrap_or_default();
            tracing::warn!(port = %name, error = %e, "opening port backend; port stays down");
        }
    }
    let k = kick.clone();
    let h = std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || run(engine, rx, k))?;
    Ok((EngineHandle { tx, kick }, h))
}

fn source_weights(dp: &Dataplane) -> Vec<u32> {
    let ports = dp.ports();
    let n = ports.iter().map(|p| p.id as usize + 1).max().unwrap_or(0);
    let mut w = vec![DEFAULT_FLOW_WEIGHT; n];
    for p in ports {
        if let Some(x) = p.config.qos.min_weight {
            w[p.id as usize] = x;
        }
    }
    w
}

/// Environment variable: microseconds the dataplane keeps polling its ports without
/// sleeping after the last frame, whatever the rate. Unset: adaptive (see
/// [`DENSE_SPIN`]); `0`: it spins only while frames keep coming.
pub const BUSY_POLL_ENV: &str = "VIREO_SWITCH_BUSY_POLL_US";
/// A read pass that brought at least this many frames marks traffic as dense.
const DENSE_FRAMES: usize = 16;
/// Adaptive busy-polling: after a dense pass the loop keeps polling its ports without
/// sleeping this long. At high rates the switch then never sleeps, so the senders' softirqs
/// never pay for waking it (an inter-processor interrupt, expensive in a VM); sparse traffic
/// costs no spinning.
pub const DENSE_SPIN: Duration = Duration::from_micros(200);

/// (fixed budget after any frame, budget after a dense pass)
fn busy_poll_from_env() -> (Duration, Duration) {
    match std::env::var(BUSY_POLL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(us) => (Duration::from_micros(us.min(1_000_000)), Duration::ZERO),
        None => (Duration::ZERO, DENSE_SPIN),
    }
}

fn run(mut e: Engine, rx: mpsc::Receiver<Command>, kick: std::sync::Arc<OwnedFd>) {
    let kfd = kick.as_raw_fd();
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    let mut who: Vec<(PortId, bool)> = Vec::new(); // (port, is listener)
    let mut last_age = Instant::now();
    let mut weights: Vec<u32> = Vec::new();
    let mut ran_commands = true;
    let (busy_poll, dense_spin) = busy_poll_from_env();
    let mut last_work = Instant::now();
    let mut last_dense = Instant::now()
        .checked_sub(dense_spin)
        .unwrap_or_else(Instant::now);
    let mut worked = false;
    let mut dense = false;
    while !e.stop {
        // While frames keep coming, skip poll(2) and try every port again at once (reads
        // are non-blocking); with a busy-poll budget, keep spinning that long after the last
        // frame. Only an idle switch sleeps in poll.
        if worked {
            last_work = Instant::now();
        }
        if dense {
            last_dense = last_work;
        }
        let spin = worked || last_work.elapsed() < busy_poll || last_dense.elapsed() < dense_spin;
        worked = false;
        dense = false;
        pfds.clear();
        who.clear();
        pfds.push(libc::pollfd {
            fd: kfd,
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout = Duration::from_secs(1);
        let now = Instant::now();
        for (i, io) in e.io.iter().enumerate() {
            let Some(io) = io else { continue };
            if let Some((fd, ev)) = io.poll_fd() {
                pfds.push(libc::pollfd {
                    fd,
                    events: ev,
                    revents: 0,
                });
                who.push((i as PortId, false));
            }
            if let Some(fd) = io.listen_fd() {
                pfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                who.push((i as PortId, true));
            }
            if let Some(t) = io.next_retry() {
                timeout = timeout.min(t.saturating_duration_since(now));
            }
        }
        let r = if spin {
            for p in pfds.iter_mut().skip(1) {
                p.revents = libc::POLLIN;
            }
            0
        } else {
            // SAFETY: pfds is a valid array of pollfd of the given length.
            unsafe {
                libc::poll(
                    pfds.as_mut_ptr(),
                    pfds.len() as libc::nfds_t,
                    timeout.as_millis() as i32,
                )
            }
        };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %err, "poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if pfds[0].revents != 0 {
            sys::eventfd_drain(kfd);
        }
        while let Ok(cmd) = rx.try_recv() {
            cmd(&mut e);
            ran_commands = true;
        }
        if ran_commands {
            weights = source_weights(&e.dp);
            if e.backlog.len() < e.io.len() {
                e.backlog.resize_with(e.io.len(), || None);
            }
            ran_commands = false;
        }
        if e.stop {
            break;
        }
        let now_t = e.now();
        // reads
        for (k, pfd) in pfds.iter().enumerate().skip(1) {
            if pfd.revents == 0 {
                continue;
            }
            let (id, is_listener) = who[k - 1];
            if is_listener {
                continue; // handled by maintain below
            }
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                // The input port's I/O is taken out of the table while its frames are
                // forwarded straight from its receive buffers (no copy): the dataplane never
                // sends a frame back to its input port.
                let Some(mut io) = e.io.get_mut(id as usize).and_then(Option::take) else {
                    continue;
                };
                let Engine {
                    dp,
                    io: ios,
                    backlog,
                    ..
                } = &mut e;
                let w = weights
                    .get(id as usize)
                    .copied()
                    .unwrap_or(DEFAULT_FLOW_WEIGHT);
                let mut frames = 0usize;
                let ev = io.read_frames(&mut |frame, gso| {
                    frames += 1;
                    let mut sink = |p: PortId, bytes: &[u8]| {
                        let Some(Some(o)) = ios.get_mut(p as usize) else {
                            return false;
                        };
                        if !o.is_up() {
                            return false;
                        }
                        let congested = backlog
                            .get(p as usize)
                            .and_then(Option::as_ref)
                            .is_some_and(|d| !d.is_empty());
                        if !congested {
                            let ok = match gso {
                                Some(g) => o.queue_super_frame(bytes, g),
                                None => o.queue(bytes),
                            };
                            if ok {
                                return true;
                            }
                        }
                        let Some(bl) = backlog.get_mut(p as usize) else {
                            return false;
                        };
                        // congested: wait in the weighted backlog (as MTU-sized frames)
                        let d = bl.get_or_insert_with(|| Drr::new(DRR_QUANTUM, BACKLOG_PER_FLOW));
                        d.set_weight(id, w);
                        match gso {
                            Some(g) => {
                                let mut ok = true;
                                let _ = switch::frame::segment_tcp(
                                    bytes,
                                    usize::from(g.size),
                                    &mut |s| {
                                        ok &= d.push(id, s.len(), s.to_vec()).is_ok();
                                    },
                                );
                                ok
                            }
                            None => d.push(id, bytes.len(), bytes.to_vec()).is_ok(),
                        }
                    };
                    if gso.is_some() {
                        dp.process_super_frame(id, frame, now_t, &mut sink);
                    } else {
                        dp.process(id, frame, now_t, &mut sink);
                    }
                });
                e.io[id as usize] = Some(io);
                worked |= frames > 0;
                dense |= frames >= DENSE_FRAMES;
                if ev == LinkEvent::Down {
                    e.dp.set_link(id, false);
                }
            }
        }
        // writes, then refill from the weighted backlog
        let mut downs = Vec::new();
        for (i, io) in e.io.iter_mut().enumerate() {
            let Some(io) = io else { continue };
            let bl = e.backlog.get_mut(i).and_then(Option::as_mut);
            if io.has_output() && io.flush() == LinkEvent::Down {
                downs.push(i as PortId);
                if let Some(d) = bl {
                    while d.pop().is_some() {}
                }
                continue;
            }
            if let Some(d) = bl {
                while !d.is_empty() && io.has_room() {
                    match d.pop() {
                        Some(f) => {
                            io.queue(&f);
                        }
                        None => break,
                    }
                }
                if io.has_output() && io.flush() == LinkEvent::Down {
                    downs.push(i as PortId);
                }
            }
        }
        for id in downs {
            e.dp.set_link(id, false);
        }
        // connections
        let inst = Instant::now();
        let mut ups = Vec::new();
        for (i, io) in e.io.iter_mut().enumerate() {
            if let Some(io) = io {
                if io.maintain(inst) == LinkEvent::Up {
                    ups.push(i as PortId);
                }
            }
        }
        for id in ups {
            e.dp.set_link(id, true);
        }
        if last_age.elapsed() >= Duration::from_secs(1) {
            last_age = Instant::now();
            let n = e.now().mono_ns;
            e.dp.age(n);
        }
    }
    for i in 0..e.io.len() {
        e.close_port(i as PortId);
    }
    tracing::info!("dataplane stopped");
}
