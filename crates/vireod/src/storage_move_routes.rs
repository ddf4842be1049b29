//! HTTP route of storage live migration: parse, call the [`Manager`], serialize.

use crate::error::ApiResult;
use crate::manager::Manager;
use api::storage_move::{MoveJob, MoveStorage};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use std::sync::Arc;

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new().route("/v1/vms/{name}/move-storage", post(move_storage))
}

async fn move_storage(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    crate::routes::Body(req): crate::routes::Body<MoveStorage>,
) -> ApiResult<Json<MoveJob>> {
    m.move_storage(&name, req).await.map(Json)
}
