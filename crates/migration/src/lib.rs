//! `migration`: host trust and the live migration protocol between Vireo hosts.
//!
//! It owns:
//! - [`identity`]: each host's self-signed certificate and private key in its state
//!   directory, and certificate fingerprints (SHA-256 of the DER);
//! - [`trust`]: the persisted list of trusted peers (pinned fingerprints);
//! - [`tls`]: the mutual-TLS configurations (both ends present their certificate; a peer is
//!   identified by its fingerprint, never by a CA) and the stream tunnel header;
//! - [`peer`]: the HTTP/JSON client over mutual TLS that one vireod uses to call another;
//! - [`protocol`]: the hello (protocol version, feature list, host facts), the pure
//!   compatibility check that refuses a migration before anything moves, and the
//!   host-to-host messages;
//! - [`job`]: the migration phases and the pure recovery policy (what the source must undo
//!   after a failure so that the VM keeps running there);
//! - [`nbd_probe`]: reading an NBD export's size (to serve placeholder exports on the
//!   destination until the disks are handed over).
//!
//! It must not drive QEMU or own VMs: the daemon (`vireod`) and the worker carry out what
//! this crate decides.
#![warn(missing_docs)]

pub mod identity;
pub mod job;
pub mod nbd_probe;
pub mod peer;
pub mod protocol;
pub mod tls;
pub mod trust;

pub use identity::{fingerprint, normalize_fingerprint, HostIdentity, IdentityError};
pub use peer::{PeerClient, PeerError};
pub use protocol::{Hello, HostFacts, Incompatible, VmNeeds, PROTOCOL_VERSION};
pub use trust::{TrustError, TrustStore};

/// Coarse classification of this crate's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Local file or socket I/O.
    Io,
    /// A file or message that cannot be read.
    Corrupt,
    /// The peer is not reachable (connect, TLS, timeout).
    Unreachable,
    /// The peer is not who it should be, or refused us.
    Untrusted,
    /// The peer answered with an error.
    Refused,
    /// Invalid input.
    InvalidInput,
}

/// Writes `data` to `path` through a fsynced temporary file and a rename.
pub(crate) fn write_atomic(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Unix seconds.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
