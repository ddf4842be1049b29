//! HTTP routes of virtual switches and VM NICs: parse, call the [`Manager`], serialize.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET/POST | `/v1/switches` | `CreateSwitch` → `SwitchInfo` |
//! | GET/DELETE | `/v1/switches/{name}` | → `SwitchInfo` |
//! | GET | `/v1/switches/{name}/stats` | → `SwitchStats` |
//! | GET/POST | `/v1/switches/{name}/acl` | `AclAdd` → `PortAcl` |
//! | POST | `/v1/switches/{name}/acl/remove` | `AclRemove` → `PortAcl` |
//! | PUT | `/v1/switches/{name}/mirror` | `MirrorSpec` or `null` → `SwitchInfo` |
//! | POST | `/v1/switches/{name}/capture` | `CaptureRequest` → `CaptureInfo` |
//! | POST | `/v1/switches/{name}/capture/stop` | `{port}` → `CaptureInfo` (frames) |
//! | GET/POST | `/v1/vms/{name}/nics` | `AddNic` → `NicInfo` |
//! | PATCH/DELETE | `/v1/vms/{name}/nics/{nic}` | `NicPatch` → `NicInfo` |

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use api::switch::*;
use axum::extract::{Path, State};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;

type Shared = State<Arc<Manager>>;

/// A JSON body whose parse errors become the API's one-line error format.
struct Body<T>(T);

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

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/switches", get(list).post(create))
        .route("/v1/switches/{name}", get(show).delete(delete))
        .route("/v1/switches/{name}/stats", get(stats))
        .route("/v1/switches/{name}/acl", get(acl_list).post(acl_add))
        .route("/v1/switches/{name}/acl/remove", post(acl_remove))
        .route("/v1/switches/{name}/mirror", axum::routing::put(mirror))
        .route("/v1/switches/{name}/capture", post(capture_start))
        .route("/v1/switches/{name}/capture/stop", post(capture_stop))
        .route("/v1/vms/{name}/nics", get(nic_list).post(nic_add))
        .route(
            "/v1/vms/{name}/nics/{nic}",
            patch(nic_set).delete(nic_remove),
        )
}

async fn list(State(m): Shared) -> ApiResult<Json<Vec<SwitchInfo>>> {
    m.switch_list().await.map(Json)
}

async fn create(State(m): Shared, Body(r): Body<CreateSwitch>) -> ApiResult<Json<SwitchInfo>> {
    m.switch_create(r).await.map(Json)
}

async fn show(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<SwitchInfo>> {
    m.switch_show(&name).await.map(Json)
}

async fn delete(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    m.switch_delete(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

async fn stats(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<SwitchStats>> {
    m.switch_stats(&name).await.map(Json)
}

async fn acl_list(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<Vec<PortAcl>>> {
    m.switch_acl_list(&name).map(Json)
}

async fn acl_add(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<AclAdd>,
) -> ApiResult<Json<PortAcl>> {
    m.switch_acl_add(&name, r).await.map(Json)
}

async fn acl_remove(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<AclRemove>,
) -> ApiResult<Json<PortAcl>> {
    m.switch_acl_remove(&name, r).await.map(Json)
}

async fn mirror(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<MirrorRequest>,
) -> ApiResult<Json<SwitchInfo>> {
    m.switch_mirror(&name, r).await.map(Json)
}

async fn capture_start(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<CaptureRequest>,
) -> ApiResult<Json<CaptureInfo>> {
    m.switch_capture_start(&name, r).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureStop {
    port: String,
}

async fn capture_stop(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<CaptureStop>,
) -> ApiResult<Json<CaptureInfo>> {
    m.switch_capture_stop(&name, &r.port).await.map(Json)
}

async fn nic_list(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<Vec<NicInfo>>> {
    m.nic_list(&name).await.map(Json)
}

async fn nic_add(
    State(m): Shared,
    Path(name): Path<String>,
    Body(r): Body<Option<AddNic>>,
) -> ApiResult<Json<NicInfo>> {
    m.nic_add(&name, r.unwrap_or_default()).await.map(Json)
}

async fn nic_set(
    State(m): Shared,
    Path((name, nic)): Path<(String, String)>,
    Body(r): Body<NicPatch>,
) -> ApiResult<Json<NicInfo>> {
    m.nic_set(&name, &nic, r).await.map(Json)
}

async fn nic_remove(
    State(m): Shared,
    Path((name, nic)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    m.nic_remove(&name, &nic).await?;
    Ok(Json(serde_json::json!({ "removed": nic })))
}
