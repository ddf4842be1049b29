//! HTTP routes of checkpoints, jobs and disk add: parse, call the [`Manager`], serialize.

use crate::error::ApiResult;
use crate::manager::Manager;
use api::checkpoint::{CheckpointInfo, CheckpointTree, JobInfo, NewCheckpoint, RemoveCheckpoint};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

type Shared = State<Arc<Manager>>;

/// A job with the VM it belongs to.
#[derive(Serialize)]
struct VmJob {
    vm: String,
    #[serde(flatten)]
    job: JobInfo,
}

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/vms/{name}/checkpoints", get(list).post(new))
        .route(
            "/v1/vms/{name}/checkpoints/{cp}",
            axum::routing::delete(remove),
        )
        .route("/v1/vms/{name}/checkpoints/{cp}/apply", post(apply))
        .route("/v1/vms/{name}/checkpoints/{cp}/rename", post(rename))
        .route("/v1/vms/{name}/checkpoints/{cp}/export", post(export))
        .route("/v1/vms/{name}/disks", post(disk_add))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job_show))
        .route("/v1/jobs/{id}/cancel", post(job_cancel))
        .route("/v1/jobs/{id}/resume", post(job_resume))
}

async fn list(State(m): Shared, Path(name): Path<String>) -> ApiResult<Json<CheckpointTree>> {
    m.checkpoints(&name).await.map(Json)
}

async fn new(
    State(m): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<CheckpointInfo>> {
    let r: Option<NewCheckpoint> = parse(&body)?;
    m.checkpoint_new(&name, r.unwrap_or_default())
        .await
        .map(Json)
}

async fn remove(
    State(m): Shared,
    Path((name, cp)): Path<(String, String)>,
) -> ApiResult<Json<RemoveCheckpoint>> {
    m.checkpoint_remove(&name, &cp).await.map(Json)
}

async fn apply(
    State(m): Shared,
    Path((name, cp)): Path<(String, String)>,
) -> ApiResult<Json<CheckpointInfo>> {
    m.checkpoint_apply(&name, &cp).await.map(Json)
}

async fn rename(
    State(m): Shared,
    Path((name, cp)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<CheckpointInfo>> {
    m.checkpoint_rename(&name, &cp, parse(&body)?)
        .await
        .map(Json)
}

async fn export(
    State(m): Shared,
    Path((name, cp)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Vec<std::path::PathBuf>>> {
    m.checkpoint_export(&name, &cp, parse(&body)?)
        .await
        .map(Json)
}

async fn disk_add(
    State(m): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<api::VmInfo>> {
    m.disk_add(&name, parse(&body)?).await.map(Json)
}

async fn jobs(State(m): Shared) -> ApiResult<Json<Vec<VmJob>>> {
    Ok(Json(
        m.jobs()
            .await?
            .into_iter()
            .map(|(vm, job)| VmJob { vm, job })
            .collect(),
    ))
}

async fn job_show(State(m): Shared, Path(id): Path<String>) -> ApiResult<Json<VmJob>> {
    m.jobs()
        .await?
        .into_iter()
        .find(|(_, j)| j.id == id)
        .map(|(vm, job)| Json(VmJob { vm, job }))
        .ok_or_else(|| crate::error::ApiError::not_found(format!("no job {id}")))
}

async fn job_cancel(State(m): Shared, Path(id): Path<String>) -> ApiResult<Json<JobInfo>> {
    m.job_cancel(&id, false).await.map(Json)
}

async fn job_resume(State(m): Shared, Path(id): Path<String>) -> ApiResult<Json<JobInfo>> {
    m.job_cancel(&id, true).await.map(Json)
}

/// Parses a JSON body (empty: `null`) into our one-line error format.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let data: &[u8] = if bytes.is_empty() { b"null" } else { bytes };
    serde_json::from_slice(data)
        .map_err(|e| crate::error::ApiError::invalid(format!("invalid request body: {e}")))
}
