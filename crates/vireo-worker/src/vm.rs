//! One VM as its worker sees it: the QMP connection, the agent client, the console facts,
//! and the operations that need several of them (status, save).

use crate::console::ConsoleFacts;
use crate::guest::GuestState;
use agent::client::AgentClient;
use anyhow::{bail, Context};
use api::worker::{ExitRecord, WorkerStatus};
use api::{Accel, VmState};
use qemu::qmp::QmpClient;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shared state of the worker.
pub struct Vm {
    /// QMP connection to QEMU.
    pub qmp: QmpClient,
    /// Guest agent client.
    pub agent: Arc<AgentClient>,
    /// Heartbeat and guest facts.
    pub guest: Arc<Mutex<GuestState>>,
    /// What the console showed.
    pub console: Arc<Mutex<ConsoleFacts>>,
    /// QEMU's PID.
    pub qemu_pid: u32,
    /// Unix time QEMU started.
    pub started_at: u64,
    /// Accelerator.
    pub accel: Accel,
    /// This worker re-attached to a running QEMU.
    pub attached: bool,
    /// The guest has been let run (false while restoring or before `cont`).
    pub booted: AtomicBool,
    /// Why QEMU is about to end, set by the action that ends it.
    pub exit: Mutex<Option<ExitRecord>>,
}

impl Vm {
    /// Records why QEMU will end (first writer wins).
    pub fn set_exit(&self, rec: ExitRecord) {
        let mut e = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(rec);
        }
    }

    /// Runs a QMP command without arguments.
    pub async fn qmp_simple(&self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        self.qmp
            .execute(cmd, None)
            .await
            .with_context(|| format!("QMP {cmd}"))
    }

    /// Whether the agent in the guest is vireo-guest (has the extensions).
    pub async fn vireo_agent(&self) -> bool {
        let known = self
            .guest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .info
            .clone();
        match known.and_then(|i| i.agent) {
            Some(a) => a.starts_with("vireo-guest"),
            None => self
                .agent
                .supports_vireo_extensions()
                .await
                .unwrap_or(false),
        }
    }

    /// The worker's status report.
    pub async fn status(&self) -> anyhow::Result<WorkerStatus> {
        let st = self.qmp_simple("query-status").await?;
        let qemu_status = st
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string();
        let state = match qemu_status.as_str() {
            "running" => VmState::Running,
            "inmigrate" | "prelaunch" if !self.booted.load(Ordering::SeqCst) => VmState::Starting,
            "finish-migrate" | "postmigrate" | "save-vm" => VmState::Saving,
            "shutdown" => VmState::Stopping,
            _ => VmState::Paused,
        };
        let (heartbeat, guest) = {
            let g = self.guest.lock().unwrap_or_else(|p| p.into_inner());
            (g.heartbeat_now(), g.info.clone())
        };
        let boot_refusal = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .boot_refusal
            .clone();
        Ok(WorkerStatus {
            qemu_pid: self.qemu_pid,
            worker_pid: std::process::id(),
            state,
            qemu_status,
            heartbeat,
            guest,
            boot_refusal,
            started_at: self.started_at,
            accel: self.accel,
            attached: self.attached,
            qemu_exec_ns: Some(crate::launch::EXEC_NS.load(Ordering::SeqCst)).filter(|n| *n != 0),
            first_heartbeat_ns: self
                .guest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .first_answer_ns,
        })
    }

    /// Saved state: pause, stream memory and device state to `path`, then quit QEMU.
    /// On failure the VM is resumed where it was and nothing is left at `path`.
    pub async fn save(&self, path: &Path) -> anyhow::Result<()> {
        let was_running = self.status().await?.state == VmState::Running;
        let tmp = path.with_extension("state.partial");
        let _ = std::fs::remove_file(&tmp);
        self.qmp_simple("stop").await?;
        let uri = format!("exec:cat > {}", shell_quote(&tmp.to_string_lossy()));
        let r = async {
            self.qmp
                .execute("migrate", Some(json!({ "uri": uri })))
                .await
                .context("QMP migrate")?;
            loop {
                let m = self.qmp_simple("query-migrate").await?;
                match m.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => {
                        bail!(
                            "saving failed: {}",
                            m.get("error-desc")
                                .and_then(|d| d.as_str())
                                .unwrap_or("migration failed")
                        )
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            let f = std::fs::File::open(&tmp).context("opening the saved state")?;
            f.sync_all().context("syncing the saved state")?;
            std::fs::rename(&tmp, path).context("committing the saved state")?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .context("syncing the VM directory")?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            if was_running {
                let _ = self.qmp_simple("cont").await;
            }
            return Err(e);
        }
        self.set_exit(ExitRecord {
            reason: "saved".into(),
            clean: true,
            saved: true,
        });
        let _ = self.qmp_simple("quit").await;
        Ok(())
    }
}

/// Quotes for `sh -c` (QEMU's exec: migration URIs run through the shell).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
