//! Virtual switches: one detached `vireo-switch` process per switch, defined under
//! `STATE/switches/NAME/`:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `spec.json` | vireod | [`SwitchSpec`] (type, uplink, host VLAN, mirror) |
//! | `initial.json` | vireod | the `SwitchConfig` the first start gets (`--config`) |
//! | `switch.json` | the switch | its live configuration (ports), which wins on restart |
//! | `switch.pid`, `control.sock`, `switch.log` | the switch | process, control API, log |
//!
//! The switch process outlives vireod: on start vireod adopts a running switch (its pid file
//! and control socket), and the supervision pass respawns one that died; the respawned switch
//! restores its ports from `switch.json` and reconnects to every VM's socket by itself.
//! This module knows processes and files only; which VM NIC is a port of which switch is
//! decided in `manager::nics`.

use crate::error::{ApiError, ApiResult};
use crate::process;
use crate::store::write_atomic;
use api::switch::{CreateSwitch, SwitchConfig, SwitchSpec, SwitchType};
use api::Client;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a new switch may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

struct Entry {
    spec: SwitchSpec,
    restarts: u32,
}

/// The switches of this host.
pub struct Switches {
    /// Serializes port reconciliation and deletion.
    pub sync: tokio::sync::Mutex<()>,
    root: PathBuf,
    bin: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Switches {
    /// Loads the switch definitions under `STATE/switches`. `bin` is the `vireo-switch`
    /// executable.
    pub fn open(state_dir: &Path, bin: PathBuf) -> anyhow::Result<Self> {
        let root = state_dir.join("switches");
        std::fs::create_dir_all(&root)?;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(&root)?.flatten() {
            let path = e.path().join("spec.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match serde_json::from_slice::<SwitchSpec>(&bytes) {
                Ok(spec) => {
                    entries.insert(spec.name.clone(), Entry { spec, restarts: 0 });
                }
                Err(err) => {
                    tracing::error!(file = %path.display(), "unreadable switch definition: {err}")
                }
            }
        }
        Ok(Switches {
            sync: tokio::sync::Mutex::new(()),
            root,
            bin,
            entries: Mutex::new(entries),
        })
    }

    /// The `vireo-switch` executable next to vireod's worker (or `$VIREO_SWITCH`).
    pub fn default_bin(worker_bin: &Path) -> PathBuf {
        std::env::var_os("VIREO_SWITCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| worker_bin.with_file_name("vireo-switch"))
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The control API client of a switch.
    pub fn client(&self, name: &str) -> Client {
        Client::new(self.dir(name).join("control.sock")).with_timeout(Duration::from_secs(10))
    }

    /// The switch process's pid, if it is alive.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let pid = process::read_pid(&self.dir(name).join("switch.pid"))?;
        process::alive(pid, "vireo-switch").then_some(pid)
    }

    /// Names and definitions.
    pub fn specs(&self) -> Vec<SwitchSpec> {
        lock(&self.entries)
            .values()
            .map(|e| e.spec.clone())
            .collect()
    }

    /// One definition.
    pub fn spec(&self, name: &str) -> ApiResult<SwitchSpec> {
        lock(&self.entries)
            .get(name)
            .map(|e| e.spec.clone())
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no switch named {name:?} (see `vireo switch list`; create one with `vireo switch new {name} --type private`)"
                ))
            })
    }

    /// Respawn count.
    pub fn restarts(&self, name: &str) -> u32 {
        lock(&self.entries)
            .get(name)
            .map(|e| e.restarts)
            .unwrap_or(0)
    }

    /// Replaces a definition (mirror settings) on disk and in memory.
    pub fn save_spec(&self, spec: SwitchSpec) -> ApiResult<()> {
        let bytes = serde_json::to_vec_pretty(&spec).map_err(ApiError::internal)?;
        write_atomic(&self.dir(&spec.name).join("spec.json"), &bytes)?;
        if let Some(e) = lock(&self.entries).get_mut(&spec.name) {
            e.spec = spec;
        }
        Ok(())
    }

    /// Defines and starts a switch. Nothing is left behind when it fails.
    pub async fn create(&self, req: CreateSwitch) -> ApiResult<SwitchSpec> {
        let mut cfg = SwitchConfig::new(&req.name, req.switch_type);
        cfg.uplink = req.uplink.clone();
        cfg.host_vlan = req.host_vlan;
        cfg.share_host = req.share_host;
        cfg.validate().map_err(|e| {
            ApiError::invalid(match req.switch_type {
                SwitchType::External if req.uplink.is_none() => {
                    "an external switch needs a host interface: add --uplink IFACE (see `ip link`)"
                        .to_string()
                }
                _ => format!("invalid switch: {e}"),
            })
        })?;
        if req.share_host && req.switch_type != SwitchType::External {
            return Err(ApiError::invalid(
                "--share-host applies to external switches only (an internal switch always has a host interface)",
            ));
        }
        if let Some(up) = &req.uplink {
            if up.is_empty() || up.contains('/') || !Path::new("/sys/class/net").join(up).exists() {
                return Err(ApiError::invalid(format!(
                    "no host interface {up:?} for the uplink (see `ip link`)"
                )));
            }
            let taken = lock(&self.entries)
                .values()
                .find(|e| e.spec.uplink.as_deref() == Some(up.as_str()))
                .map(|e| e.spec.name.clone());
            if let Some(other) = taken {
                return Err(ApiError::conflict(format!(
                    "host interface {up} is already the uplink of switch {other}"
                )));
            }
        }
        let ifname = api::switch::host_ifname(&req.name);
        let wants_host = req.switch_type == SwitchType::Internal || req.share_host;
        {
            let entries = lock(&self.entries);
            if entries.contains_key(&req.name) {
                return Err(ApiError::conflict(format!(
                    "a switch named {:?} already exists",
                    req.name
                )));
            }
            if wants_host {
                let clash = entries.values().find(|e| {
                    (e.spec.switch_type == SwitchType::Internal || e.spec.share_host)
                        && api::switch::host_ifname(&e.spec.name) == ifname
                });
                if let Some(c) = clash {
                    return Err(ApiError::conflict(format!(
                        "switch {} already uses the host interface name {ifname} (the first 11 characters of a switch name must differ)",
                        c.spec.name
                    )));
                }
            }
        }
        let spec = SwitchSpec {
            name: req.name.clone(),
            switch_type: req.switch_type,
            uplink: req.uplink,
            host_vlan: req.host_vlan,
            share_host: req.share_host,
            mirror: None,
        };
        let dir = self.dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(ApiError::internal)?;
        let result = async {
            let initial = serde_json::to_vec_pretty(&cfg).map_err(ApiError::internal)?;
            write_atomic(&dir.join("initial.json"), &initial)?;
            self.spawn(&spec.name)?;
            self.wait_ready(&spec.name).await?;
            let bytes = serde_json::to_vec_pretty(&spec).map_err(ApiError::internal)?;
            write_atomic(&dir.join("spec.json"), &bytes)?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.kill(&spec.name).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        lock(&self.entries).insert(
            spec.name.clone(),
            Entry {
                spec: spec.clone(),
                restarts: 0,
            },
        );
        tracing::info!(switch = %spec.name, kind = ?spec.switch_type, "switch created");
        Ok(spec)
    }

    fn spawn(&self, name: &str) -> ApiResult<u32> {
        let dir = self.dir(name);
        if !self.bin.is_file() {
            return Err(ApiError::failed(format!(
                "vireo-switch not found at {} (build it next to vireod, or set VIREO_SWITCH)",
                self.bin.display()
            )));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("switch.log"))
            .map_err(ApiError::internal)?;
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--config")
            .arg(dir.join("initial.json"))
            .arg("--control")
            .arg(dir.join("control.sock"))
            .arg("--run-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(ApiError::internal)?))
            .stderr(Stdio::from(log))
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ApiError::failed(format!("cannot start {}: {e}", self.bin.display())))?;
        let pid = child.id().unwrap_or(0);
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(pid)
    }

    async fn wait_ready(&self, name: &str) -> ApiResult<()> {
        let client = self.client(name).with_timeout(Duration::from_secs(2));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if client.get::<serde_json::Value>("/v1/switch").await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ApiError::failed(format!(
                    "switch {name} did not start: {}",
                    last_line(&self.dir(name).join("switch.log"))
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill(&self, name: &str) {
        let _ = self
            .client(name)
            .with_timeout(Duration::from_secs(3))
            .post::<_, serde_json::Value>("/v1/shutdown", &())
            .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(pid) = self.pid(name) {
            if Instant::now() > deadline {
                process::signal(pid, libc::SIGKILL);
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops a switch process and forgets the switch (the caller checked it has no NICs).
    pub async fn delete(&self, name: &str) -> ApiResult<()> {
        self.spec(name)?;
        // Forget it first so that supervision does not restart it while it stops.
        lock(&self.entries).remove(name);
        self.kill(name).await;
        std::fs::remove_dir_all(self.dir(name)).map_err(ApiError::internal)?;
        tracing::info!(switch = %name, "switch deleted");
        Ok(())
    }

    /// Starts every defined switch that is not running (adopting the ones that are).
    /// Returns the names of the switches it (re)started.
    pub async fn supervise(&self) -> Vec<String> {
        let mut started = Vec::new();
        for spec in self.specs() {
            if self.pid(&spec.name).is_some() {
                continue;
            }
            tracing::warn!(switch = %spec.name, "switch process is not running; starting it (it restores its ports and reconnects the VMs)");
            match self.spawn(&spec.name) {
                Ok(_) => {
                    if let Err(e) = self.wait_ready(&spec.name).await {
                        tracing::error!(switch = %spec.name, "{}", e.message);
                    }
                    if let Some(e) = lock(&self.entries).get_mut(&spec.name) {
                        e.restarts += 1;
                    }
                    started.push(spec.name.clone());
                }
                Err(e) => tracing::error!(switch = %spec.name, "{}", e.message),
            }
        }
        started
    }
}

fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "the process exited without a message".into())
}
