//! The crate error: wraps each module's error and classifies it with [`ErrorKind`].

use std::io;
use std::path::PathBuf;

use crate::guid::Guid;

/// What class of failure an [`Error`] is, for callers that map errors
/// (HTTP status, NBD error codes, exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The host file system failed.
    Io,
    /// The image is damaged or not a VHDX image.
    Corrupt,
    /// A valid image uses something this implementation does not do.
    Unsupported,
    /// A file (the image or a parent) does not exist.
    NotFound,
    /// Another process holds the image open for writing.
    Busy,
    /// The caller asked for something invalid (bad size, offset out of range).
    InvalidInput,
    /// A write was attempted on a read-only handle.
    ReadOnly,
    /// The differencing chain is broken (parent changed, missing or looping).
    Chain,
    /// The operation was cancelled by its caller.
    Cancelled,
}

/// Errors of the `vhdx` crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done ("reading header 1 of", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file header or file identifier is invalid.
    #[error("invalid VHDX headers in {path}")]
    Header {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::header::HeaderError,
    },
    /// The region table is invalid.
    #[error("invalid region table in {path}")]
    Region {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::region::RegionError,
    },
    /// The metadata region is invalid.
    #[error("invalid metadata in {path}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::metadata::MetadataError,
    },
    /// The parent locator is invalid.
    #[error("invalid parent locator in {path}")]
    Locator {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::locator::LocatorError,
    },
    /// The block allocation table is invalid.
    #[error("invalid block allocation table in {path}")]
    Bat {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::bat::BatError,
    },
    /// The metadata log cannot be read or replayed.
    #[error("metadata log of {path}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::log::LogError,
    },
    /// Another process has the image open.
    #[error("{path} is in use by another process (lock held)")]
    Busy {
        /// The file.
        path: PathBuf,
    },
    /// The image or a parent does not exist.
    #[error("{path} does not exist")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// A write on a read-only handle.
    #[error("{path} is open read-only")]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// A request the image cannot satisfy.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// A feature this implementation does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The parent of a differencing disk was modified after the child was created.
    #[error(
        "parent {parent} of {child} has changed since the child was created \
         (parent DataWriteGuid {actual:?}, child expects {expected})"
    )]
    ParentChanged {
        /// The child.
        child: PathBuf,
        /// The parent file found.
        parent: PathBuf,
        /// DataWriteGuid found in the parent.
        actual: Guid,
        /// parent_linkage recorded in the child.
        expected: String,
    },
    /// No parent file could be found from the locator.
    #[error("parent of {child} not found (tried: {tried})")]
    ParentNotFound {
        /// The child.
        child: PathBuf,
        /// Paths tried, comma separated.
        tried: String,
    },
    /// The chain refers back to itself or is too deep.
    #[error("differencing chain of {child} loops or is deeper than {max} images (at {at})")]
    ParentLoop {
        /// The child.
        child: PathBuf,
        /// The repeated file.
        at: PathBuf,
        /// Maximum depth.
        max: usize,
    },
    /// The caller cancelled the operation.
    #[error("operation cancelled")]
    Cancelled,
    /// A helper tool (qemu-img) failed.
    #[error("{0}")]
    Tool(String),
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::Io { .. } | Error::Tool(_) => ErrorKind::Io,
            Error::Header { .. }
            | Error::Region { .. }
            | Error::Metadata { .. }
            | Error::Locator { .. }
            | Error::Bat { .. } => ErrorKind::Corrupt,
            Error::Log { source, .. } => match source {
                crate::log::LogError::NeedsReplay => ErrorKind::ReadOnly,
                crate::log::LogError::Io(_) => ErrorKind::Io,
                _ => ErrorKind::Corrupt,
            },
            Error::Busy { .. } => ErrorKind::Busy,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::ParentChanged { .. }
            | Error::ParentNotFound { .. }
            | Error::ParentLoop { .. } => ErrorKind::Chain,
            Error::Cancelled => ErrorKind::Cancelled,
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;
