//! Local API routes of host trust, host settings and live migration: parse, call, answer.

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use crate::peers;
use api::migration::{
    HostSettings, HostSettingsPatch, MigrationJobInfo, MoveRequest, PeerInfo, TrustRequest,
    TrustResponse,
};
use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use migration::{normalize_fingerprint, PeerClient};
use std::sync::Arc;

type Shared = State<Arc<Manager>>;

/// The routes, merged into the API router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/hosts", get(host_list))
        .route("/v1/hosts/{name}", delete(host_untrust))
        .route("/v1/host/trust", post(host_trust))
        .route("/v1/host/settings", get(settings_show).patch(settings_set))
        .route("/v1/vms/{name}/move", post(vm_move))
        .route("/v1/migrations", get(migrations))
        .route("/v1/migrations/{id}", get(migration_show))
        .route("/v1/migrations/{id}/cancel", post(migration_cancel))
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let data: &[u8] = if bytes.is_empty() { b"null" } else { bytes };
    serde_json::from_slice(data).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

async fn host_list() -> ApiResult<Json<Vec<PeerInfo>>> {
    Ok(Json(peers::get()?.trust.list()))
}

async fn host_untrust(Path(name): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let p = peers::get()?;
    if !p.trust.remove(&name).map_err(ApiError::internal)? {
        return Err(ApiError::not_found(format!("no trusted host {name:?}")));
    }
    tracing::info!(peer = %name, "host no longer trusted");
    Ok(Json(serde_json::json!({ "untrusted": name })))
}

/// Looks at the peer (its certificate and hello); trusts it only with a confirmed
/// fingerprint that matches.
async fn host_trust(body: axum::body::Bytes) -> ApiResult<Json<TrustResponse>> {
    let req: TrustRequest = parse(&body)?;
    if req.address.parse::<std::net::SocketAddr>().is_err()
        && !req
            .address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        return Err(ApiError::invalid(format!(
            "{:?} is not ADDR:PORT (the peer's `vireod --listen` address)",
            req.address
        )));
    }
    let confirmed = match &req.fingerprint {
        Some(f) => Some(normalize_fingerprint(f).ok_or_else(|| {
            ApiError::invalid(format!(
                "{f:?} is not a SHA-256 fingerprint (64 hex digits, colons optional; see `vireo host show` on the peer)"
            ))
        })?),
        None => None,
    };
    let p = peers::get()?;
    let look = PeerClient::new(p.identity.clone(), &req.address, None);
    let fp = look
        .probe_fingerprint()
        .await
        .map_err(|e| ApiError::failed(e.to_string()))?;
    if fp == p.identity.fingerprint() {
        return Err(ApiError::invalid("that address is this host itself"));
    }
    let hello: migration::Hello = PeerClient::new(p.identity.clone(), &req.address, Some(&fp))
        .get("/peer/v1/hello")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))?;
    let peer = PeerInfo {
        name: if hello.hostname.is_empty() {
            req.address.clone()
        } else {
            hello.hostname.clone()
        },
        address: req.address.clone(),
        fingerprint: fp.clone(),
        version: hello.vireo_version.clone(),
        protocol_version: hello.protocol_version,
        trusted_at: 0,
    };
    let Some(confirmed) = confirmed else {
        return Ok(Json(TrustResponse {
            peer,
            trusted: false,
        }));
    };
    if confirmed != fp {
        tracing::warn!(peer = %req.address, presented = %fp, confirmed = %confirmed, "trust refused: fingerprint mismatch");
        return Err(ApiError::invalid(format!(
            "the host at {} presents certificate {fp}, not the confirmed {confirmed}; nothing was trusted (check `vireo host show` on that host)",
            req.address
        )));
    }
    let peer = PeerInfo {
        trusted_at: migration::now_unix(),
        ..peer
    };
    p.trust.add(peer.clone()).map_err(ApiError::internal)?;
    tracing::info!(peer = %peer.address, fingerprint = %fp, "host trusted");
    Ok(Json(TrustResponse {
        peer,
        trusted: true,
    }))
}

async fn settings_show() -> ApiResult<Json<HostSettings>> {
    Ok(Json(peers::get()?.settings()))
}

async fn settings_set(body: axum::body::Bytes) -> ApiResult<Json<HostSettings>> {
    let patch: HostSettingsPatch = parse(&body)?;
    let p = peers::get()?;
    let mut s = p.settings();
    if let Some(n) = patch.max_migrations {
        if !(1..=16).contains(&n) {
            return Err(ApiError::invalid(
                "--max-migrations must be between 1 and 16",
            ));
        }
        s.max_migrations = n;
    }
    p.set_settings(s.clone())?;
    Ok(Json(s))
}

async fn vm_move(
    State(m): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<MigrationJobInfo>> {
    let req: MoveRequest = parse(&body)?;
    m.move_vm(&name, req).await.map(Json)
}

async fn migrations(State(m): Shared) -> ApiResult<Json<Vec<MigrationJobInfo>>> {
    m.migration_jobs().map(Json)
}

async fn migration_show(
    State(m): Shared,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationJobInfo>> {
    m.migration_jobs()?
        .into_iter()
        .rev()
        .find(|j| j.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no migration job {id}")))
}

async fn migration_cancel(
    State(m): Shared,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationJobInfo>> {
    m.migration_cancel(&id).map(Json)
}
