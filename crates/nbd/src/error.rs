//! Crate errors and the NBD error values sent to clients.

use std::io;

/// An error value carried in an NBD reply (the protocol's fixed set of
/// errno-like numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    /// `EPERM`: write to a read-only export.
    Perm,
    /// `EIO`: the export failed.
    Io,
    /// `ENOMEM`.
    NoMem,
    /// `EINVAL`: malformed or out-of-range request.
    Inval,
    /// `ENOSPC`: write beyond the end, or the backing store is full.
    NoSpc,
    /// `EOVERFLOW`: value too large.
    Overflow,
    /// `ENOTSUP`: operation not supported (e.g. a fast zero that would be slow).
    NotSup,
    /// `ESHUTDOWN`: the server is shutting down.
    Shutdown,
}

impl Errno {
    /// The number sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Maps an error returned by an [`Export`](crate::Export) to the value a
    /// client sees. The raw OS error wins when present; otherwise the kind.
    pub fn from_io(e: &io::Error) -> Errno {
        if let Some(code) = e.raw_os_error() {
            return match code {
                libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
                libc::EINVAL => Errno::Inval,
                libc::ENOMEM => Errno::NoMem,
                libc::EOVERFLOW => Errno::Overflow,
                libc::EOPNOTSUPP => Errno::NotSup,
                libc::ESHUTDOWN => Errno::Shutdown,
                _ => Errno::Io,
            };
        }
        match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Errno::Perm,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => Errno::NoSpc,
            io::ErrorKind::InvalidInput => Errno::Inval,
            io::ErrorKind::Unsupported => Errno::NotSup,
            io::ErrorKind::OutOfMemory => Errno::NoMem,
            _ => Errno::Io,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(s)
    }
}

/// What kind of failure an [`Error`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Socket or file I/O failed.
    Io,
    /// The peer broke the protocol.
    Protocol,
    /// A named export does not exist.
    NotFound,
    /// The resource is in use (e.g. a live server on the socket path).
    Busy,
    /// Invalid configuration or argument.
    Invalid,
}

/// Errors of the `nbd` crate's public operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Binding or preparing a listening socket failed.
    #[error("binding NBD socket {path}")]
    Bind {
        /// Socket path or address.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another server answers on the socket path.
    #[error("another server is listening on {path}")]
    SocketInUse {
        /// Socket path.
        path: String,
    },
    /// The path exists and is not a socket; it is left alone.
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// Path.
        path: String,
    },
    /// Accepting a connection failed.
    #[error("accepting an NBD connection")]
    Accept(#[source] io::Error),
    /// An export with this name is already served.
    #[error("export {name:?} already exists")]
    DuplicateExport {
        /// Export name.
        name: String,
    },
    /// The export name cannot be sent over NBD.
    #[error("invalid export name {name:?}: at most 4096 bytes, no NUL")]
    InvalidExportName {
        /// Export name.
        name: String,
    },
    /// The server configuration is inconsistent.
    #[error("invalid server configuration: {0}")]
    Config(&'static str),
    /// One connection failed (handshake or transmission).
    #[error("NBD connection")]
    Connection(#[source] crate::server::ConnectionError),
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Bind { .. } | Error::Accept(_) => ErrorKind::Io,
            Error::SocketInUse { .. } => ErrorKind::Busy,
            Error::NotASocket { .. }
            | Error::DuplicateExport { .. }
            | Error::InvalidExportName { .. }
            | Error::Config(_) => ErrorKind::Invalid,
            Error::Connection(c) => c.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_protocol_values() {
        assert_eq!(
            Errno::from_io(&io::Error::from_raw_os_error(libc::EDQUOT)),
            Errno::NoSpc
        );
        assert_eq!(
            Errno::from_io(&io::Error::from_raw_os_error(libc::EROFS)),
            Errno::Perm
        );
        assert_eq!(
            Errno::from_io(&io::Error::from_raw_os_error(libc::EBADF)),
            Errno::Io
        );
        assert_eq!(
            Errno::from_io(&io::Error::from(io::ErrorKind::Unsupported)),
            Errno::NotSup
        );
        assert_eq!(Errno::Inval.code(), 22);
    }
}
