//! Standard checkpoints with a short pause: QEMU's background snapshot.
//!
//! The worker pauses the vCPUs, switches every disk to its new differencing leaf (the
//! `switch` closure), and starts a migration to the state file with the
//! `background-snapshot` capability. QEMU then saves the device state, write-protects the
//! guest RAM with userfaultfd and resumes the vCPUs by itself; RAM is written out while the
//! guest runs, each page copied before the guest's first write to it. So the memory state
//! is cut at the same instant as the disks (both while paused), and the pause lasts for the
//! disk switch and the device state only, not for the RAM.
//!
//! Capabilities that QEMU refuses together with `background-snapshot` (multifd after an
//! incoming migration, for instance) are turned off for the snapshot and restored after,
//! as are the bandwidth limit and the capability itself, so a later live migration sees
//! the settings it had. When QEMU or the kernel cannot do it (no userfaultfd write-protect),
//! the state is saved with the vCPUs paused, as before.

use crate::vm::Vm;
use anyhow::{anyhow, bail, Context};
use qemu::qmp::MigrationStatus;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Capabilities QEMU 7.2 refuses together with `background-snapshot`.
const INCOMPATIBLE: &[&str] = &[
    "postcopy-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "return-path",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "release-ram",
    "rdma-pin-all",
    "compress",
    "xbzrle",
    "x-colo",
    "validate-uuid",
    "zero-copy-send",
];

/// Bandwidth for writing the state file (bytes/s): the file is local, the limit only
/// stretches the time the guest runs with write-protected memory.
const SNAPSHOT_BANDWIDTH: u64 = 4 << 30;

/// How long the whole save may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a standard checkpoint cost the guest.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    /// From pausing the vCPUs to their resumption.
    pub paused: Duration,
    /// From pausing to the state file being complete.
    pub total: Duration,
    /// The state was saved in the background (false: saved while paused).
    pub background: bool,
}

/// Migration settings changed for the snapshot, to put back afterwards.
struct Saved {
    caps_off: Vec<String>,
    max_bandwidth: Option<Value>,
}

async fn enable_background(vm: &Vm) -> anyhow::Result<Saved> {
    let caps = vm
        .qmp
        .execute("query-migrate-capabilities", None)
        .await
        .context("query-migrate-capabilities")?;
    let on = |name: &str| {
        caps.as_array().is_some_and(|a| {
            a.iter().any(|c| {
                c.get("capability").and_then(Value::as_str) == Some(name)
                    && c.get("state").and_then(Value::as_bool) == Some(true)
            })
        })
    };
    if !caps.as_array().is_some_and(|a| {
        a.iter()
            .any(|c| c.get("capability").and_then(Value::as_str) == Some("background-snapshot"))
    }) {
        bail!("this QEMU has no background-snapshot capability");
    }
    let caps_off: Vec<String> = INCOMPATIBLE
        .iter()
        .filter(|c| on(c))
        .map(|c| c.to_string())
        .collect();
    let mut set: Vec<(&str, bool)> = caps_off.iter().map(|c| (c.as_str(), false)).collect();
    set.push(("background-snapshot", true));
    vm.qmp
        .migrate_set_capabilities(&set)
        .await
        .context("enabling background-snapshot")?;
    let params = vm
        .qmp
        .execute("query-migrate-parameters", None)
        .await
        .unwrap_or(Value::Null);
    let max_bandwidth = params.get("max-bandwidth").cloned();
    let saved = Saved {
        caps_off,
        max_bandwidth,
    };
    if let Err(e) = vm
        .qmp
        .migrate_set_parameters(json!({ "max-bandwidth": SNAPSHOT_BANDWIDTH }))
        .await
    {
        tracing::debug!("raising the snapshot bandwidth: {e}");
    }
    Ok(saved)
}

async fn restore(vm: &Vm, saved: Saved) {
    let mut set: Vec<(&str, bool)> = vec![("background-snapshot", false)];
    set.extend(saved.caps_off.iter().map(|c| (c.as_str(), true)));
    if let Err(e) = vm.qmp.migrate_set_capabilities(&set).await {
        tracing::warn!("restoring the migration capabilities after a snapshot: {e}");
    }
    if let Some(b) = saved.max_bandwidth {
        if let Err(e) = vm
            .qmp
            .migrate_set_parameters(json!({ "max-bandwidth": b }))
            .await
        {
            tracing::warn!("restoring the migration bandwidth after a snapshot: {e}");
        }
    }
}

fn state_uri(path: &Path) -> String {
    format!(
        "exec:cat > {}",
        crate::vm::shell_quote(&path.to_string_lossy())
    )
}

/// Polls the migration to its end; the final status must be `completed`.
async fn wait_saved(vm: &Vm, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let m = vm.qmp.query_migrate().await.context("query-migrate")?;
        match m.status {
            MigrationStatus::Completed => return Ok(()),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                bail!(
                    "saving the memory state failed: {}",
                    m.error_desc.unwrap_or_else(|| format!("{:?}", m.status))
                )
            }
            _ if Instant::now() > deadline => bail!("saving the memory state timed out"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Takes a standard checkpoint: pauses the vCPUs, runs `switch` (the disk switch, on a
/// blocking thread), saves memory and device state to `state_file` and resumes. Uses the
/// background snapshot when QEMU can, so the vCPUs run again as soon as the device state
/// is saved. The vCPUs are running again when this returns, also on error.
pub async fn take_standard<T: Send + 'static, E: Send + 'static>(
    vm: &Vm,
    state_file: &Path,
    switch: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> anyhow::Result<(Result<T, E>, Taken)> {
    let background = match enable_background(vm).await {
        Ok(saved) => Some(saved),
        Err(e) => {
            tracing::info!(
                "background snapshot not available, saving with the vCPUs paused: {e:#}"
            );
            None
        }
    };
    let t = Instant::now();
    let deadline = t + SAVE_TIMEOUT;
    if let Err(e) = vm.qmp.stop().await {
        if let Some(s) = background {
            restore(vm, s).await;
        }
        return Err(anyhow!(e).context("pausing the VM"));
    }
    let switched = tokio::task::spawn_blocking(switch)
        .await
        .context("the disk switch panicked");
    let switched = match switched {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let _ = vm.qmp.cont().await;
            if let Some(s) = background {
                restore(vm, s).await;
            }
            let taken = Taken {
                paused: t.elapsed(),
                total: t.elapsed(),
                background: false,
            };
            return Ok((Err(e), taken));
        }
        Err(e) => {
            let _ = vm.qmp.cont().await;
            if let Some(s) = background {
                restore(vm, s).await;
            }
            return Err(e);
        }
    };
    let Some(saved) = background else {
        // Paused for the whole save.
        let r = match vm.qmp.migrate(&state_uri(state_file)).await {
            Ok(()) => wait_saved(vm, deadline).await,
            Err(e) => Err(anyhow!(e).context("migrate")),
        };
        let _ = vm.qmp.cont().await;
        let paused = t.elapsed();
        r?;
        let taken = Taken {
            paused,
            total: paused,
            background: false,
        };
        return Ok((Ok(switched), taken));
    };
    // Subscribe before starting, so QEMU's own RESUME cannot be missed.
    let mut events = vm.qmp.events();
    let r = async {
        vm.qmp
            .migrate(&state_uri(state_file))
            .await
            .context("migrate (background snapshot)")?;
        // QEMU resumes the vCPUs once the device state is saved and RAM write-protected.
        let paused = loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) if ev.event == "RESUME" => break t.elapsed(),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => bail!("QMP connection closed"),
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if vm.qmp.query_status().await.is_ok_and(|s| s.running) {
                        break t.elapsed();
                    }
                    let m = vm.qmp.query_migrate().await.context("query-migrate")?;
                    if matches!(m.status, MigrationStatus::Failed | MigrationStatus::Cancelled) {
                        bail!("the background snapshot failed: {}", m.error_desc.unwrap_or_default());
                    }
                    if Instant::now() > deadline {
                        bail!("the background snapshot did not resume the VM in time");
                    }
                }
            }
        };
        tracing::info!(
            paused_ms = paused.as_millis() as u64,
            "standard checkpoint: vCPUs resumed, saving memory in the background"
        );
        wait_saved(vm, deadline).await?;
        anyhow::Ok(paused)
    }
    .await;
    // Running again in every case (a no-op when QEMU resumed it).
    let resumed = vm.qmp.query_status().await.is_ok_and(|s| s.running);
    let paused = match &r {
        Ok(p) => *p,
        Err(_) => t.elapsed(),
    };
    if !resumed {
        let _ = vm.qmp.cont().await;
    }
    restore(vm, saved).await;
    let paused = r?.min(paused);
    Ok((
        Ok(switched),
        Taken {
            paused,
            total: t.elapsed(),
            background: true,
        },
    ))
}
