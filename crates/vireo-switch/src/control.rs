//! The control API: HTTP/JSON over a unix socket (axum). Every handler parses its request
//! and sends one closure to the dataplane thread; mutations persist the configuration
//! before answering.
//!
//! Routes (all under `/v1`):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/switch` | | [`SwitchInfo`] |
//! | GET | `/config` | | `SwitchConfig` (what is persisted) |
//! | PATCH | `/switch` | [`SwitchPatch`] | [`SwitchInfo`] |
//! | GET | `/ports` | | `[PortStatus]` |
//! | POST | `/ports` | `PortConfig` (stream path may be empty: one is chosen) | 201 `PortStatus` |
//! | GET | `/ports/{name}` | | `PortStatus` |
//! | PUT | `/ports/{name}` | `PortConfig` | `PortStatus` |
//! | PATCH | `/ports/{name}` | [`PortPatch`] | `PortStatus` |
//! | DELETE | `/ports/{name}` | | 204 |
//! | POST | `/ports/{name}/capture` | [`CaptureStart`] | [`CaptureInfo`] |
//! | DELETE | `/ports/{name}/capture` | | [`CaptureInfo`] |
//! | GET | `/fdb` | | `[FdbEntry]` |
//! | GET/PUT | `/mirror` | `MirrorConfig` | `MirrorConfig` |
//! | GET | `/extensions` | | `[ExtensionInfo]` |
//! | PATCH | `/extensions/{name}` | [`ExtensionPatch`] | `[ExtensionInfo]` |
//! | POST | `/shutdown` | | 204, then the process exits |
//!
//! Errors: `{"error": message, "kind": "invalid"|"not_found"|"exists"|"io"|"internal"}`
//! with 400/404/409/500.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use switch::dataplane::PortStatus;
use switch::extension::builtin::Capture;
use switch::extension::ExtensionInfo;
use switch::{
    AclRule, Backend, DataplaneError, ErrorKind, IpPrefix, Mac, MirrorConfig, PortConfig,
    PvlanMode, QosConfig, SwitchType, VlanMode,
};

use crate::engine::{Engine, EngineHandle};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The dataplane thread.
    pub engine: EngineHandle,
    /// Run directory (default socket paths live in `RUN_DIR/ports/`).
    pub run_dir: PathBuf,
    /// Notified when the switch should exit.
    pub shutdown: Arc<tokio::sync::Notify>,
}

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    kind: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(error = %self.message, "control request failed");
        }
        let msg = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error (see the switch log)"
        } else {
            &self.message
        };
        (
            self.status,
            Json(ErrorBody {
                error: msg,
                kind: self.kind,
            }),
        )
            .into_response()
    }
}

impl ApiError {
    fn invalid(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid",
            message: m.into(),
        }
    }
    fn not_found(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: m.into(),
        }
    }
    fn io(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "io",
            message: m.into(),
        }
    }
    fn internal(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            message: m.into(),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl From<DataplaneError> for ApiError {
    fn from(e: DataplaneError) -> Self {
        let message = chain(&e);
        match e.kind() {
            ErrorKind::NotFound => ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "not_found",
                message,
            },
            ErrorKind::Exists => ApiError {
                status: StatusCode::CONFLICT,
                kind: "exists",
                message,
            },
            _ => ApiError {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid",
                message,
            },
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn call<R: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&mut Engine) -> R + Send + 'static,
) -> ApiResult<R> {
    st.engine
        .call(f)
        .await
        .ok_or_else(|| ApiError::internal("dataplane thread is gone"))
}

fn persist(e: &Engine) -> ApiResult<()> {
    e.persist()
        .map_err(|err| ApiError::internal(format!("{err:#}")))
}

/// Switch summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchInfo {
    /// Name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub switch_type: SwitchType,
    /// Uplink interface.
    pub uplink: Option<String>,
    /// Host port VLAN.
    pub host_vlan: Option<u16>,
    /// MTU.
    pub mtu: u32,
    /// FDB aging.
    pub fdb_aging_secs: u64,
    /// Number of ports.
    pub ports: usize,
    /// Ports with link up.
    pub ports_up: usize,
    /// Process id.
    pub pid: u32,
}

/// Switch settings that can change at run time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchPatch {
    /// New MTU.
    pub mtu: Option<u32>,
    /// New FDB aging time.
    pub fdb_aging_secs: Option<u64>,
}

/// Partial port update: every present field replaces the port's value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPatch {
    /// The NIC's MAC (null clears it).
    #[serde(default, with = "double_option")]
    pub mac: Option<Option<Mac>>,
    /// VLAN mode.
    pub vlan: Option<VlanMode>,
    /// PVLAN mode.
    pub pvlan: Option<PvlanMode>,
    /// Allow MAC spoofing.
    pub mac_spoofing: Option<bool>,
    /// DHCP guard.
    pub dhcp_guard: Option<bool>,
    /// Router guard.
    pub router_guard: Option<bool>,
    /// Allowed IPs (empty: no IP check).
    pub allowed_ips: Option<Vec<IpPrefix>>,
    /// ACL rules.
    pub acl: Option<Vec<AclRule>>,
    /// QoS (whole).
    pub qos: Option<QosConfig>,
    /// Static MACs.
    pub static_macs: Option<Vec<Mac>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl PortPatch {
    /// Applies the patch to a port configuration.
    pub fn apply(self, mut p: PortConfig) -> PortConfig {
        if let Some(m) = self.mac {
            p.mac = m;
        }
        if let Some(v) = self.vlan {
            p.vlan = v;
        }
        if let Some(v) = self.pvlan {
            p.pvlan = v;
        }
        if let Some(v) = self.mac_spoofing {
            p.security.mac_spoofing = v;
        }
        if let Some(v) = self.dhcp_guard {
            p.security.dhcp_guard = v;
        }
        if let Some(v) = self.router_guard {
            p.security.router_guard = v;
        }
        if let Some(v) = self.allowed_ips {
            p.security.allowed_ips = v;
        }
        if let Some(v) = self.acl {
            p.acl = v;
        }
        if let Some(v) = self.qos {
            p.qos = v;
        }
        if let Some(v) = self.static_macs {
            p.static_macs = v;
        }
        p
    }
}

/// Starts a capture.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureStart {
    /// pcap file to write (created or truncated).
    pub path: String,
}

/// A capture's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureInfo {
    /// Port.
    pub port: String,
    /// Frames written (when stopped).
    pub frames: Option<u64>,
}

/// An FDB entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdbEntry {
    /// VLAN.
    pub vlan: u16,
    /// MAC.
    pub mac: Mac,
    /// Port name.
    pub port: String,
    /// Static entry.
    pub is_static: bool,
    /// Seconds since last seen.
    pub age_secs: u64,
}

/// Enables/disables or configures an extension.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionPatch {
    /// Enabled.
    pub enabled: Option<bool>,
    /// New configuration.
    pub config: Option<serde_json::Value>,
}

/// The router.
pub fn router(st: AppState) -> Router {
    Router::new()
        .route("/v1/switch", get(get_switch).patch(patch_switch))
        .route("/v1/config", get(get_config))
        .route("/v1/ports", get(list_ports).post(add_port))
        .route(
            "/v1/ports/{name}",
            get(get_port)
                .put(put_port)
                .patch(patch_port)
                .delete(delete_port),
        )
        .route(
            "/v1/ports/{name}/capture",
            post(start_capture).delete(stop_capture),
        )
        .route("/v1/fdb", get(get_fdb))
        .route("/v1/mirror", get(get_mirror).put(put_mirror))
        .route("/v1/extensions", get(list_extensions))
        .route(
            "/v1/extensions/{name}",
            axum::routing::patch(patch_extension),
        )
        .route("/v1/shutdown", post(shutdown))
        .with_state(st)
}

fn info(e: &Engine) -> SwitchInfo {
    let c = e.dp.config();
    let ports = e.dp.ports();
    SwitchInfo {
        name: c.name,
        switch_type: c.switch_type,
        uplink: c.uplink,
        host_vlan: c.host_vlan,
        mtu: c.mtu,
        fdb_aging_secs: c.fdb_aging_secs,
        ports: ports.len(),
        ports_up: ports.iter().filter(|p| p.up).count(),
        pid: std::process::id(),
    }
}

async fn get_switch(State(st): State<AppState>) -> ApiResult<Json<SwitchInfo>> {
    Ok(Json(call(&st, |e| info(e)).await?))
}

async fn patch_switch(
    State(st): State<AppState>,
    Json(p): Json<SwitchPatch>,
) -> ApiResult<Json<SwitchInfo>> {
    call(&st, move |e| {
        e.dp.set_settings(p.mtu, p.fdb_aging_secs)?;
        persist(e)?;
        Ok(Json(info(e)))
    })
    .await?
}

async fn get_config(State(st): State<AppState>) -> ApiResult<Json<switch::SwitchConfig>> {
    Ok(Json(call(&st, |e| e.dp.config()).await?))
}

async fn list_ports(State(st): State<AppState>) -> ApiResult<Json<Vec<PortStatus>>> {
    Ok(Json(call(&st, |e| e.dp.ports()).await?))
}

fn port_status(e: &Engine, name: &str) -> ApiResult<PortStatus> {
    e.dp.ports()
        .into_iter()
        .find(|p| p.config.name == name)
        .ok_or_else(|| ApiError::not_found(format!("port {name:?} does not exist")))
}

fn fill_path(st: &AppState, mut p: PortConfig) -> ApiResult<PortConfig> {
    let dir = st.run_dir.join("ports");
    match &mut p.backend {
        Backend::StreamConnect { path } | Backend::StreamListen { path } if path.is_empty() => {
            switch::config::check_name(&p.name)?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
            *path = dir
                .join(format!("{}.sock", p.name))
                .to_string_lossy()
                .into_owned();
        }
        _ => {}
    }
    Ok(p)
}

impl From<switch::ConfigError> for ApiError {
    fn from(e: switch::ConfigError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

async fn add_port(
    State(st): State<AppState>,
    Json(p): Json<PortConfig>,
) -> ApiResult<(StatusCode, Json<PortStatus>)> {
    let p = fill_path(&st, p)?;
    let name = p.name.clone();
    call(&st, move |e| {
        let id = e.dp.add_port(p)?;
        if let Err(err) = e.open_port(id) {
            let _ = e.dp.remove_port(&name);
            return Err(ApiError::io(format!("opening the port backend: {err}")));
        }
        persist(e)?;
        tracing::info!(port = %name, "port added");
        Ok((StatusCode::CREATED, Json(port_status(e, &name)?)))
    })
    .await?
}

async fn get_port(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<PortStatus>> {
    call(&st, move |e| port_status(e, &name).map(Json)).await?
}

fn replace_port(e: &mut Engine, p: PortConfig) -> ApiResult<PortStatus> {
    let name = p.name.clone();
    let old = port_status(e, &name)?;
    let backend_changed = old.config.backend != p.backend;
    let id = e.dp.update_port(p)?;
    if backend_changed {
        e.close_port(id);
        if let Err(err) = e.open_port(id) {
            // put the old configuration back
            let _ = e.dp.update_port(old.config);
            let _ = e.open_port(id);
            return Err(ApiError::io(format!("opening the port backend: {err}")));
        }
    }
    persist(e)?;
    port_status(e, &name)
}

async fn put_port(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Json(p): Json<PortConfig>,
) -> ApiResult<Json<PortStatus>> {
    if p.name != name {
        return Err(ApiError::invalid("the body's name differs from the path's"));
    }
    let p = fill_path(&st, p)?;
    call(&st, move |e| replace_port(e, p).map(Json)).await?
}

async fn patch_port(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Json(patch): Json<PortPatch>,
) -> ApiResult<Json<PortStatus>> {
    call(&st, move |e| {
        let cur = port_status(e, &name)?.config;
        replace_port(e, patch.apply(cur)).map(Json)
    })
    .await?
}

async fn delete_port(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    call(&st, move |e| {
        let id =
            e.dp.port_id(&name)
                .ok_or_else(|| ApiError::not_found(format!("port {name:?} does not exist")))?;
        e.close_port(id);
        let cfg = e.dp.remove_port(&name)?;
        if let Backend::StreamListen { path } = cfg.backend {
            let _ = std::fs::remove_file(path);
        }
        persist(e)?;
        tracing::info!(port = %name, "port removed");
        Ok(StatusCode::NO_CONTENT)
    })
    .await?
}

async fn start_capture(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<CaptureStart>,
) -> ApiResult<Json<CaptureInfo>> {
    let exists = call(&st, {
        let name = name.clone();
        move |e| e.dp.port_id(&name).is_some()
    })
    .await?;
    if !exists {
        return Err(ApiError::not_found(format!("port {name:?} does not exist")));
    }
    let file = std::fs::File::create(&req.path)
        .map_err(|e| ApiError::io(format!("creating {}: {e}", req.path)))?;
    call(&st, move |e| {
        let id =
            e.dp.port_id(&name)
                .ok_or_else(|| ApiError::not_found(format!("port {name:?} does not exist")))?;
        let cap =
            e.dp.pipeline_mut()
                .get_mut::<Capture>("capture")
                .ok_or_else(|| {
                    ApiError::invalid("the capture extension is not in this switch's pipeline")
                })?;
        cap.start(id, Box::new(file))
            .map_err(|err| ApiError::io(format!("writing the pcap header: {err}")))?;
        Ok(Json(CaptureInfo {
            port: name,
            frames: None,
        }))
    })
    .await?
}

async fn stop_capture(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<CaptureInfo>> {
    call(&st, move |e| {
        let id =
            e.dp.port_id(&name)
                .ok_or_else(|| ApiError::not_found(format!("port {name:?} does not exist")))?;
        let frames = e
            .dp
            .pipeline_mut()
            .get_mut::<Capture>("capture")
            .and_then(|c| c.stop(id))
            .ok_or_else(|| ApiError::not_found(format!("port {name:?} is not being captured")))?;
        Ok(Json(CaptureInfo {
            port: name,
            frames: Some(frames),
        }))
    })
    .await?
}

async fn get_fdb(State(st): State<AppState>) -> ApiResult<Json<Vec<FdbEntry>>> {
    Ok(Json(
        call(&st, |e| {
            let now = e.now().mono_ns;
            e.dp.fdb(now)
                .into_iter()
                .map(|(r, port)| FdbEntry {
                    vlan: r.vlan,
                    mac: r.mac,
                    port,
                    is_static: r.is_static,
                    age_secs: r.age_secs,
                })
                .collect()
        })
        .await?,
    ))
}

async fn get_mirror(State(st): State<AppState>) -> ApiResult<Json<MirrorConfig>> {
    Ok(Json(call(&st, |e| e.dp.config().mirror).await?))
}

async fn put_mirror(
    State(st): State<AppState>,
    Json(m): Json<MirrorConfig>,
) -> ApiResult<Json<MirrorConfig>> {
    call(&st, move |e| {
        e.dp.set_mirror(m)?;
        persist(e)?;
        Ok(Json(e.dp.config().mirror))
    })
    .await?
}

async fn list_extensions(State(st): State<AppState>) -> ApiResult<Json<Vec<ExtensionInfo>>> {
    Ok(Json(call(&st, |e| e.dp.pipeline().list()).await?))
}

async fn patch_extension(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Json(p): Json<ExtensionPatch>,
) -> ApiResult<Json<Vec<ExtensionInfo>>> {
    call(&st, move |e| {
        e.dp.pipeline_mut()
            .set(&name, p.enabled, p.config)
            .map_err(DataplaneError::Extension)?;
        persist(e)?;
        Ok(Json(e.dp.pipeline().list()))
    })
    .await?
}

async fn shutdown(State(st): State<AppState>) -> StatusCode {
    st.shutdown.notify_one();
    StatusCode::NO_CONTENT
}
