//! A fake QMP peer for unit tests of code that drives QEMU (feature `test-utils`).
//!
//! [`FakeQmp`] listens on a unix socket and behaves like QEMU's monitor: one client at a
//! time, a greeting on every connection, capabilities negotiation, and a small state machine
//! (run state, balloon size, migration) with the matching events. Tests can override any
//! command's reply, make a command fail or never answer, inject events, drop the client, and
//! read back every command received.
//!
//! ```no_run
//! # async fn t() {
//! let fake = qemu::testing::FakeQmp::start("/tmp/t/qmp.sock").await.unwrap();
//! let qmp = qemu::QmpClient::connect(fake.path()).await.unwrap();
//! qmp.stop().await.unwrap();
//! assert_eq!(fake.status(), "paused");
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// How the fake answers a command instead of its built-in behaviour.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": .., "desc": ..}}`.
    Error {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// No reply at all (for timeout tests).
    Hang,
}

#[derive(Debug)]
struct State {
    status: String,
    balloon_actual: u64,
    migration: String,
    received: Vec<(String, Value)>,
    overrides: HashMap<String, Reply>,
    connections: usize,
}

#[derive(Debug, Clone)]
enum Push {
    Event(String, Value),
    Disconnect,
}

/// A scripted QMP server on a unix socket.
#[derive(Debug)]
pub struct FakeQmp {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    push: broadcast::Sender<Push>,
    task: JoinHandle<()>,
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeQmp {
    /// Binds `path` (removing a stale socket) and serves clients one at a time.
    pub async fn start(path: impl AsRef<Path>) -> std::io::Result<FakeQmp> {
        let path = path.as_ref().to_path_buf();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let state = Arc::new(Mutex::new(State {
            status: "running".into(),
            balloon_actual: 1 << 30,
            migration: String::new(),
            received: Vec::new(),
            overrides: HashMap::new(),
            connections: 0,
        }));
        let (push, _) = broadcast::channel(64);
        let st = state.clone();
        let push2 = push.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                lock(&st).connections += 1;
                // One client at a time, like QEMU.
                serve(stream, st.clone(), push2.subscribe()).await;
            }
        });
        Ok(FakeQmp {
            path,
            state,
            push,
            task,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Overrides the reply to `command`.
    pub fn reply(&self, command: &str, reply: Reply) {
        lock(&self.state)
            .overrides
            .insert(command.to_string(), reply);
    }

    /// Sends an event to the connected client.
    pub fn emit(&self, event: &str, data: Value) {
        let _ = self.push.send(Push::Event(event.to_string(), data));
    }

    /// Closes the current client connection (as QEMU does when it exits).
    pub fn disconnect(&self) {
        let _ = self.push.send(Push::Disconnect);
    }

    /// Every command received (name, arguments), in order, across connections.
    pub fn received(&self) -> Vec<(String, Value)> {
        lock(&self.state).received.clone()
    }

    /// Current run state (`running`, `paused`, `shutdown`, ...).
    pub fn status(&self) -> String {
        lock(&self.state).status.clone()
    }

    /// Sets the run state.
    pub fn set_status(&self, status: &str) {
        lock(&self.state).status = status.to_string();
    }

    /// Current balloon size in bytes.
    pub fn balloon_actual(&self) -> u64 {
        lock(&self.state).balloon_actual
    }

    /// How many clients have connected so far.
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }
}

fn event_line(name: &str, data: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}\r\n",
        json!({"event": name, "data": data,
               "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}})
    )
}

async fn serve(
    stream: tokio::net::UnixStream,
    state: Arc<Mutex<State>>,
    mut push: broadcast::Receiver<Push>,
) {
    let (rd, mut wr) = stream.into_split();
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                               "package": "vireo-fake"},
                                   "capabilities": ["oob"]}});
    if wr
        .write_all(format!("{greeting}\r\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut lines = BufReader::new(rd).lines();
    let mut negotiated = false;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => match l {
                Ok(Some(l)) => l,
                _ => return,
            },
            p = push.recv() => match p {
                Ok(Push::Event(name, data)) => {
                    if wr.write_all(event_line(&name, data).as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Push::Disconnect) => return,
                Err(_) => continue,
            },
        };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            let e = json!({"error": {"class": "GenericError", "desc": "JSON parse error"}});
            let _ = wr.write_all(format!("{e}\r\n").as_bytes()).await;
            continue;
        };
        let id = msg.get("id").cloned();
        let cmd = msg["execute"].as_str().unwrap_or_default().to_string();
        let args = msg.get("arguments").cloned().unwrap_or(json!({}));
        let (reply, events, close) = handle(&state, &mut negotiated, &cmd, &args);
        let mut out = String::new();
        if let Some(r) = reply {
            let mut v = match r {
                Ok(ret) => json!({ "return": ret }),
                Err((class, desc)) => json!({"error": {"class": class, "desc": desc}}),
            };
            if let Some(id) = id {
                v["id"] = id;
            }
            out.push_str(&format!("{v}\r\n"));
        }
        for (name, data) in events {
            out.push_str(&event_line(&name, data));
        }
        if wr.write_all(out.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

type Handled = (
    Option<Result<Value, (String, String)>>,
    Vec<(String, Value)>,
    bool,
);

fn handle(state: &Mutex<State>, negotiated: &mut bool, cmd: &str, args: &Value) -> Handled {
    let mut s = lock(state);
    s.received.push((cmd.to_string(), args.clone()));
    if let Some(r) = s.overrides.get(cmd).cloned() {
        if cmd == "qmp_capabilities" {
            *negotiated = true;
        }
        return match r {
            Reply::Return(v) => (Some(Ok(v)), vec![], false),
            Reply::Error { class, desc } => (Some(Err((class, desc))), vec![], false),
            Reply::Hang => (None, vec![], false),
        };
    }
    let ok = |v: Value| Some(Ok(v));
    if !*negotiated && cmd != "qmp_capabilities" {
        return (
            Some(Err((
                "CommandNotFound".into(),
                "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            ))),
            vec![],
            false,
        );
    }
    match cmd {
        "qmp_capabilities" => {
            *negotiated = true;
            (ok(json!({})), vec![], false)
        }
        "query-status" => (
            ok(json!({"running": s.status == "running", "status": s.status, "singlestep": false})),
            vec![],
            false,
        ),
        "stop" => {
            s.status = "paused".into();
            (ok(json!({})), vec![("STOP".into(), json!({}))], false)
        }
        "cont" => {
            s.status = "running".into();
            (ok(json!({})), vec![("RESUME".into(), json!({}))], false)
        }
        "system_powerdown" => (ok(json!({})), vec![("POWERDOWN".into(), json!({}))], false),
        "system_reset" => (
            ok(json!({})),
            vec![(
                "RESET".into(),
                json!({"guest": false, "reason": "host-qmp-system-reset"}),
            )],
            false,
        ),
        "quit" => {
            s.status = "shutdown".into();
            (
                ok(json!({})),
                vec![(
                    "SHUTDOWN".into(),
                    json!({"guest": false, "reason": "host-qmp-quit"}),
                )],
                true,
            )
        }
        "balloon" => match args["value"].as_u64() {
            Some(v) => {
                s.balloon_actual = v;
                (
                    ok(json!({})),
                    vec![("BALLOON_CHANGE".into(), json!({"actual": v}))],
                    false,
                )
            }
            None => (
                Some(Err((
                    "GenericError".into(),
                    "Parameter 'value' is missing".into(),
                ))),
                vec![],
                false,
            ),
        },
        "query-balloon" => (ok(json!({"actual": s.balloon_actual})), vec![], false),
        "migrate" => {
            s.migration = "completed".into();
            s.status = "postmigrate".into();
            (
                ok(json!({})),
                vec![
                    ("MIGRATION".into(), json!({"status": "setup"})),
                    ("STOP".into(), json!({})),
                    ("MIGRATION".into(), json!({"status": "completed"})),
                ],
                false,
            )
        }
        "query-migrate" => {
            if s.migration.is_empty() {
                (ok(json!({})), vec![], false)
            } else {
                (
                    ok(
                        json!({"status": s.migration, "total-time": 1, "downtime": 1,
                              "ram": {"transferred": 1, "remaining": 0, "total": 1}}),
                    ),
                    vec![],
                    false,
                )
            }
        }
        "query-cpus-fast" => (
            ok(
                json!([{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                       "thread-id": 1, "props": {"core-id": 0}, "target": "x86_64"}]),
            ),
            vec![],
            false,
        ),
        "device_del" => (
            ok(json!({})),
            vec![("DEVICE_DELETED".into(), json!({"device": args["id"]}))],
            false,
        ),
        "device_add"
        | "netdev_add"
        | "netdev_del"
        | "migrate-set-capabilities"
        | "migrate-set-parameters"
        | "migrate-incoming"
        | "migrate_cancel"
        | "qom-set"
        | "blockdev-add"
        | "blockdev-del" => (ok(json!({})), vec![], false),
        "qom-get" => (ok(Value::Null), vec![], false),
        "human-monitor-command" => (ok(json!("")), vec![], false),
        other => (
            Some(Err((
                "CommandNotFound".into(),
                format!("The command {other} has not been found"),
            ))),
            vec![],
            false,
        ),
    }
}
