//! Adding disks to a VM that is off: attach an existing image, or create a new one in the
//! VM's directory (a dynamic VHDX unless raw is asked for: checkpoints need VHDX).

use super::Manager;
use crate::error::{ApiError, ApiResult};
use api::checkpoint::{AddDisk, NewImageFormat};
use api::{CreateDisk, VmInfo, VmPatch};
use std::path::{Path, PathBuf};

/// Creates a new image of `size` bytes at `path` (must not exist).
fn create_image(path: &Path, size: u64, format: NewImageFormat) -> ApiResult<()> {
    match format {
        NewImageFormat::Vhdx => {
            let opts = vhdx::CreateOptions {
                size,
                disk_type: vhdx::DiskType::Dynamic,
                ..Default::default()
            };
            vhdx::Vhdx::create(path, &opts)
                .and_then(|v| v.close())
                .map_err(|e| ApiError::failed(format!("creating {}: {e}", path.display())))
        }
        NewImageFormat::Raw => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|f| {
                f.set_len(size)?;
                f.sync_all()
            })
            .map_err(|e| ApiError::failed(format!("creating {}: {e}", path.display()))),
    }
}

impl Manager {
    /// Adds a disk to a VM that is off (`vireo vm disk add`, `vireo vm new --disk-size`).
    pub async fn disk_add(&self, name: &str, req: AddDisk) -> ApiResult<VmInfo> {
        req.check().map_err(ApiError::invalid)?;
        let (uuid, _) = self.find(name)?;
        if self.qemu_pid(&uuid).is_some() {
            return Err(ApiError::wrong_state(format!(
                "VM {name} is running: disks are added while it is off (stop it with `vireo vm stop {name}`)"
            )));
        }
        let (path, created) = match (req.path, req.size) {
            (Some(p), _) => (p, None),
            (None, Some(size)) => {
                let format = req.format.unwrap_or_default();
                let ext = match format {
                    NewImageFormat::Vhdx => "vhdx",
                    NewImageFormat::Raw => "img",
                };
                let dir = self.store.vm_dir(&uuid);
                let n = self.spec(&uuid)?.disks.len();
                let path: PathBuf = (n..n + 1000)
                    .map(|i| dir.join(format!("disk{i}.{ext}")))
                    .find(|p| !p.exists())
                    .ok_or_else(|| {
                        ApiError::failed("no free disk file name in the VM directory")
                    })?;
                let p = path.clone();
                tokio::task::spawn_blocking(move || create_image(&p, size, format))
                    .await
                    .map_err(ApiError::internal)??;
                (path.clone(), Some(path))
            }
            (None, None) => return Err(ApiError::invalid("give a path or a size")),
        };
        let patch = VmPatch {
            add_disks: vec![CreateDisk {
                path,
                bus: req.bus,
                read_only: req.read_only,
            }],
            ..Default::default()
        };
        let r = self.update(name, patch).await;
        if r.is_err() {
            if let Some(p) = created {
                let _ = std::fs::remove_file(p);
            }
        }
        r
    }
}
