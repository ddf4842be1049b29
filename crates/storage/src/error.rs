//! Errors of the disk service.

use std::path::PathBuf;

/// Class of a [`StorageError`], to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing a file failed.
    Io,
    /// An image is damaged.
    Corrupt,
    /// The operation is not possible for this image or state.
    Unsupported,
    /// A file, checkpoint or job does not exist.
    NotFound,
    /// Another operation holds the disk (a merge is running).
    Busy,
    /// The request is malformed.
    InvalidInput,
}

/// What went wrong in the disk service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An image operation failed.
    #[error("{op} {path}")]
    Image {
        /// What was being done.
        op: &'static str,
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<vhdx::Error>,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// qcow2 and other formats are not served by the disk service.
    #[error("{path} is a {format} image; the disk service serves VHDX and raw images (convert it with `vireo disk convert`)")]
    Format {
        /// The image.
        path: PathBuf,
        /// Its format.
        format: &'static str,
    },
    /// Checkpoints and merges need VHDX.
    #[error("{path} is a raw image: checkpoints need VHDX; convert it first with `vireo disk convert {path} NEW.vhdx` and attach the VHDX")]
    RawDisk {
        /// The raw image.
        path: PathBuf,
    },
    /// The state does not allow the operation.
    #[error("{0}")]
    Unsupported(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A merge or switch is in progress.
    #[error("{0}")]
    Busy(String),
    /// Bad request.
    #[error("{0}")]
    InvalidInput(String),
    /// The persisted state is unreadable or of an unknown version.
    #[error("state file {path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        why: String,
    },
    /// Serving NBD failed.
    #[error("NBD server")]
    Nbd(#[source] nbd::Error),
}

impl StorageError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::Image { source, .. } => match source.kind() {
                vhdx::ErrorKind::NotFound => ErrorKind::NotFound,
                vhdx::ErrorKind::Corrupt | vhdx::ErrorKind::Chain => ErrorKind::Corrupt,
                vhdx::ErrorKind::Busy => ErrorKind::Busy,
                vhdx::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                vhdx::ErrorKind::Unsupported => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
            StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            StorageError::Io { .. } | StorageError::Nbd(_) => ErrorKind::Io,
            StorageError::Format { .. }
            | StorageError::RawDisk { .. }
            | StorageError::Unsupported(_) => ErrorKind::Unsupported,
            StorageError::NotFound(_) => ErrorKind::NotFound,
            StorageError::Busy(_) => ErrorKind::Busy,
            StorageError::InvalidInput(_) => ErrorKind::InvalidInput,
            StorageError::State { .. } => ErrorKind::Corrupt,
        }
    }

    pub(crate) fn image<'a>(
        op: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(vhdx::Error) -> StorageError + 'a {
        move |source| StorageError::Image {
            op,
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    }

    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
        move |source| StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, StorageError>;

/// An image error as the `io::Error` an NBD export returns.
pub(crate) fn to_io(e: vhdx::Error) -> std::io::Error {
    let kind = match e.kind() {
        vhdx::ErrorKind::ReadOnly => std::io::ErrorKind::PermissionDenied,
        vhdx::ErrorKind::InvalidInput => std::io::ErrorKind::InvalidInput,
        vhdx::ErrorKind::Unsupported => std::io::ErrorKind::Unsupported,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e)
}
