//! NIC hot-plug and hot-unplug on the running VM (QMP `netdev_add`/`device_add`,
//! `device_del`/`netdev_del`). Every NIC's netdev is a `-netdev stream,server=on` socket in
//! the run directory; vireod tells the switch to connect to it.
//!
//! Routes: `POST /nics` ([`api::switch::NicHotplug`]), `DELETE /nics/{id}`.

use crate::vm::Vm;
use api::switch::NicHotplug;
use api::{ErrorBody, ErrorKind, NicModel};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// How long the guest may take to release an unplugged NIC.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);

/// The routes, merged into the worker's router.
pub fn routes() -> Router<Arc<Vm>> {
    Router::new()
        .route("/nics", post(add))
        .route("/nics/{id}", delete(remove))
}

/// An error answered to vireod.
pub struct NicError(ErrorKind, String);

impl IntoResponse for NicError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
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

fn failed(what: &str, e: impl std::fmt::Display) -> NicError {
    NicError(ErrorKind::Failed, format!("{what}: {e}"))
}

async fn add(
    State(vm): State<Arc<Vm>>,
    Json(r): Json<NicHotplug>,
) -> Result<Json<serde_json::Value>, NicError> {
    api::switch::check_nic_name(&r.id).map_err(|e| NicError(ErrorKind::Invalid, e))?;
    let netdev = format!("net-{}", r.id);
    // A stale socket file would make QEMU's bind fail.
    let _ = std::fs::remove_file(&r.socket);
    vm.qmp
        .netdev_add(
            "stream",
            &netdev,
            json!({"server": true, "addr": {"type": "unix", "path": r.socket}}),
        )
        .await
        .map_err(|e| failed("QMP netdev_add", e))?;
    let driver = match r.model {
        NicModel::E1000 => "e1000",
        NicModel::Virtio => "virtio-net-pci",
    };
    let props = |bus: Option<String>| {
        let mut p = json!({"netdev": netdev, "mac": r.mac});
        if let Some(b) = bus {
            p["bus"] = json!(b);
        }
        p
    };
    let result = if r.generation == 2 {
        // q35's root bus takes no hotplug: use the first free PCIe root port.
        let mut last = None;
        let mut done = false;
        for i in 0..qemu::cmdline::GEN2_HOTPLUG_PORTS {
            match vm
                .qmp
                .device_add(driver, &r.id, props(Some(format!("hp{i}"))))
                .await
            {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) => last = Some(e.to_string()),
            }
        }
        if done {
            Ok(())
        } else {
            Err(format!(
                "no free PCIe hotplug port ({})",
                last.unwrap_or_default()
            ))
        }
    } else {
        vm.qmp
            .device_add(driver, &r.id, props(None))
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(e) = result {
        let _ = vm.qmp.netdev_del(&netdev).await;
        let _ = std::fs::remove_file(&r.socket);
        return Err(failed("QMP device_add", e));
    }
    tracing::info!(nic = %r.id, mac = %r.mac, "NIC hot-plugged");
    Ok(Json(json!({"added": r.id})))
}

async fn remove(
    State(vm): State<Arc<Vm>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, NicError> {
    api::switch::check_nic_name(&id).map_err(|e| NicError(ErrorKind::Invalid, e))?;
    let mut events = vm.qmp.events();
    vm.qmp
        .device_del(&id)
        .await
        .map_err(|e| failed("QMP device_del", e))?;
    let want = id.clone();
    vm.qmp
        .wait_event(
            &mut events,
            "DEVICE_DELETED",
            move |d| d.get("device").and_then(|v| v.as_str()) == Some(want.as_str()),
            UNPLUG_TIMEOUT,
        )
        .await
        .map_err(|e| {
            failed(
                "the guest did not release the NIC (does it support PCI hot-unplug?)",
                e,
            )
        })?;
    let netdev = format!("net-{id}");
    vm.qmp
        .netdev_del(&netdev)
        .await
        .map_err(|e| failed("QMP netdev_del", e))?;
    tracing::info!(nic = %id, "NIC hot-unplugged");
    Ok(Json(json!({"removed": id})))
}
