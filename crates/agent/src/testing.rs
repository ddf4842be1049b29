//! [`FakeGuest`]: a real vireo-guest dispatcher served on a unix socket in a background
//! thread, standing in for QEMU's agent chardev in downstream tests (worker, daemon).
//!
//! System actions are simulated (shutdown is recorded, the clock is offset, fsfreeze only
//! flips a flag); exec, KVP, memory status and the rest are real.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::guest::{transport, KvpStore, Server, ServerConfig, SystemMode};
use crate::protocol::{KvpPool, ShutdownMode};

/// An in-process guest agent on a unix socket.
pub struct FakeGuest {
    dir: tempfile::TempDir,
    socket: PathBuf,
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeGuest {
    /// Starts the agent on `<tempdir>/qga.sock`.
    pub fn start() -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&socket)?;
        let server = Arc::new(Server::new(ServerConfig {
            kvp_root: dir.path().join("kvp"),
            blocked: Vec::new(),
            system: SystemMode::Simulated,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (server.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fake-guest".into())
            .spawn(move || {
                if let Err(e) = transport::serve_listener(&s, &listener, &st) {
                    tracing::warn!(error = %e, "fake guest stopped");
                }
            })?;
        Ok(FakeGuest {
            dir,
            socket,
            server,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket to point an [`crate::AgentClient`] at.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The guest's KVP pools (files under a temp dir).
    pub fn kvp(&self) -> KvpStore {
        KvpStore::new(self.dir.path().join("kvp"))
    }

    /// Publishes `key=value` as the guest would (`vireo-guest kvp set`).
    pub fn publish(&self, key: &str, value: &str) -> Result<(), crate::guest::KvpError> {
        self.kvp().set(KvpPool::Guest, key, value)
    }

    /// Mutes the agent: it keeps reading but answers nothing (a hung guest).
    pub fn set_muted(&self, muted: bool) {
        self.server.set_muted(muted);
    }

    /// Shutdown modes the host requested.
    pub fn shutdown_requests(&self) -> Vec<ShutdownMode> {
        self.server.shutdown_requests()
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
