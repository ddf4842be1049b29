//! HTTP routes of Replica: parse, call the [`Manager`] (`manager/replica.rs`), serialize.

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use crate::routes::Body;
use api::replica::{
    EnableReplica, ExportReplica, FailoverReport, FailoverRequest, ImportReplica,
    ReplicaHostSettings, ReplicaStatus,
};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

type Shared = State<Arc<Manager>>;

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/replica", get(status))
        .route(
            "/v1/replica/host-settings",
            get(settings_get).put(settings_put),
        )
        .route("/v1/replica/{vm}/enable", post(enable))
        .route("/v1/replica/{vm}/export", post(export))
        .route("/v1/replica/{vm}/import", post(import))
        .route("/v1/replica/{vm}/{action}", post(action))
}

async fn status(State(m): Shared) -> Json<Vec<ReplicaStatus>> {
    Json(m.replica_status())
}

async fn settings_get(State(m): Shared) -> Json<ReplicaHostSettings> {
    Json(m.replica_settings())
}

async fn settings_put(
    State(m): Shared,
    Body(s): Body<ReplicaHostSettings>,
) -> ApiResult<Json<ReplicaHostSettings>> {
    m.set_replica_settings(s).map(Json)
}

async fn enable(
    State(m): Shared,
    Path(vm): Path<String>,
    Body(req): Body<EnableReplica>,
) -> ApiResult<Json<ReplicaStatus>> {
    m.replica_enable(&vm, req).await.map(Json)
}

async fn export(
    State(m): Shared,
    Path(vm): Path<String>,
    Body(req): Body<ExportReplica>,
) -> ApiResult<Json<FailoverReport>> {
    m.replica_export(&vm, req.dir).await.map(Json)
}

async fn import(
    State(m): Shared,
    Path(vm): Path<String>,
    Body(req): Body<ImportReplica>,
) -> ApiResult<Json<FailoverReport>> {
    m.replica_import(&vm, req).await.map(Json)
}

async fn action(
    State(m): Shared,
    Path((vm, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let req: FailoverRequest = if body.is_empty() || &body[..] == b"null" {
        FailoverRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))?
    };
    let v = |r: FailoverReport| serde_json::to_value(r).map_err(ApiError::internal);
    match action.as_str() {
        "start" | "pause" | "resume" => {
            serde_json::to_value(m.replica_set_state(&vm, &action)?).map_err(ApiError::internal)
        }
        "disable" => {
            m.replica_disable(&vm).await?;
            Ok(serde_json::Value::Null)
        }
        "failover" => v(m.replica_failover(&vm, req).await?),
        "commit" => v(m.replica_commit(&vm).await?),
        "cancel-failover" => v(m.replica_cancel_failover(&vm).await?),
        "test-failover" => v(m.replica_test_failover(&vm, req.point, req.test_switch).await?),
        "test-stop" => v(m.replica_test_stop(&vm).await?),
        "reverse" => v(m.replica_reverse(&vm).await?),
        "resync" => v(m.replica_resync(&vm)?),
        other => Err(ApiError::not_found(format!(
            "no replica action {other:?} (start, pause, resume, disable, failover, commit, cancel-failover, test-failover, test-stop, reverse, resync)"
        ))),
    }
    .map(Json)
}
