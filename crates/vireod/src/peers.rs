//! Host trust and the peer API served on `--listen` over mutual TLS (see `tls.rs`).
//!
//! Every request carries the caller's certificate fingerprint. Only `GET /peer/v1/hello`
//! is answered for an untrusted caller (so that `vireo host trust` can show who it is);
//! anything else from an untrusted host is refused with 403 and logged.

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use api::migration::{HostSettings, MigrationJobInfo};
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing;
use axum::{Extension, Json, Router};
use migration::protocol::{FirmwareFacts, Hello, IncomingStatus, PrepareRequest, FEATURES};
use migration::{HostIdentity, TrustStore};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// The caller of a peer request, as the TLS handshake proved it.
#[derive(Debug, Clone)]
pub struct PeerId {
    /// Fingerprint of the certificate the caller presented.
    pub fingerprint: String,
    /// Remote address.
    pub addr: String,
}

/// An outgoing migration job.
pub struct Outgoing {
    /// What `vireo job show` prints.
    pub info: Mutex<MigrationJobInfo>,
    /// Set by cancel.
    pub cancel: AtomicBool,
    /// Start time.
    pub t0: Instant,
}

/// An incoming migration on the destination.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Job view.
    pub info: MigrationJobInfo,
    /// The VM.
    pub uuid: uuid::Uuid,
    /// The source host's fingerprint (the only one allowed to drive it).
    pub source_fp: String,
    /// State.
    pub state: migration::protocol::IncomingState,
    /// Last request from the source.
    pub last_contact: Instant,
    /// The VM's run directory here.
    pub run_dir: PathBuf,
    /// Shared-nothing: the directory the disk copies land in.
    pub storage_dir: Option<PathBuf>,
    /// Shared-nothing: which disks were received completely (verified and committed).
    pub received: Vec<bool>,
    /// The prepare request (spec, disk state).
    pub request: Arc<PrepareRequest>,
}

/// Trust, identity, settings and migrations of this host.
pub struct Peers {
    /// This host's certificate.
    pub identity: Arc<HostIdentity>,
    /// Trusted peers.
    pub trust: TrustStore,
    settings: Mutex<HostSettings>,
    state_dir: PathBuf,
    /// Address served with `--listen`.
    pub listen: Option<String>,
    /// Outgoing jobs.
    pub outgoing: Mutex<BTreeMap<String, Arc<Outgoing>>>,
    /// Incoming migrations.
    pub incoming: Mutex<BTreeMap<String, Incoming>>,
}

static PEERS: OnceLock<Arc<Peers>> = OnceLock::new();

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Loads (or creates) the identity, the trust store and the settings. Called once at start.
pub fn init(state_dir: &std::path::Path, listen: Option<String>) -> anyhow::Result<Arc<Peers>> {
    let identity = Arc::new(HostIdentity::load_or_create(state_dir, &hostname())?);
    let trust = TrustStore::open(state_dir)?;
    let settings = std::fs::read(state_dir.join("host-settings.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    std::fs::create_dir_all(state_dir.join("migrations"))?;
    let p = Arc::new(Peers {
        identity,
        trust,
        settings: Mutex::new(settings),
        state_dir: state_dir.to_path_buf(),
        listen,
        outgoing: Mutex::new(BTreeMap::new()),
        incoming: Mutex::new(BTreeMap::new()),
    });
    let _ = PEERS.set(p.clone());
    Ok(p)
}

/// The peers state (after [`init`]).
pub fn get() -> ApiResult<Arc<Peers>> {
    PEERS
        .get()
        .cloned()
        .ok_or_else(|| ApiError::internal("host identity not initialized"))
}

/// This host's certificate fingerprint (for `vireo host show`).
pub fn fingerprint() -> Option<String> {
    PEERS.get().map(|p| p.identity.fingerprint().to_string())
}

/// The `--listen` address (for `vireo host show`).
pub fn listen_address() -> Option<String> {
    PEERS.get().and_then(|p| p.listen.clone())
}

impl Peers {
    /// Current settings.
    pub fn settings(&self) -> HostSettings {
        lock(&self.settings).clone()
    }

    /// Changes and persists the settings.
    pub fn set_settings(&self, s: HostSettings) -> ApiResult<()> {
        let bytes = serde_json::to_vec_pretty(&s).map_err(ApiError::internal)?;
        crate::store::write_atomic(&self.state_dir.join("host-settings.json"), &bytes)?;
        *lock(&self.settings) = s;
        Ok(())
    }

    /// Directory of persisted migration records.
    pub fn records_dir(&self) -> PathBuf {
        self.state_dir.join("migrations")
    }

    /// Migrations running now (both directions).
    pub fn active(&self) -> u32 {
        let out = lock(&self.outgoing)
            .values()
            .filter(|j| !lock(&j.info).phase.is_final())
            .count();
        let inc = lock(&self.incoming)
            .values()
            .filter(|i| {
                matches!(
                    i.state,
                    migration::protocol::IncomingState::Prepared
                        | migration::protocol::IncomingState::Activated
                )
            })
            .count();
        (out + inc) as u32
    }

    /// Every job, newest last.
    pub fn jobs(&self) -> Vec<MigrationJobInfo> {
        let mut v: Vec<MigrationJobInfo> = lock(&self.outgoing)
            .values()
            .map(|j| {
                let mut i = lock(&j.info).clone();
                if !i.phase.is_final() {
                    i.elapsed_secs = j.t0.elapsed().as_secs_f64();
                }
                i
            })
            .collect();
        v.extend(lock(&self.incoming).values().map(|i| i.info.clone()));
        v.sort_by_key(|j| j.started);
        v
    }
}

static QEMU_VERSION: OnceLock<String> = OnceLock::new();

fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

fn switch_names(state_dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state_dir.join("switches")) {
        for e in rd.flatten() {
            if let Some(name) = std::fs::read(e.path().join("spec.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
            {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

/// This host's hello.
pub fn hello(m: &Manager) -> Hello {
    let p = PEERS.get();
    let settings = p.map(|p| p.settings()).unwrap_or_default();
    let accel = m.host().auto_accel.0;
    let ovmf = qemu::firmware::OvmfPaths::discover().ok();
    let seabios = [
        "/usr/share/seabios/bios-256k.bin",
        "/usr/share/qemu/bios-256k.bin",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    // Test hook: lets the e2e suite play an incompatible peer.
    let version = std::env::var("VIREO_TEST_PROTOCOL_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(migration::PROTOCOL_VERSION);
    Hello {
        protocol_version: version,
        min_protocol_version: version.max(migration::protocol::MIN_PROTOCOL_VERSION),
        vireo_version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: hostname(),
        fingerprint: p
            .map(|p| p.identity.fingerprint().to_string())
            .unwrap_or_default(),
        features: FEATURES.iter().map(|s| s.to_string()).collect(),
        facts: migration::HostFacts {
            qemu_version: QEMU_VERSION.get_or_init(crate::host::qemu_version).clone(),
            accel: Some(accel),
            cpu_flags: if accel == api::Accel::Kvm {
                cpu_flags()
            } else {
                Vec::new()
            },
            firmware: FirmwareFacts {
                seabios,
                ovmf: ovmf.is_some(),
                ovmf_secure_boot: ovmf
                    .as_ref()
                    .map(|o| o.code_secboot.exists())
                    .unwrap_or(false),
            },
            switches: switch_names(&m.host().state_dir),
            memory_available: {
                let (_, mem) = m.host_memory();
                mem.free_for_vms
                    .saturating_sub(mem.reserve)
                    .min(mem.vm_limit.saturating_sub(mem.assigned))
            },
            max_migrations: settings.max_migrations,
            active_migrations: p.map(|p| p.active()).unwrap_or(0),
        },
    }
}

/// Refuses every peer request but hello from a host that is not trusted, and logs it.
async fn authorize(req: Request, next: Next) -> Response {
    let who = req.extensions().get::<PeerId>().cloned();
    let path = req.uri().path().to_string();
    let trusted = match (&who, PEERS.get()) {
        (Some(w), Some(p)) => p.trust.is_trusted(&w.fingerprint),
        _ => false,
    };
    if trusted || path == "/peer/v1/hello" {
        return next.run(req).await;
    }
    let (fp, addr) = who
        .map(|w| (w.fingerprint, w.addr))
        .unwrap_or_else(|| ("none".into(), "unknown".into()));
    tracing::warn!(peer = %addr, fingerprint = %fp, path = %path, "refused a request from an untrusted host");
    (
        axum::http::StatusCode::FORBIDDEN,
        Json(api::ErrorBody {
            kind: api::ErrorKind::Invalid,
            error: format!(
                "this host does not trust the caller (certificate {fp}); on this host run `vireo host trust ADDR:PORT --fingerprint {fp}` for the caller first"
            ),
        }),
    )
        .into_response()
}

type Shared = State<Arc<Manager>>;

/// The peer API router (served over mutual TLS).
pub fn peer_router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/peer/v1/hello", routing::get(peer_hello))
        .route("/peer/v1/migrations", routing::post(peer_prepare))
        .route("/peer/v1/migrations/{id}", routing::get(peer_status))
        .route(
            "/peer/v1/migrations/{id}/activate",
            routing::post(peer_activate),
        )
        .route(
            "/peer/v1/migrations/{id}/commit",
            routing::post(peer_commit),
        )
        .route("/peer/v1/migrations/{id}/abort", routing::post(peer_abort))
        .fallback(|| async { ApiError::not_found("no such peer API route") })
        .layer(axum::middleware::from_fn(authorize))
        .with_state(manager)
}

async fn peer_hello(State(m): Shared, Extension(who): Extension<PeerId>) -> Json<Hello> {
    tracing::debug!(peer = %who.addr, fingerprint = %who.fingerprint, "hello");
    Json(hello(&m))
}

async fn peer_prepare(
    State(m): Shared,
    Extension(who): Extension<PeerId>,
    body: axum::body::Bytes,
) -> ApiResult<Json<IncomingStatus>> {
    let req: PrepareRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid prepare request: {e}")))?;
    m.incoming_prepare(req, &who.fingerprint).await.map(Json)
}

async fn peer_status(
    State(m): Shared,
    Extension(who): Extension<PeerId>,
    Path(id): Path<String>,
) -> ApiResult<Json<IncomingStatus>> {
    m.incoming_status(&id, &who.fingerprint).await.map(Json)
}

async fn peer_activate(
    State(m): Shared,
    Extension(who): Extension<PeerId>,
    Path(id): Path<String>,
) -> ApiResult<Json<IncomingStatus>> {
    m.incoming_activate(&id, &who.fingerprint).await.map(Json)
}

async fn peer_commit(
    State(m): Shared,
    Extension(who): Extension<PeerId>,
    Path(id): Path<String>,
) -> ApiResult<Json<IncomingStatus>> {
    m.incoming_commit(&id, &who.fingerprint).await.map(Json)
}

async fn peer_abort(
    State(m): Shared,
    Extension(who): Extension<PeerId>,
    Path(id): Path<String>,
) -> ApiResult<Json<IncomingStatus>> {
    m.incoming_abort_by_source(&id, &who.fingerprint)
        .await
        .map(Json)
}
