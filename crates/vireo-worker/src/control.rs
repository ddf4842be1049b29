//! The worker's control API (HTTP/JSON on `worker.sock`), called by vireod.

use crate::vm::Vm;
use agent::client::RunRequest;
use api::worker::{ExitRecord, GuestPowerAction, SaveRequest, WorkerStatus};
use api::{ErrorBody, ErrorKind, ExecOutput, ExecRequest, ExecStarted, KvpPools, KvpSet};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

/// An error answered to vireod.
pub struct WorkerError(ErrorKind, String);

impl IntoResponse for WorkerError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::WrongState => StatusCode::CONFLICT,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_GATEWAY,
        };
        (
            status,
            Json(ErrorBody {
                kind: self.0,
                error: self.1,
            }),
        )
            .into_response()
    }
}

fn failed(e: impl std::fmt::Display) -> WorkerError {
    WorkerError(ErrorKind::Failed, e.to_string())
}

fn agent_err(e: agent::client::AgentError) -> WorkerError {
    WorkerError(
        ErrorKind::Failed,
        format!("the guest agent did not complete the request: {e} (is an agent running in the guest? `vireo vm show` shows the heartbeat)"),
    )
}

type R<T> = Result<Json<T>, WorkerError>;
type S = State<Arc<Vm>>;

/// The router.
pub fn router(vm: Arc<Vm>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/reset", post(reset))
        .route("/powerdown", post(powerdown))
        .route("/quit", post(quit))
        .route("/shutdown", post(shutdown))
        .route("/save", post(save))
        .route("/exec", post(exec))
        .route("/exec/{pid}", get(exec_output))
        .route("/kvp", get(kvp_list).put(kvp_set))
        .merge(crate::disks::routes())
        .merge(crate::migration::routes())
        .merge(crate::nics::routes())
        .merge(crate::storage_move::routes())
        .merge(crate::replica::routes())
        .merge(crate::memory::routes())
        .with_state(vm)
}

async fn status(State(vm): S) -> R<WorkerStatus> {
    vm.status().await.map(Json).map_err(failed)
}

async fn pause(State(vm): S) -> R<WorkerStatus> {
    vm.qmp_simple("stop").await.map_err(failed)?;
    status(State(vm)).await
}

async fn resume(State(vm): S) -> R<WorkerStatus> {
    vm.qmp_simple("cont").await.map_err(failed)?;
    status(State(vm)).await
}

async fn reset(State(vm): S) -> R<WorkerStatus> {
    vm.qmp_simple("system_reset").await.map_err(failed)?;
    status(State(vm)).await
}

async fn powerdown(State(vm): S) -> R<serde_json::Value> {
    vm.set_exit(ExitRecord {
        reason: "stopped through the ACPI power button".into(),
        clean: true,
        saved: false,
    });
    vm.qmp_simple("system_powerdown").await.map_err(failed)?;
    Ok(Json(serde_json::Value::Null))
}

async fn quit(State(vm): S) -> R<serde_json::Value> {
    vm.set_exit(ExitRecord {
        reason: "turned off".into(),
        clean: true,
        saved: false,
    });
    // QEMU may close the socket before answering: that is success.
    let _ = vm.qmp_simple("quit").await;
    Ok(Json(serde_json::Value::Null))
}

async fn shutdown(State(vm): S, Json(action): Json<GuestPowerAction>) -> R<serde_json::Value> {
    let mode = match action {
        GuestPowerAction::Powerdown => agent::protocol::ShutdownMode::Powerdown,
        GuestPowerAction::Reboot => agent::protocol::ShutdownMode::Reboot,
    };
    if action == GuestPowerAction::Powerdown {
        vm.set_exit(ExitRecord {
            reason: "stopped gracefully through the guest agent".into(),
            clean: true,
            saved: false,
        });
    }
    vm.agent.shutdown(mode).await.map_err(agent_err)?;
    Ok(Json(serde_json::Value::Null))
}

async fn save(State(vm): S, Json(req): Json<SaveRequest>) -> R<serde_json::Value> {
    vm.save(&req.path).await.map_err(failed)?;
    Ok(Json(serde_json::Value::Null))
}

async fn exec(State(vm): S, Json(req): Json<ExecRequest>) -> R<ExecStarted> {
    let mut run = RunRequest::from_argv(&req.argv)
        .ok_or_else(|| WorkerError(ErrorKind::Invalid, "no command given".into()))?;
    if !req.env.is_empty() {
        run.env = Some(req.env.clone());
    }
    run.stdin = req.stdin.map(String::into_bytes);
    let pid = vm.agent.exec(&run).await.map_err(agent_err)?;
    Ok(Json(ExecStarted { pid }))
}

async fn exec_output(State(vm): S, Path(pid): Path<i64>) -> R<ExecOutput> {
    let st = if vm.vireo_agent().await {
        vm.agent.exec_read(pid).await
    } else {
        vm.agent.exec_status(pid).await
    }
    .map_err(agent_err)?;
    Ok(Json(ExecOutput {
        exited: st.exit.is_some(),
        exit_code: st.exit.and_then(|e| e.code),
        signal: st.exit.and_then(|e| e.signal),
        stdout: String::from_utf8_lossy(&st.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&st.stderr).into_owned(),
    }))
}

async fn kvp_list(State(vm): S) -> R<KvpPools> {
    if !vm.vireo_agent().await {
        return Err(WorkerError(
            ErrorKind::Failed,
            "key-value pair exchange needs vireo-guest in the guest (qemu-ga does not have it)"
                .into(),
        ));
    }
    let host = vm
        .agent
        .kvp_list(agent::protocol::KvpPool::Host)
        .await
        .map_err(agent_err)?;
    let guest = vm
        .agent
        .kvp_list(agent::protocol::KvpPool::Guest)
        .await
        .map_err(agent_err)?;
    Ok(Json(KvpPools {
        host: host.into_iter().map(|p| (p.key, p.value)).collect(),
        guest: guest.into_iter().map(|p| (p.key, p.value)).collect(),
    }))
}

async fn kvp_set(State(vm): S, Json(kv): Json<KvpSet>) -> R<KvpPools> {
    if !vm.vireo_agent().await {
        return Err(WorkerError(
            ErrorKind::Failed,
            "key-value pair exchange needs vireo-guest in the guest (qemu-ga does not have it)"
                .into(),
        ));
    }
    vm.agent
        .kvp_set(&kv.key, &kv.value)
        .await
        .map_err(agent_err)?;
    kvp_list(State(vm)).await
}
