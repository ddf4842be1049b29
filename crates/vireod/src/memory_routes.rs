//! HTTP routes of dynamic memory: `GET /v1/memory` (`vireo memory status`) and
//! `GET`/`PATCH /v1/host/memory` (`vireo host set --memory-reserve/--memory-budget`).

use crate::error::ApiResult;
use crate::manager::Manager;
use crate::routes::Body;
use api::memory::{HostMemoryPatch, HostMemoryStatus, MemoryStatus};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

type Shared = State<Arc<Manager>>;

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/memory", get(status))
        .route("/v1/host/memory", get(host).patch(host_set))
}

async fn status(State(m): Shared) -> Json<MemoryStatus> {
    Json(m.memory_status())
}

async fn host(State(m): Shared) -> Json<HostMemoryStatus> {
    Json(m.host_memory().1)
}

async fn host_set(
    State(m): Shared,
    Body(p): Body<HostMemoryPatch>,
) -> ApiResult<Json<HostMemoryStatus>> {
    m.set_host_memory(p).map(Json)
}
