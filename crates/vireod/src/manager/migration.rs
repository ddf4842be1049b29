//! Live migration, both ends. The policy (compatibility, phases, what to undo) lives in the
//! `migration` crate; this file carries it out with the workers, the store and the peer.
//!
//! Source job (one task per `vireo vm move`):
//! ```text
//!  Negotiating: hello, check()  ── incompatible: refused, nothing moved
//!  Preparing:   destination starts `-incoming defer` worker with placeholder disks
//!  Memory:      QEMU migrate -> unix socket -> TLS tunnel -> destination QEMU
//!               (pre-copy passes, auto-converge, bandwidth and downtime limits)
//!  Switchover:  QEMU pauses before switchover; source closes its disk images,
//!               destination opens them; QEMU sends the rest; destination resumes on commit
//!  Completed:   source QEMU quits, the VM leaves the source inventory
//! ```
//! Shared-nothing (`--include-storage`) adds, between Preparing and Memory:
//! ```text
//!  CopyingDisks: the worker mirrors each disk's whole chain (checkpoints included) into a
//!               unix socket -> TLS tunnel "disk-N" -> destination `receive_chain` into the
//!               destination directory; guest writes are mirrored; memory starts once
//!               every mirror is in sync, and the mirrors keep running during pre-copy
//!  Switchover:  (VM paused) final mirror pass, checksum verification and commit of every
//!               disk at the destination, then the handover as with shared storage
//!  Completed:   the source's chain files are removed
//! ```
//! Any failure or cancel before the commit runs `migration::job::recovery`: the destination
//! aborts (or its lease expires) and removes what it received, the mirrors stop, the
//! source disks are served again, QEMU's migration is cancelled and the VM runs on the
//! source.

use super::{lock, Manager, VmEntry};
use crate::error::{ApiError, ApiResult};
use crate::peers::{self, Incoming, Outgoing, PeerId};
use crate::process;
use crate::store::write_atomic;
use api::migration::{
    IncomingLaunch, MigrationJobInfo, MigrationPhase, MoveRequest, WorkerChainFiles,
    WorkerMigrateStart, WorkerMigrateStatus, WorkerMirrorDone, WorkerMirrorStart,
    WorkerMirrorStatus,
};
use api::worker::{LaunchSpec, WorkerStatus};
use api::{VmSpec, VmState};
use base64::Engine;
use migration::job::{recovery, Done, Recovery};
use migration::protocol::{
    self, IncomingState, IncomingStatus, PrepareRequest, StorageCopy, LEASE_SECS,
};
use migration::tls::StreamHeader;
use migration::{PeerClient, PeerError, VmNeeds};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A migration that must stop, and why.
enum Stop {
    Cancelled,
    Failed(String),
}

impl From<PeerError> for Stop {
    fn from(e: PeerError) -> Self {
        Stop::Failed(e.to_string())
    }
}

impl From<api::ClientError> for Stop {
    fn from(e: api::ClientError) -> Self {
        Stop::Failed(format!("the VM's worker: {e}"))
    }
}

fn short_id() -> String {
    let u = Uuid::new_v4().simple().to_string();
    format!("mig-{}", &u[..8])
}

fn uri_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(name)
}

impl Manager {
    // ───────────────────────── source ─────────────────────────

    /// Starts moving a running VM to a trusted host; returns the job at once.
    pub async fn move_vm(
        self: &Arc<Self>,
        name: &str,
        req: MoveRequest,
    ) -> ApiResult<MigrationJobInfo> {
        let peers = peers::get()?;
        let (uuid, op) = self.find(name)?;
        if self.qemu_pid(&uuid).is_none() {
            return Err(ApiError::wrong_state(format!(
                "VM {name} is not running: live migration moves running VMs (start it with `vireo vm start {name}`)"
            )));
        }
        if !req.include_storage && req.destination_path.is_some() {
            return Err(ApiError::invalid(
                "--destination-path is for shared-nothing migration: add --include-storage",
            ));
        }
        if let Some(p) = &req.destination_path {
            if !p.is_absolute() {
                return Err(ApiError::invalid(format!(
                    "the destination path {} is not absolute",
                    p.display()
                )));
            }
        }
        let peer = peers.trust.find(&req.to).ok_or_else(|| {
            ApiError::not_found(format!(
                "no trusted host {:?} (see `vireo host list`; trust it with `vireo host trust ADDR:PORT`)",
                req.to
            ))
        })?;
        let settings = peers.settings();
        if peers.active() >= settings.max_migrations {
            return Err(ApiError::wrong_state(format!(
                "this host already runs {} of its {} simultaneous migrations; wait, or raise it with `vireo host set --max-migrations N`",
                peers.active(),
                settings.max_migrations
            )));
        }
        let op = op.try_lock_owned().map_err(|_| {
            ApiError::wrong_state(format!("VM {name} is busy with another operation"))
        })?;
        let spec = self.spec(&uuid)?;
        let id = short_id();
        let info = MigrationJobInfo {
            id: id.clone(),
            vm: name.to_string(),
            direction: "outgoing".into(),
            peer: format!("{} ({})", peer.name, peer.address),
            phase: MigrationPhase::Negotiating,
            include_storage: req.include_storage,
            memory_transferred: 0,
            memory_remaining: 0,
            memory_total: spec.memory,
            disk_transferred: 0,
            disk_total: 0,
            dirty_pages_rate: 0,
            passes: 0,
            expected_downtime_ms: 0,
            downtime_ms: None,
            bandwidth: req.bandwidth,
            started: super::now_unix(),
            elapsed_secs: 0.0,
            message: None,
        };
        let job = Arc::new(Outgoing {
            info: std::sync::Mutex::new(info.clone()),
            cancel: std::sync::atomic::AtomicBool::new(false),
            t0: Instant::now(),
        });
        peers::lock(&peers.outgoing).insert(id.clone(), job.clone());
        tracing::info!(vm = %name, job = %id, to = %peer.address, "live migration started");
        let m = self.clone();
        let client = PeerClient::new(
            peers.identity.clone(),
            &peer.address,
            Some(&peer.fingerprint),
        );
        tokio::spawn(async move {
            let _op = op;
            m.run_outgoing(job, uuid, spec, client, req).await;
        });
        Ok(info)
    }

    /// Cancels a migration job (the VM stays on the source).
    pub fn migration_cancel(&self, id: &str) -> ApiResult<MigrationJobInfo> {
        let peers = peers::get()?;
        let job = peers::lock(&peers.outgoing)
            .get(id)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no migration job {id} on this host (cancel it on its source host)"
                ))
            })?;
        let info = peers::lock(&job.info).clone();
        if info.phase.is_final() {
            return Err(ApiError::wrong_state(format!(
                "migration {id} already ended ({:?})",
                info.phase
            )));
        }
        job.cancel.store(true, Ordering::SeqCst);
        Ok(info)
    }

    fn set_phase(job: &Outgoing, phase: MigrationPhase) {
        peers::lock(&job.info).phase = phase;
    }

    async fn run_outgoing(
        self: Arc<Self>,
        job: Arc<Outgoing>,
        uuid: Uuid,
        spec: VmSpec,
        peer: PeerClient,
        req: MoveRequest,
    ) {
        let id = peers::lock(&job.info).id.clone();
        let run_dir = self.run_dir(&uuid);
        let was_running = self
            .worker_client(&uuid)
            .get::<WorkerStatus>("/status")
            .await
            .map(|s| s.state == VmState::Running)
            .unwrap_or(true);
        let mut done = Done::default();
        let mut tunnel: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        self.set_message(&uuid, Some(format!("moving to {}", peer.address())));
        let r = self
            .outgoing_steps(&job, &id, uuid, &spec, &peer, &req, &mut done, &mut tunnel)
            .await;
        for t in tunnel.drain(..) {
            t.abort();
        }
        let _ = std::fs::remove_file(uri_path(&run_dir, "migrate-out.sock"));
        for i in 0..spec.disks.len() {
            let _ = std::fs::remove_file(uri_path(&run_dir, &format!("mirror-out-{i}.sock")));
        }
        match r {
            Ok(copied_files) => {
                self.finish_source(uuid, &spec.name).await;
                remove_source_files(&id, &copied_files);
                let mut i = peers::lock(&job.info);
                i.phase = MigrationPhase::Completed;
                i.elapsed_secs = job.t0.elapsed().as_secs_f64();
                i.message = Some(format!("the VM runs on {}", peer.address()));
                tracing::info!(vm = %spec.name, job = %id, downtime_ms = ?i.downtime_ms, "live migration completed");
            }
            Err(stop) => {
                let (phase, why) = match stop {
                    Stop::Cancelled => (MigrationPhase::Cancelled, "cancelled".to_string()),
                    Stop::Failed(w) => (MigrationPhase::Failed, w),
                };
                tracing::warn!(vm = %spec.name, job = %id, "live migration stopped: {why}; recovering on the source");
                let outcome = self.recover(&id, uuid, &peer, &mut done, was_running).await;
                let on_destination = matches!(outcome, RecoveryOutcome::Destination);
                {
                    let mut i = peers::lock(&job.info);
                    i.elapsed_secs = job.t0.elapsed().as_secs_f64();
                    if on_destination {
                        i.phase = MigrationPhase::Completed;
                        i.message = Some(format!(
                            "the destination confirmed it runs the VM after: {why}"
                        ));
                    } else {
                        i.phase = phase;
                        i.message = Some(format!("{why}; the VM keeps running on this host"));
                    }
                }
                if on_destination {
                    self.finish_source(uuid, &spec.name).await;
                    if req.include_storage && done.mirrored {
                        tracing::warn!(job = %id, "the source's disk files stay (the move ended in recovery); remove them once the VM is verified on the destination");
                    }
                } else {
                    CommitRecord::remove(&run_dir);
                    self.set_message(&uuid, Some(format!("live migration {id}: {why}")));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn outgoing_steps(
        self: &Arc<Self>,
        job: &Arc<Outgoing>,
        id: &str,
        uuid: Uuid,
        spec: &VmSpec,
        peer: &PeerClient,
        req: &MoveRequest,
        done: &mut Done,
        tunnel: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Result<Vec<PathBuf>, Stop> {
        let check_cancel = |job: &Outgoing| {
            if job.cancel.load(Ordering::SeqCst) {
                Err(Stop::Cancelled)
            } else {
                Ok(())
            }
        };
        let run_dir = self.run_dir(&uuid);
        let worker = self.worker_client(&uuid);
        // Negotiating: refuse before anything moves.
        let theirs: protocol::Hello = peer.get("/peer/v1/hello").await?;
        let ours = peers::hello(self);
        let accel = lock(&self.vms)
            .get(&uuid)
            .and_then(|e| e.last_status.as_ref().map(|s| s.accel))
            .unwrap_or_else(|| self.accel_for(spec.accel).0);
        let needs = VmNeeds::of(spec, accel, req.include_storage);
        let reasons = protocol::check(&ours, &theirs, &needs);
        if !reasons.is_empty() {
            return Err(Stop::Failed(format!(
                "refused before anything moved: {}",
                protocol::explain(&reasons)
            )));
        }
        check_cancel(job)?;
        Self::set_phase(job, MigrationPhase::Preparing);

        // Preparing.
        let mut disks = Vec::new();
        for i in 0..spec.disks.len() {
            let f = migration::nbd_probe::export_facts(
                &storage::socket_path(&run_dir, i),
                &storage::export_name(i),
            )
            .await
            .map_err(|e| Stop::Failed(format!("reading disk {i}'s export: {e}")))?;
            disks.push(f);
        }
        let vm_dir = self.store.vm_dir(&uuid);
        let launch: Option<serde_json::Value> = std::fs::read(run_dir.join("launch.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let disk_state = std::fs::read(vm_dir.join(storage::FILE_NAME))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let uefi_vars = std::fs::read(vm_dir.join("uefi-vars.fd"))
            .ok()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        let storage = if req.include_storage {
            let files: WorkerChainFiles = worker.get("/migration/chain-files").await?;
            if files.disks.len() != spec.disks.len() {
                return Err(Stop::Failed(format!(
                    "the worker serves {} disks, the VM has {}",
                    files.disks.len(),
                    spec.disks.len()
                )));
            }
            let total: u64 = files
                .disks
                .iter()
                .flatten()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum();
            peers::lock(&job.info).disk_total = total;
            Some(StorageCopy {
                destination_path: req.destination_path.clone(),
                files: files.disks,
            })
        } else {
            None
        };
        let prep = PrepareRequest {
            id: id.to_string(),
            source: ours,
            needs,
            spec: spec.clone(),
            disks,
            disk_state,
            uefi_vars,
            multifd_channels: 0,
            launch,
            storage,
        };
        done.prepared = true;
        let st: IncomingStatus = peer
            .clone()
            .with_timeout(Duration::from_secs(150))
            .post("/peer/v1/migrations", &prep)
            .await?;
        tracing::info!(job = %id, qemu = %st.qemu_status, "destination prepared");
        check_cancel(job)?;
        let mut lease = Lease::new();

        // CopyingDisks (shared-nothing): mirror every chain while the VM runs.
        if req.include_storage {
            Self::set_phase(job, MigrationPhase::CopyingDisks);
            let mut sockets = Vec::new();
            for i in 0..spec.disks.len() {
                let sock = uri_path(&run_dir, &format!("mirror-out-{i}.sock"));
                tunnel.push(open_tunnel(&sock, peer, id, &protocol::disk_channel(i))?);
                sockets.push(sock);
            }
            done.mirroring = true;
            worker
                .post::<_, serde_json::Value>(
                    "/migration/mirror-start",
                    &WorkerMirrorStart {
                        sockets,
                        bandwidth: req.bandwidth,
                    },
                )
                .await?;
            let mut last = (0u64, Instant::now());
            loop {
                check_cancel(job)?;
                let s = self.mirror_status(job, &worker).await?;
                if s.converged {
                    break;
                }
                if s.bytes_copied != last.0 {
                    last = (s.bytes_copied, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(LEASE_SECS) {
                    return Err(Stop::Failed(format!(
                        "the disk copy made no progress for {LEASE_SECS} s (network to the destination down?)"
                    )));
                }
                lease.keep(peer, id).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tracing::info!(job = %id, "disks in sync; memory follows");
        }

        // Memory: the tunnel, then QEMU's migration.
        let sock = uri_path(&run_dir, "migrate-out.sock");
        tunnel.push(open_tunnel(&sock, peer, id, "memory")?);
        Self::set_phase(job, MigrationPhase::Memory);
        done.migrating = true;
        worker
            .post::<_, serde_json::Value>(
                "/migration/start",
                &WorkerMigrateStart {
                    uri: format!("unix:{}", sock.display()),
                    bandwidth: req.bandwidth,
                    max_downtime_ms: req.max_downtime_ms,
                    auto_converge: true,
                    multifd_channels: 0,
                },
            )
            .await?;
        let mut last_bytes = 0u64;
        let mut last_progress = Instant::now();
        let mut last_mirror = Instant::now();
        loop {
            check_cancel(job)?;
            let s: WorkerMigrateStatus = worker.get("/migration/status").await?;
            self.record(job, &s);
            if req.include_storage && last_mirror.elapsed() >= Duration::from_millis(200) {
                last_mirror = Instant::now();
                self.mirror_status(job, &worker).await?;
            }
            match s.status.as_str() {
                "pre-switchover" => break,
                "failed" | "cancelled" | "none" => {
                    return Err(Stop::Failed(format!(
                        "QEMU's migration {}: {}",
                        s.status,
                        s.error.unwrap_or_else(|| "no detail".into())
                    )))
                }
                _ => {}
            }
            if s.transferred != last_bytes {
                last_bytes = s.transferred;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > Duration::from_secs(LEASE_SECS) {
                return Err(Stop::Failed(format!(
                    "the memory stream made no progress for {LEASE_SECS} s (network to the destination down?)"
                )));
            }
            lease.keep(peer, id).await?;
            // QEMU pauses the guest at pre-switchover: every ms until it is seen is downtime.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }

        // Switchover: the VM is paused.
        let t_pause = Instant::now();
        let ms = |t: Instant| t.duration_since(t_pause).as_millis() as u64;
        Self::set_phase(job, MigrationPhase::Switchover);
        test_hold(HoldPoint::Switchover, job, &mut lease, peer, id).await?;
        check_cancel(job)?;
        lease.keep_now(peer, id).await?;
        let mut copied_files = Vec::new();
        if req.include_storage {
            // The guest is paused: the final pass makes the destination byte-identical,
            // verified by checksum, and commits it there.
            let md: WorkerMirrorDone = worker
                .clone()
                .with_timeout(Duration::from_secs(600))
                .post("/migration/mirror-complete", &())
                .await
                .map_err(|e| Stop::Failed(format!("completing the disk copy: {e}")))?;
            done.mirrored = true;
            {
                let mut i = peers::lock(&job.info);
                i.disk_transferred = md.bytes_copied;
            }
            tracing::info!(job = %id, final_pass = md.final_pass_bytes, io_pause_ms = md.io_pause_ms, checksums = ?md.checksums, "disks verified at the destination");
            copied_files = md.source_files;
            test_hold(HoldPoint::Verified, job, &mut lease, peer, id).await?;
            lease.keep_now(peer, id).await?;
        }
        let t_disks = Instant::now();
        done.disks_released = true;
        done.activate_sent = true;
        let release = async {
            worker
                .post::<_, serde_json::Value>("/migration/release-disks", &())
                .await
        };
        let activate = async {
            peer.post::<_, IncomingStatus>(&format!("/peer/v1/migrations/{id}/activate"), &())
                .await
        };
        if req.include_storage {
            // Shared-nothing: the destination opens its own copies, which the source never
            // touches, so both ends switch their disks at the same time.
            let (r, a) = tokio::join!(release, activate);
            r?;
            a?;
        } else {
            // Shared storage: the source closes the images before the destination opens them.
            release.await?;
            activate.await?;
        }
        let t_activated = Instant::now();
        worker
            .post::<_, serde_json::Value>("/migration/continue", &())
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s: WorkerMigrateStatus = worker.get("/migration/status").await?;
            self.record(job, &s);
            match s.status.as_str() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(Stop::Failed(format!(
                        "QEMU's migration failed at switchover: {}",
                        s.error.unwrap_or_else(|| "no detail".into())
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(Stop::Failed(
                        "switchover did not complete within 60 s".into(),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let t_sent = Instant::now();
        test_hold(HoldPoint::Commit, job, &mut lease, peer, id).await?;
        // From here the destination may run the VM: a vireod that dies now must, when it
        // comes back, ask the destination before it does anything with this VM.
        let record = CommitRecord {
            id: id.to_string(),
            to: req.to.clone(),
            source_files: copied_files.clone(),
        };
        if let Err(e) = record.save(&run_dir) {
            return Err(Stop::Failed(format!(
                "recording the commit in {}: {e}",
                run_dir.display()
            )));
        }
        // Commit: from here the destination may run the VM.
        done.commit_sent = true;
        match peer
            .post::<_, IncomingStatus>(&format!("/peer/v1/migrations/{id}/commit"), &())
            .await
        {
            Ok(st) if st.state == IncomingState::Committed => {
                done.committed = true;
                tracing::info!(
                    job = %id,
                    disks_verified_ms = ms(t_disks),
                    disks_switched_ms = ms(t_activated),
                    state_sent_ms = ms(t_sent),
                    resumed_ms = ms(Instant::now()),
                    "switchover phases (ms since the pre-switchover pause)"
                );
                test_hold(HoldPoint::Committed, job, &mut lease, peer, id).await?;
                Ok(copied_files)
            }
            Ok(st) => Err(Stop::Failed(format!(
                "the destination did not take the VM (state {:?})",
                st.state
            ))),
            Err(e) => {
                if e.not_delivered() {
                    done.commit_sent = false;
                }
                Err(e.into())
            }
        }
    }

    /// Mirror progress into the job; a failed mirror stops the migration.
    async fn mirror_status(
        &self,
        job: &Outgoing,
        worker: &api::Client,
    ) -> Result<WorkerMirrorStatus, Stop> {
        let s: WorkerMirrorStatus = worker.get("/migration/mirror-status").await?;
        {
            let mut i = peers::lock(&job.info);
            i.disk_transferred = s.bytes_copied;
            i.disk_total = i.disk_total.max(s.bytes_copied + s.bytes_remaining);
            i.elapsed_secs = job.t0.elapsed().as_secs_f64();
        }
        if let Some(e) = &s.error {
            return Err(Stop::Failed(format!("copying the disks: {e}")));
        }
        if s.disks == 0 {
            return Err(Stop::Failed("the disk mirrors are gone".into()));
        }
        Ok(s)
    }

    fn record(&self, job: &Outgoing, s: &WorkerMigrateStatus) {
        let mut i = peers::lock(&job.info);
        i.memory_transferred = s.transferred;
        i.memory_remaining = s.remaining;
        if s.total > 0 {
            i.memory_total = s.total;
        }
        i.dirty_pages_rate = s.dirty_pages_rate;
        i.passes = s.passes;
        i.expected_downtime_ms = s.expected_downtime_ms;
        if s.downtime_ms.is_some() {
            i.downtime_ms = s.downtime_ms;
        }
        i.elapsed_secs = job.t0.elapsed().as_secs_f64();
    }

    /// Runs the recovery plan; says where the VM runs afterwards.
    async fn recover(
        &self,
        id: &str,
        uuid: Uuid,
        peer: &PeerClient,
        done: &mut Done,
        was_running: bool,
    ) -> RecoveryOutcome {
        let mut plan = recovery(done);
        let mut i = 0;
        while i < plan.len() {
            let step = plan[i];
            i += 1;
            tracing::info!(job = %id, ?step, "recovery");
            match step {
                Recovery::FinishOnDestination => return RecoveryOutcome::Destination,
                Recovery::AskDestination => {
                    // The commit may have arrived: ask until the destination answers.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut answer = None;
                    while Instant::now() < deadline {
                        match peer
                            .get::<IncomingStatus>(&format!("/peer/v1/migrations/{id}"))
                            .await
                        {
                            Ok(st) => {
                                answer = Some(st.state);
                                break;
                            }
                            Err(PeerError::Refused { .. }) => {
                                answer = Some(IncomingState::Aborted);
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                        }
                    }
                    match answer {
                        Some(IncomingState::Committed) => return RecoveryOutcome::Destination,
                        other => {
                            if other.is_none() {
                                tracing::error!(job = %id, "the destination stayed unreachable after the commit request; resuming the VM here (check the destination: it must not run the VM)");
                            }
                            done.commit_sent = false;
                            plan = recovery(done);
                            i = 0;
                        }
                    }
                }
                Recovery::AbortDestination { must_confirm } => {
                    let deadline = Instant::now() + Duration::from_secs(LEASE_SECS + 3);
                    loop {
                        match peer
                            .clone()
                            .with_timeout(Duration::from_secs(20))
                            .post::<_, IncomingStatus>(
                                &format!("/peer/v1/migrations/{id}/abort"),
                                &(),
                            )
                            .await
                        {
                            Ok(_) | Err(PeerError::Refused { .. }) => break,
                            Err(e) => {
                                if !must_confirm || Instant::now() > deadline {
                                    // The destination aborts by itself when its lease ends.
                                    tracing::warn!(job = %id, "destination not reachable for abort: {e}");
                                    if must_confirm {
                                        tokio::time::sleep(Duration::from_secs(1)).await;
                                    }
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
                Recovery::ReopenSourceDisks => {
                    // A new worker re-serves the same chains on the same sockets; QEMU's
                    // NBD client reconnects (the guest is paused meanwhile).
                    if let Some(pid) = self.worker_pid(&uuid) {
                        process::signal(pid, libc::SIGKILL);
                    }
                    for _ in 0..100 {
                        if self.worker_pid(&uuid).is_none() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let run_dir = self.run_dir(&uuid);
                    if let Err(e) = process::spawn_worker(&self.host.worker_bin, &run_dir, true) {
                        tracing::error!(job = %id, "restarting the source worker: {e}");
                    }
                    self.wait_worker(&uuid, Duration::from_secs(30)).await;
                }
                Recovery::CancelDiskMirrors => {
                    self.ensure_worker(id, &uuid).await;
                    if let Err(e) = self
                        .worker_client(&uuid)
                        .with_timeout(Duration::from_secs(60))
                        .post::<_, serde_json::Value>("/migration/mirror-cancel", &())
                        .await
                    {
                        tracing::warn!(job = %id, "stopping the disk mirrors: {e}");
                    }
                }
                Recovery::CancelQemuMigration => {
                    self.ensure_worker(id, &uuid).await;
                    let _ = self
                        .worker_client(&uuid)
                        .post::<_, serde_json::Value>("/migration/cancel", &())
                        .await;
                }
                Recovery::ResumeSource => {
                    self.ensure_worker(id, &uuid).await;
                    let client = self.worker_client(&uuid);
                    if let Ok(st) = client.get::<WorkerStatus>("/status").await {
                        if was_running && st.state != VmState::Running {
                            match client.post::<_, WorkerStatus>("/resume", &()).await {
                                // `vm show` reads this cache: without it the state stays
                                // `saving` (from the switchover) until the next supervision pass.
                                Ok(st) => self.cache_status(&uuid, Some(st)),
                                Err(e) => {
                                    tracing::error!(job = %id, "resuming the VM on the source: {e}")
                                }
                            }
                        } else {
                            self.cache_status(&uuid, Some(st));
                        }
                    }
                }
            }
        }
        RecoveryOutcome::Source
    }

    /// The source worker died during the migration (supervision leaves a VM that is busy
    /// with an operation alone): a new worker re-attaches to QEMU so recovery can reach it.
    /// Runs only after the destination let go of shared disks (the plan orders it so).
    async fn ensure_worker(&self, id: &str, uuid: &Uuid) {
        if self.worker_pid(uuid).is_some() || self.qemu_pid(uuid).is_none() {
            return;
        }
        tracing::warn!(job = %id, "the source worker is gone; starting a new one that re-attaches to QEMU");
        if let Err(e) = process::spawn_worker(&self.host.worker_bin, &self.run_dir(uuid), true) {
            tracing::error!(job = %id, "restarting the source worker: {e}");
            return;
        }
        if let Some(e) = lock(&self.vms).get_mut(uuid) {
            e.worker_restarts += 1;
        }
        self.wait_worker(uuid, Duration::from_secs(30)).await;
    }

    async fn wait_worker(&self, uuid: &Uuid, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let client = self
            .worker_client(uuid)
            .with_timeout(Duration::from_secs(3));
        while Instant::now() < deadline {
            if let Ok(st) = client.get::<WorkerStatus>("/status").await {
                self.cache_status(uuid, Some(st));
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The destination runs the VM: quit the source QEMU and forget the VM here (its disks
    /// stay: they are the destination's now, or shared).
    async fn finish_source(&self, uuid: Uuid, name: &str) {
        let _ = self
            .worker_client(&uuid)
            .with_timeout(Duration::from_secs(10))
            .post::<_, serde_json::Value>("/migration/finish", &())
            .await;
        if !self.wait_gone(&uuid, Duration::from_secs(20)).await {
            if let Some(pid) = self.qemu_pid(&uuid) {
                process::signal(pid, libc::SIGKILL);
            }
            if let Some(pid) = self.worker_pid(&uuid) {
                process::signal(pid, libc::SIGKILL);
            }
            self.wait_gone(&uuid, Duration::from_secs(5)).await;
        }
        if let Err(e) = self.store.remove(&uuid) {
            tracing::warn!(vm = %name, "removing the moved VM's record: {e}");
        }
        let _ = std::fs::remove_dir_all(self.run_dir(&uuid));
        lock(&self.vms).remove(&uuid);
    }

    // ─────────────────────── destination ───────────────────────

    fn incoming_get(&self, id: &str, fp: &str) -> ApiResult<Incoming> {
        let peers = peers::get()?;
        let mut map = peers::lock(&peers.incoming);
        let inc = map
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found(format!("no incoming migration {id}")))?;
        if inc.source_fp != fp {
            tracing::warn!(job = %id, fingerprint = %fp, "a host other than the source tried to drive a migration");
            return Err(ApiError::invalid(
                "only the source host drives this migration",
            ));
        }
        inc.last_contact = Instant::now();
        Ok(inc.clone())
    }

    fn incoming_set(&self, id: &str, state: IncomingState) {
        if let Ok(peers) = peers::get() {
            if let Some(i) = peers::lock(&peers.incoming).get_mut(id) {
                i.state = state;
                i.info.phase = match state {
                    IncomingState::Prepared => MigrationPhase::Memory,
                    IncomingState::Activated => MigrationPhase::Switchover,
                    IncomingState::Committed => MigrationPhase::Completed,
                    IncomingState::Aborted => MigrationPhase::Failed,
                };
            }
        }
    }

    async fn incoming_qemu_status(&self, run_dir: &Path) -> String {
        api::Client::new(run_dir.join("worker.sock"))
            .with_timeout(Duration::from_secs(5))
            .get::<WorkerStatus>("/status")
            .await
            .map(|s| s.qemu_status)
            .unwrap_or_else(|_| "unknown".into())
    }

    /// Prepares an incoming VM: compatibility again, then a worker waiting for the state.
    pub async fn incoming_prepare(
        self: &Arc<Self>,
        mut req: PrepareRequest,
        source_fp: &str,
    ) -> ApiResult<IncomingStatus> {
        let peers = peers::get()?;
        let ours = peers::hello(self);
        let reasons = protocol::check(&req.source, &ours, &req.needs);
        if !reasons.is_empty() {
            return Err(ApiError::wrong_state(protocol::explain(&reasons)));
        }
        let uuid = req.spec.uuid;
        {
            let vms = lock(&self.vms);
            if vms.contains_key(&uuid) {
                return Err(ApiError::conflict(format!(
                    "VM {} ({uuid}) is already defined on this host",
                    req.spec.name
                )));
            }
            if vms.values().any(|e| e.spec.name == req.spec.name) {
                return Err(ApiError::conflict(format!(
                    "a VM named {:?} already exists on this host; rename one of them first",
                    req.spec.name
                )));
            }
        }
        if peers::lock(&peers.incoming).values().any(|i| {
            i.uuid == uuid && !matches!(i.state, IncomingState::Aborted | IncomingState::Committed)
        }) {
            return Err(ApiError::conflict("this VM is already being received"));
        }
        self.admit_memory(&uuid, &req.spec).map_err(|e| {
            ApiError::wrong_state(format!(
                "not enough memory on this host for VM {}: {}; fix: free memory here, or raise the budget/lower the reserve (`vireo host set`)",
                req.spec.name, e.message
            ))
        })?;
        if req.storage.is_none() {
            for d in &req.spec.disks {
                if !d.path.is_file() {
                    return Err(ApiError::invalid(format!(
                        "disk {} is not visible on this host; fix: put the disks on storage both hosts see, or move with --include-storage",
                        d.path.display()
                    )));
                }
            }
        }
        let run_dir = self.run_dir(&uuid);
        let vm_dir = self.store.vm_dir(&uuid);
        // Shared-nothing: where the copies land; refused before anything moves.
        let (storage_dir, storage_files, dir_created) = match req.storage.clone() {
            Some(sc) => {
                let dir = sc
                    .destination_path
                    .clone()
                    .unwrap_or_else(|| vm_dir.clone());
                let (files, created) = plan_storage(&mut req, &sc, &dir, &vm_dir)?;
                (Some(dir), files, created)
            }
            None => (None, Vec::new(), false),
        };
        let record = peers.records_dir().join(format!("in-{}.json", req.id));
        write_atomic(
            &record,
            &serde_json::to_vec(&serde_json::json!({
                "id": req.id,
                "uuid": uuid,
                "files": storage_files,
                "created_dir": if dir_created { storage_dir.clone() } else { None },
            }))
            .map_err(ApiError::internal)?,
        )?;
        let r = self.prepare_dirs(&req, &run_dir, &vm_dir);
        let launch = match r {
            Ok(l) => l,
            Err(e) => {
                self.cleanup_incoming(uuid, &run_dir, &record).await;
                return Err(e);
            }
        };
        let info = MigrationJobInfo {
            id: req.id.clone(),
            vm: req.spec.name.clone(),
            direction: "incoming".into(),
            peer: req.source.hostname.clone(),
            phase: MigrationPhase::Preparing,
            include_storage: req.storage.is_some(),
            memory_transferred: 0,
            memory_remaining: 0,
            memory_total: req.spec.memory,
            disk_transferred: 0,
            disk_total: 0,
            dirty_pages_rate: 0,
            passes: 0,
            expected_downtime_ms: 0,
            downtime_ms: None,
            bandwidth: 0,
            started: super::now_unix(),
            elapsed_secs: 0.0,
            message: None,
        };
        let id = req.id.clone();
        peers::lock(&peers.incoming).insert(
            id.clone(),
            Incoming {
                info,
                uuid,
                source_fp: source_fp.to_string(),
                state: IncomingState::Prepared,
                last_contact: Instant::now(),
                run_dir: run_dir.clone(),
                storage_dir,
                received: vec![false; req.spec.disks.len()],
                request: Arc::new(req),
            },
        );
        let started = async {
            let pid = process::spawn_worker(&self.host.worker_bin, &run_dir, false)
                .map_err(|e| ApiError::failed(format!("starting the destination worker: {e}")))?;
            let client =
                api::Client::new(run_dir.join("worker.sock")).with_timeout(Duration::from_secs(5));
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if Instant::now() > deadline {
                    return Err(ApiError::failed(
                        "the destination worker did not get ready within 90 s",
                    ));
                }
                if !process::alive(pid, "vireo-worker") {
                    return Err(ApiError::failed(format!(
                        "the destination worker failed: {}",
                        super::last_error_line(&run_dir.join("worker.log"))
                    )));
                }
                if let Ok(st) = client.get::<WorkerStatus>("/status").await {
                    if st.qemu_status == "inmigrate" {
                        return Ok(st.qemu_status);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        .await;
        let _ = launch;
        match started {
            Ok(qemu_status) => {
                self.incoming_set(&id, IncomingState::Prepared);
                tracing::info!(job = %id, vm = %uuid, "incoming migration prepared");
                Ok(IncomingStatus {
                    id,
                    state: IncomingState::Prepared,
                    qemu_status,
                })
            }
            Err(e) => {
                self.incoming_abort(&id, &e.message).await;
                Err(e)
            }
        }
    }

    fn prepare_dirs(
        &self,
        req: &PrepareRequest,
        run_dir: &Path,
        vm_dir: &Path,
    ) -> ApiResult<LaunchSpec> {
        let _ = std::fs::remove_dir_all(run_dir);
        std::fs::create_dir_all(run_dir).map_err(ApiError::internal)?;
        std::fs::create_dir_all(vm_dir).map_err(ApiError::internal)?;
        if let Some(ds) = &req.disk_state {
            let bytes = serde_json::to_vec_pretty(ds).map_err(ApiError::internal)?;
            write_atomic(&vm_dir.join(storage::FILE_NAME), &bytes)?;
        }
        let uefi_vars = match &req.uefi_vars {
            Some(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| ApiError::invalid(format!("bad UEFI variable store: {e}")))?;
                let p = vm_dir.join("uefi-vars.fd");
                write_atomic(&p, &bytes)?;
                let marker = format!(
                    "{}:{}",
                    req.spec.secure_boot,
                    req.spec.secure_boot_template.as_str()
                );
                std::fs::write(vm_dir.join("uefi-vars.template"), marker)
                    .map_err(ApiError::internal)?;
                Some(p)
            }
            None => None,
        };
        let mut launch = req.launch.clone().unwrap_or_else(|| serde_json::json!({}));
        let incoming = IncomingLaunch {
            uri: format!("unix:{}", run_dir.join("migrate-in.sock").display()),
            disks: req.disks.clone(),
            multifd_channels: req.multifd_channels,
        };
        let obj = launch
            .as_object_mut()
            .ok_or_else(|| ApiError::invalid("the source's launch is not an object"))?;
        obj.insert(
            "vm".into(),
            serde_json::to_value(&req.spec).map_err(ApiError::internal)?,
        );
        obj.insert(
            "accel".into(),
            serde_json::to_value(req.needs.accel).map_err(ApiError::internal)?,
        );
        obj.insert(
            "run_dir".into(),
            serde_json::to_value(run_dir).map_err(ApiError::internal)?,
        );
        obj.insert(
            "uefi_vars".into(),
            serde_json::to_value(&uefi_vars).map_err(ApiError::internal)?,
        );
        obj.insert(
            "console_log".into(),
            serde_json::to_value(vm_dir.join("console.log")).map_err(ApiError::internal)?,
        );
        obj.insert("restore_from".into(), serde_json::Value::Null);
        obj.insert(
            "incoming".into(),
            serde_json::to_value(&incoming).map_err(ApiError::internal)?,
        );
        let spec: LaunchSpec = serde_json::from_value(launch).map_err(|e| {
            ApiError::invalid(format!("the source's launch does not fit this host: {e}"))
        })?;
        let bytes = serde_json::to_vec_pretty(&spec).map_err(ApiError::internal)?;
        write_atomic(&run_dir.join("launch.json"), &bytes)?;
        Ok(spec)
    }

    /// Status of an incoming migration (each call renews the source's lease).
    pub async fn incoming_status(&self, id: &str, fp: &str) -> ApiResult<IncomingStatus> {
        let inc = self.incoming_get(id, fp)?;
        Ok(IncomingStatus {
            id: id.to_string(),
            state: inc.state,
            qemu_status: self.incoming_qemu_status(&inc.run_dir).await,
        })
    }

    /// Opens the disks here (the source closed them).
    pub async fn incoming_activate(&self, id: &str, fp: &str) -> ApiResult<IncomingStatus> {
        let inc = self.incoming_get(id, fp)?;
        if inc.state != IncomingState::Prepared {
            return Err(ApiError::wrong_state(format!(
                "migration {id} is {:?}",
                inc.state
            )));
        }
        if inc.storage_dir.is_some() {
            // The source's last mirror commit may still be finishing its bookkeeping here.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let all = peers::get()
                    .ok()
                    .and_then(|p| {
                        peers::lock(&p.incoming)
                            .get(id)
                            .map(|i| i.received.iter().all(|r| *r))
                    })
                    .unwrap_or(false);
                if all {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ApiError::wrong_state(format!(
                        "migration {id}: not every disk was received completely"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.incoming_set(id, IncomingState::Activated);
        let client =
            api::Client::new(inc.run_dir.join("worker.sock")).with_timeout(Duration::from_secs(30));
        client
            .post::<_, serde_json::Value>("/migration/activate", &())
            .await?;
        Ok(IncomingStatus {
            id: id.to_string(),
            state: IncomingState::Activated,
            qemu_status: self.incoming_qemu_status(&inc.run_dir).await,
        })
    }

    /// Runs the VM here and adopts it into the inventory.
    pub async fn incoming_commit(&self, id: &str, fp: &str) -> ApiResult<IncomingStatus> {
        let inc = self.incoming_get(id, fp)?;
        if inc.state == IncomingState::Committed {
            return Ok(IncomingStatus {
                id: id.to_string(),
                state: IncomingState::Committed,
                qemu_status: self.incoming_qemu_status(&inc.run_dir).await,
            });
        }
        if inc.state != IncomingState::Activated {
            return Err(ApiError::wrong_state(format!(
                "migration {id} is {:?}",
                inc.state
            )));
        }
        let client =
            api::Client::new(inc.run_dir.join("worker.sock")).with_timeout(Duration::from_secs(30));
        client
            .post::<_, serde_json::Value>("/migration/resume", &())
            .await?;
        let spec = inc.request.spec.clone();
        self.store.save(&spec)?;
        lock(&self.vms).insert(
            inc.uuid,
            VmEntry {
                spec,
                op_lock: Arc::new(tokio::sync::Mutex::new(())),
                transient: None,
                status_message: Some(format!("moved here from {}", inc.info.peer)),
                worker_restarts: 0,
                last_status: None,
                last_start: None,
            },
        );
        self.incoming_set(id, IncomingState::Committed);
        if let Ok(peers) = peers::get() {
            let _ = std::fs::remove_file(peers.records_dir().join(format!("in-{id}.json")));
        }
        tracing::info!(job = %id, vm = %inc.request.spec.name, "incoming VM runs here");
        Ok(IncomingStatus {
            id: id.to_string(),
            state: IncomingState::Committed,
            qemu_status: self.incoming_qemu_status(&inc.run_dir).await,
        })
    }

    /// Abort requested by the source.
    pub async fn incoming_abort_by_source(&self, id: &str, fp: &str) -> ApiResult<IncomingStatus> {
        let inc = self.incoming_get(id, fp)?;
        if inc.state == IncomingState::Committed {
            return Err(ApiError::wrong_state(format!(
                "migration {id} is committed: the VM runs here"
            )));
        }
        self.incoming_abort(id, "aborted by the source").await;
        Ok(IncomingStatus {
            id: id.to_string(),
            state: IncomingState::Aborted,
            qemu_status: "gone".into(),
        })
    }

    /// Kills the incoming worker and QEMU, removes every file made for it.
    async fn incoming_abort(&self, id: &str, why: &str) {
        let Ok(peers) = peers::get() else { return };
        let inc = peers::lock(&peers.incoming).get(id).cloned();
        let Some(inc) = inc else { return };
        if matches!(inc.state, IncomingState::Committed | IncomingState::Aborted) {
            return;
        }
        tracing::warn!(job = %id, "incoming migration aborted: {why}");
        let record = peers.records_dir().join(format!("in-{id}.json"));
        self.cleanup_incoming(inc.uuid, &inc.run_dir, &record).await;
        self.incoming_set(id, IncomingState::Aborted);
        let mut map = peers::lock(&peers.incoming);
        if let Some(i) = map.get_mut(id) {
            i.info.message = Some(why.to_string());
        }
    }

    async fn cleanup_incoming(&self, uuid: Uuid, run_dir: &Path, record: &Path) {
        for f in ["qemu.pid", "worker.pid"] {
            if let Some(pid) = process::read_pid(&run_dir.join(f)) {
                if process::alive(
                    pid,
                    if f == "qemu.pid" {
                        "qemu-system"
                    } else {
                        "vireo-worker"
                    },
                ) {
                    process::signal(pid, libc::SIGKILL);
                }
            }
        }
        for _ in 0..100 {
            let q = process::read_pid(&run_dir.join("qemu.pid"))
                .filter(|p| process::alive(*p, "qemu-system"));
            let w = process::read_pid(&run_dir.join("worker.pid"))
                .filter(|p| process::alive(*p, "vireo-worker"));
            if q.is_none() && w.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !lock(&self.vms).contains_key(&uuid) {
            let _ = std::fs::remove_dir_all(run_dir);
            let _ = std::fs::remove_dir_all(self.store.vm_dir(&uuid));
            remove_received(record);
        }
        let _ = std::fs::remove_file(record);
    }

    /// Destination watchdog: an incoming migration whose source went silent for longer
    /// than the lease, or whose worker died, is aborted. Also cleans up after a restart.
    pub async fn migration_watchdog(self: Arc<Self>) {
        self.recover_orphaned_outgoing().await;
        if let Ok(peers) = peers::get() {
            // Leftovers of a previous run: never committed, so nothing of them may stay.
            if let Ok(rd) = std::fs::read_dir(peers.records_dir()) {
                for e in rd.flatten() {
                    let rec: Option<serde_json::Value> = std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok());
                    let uuid = rec
                        .as_ref()
                        .and_then(|r| r.get("uuid"))
                        .and_then(|u| u.as_str())
                        .and_then(|u| Uuid::parse_str(u).ok());
                    if let Some(uuid) = uuid {
                        tracing::warn!(record = %e.path().display(), "cleaning up an incoming migration interrupted by a daemon restart");
                        self.cleanup_incoming(uuid, &self.run_dir(&uuid), &e.path())
                            .await;
                    } else {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Ok(peers) = peers::get() else { continue };
            let expired: Vec<(String, String)> = peers::lock(&peers.incoming)
                .iter()
                .filter(|(_, i)| {
                    matches!(i.state, IncomingState::Prepared | IncomingState::Activated)
                })
                .filter_map(|(id, i)| {
                    let worker_dead = process::read_pid(&i.run_dir.join("worker.pid"))
                        .map(|p| !process::alive(p, "vireo-worker"))
                        .unwrap_or(false);
                    if i.last_contact.elapsed() > Duration::from_secs(LEASE_SECS) {
                        Some((
                            id.clone(),
                            format!("no word from the source for {LEASE_SECS} s"),
                        ))
                    } else if worker_dead {
                        Some((id.clone(), "the destination worker exited".into()))
                    } else {
                        None
                    }
                })
                .collect();
            for (id, why) in expired {
                self.incoming_abort(&id, &why).await;
            }
        }
    }

    /// Source side after a daemon restart: an outgoing migration whose job died with the
    /// previous vireod has lost its tunnels, so it cannot complete. Before the commit the
    /// destination never runs the VM (and its lease ends it), so the source takes the VM
    /// back: disk mirrors stop, QEMU's migration is cancelled (QEMU resumes a guest that
    /// was running) and the cached state is refreshed.
    async fn recover_orphaned_outgoing(&self) {
        let vms: Vec<(Uuid, String)> = lock(&self.vms)
            .iter()
            .map(|(u, e)| (*u, e.spec.name.clone()))
            .collect();
        for (uuid, name) in vms {
            if self.qemu_pid(&uuid).is_none() {
                continue;
            }
            let mut reopen = false;
            if let Some(rec) = CommitRecord::load(&self.run_dir(&uuid)) {
                // The previous vireod sent the commit: the destination decides.
                match self.ask_commit(&rec).await {
                    Some(IncomingState::Committed) => {
                        tracing::warn!(vm = %name, job = %rec.id, to = %rec.to, "the VM runs on the destination (commit confirmed after a daemon restart); stopping the source copy");
                        self.finish_source(uuid, &name).await;
                        remove_source_files(&rec.id, &rec.source_files);
                        continue;
                    }
                    answer => {
                        // Aborted, or never heard of it: the VM comes back here, with its
                        // disks served again (they were released at the switchover).
                        tracing::warn!(vm = %name, job = %rec.id, ?answer, "the destination did not take the VM; it stays on this host");
                        CommitRecord::remove(&self.run_dir(&uuid));
                        reopen = true;
                    }
                }
            }
            let worker = self
                .worker_client(&uuid)
                .with_timeout(Duration::from_secs(10));
            let Ok(s) = worker.get::<WorkerMigrateStatus>("/migration/status").await else {
                continue;
            };
            let mirrors = worker
                .get::<WorkerMirrorStatus>("/migration/mirror-status")
                .await
                .map(|m| m.disks)
                .unwrap_or(0);
            let orphaned = matches!(
                s.status.as_str(),
                "setup" | "active" | "pre-switchover" | "device" | "cancelling"
            );
            if !orphaned && mirrors == 0 && !reopen {
                continue;
            }
            tracing::warn!(vm = %name, status = %s.status, "an outgoing migration was interrupted by a daemon restart; the VM stays on this host");
            if mirrors > 0 {
                let _ = worker
                    .clone()
                    .with_timeout(Duration::from_secs(60))
                    .post::<_, serde_json::Value>("/migration/mirror-cancel", &())
                    .await;
            }
            if s.status == "pre-switchover" || reopen {
                // The disks may have been handed over already: wait until the destination's
                // lease has certainly ended (it lets go of them), then serve them again
                // from a new worker before QEMU resumes the guest.
                tokio::time::sleep(Duration::from_secs(LEASE_SECS + 2)).await;
                if let Some(pid) = self.worker_pid(&uuid) {
                    process::signal(pid, libc::SIGKILL);
                }
                for _ in 0..100 {
                    if self.worker_pid(&uuid).is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Err(e) =
                    process::spawn_worker(&self.host.worker_bin, &self.run_dir(&uuid), true)
                {
                    tracing::error!(vm = %name, "restarting the worker: {e}");
                }
                self.wait_worker(&uuid, Duration::from_secs(30)).await;
            }
            if orphaned {
                if let Err(e) = worker
                    .post::<_, serde_json::Value>("/migration/cancel", &())
                    .await
                {
                    tracing::error!(vm = %name, "cancelling the interrupted migration: {e}");
                }
            }
            if reopen {
                // QEMU's migration had completed (postmigrate): resume the guest here.
                if let Err(e) = worker.post::<_, WorkerStatus>("/resume", &()).await {
                    tracing::error!(vm = %name, "resuming the VM after an aborted commit: {e}");
                }
            }
            if let Ok(st) = worker.get::<WorkerStatus>("/status").await {
                self.cache_status(&uuid, Some(st));
            }
            self.set_message(
                &uuid,
                Some("live migration interrupted by a daemon restart; the VM stayed here".into()),
            );
        }
    }

    /// Asks the destination of `rec` (for up to 60 s) whether it took the VM; `None` when it
    /// cannot be reached or is no longer trusted.
    async fn ask_commit(&self, rec: &CommitRecord) -> Option<IncomingState> {
        let peers = peers::get().ok()?;
        let Some(info) = peers.trust.find(&rec.to) else {
            tracing::error!(job = %rec.id, to = %rec.to, "the destination of an interrupted commit is no longer trusted");
            return None;
        };
        let peer = PeerClient::new(
            peers.identity.clone(),
            &info.address,
            Some(&info.fingerprint),
        )
        .with_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match peer
                .get::<IncomingStatus>(&format!("/peer/v1/migrations/{}", rec.id))
                .await
            {
                Ok(st) => return Some(st.state),
                Err(PeerError::Refused { .. }) => return Some(IncomingState::Aborted),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        tracing::error!(job = %rec.id, to = %rec.to, "the destination stayed unreachable after a commit was sent; the VM stays paused here (check the destination)");
        None
    }

    /// A tunnel connection from a peer: connects it to the incoming QEMU.
    pub async fn serve_stream(
        &self,
        mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        who: PeerId,
    ) {
        use tokio::io::AsyncWriteExt;
        let header = match tokio::time::timeout(
            Duration::from_secs(10),
            migration::tls::read_line(&mut tls),
        )
        .await
        {
            Ok(Ok(l)) => serde_json::from_str::<StreamHeader>(&l).ok(),
            _ => None,
        };
        let refuse = |why: &str| format!("refused {why}\n");
        let Some(h) = header else {
            let _ = tls.write_all(refuse("(bad header)").as_bytes()).await;
            return;
        };
        let trusted = peers::get()
            .map(|p| p.trust.is_trusted(&who.fingerprint))
            .unwrap_or(false);
        if !trusted {
            tracing::warn!(peer = %who.addr, fingerprint = %who.fingerprint, "refused a stream from an untrusted host");
            let _ = tls.write_all(refuse("(untrusted host)").as_bytes()).await;
            return;
        }
        if h.channel.starts_with("replica-") {
            return self.replica_stream(tls, h, who).await;
        }
        let inc = match self.incoming_get(&h.migration, &who.fingerprint) {
            Ok(i) => i,
            Err(e) => {
                let _ = tls.write_all(refuse(&e.message).as_bytes()).await;
                return;
            }
        };
        if let Some(disk) = protocol::parse_disk_channel(&h.channel) {
            self.receive_disk(tls, &h.migration, &inc, disk).await;
            return;
        }
        if h.channel != "memory" || inc.state != IncomingState::Prepared {
            let _ = tls
                .write_all(refuse("(unknown channel or state)").as_bytes())
                .await;
            return;
        }
        let sock = inc.run_dir.join("migrate-in.sock");
        let mut local = None;
        for _ in 0..50 {
            if let Ok(s) = tokio::net::UnixStream::connect(&sock).await {
                local = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(mut local) = local else {
            let _ = tls
                .write_all(refuse("(QEMU is not listening)").as_bytes())
                .await;
            return;
        };
        if tls.write_all(b"ok\n").await.is_err() {
            return;
        }
        let _ = tls.flush().await;
        if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut local).await {
            tracing::debug!(job = %h.migration, "incoming stream ended: {e}");
        }
    }

    /// A disk mirror stream (shared-nothing): receives disk `disk`'s chain into the
    /// migration's directory. Stops (the files go) when the migration is aborted.
    async fn receive_disk(
        &self,
        mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        id: &str,
        inc: &Incoming,
        disk: usize,
    ) {
        use tokio::io::AsyncWriteExt;
        let Some(dir) = inc.storage_dir.clone() else {
            let _ = tls
                .write_all(b"refused (this migration does not copy disks)\n")
                .await;
            return;
        };
        if inc.state != IncomingState::Prepared || disk >= inc.received.len() || inc.received[disk]
        {
            let _ = tls
                .write_all(b"refused (unknown disk or wrong state)\n")
                .await;
            return;
        }
        let copies = peers::get()
            .map(|p| received_list(&p.records_dir().join(format!("in-{id}.json"))))
            .unwrap_or_default();
        if tls.write_all(b"ok\n").await.is_err() {
            return;
        }
        let _ = tls.flush().await;
        let aborted = || {
            peers::get()
                .ok()
                .map(|p| {
                    peers::lock(&p.incoming)
                        .get(id)
                        .is_none_or(|i| i.state == IncomingState::Aborted)
                })
                .unwrap_or(true)
        };
        let watch = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if aborted() {
                    return;
                }
            }
        };
        tokio::select! {
            r = storage::mirror::receive_chain(&mut tls, &dir) => match r {
                Ok(files) => {
                    tracing::info!(job = %id, disk, files = files.len(), "disk chain received and verified");
                    if let Ok(p) = peers::get() {
                        if let Some(i) = peers::lock(&p.incoming).get_mut(id) {
                            if let Some(r) = i.received.get_mut(disk) {
                                *r = true;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(job = %id, disk, "receiving the disk chain: {}", e.full_message()),
            },
            _ = watch => {
                tracing::warn!(job = %id, disk, "disk copy stopped: the migration was aborted");
            }
        }
        if aborted() {
            // Whatever the stream created after the cleanup goes too.
            remove_copies(&copies.0, copies.1.as_deref());
        }
    }

    /// Incoming and outgoing migrations as jobs.
    pub fn migration_jobs(&self) -> ApiResult<Vec<MigrationJobInfo>> {
        Ok(peers::get()?.jobs())
    }
}

/// Where the VM runs after a recovery.
enum RecoveryOutcome {
    Source,
    Destination,
}

/// Renews the destination's lease about once a second; fails after the lease time without
/// an answer.
/// Test hook shared by migrations and replica applies: `MS` when the file named by
/// `VIREO_TEST_HOLD_FILE` contains `POINT MS` for this `point` (read at each call, so a
/// test can move the hold without restarting the daemon). Without the variable: `None`.
pub(super) fn test_hold_ms(point: &str) -> Option<u64> {
    let f = std::env::var_os("VIREO_TEST_HOLD_FILE")?;
    let text = std::fs::read_to_string(f).ok()?;
    let mut w = text.split_whitespace();
    if w.next() != Some(point) {
        return None;
    }
    w.next()?.parse().ok()
}

/// Where the test hook [`test_hold`] can keep a migration waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldPoint {
    /// In QEMU's pre-switchover pause, before the final disk pass.
    Switchover,
    /// Paused, the disks verified and committed at the destination, the source's disks
    /// not yet released.
    Verified,
    /// QEMU's migration completed (the destination holds the whole state), the commit
    /// not yet sent.
    Commit,
    /// The destination confirmed the commit (it runs the VM); the source has not yet
    /// stopped its QEMU nor forgotten the VM.
    Committed,
}

impl HoldPoint {
    fn name(self) -> &'static str {
        match self {
            HoldPoint::Switchover => "switchover",
            HoldPoint::Verified => "verified",
            HoldPoint::Commit => "commit",
            HoldPoint::Committed => "committed",
        }
    }
}

/// Test hook: keeps the migration at `point` (the guest paused) so a test can cut the link
/// or kill a process there, while the lease keeps running. Held for
/// `VIREO_TEST_HOLD_SWITCHOVER_MS` at the pre-switchover pause, or for `MS` when the file
/// named by `VIREO_TEST_HOLD_FILE` contains `POINT MS` (read at each point, so a test can
/// move the hold between migrations without restarting the daemon). Without these
/// variables it does nothing.
async fn test_hold(
    point: HoldPoint,
    job: &Outgoing,
    lease: &mut Lease,
    peer: &PeerClient,
    id: &str,
) -> Result<(), Stop> {
    let mut ms = None;
    if point == HoldPoint::Switchover {
        ms = std::env::var("VIREO_TEST_HOLD_SWITCHOVER_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
    }
    ms = test_hold_ms(point.name()).or(ms);
    let Some(ms) = ms else { return Ok(()) };
    tracing::info!(job = %id, point = point.name(), ms, "test hook: holding the migration");
    peers::lock(&job.info).message = Some(format!("test hook: held at {}", point.name()));
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        if job.cancel.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        lease.keep(peer, id).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

struct Lease {
    last_ok: Instant,
    last_try: Instant,
}

impl Lease {
    fn new() -> Self {
        Lease {
            last_ok: Instant::now(),
            last_try: Instant::now(),
        }
    }

    async fn keep(&mut self, peer: &PeerClient, id: &str) -> Result<(), Stop> {
        if self.last_try.elapsed() < Duration::from_secs(1) {
            return Ok(());
        }
        self.keep_now(peer, id).await
    }

    async fn keep_now(&mut self, peer: &PeerClient, id: &str) -> Result<(), Stop> {
        self.last_try = Instant::now();
        match peer
            .clone()
            .with_timeout(Duration::from_secs(3))
            .get::<IncomingStatus>(&format!("/peer/v1/migrations/{id}"))
            .await
        {
            Ok(st) if st.state == IncomingState::Aborted => {
                Err(Stop::Failed("the destination aborted the migration".into()))
            }
            Ok(_) => {
                self.last_ok = Instant::now();
                Ok(())
            }
            Err(e @ PeerError::Refused { .. }) => Err(e.into()),
            Err(e) => {
                if self.last_ok.elapsed() > Duration::from_secs(LEASE_SECS / 2) {
                    Err(Stop::Failed(format!(
                        "lost contact with the destination: {e}"
                    )))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Listens on `sock`; every connection is tunnelled to the peer as stream `channel` of
/// migration `id`. Aborting the task (job end) closes every tunnel.
fn open_tunnel(
    sock: &Path,
    peer: &PeerClient,
    id: &str,
    channel: &str,
) -> Result<tokio::task::JoinHandle<()>, Stop> {
    let _ = std::fs::remove_file(sock);
    let listener = tokio::net::UnixListener::bind(sock)
        .map_err(|e| Stop::Failed(format!("binding {}: {e}", sock.display())))?;
    let tpeer = peer.clone();
    let header = StreamHeader {
        migration: id.to_string(),
        channel: channel.to_string(),
    };
    Ok(tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut local, _)) = listener.accept().await {
            let p = tpeer.clone();
            let h = header.clone();
            conns.spawn(async move {
                match p.open_stream(&h).await {
                    Ok(mut remote) => {
                        if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await
                        {
                            tracing::debug!(channel = %h.channel, "migration tunnel ended: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(channel = %h.channel, "opening the migration tunnel: {e}")
                    }
                }
            });
        }
    }))
}

/// After a shared-nothing move: the destination runs the VM on its verified copies, so the
/// source's chain files go.
fn remove_source_files(id: &str, files: &[PathBuf]) {
    for f in files {
        match std::fs::remove_file(f) {
            Ok(()) => tracing::info!(job = %id, file = %f.display(), "source disk file removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(job = %id, "removing the source's {}: {e}", f.display()),
        }
    }
}

/// Shared-nothing, destination: checks that the copies can land in `dir` (absolute, no file
/// of the chains there yet, writable) and points the spec and the disk state at them.
/// Returns the destination files and whether `dir` was created.
fn plan_storage(
    req: &mut PrepareRequest,
    sc: &StorageCopy,
    dir: &Path,
    vm_dir: &Path,
) -> ApiResult<(Vec<PathBuf>, bool)> {
    if !dir.is_absolute() {
        return Err(ApiError::invalid(format!(
            "the destination path {} is not absolute",
            dir.display()
        )));
    }
    if sc.files.len() != req.spec.disks.len() {
        return Err(ApiError::invalid("the chain list does not match the disks"));
    }
    let map = sc.destinations(dir).map_err(ApiError::invalid)?;
    for (_, to) in &map {
        if to.exists() {
            return Err(ApiError::conflict(format!(
                "{} already exists on this host; fix: remove it or choose another --destination-path",
                to.display()
            )));
        }
    }
    let created = !dir.exists() && dir != vm_dir;
    let unwritable = |e: std::io::Error| {
        ApiError::invalid(format!(
            "the destination path {} is not writable on this host ({e}); fix: choose another --destination-path or fix its permissions",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    let probe = dir.join(format!(".vireo-probe-{}", req.id));
    let r = std::fs::File::create(&probe).and_then(|f| f.sync_all());
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = r {
        if created {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(unwritable(e));
    }
    let to = |p: &Path| -> Option<PathBuf> {
        map.iter()
            .find(|(from, _)| from == p)
            .map(|(_, t)| t.clone())
    };
    for (i, d) in req.spec.disks.iter_mut().enumerate() {
        d.path = to(&d.path)
            .or_else(|| sc.files[i].first().cloned().and_then(|l| to(&l)))
            .ok_or_else(|| ApiError::invalid(format!("disk {i} has no files to copy")))?;
    }
    if let Some(ds) = req.disk_state.take() {
        let mut st: storage::DiskState = serde_json::from_value(ds)
            .map_err(|e| ApiError::invalid(format!("the source's disk state: {e}")))?;
        for l in &mut st.leaves {
            if let Some(t) = to(l) {
                *l = t;
            }
        }
        for c in &mut st.checkpoints {
            for img in &mut c.images {
                if let Some(t) = to(img) {
                    *img = t;
                }
            }
            // Standard checkpoints' memory state travels with disk 0's chain.
            if let Some(t) = c.memory_state.as_deref().and_then(to) {
                c.memory_state = Some(t);
            }
        }
        for j in &mut st.jobs {
            for p in [&mut j.top, &mut j.target] {
                if let Some(t) = to(p) {
                    *p = t;
                }
            }
        }
        req.disk_state = Some(serde_json::to_value(&st).map_err(ApiError::internal)?);
    }
    Ok((map.into_iter().map(|(_, t)| t).collect(), created))
}

/// The disk copies an incoming migration record lists, and the directory it made.
fn received_list(record: &Path) -> (Vec<PathBuf>, Option<PathBuf>) {
    let Some(rec) = std::fs::read(record)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return (Vec::new(), None);
    };
    let files: Vec<PathBuf> = rec
        .get("files")
        .and_then(|f| serde_json::from_value(f.clone()).ok())
        .unwrap_or_default();
    let dir = rec
        .get("created_dir")
        .and_then(|d| d.as_str())
        .map(PathBuf::from);
    (files, dir)
}

/// Removes the disk copies an incoming migration record lists (and the directory it made,
/// when empty). Only for migrations that never committed.
fn remove_received(record: &Path) {
    let (files, dir) = received_list(record);
    remove_copies(&files, dir.as_deref());
}

fn remove_copies(files: &[PathBuf], dir: Option<&Path>) {
    for f in files {
        match std::fs::remove_file(f) {
            Ok(()) => tracing::info!(file = %f.display(), "removed a partial disk copy"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing the partial {}: {e}", f.display()),
        }
    }
    if let Some(d) = dir {
        let _ = std::fs::remove_dir(d);
    }
}

/// Written into the VM's run directory on the source just before the commit is sent; a
/// vireod restarted before the VM left this host asks the destination what became of it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CommitRecord {
    /// Migration id.
    id: String,
    /// The destination as the user named it (a trusted host's name or address).
    to: String,
    /// Source chain files to remove once the destination confirmed (shared-nothing).
    #[serde(default)]
    source_files: Vec<PathBuf>,
}

impl CommitRecord {
    const FILE: &'static str = "outgoing-commit.json";

    fn save(&self, run_dir: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        write_atomic(&run_dir.join(Self::FILE), &bytes).map_err(|e| e.to_string())
    }

    fn load(run_dir: &Path) -> Option<CommitRecord> {
        let b = std::fs::read(run_dir.join(Self::FILE)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn remove(run_dir: &Path) {
        let _ = std::fs::remove_file(run_dir.join(Self::FILE));
    }
}
