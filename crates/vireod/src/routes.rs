//! HTTP routes: parse the request, call the [`Manager`], serialize the answer. No logic here.

use crate::error::{ApiError, ApiResult};
use crate::host;
use crate::manager::Manager;
use api::*;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;

type Shared = State<Arc<Manager>>;

/// The API router.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/host", get(host_show))
        .route("/v1/vms", get(vm_list).post(vm_create))
        .route(
            "/v1/vms/{name}",
            get(vm_show).patch(vm_update).delete(vm_delete),
        )
        .route("/v1/vms/{name}/start", post(vm_start))
        .route("/v1/vms/{name}/stop", post(vm_stop))
        .route("/v1/vms/{name}/turn-off", post(vm_turn_off))
        .route("/v1/vms/{name}/restart", post(vm_restart))
        .route("/v1/vms/{name}/pause", post(vm_pause))
        .route("/v1/vms/{name}/resume", post(vm_resume))
        .route("/v1/vms/{name}/save", post(vm_save))
        .route("/v1/vms/{name}/exec", post(vm_exec))
        .route("/v1/vms/{name}/exec/{pid}", get(vm_exec_output))
        .route("/v1/vms/{name}/kvp", get(vm_kvp_list).put(vm_kvp_set))
        .route("/v1/vms/{name}/console", get(vm_console))
        .merge(crate::checkpoint_routes::routes())
        .merge(crate::migration_routes::routes())
        .merge(crate::memory_routes::routes())
        .merge(crate::switch_routes::routes())
        .merge(crate::storage_move_routes::routes())
        .merge(crate::replica_routes::routes())
        .fallback(|| async { ApiError::not_found("no such API route") })
        .with_state(manager)
}

/// A JSON body whose parse errors become our one-line error format.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(format!("unreadable request body: {e}")))?;
        let data: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(data)
            .map(Body)
            .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
    }
}

async fn host_show(State(m): Shared) -> ApiResult<Json<HostInfo>> {
    Ok(Json(host::info(&m)))
}

async fn vm_list(State(m): Shared) -> Json<Vec<VmInfo>> {
    Json(m.list())
}

async fn vm_create(State(m): Shared, Body(req): Body<CreateVm>) -> ApiResult<Json<VmInfo>> {
    m.create(req).map(Json)
}

async fn vm_show(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.show(&name).map(Json)
}

async fn vm_update(
    State(m): Shared,
    Path(name): Path<String>,
    Body(p): Body<VmPatch>,
) -> ApiResult<Json<VmInfo>> {
    m.update(&name, p).await.map(Json)
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    keep_disks: bool,
}

async fn vm_delete(
    State(m): Shared,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    m.delete(&name, q.keep_disks).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

async fn vm_start(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.start(&name).await.map(Json)
}

async fn vm_stop(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<Option<StopRequest>>,
) -> ApiResult<Json<VmInfo>> {
    m.stop(&name, r.and_then(|r| r.timeout_secs))
        .await
        .map(Json)
}

async fn vm_turn_off(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.turn_off(&name).await.map(Json)
}

async fn vm_restart(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.restart(&name).await.map(Json)
}

async fn vm_pause(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.pause(&name).await.map(Json)
}

async fn vm_resume(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.resume(&name).await.map(Json)
}

async fn vm_save(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<VmInfo>> {
    m.save(&name).await.map(Json)
}

async fn vm_exec(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<ExecRequest>,
) -> ApiResult<Json<ExecStarted>> {
    m.exec(&name, r).await.map(Json)
}

async fn vm_exec_output(
    State(m): Shared,
    Path((name, pid)): Path<(String, i64)>,
) -> ApiResult<Json<ExecOutput>> {
    m.exec_output(&name, pid).await.map(Json)
}

async fn vm_kvp_list(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<KvpPools>> {
    m.kvp_list(&name).await.map(Json)
}

async fn vm_kvp_set(
    State(m): Shared,
    Path(name): Path<String>,
    Body(kv): Body<KvpSet>,
) -> ApiResult<Json<KvpPools>> {
    m.kvp_set(&name, kv).await.map(Json)
}

async fn vm_console(
    State(m): Shared,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    m.console(&name).map(Json)
}
