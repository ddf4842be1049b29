//! The trusted peers of a host, persisted as `<state_dir>/peers.json` (temp file, fsync,
//! rename). A peer is trusted by its certificate fingerprint; its address is only where to
//! reach it.

use api::migration::PeerInfo;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File layout version; an unknown version is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Trust store failures.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Reading or writing the file.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a trust store this version understands.
    #[error("{path} is unreadable: {detail}")]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

impl TrustError {
    /// Classification.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            TrustError::Io { .. } => crate::ErrorKind::Io,
            TrustError::Corrupt { .. } => crate::ErrorKind::Corrupt,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    format_version: u32,
    peers: Vec<PeerInfo>,
}

/// The trusted peers.
pub struct TrustStore {
    path: PathBuf,
    peers: Mutex<Vec<PeerInfo>>,
}

impl TrustStore {
    /// Opens `<state_dir>/peers.json` (empty when absent).
    pub fn open(state_dir: &Path) -> Result<Self, TrustError> {
        let path = state_dir.join("peers.json");
        let peers = match std::fs::read(&path) {
            Ok(b) => {
                let f: File = serde_json::from_slice(&b).map_err(|e| TrustError::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                if f.format_version != FORMAT_VERSION {
                    return Err(TrustError::Corrupt {
                        path,
                        detail: format!("unknown format version {}", f.format_version),
                    });
                }
                f.peers
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(TrustError::Io {
                    op: "reading",
                    path,
                    source,
                })
            }
        };
        Ok(TrustStore {
            path,
            peers: Mutex::new(peers),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PeerInfo>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every trusted peer.
    pub fn list(&self) -> Vec<PeerInfo> {
        self.lock().clone()
    }

    /// Whether `fingerprint` belongs to a trusted peer.
    pub fn is_trusted(&self, fingerprint: &str) -> bool {
        self.lock().iter().any(|p| p.fingerprint == fingerprint)
    }

    /// The peer with this fingerprint.
    pub fn by_fingerprint(&self, fingerprint: &str) -> Option<PeerInfo> {
        self.lock()
            .iter()
            .find(|p| p.fingerprint == fingerprint)
            .cloned()
    }

    /// A peer by name or address.
    pub fn find(&self, name_or_address: &str) -> Option<PeerInfo> {
        let peers = self.lock();
        peers
            .iter()
            .find(|p| p.address == name_or_address)
            .or_else(|| peers.iter().find(|p| p.name == name_or_address))
            .cloned()
    }

    /// Adds (or replaces, same fingerprint or address) a trusted peer and persists.
    pub fn add(&self, peer: PeerInfo) -> Result<(), TrustError> {
        let mut peers = self.lock();
        peers.retain(|p| p.fingerprint != peer.fingerprint && p.address != peer.address);
        peers.push(peer);
        self.persist(&peers)
    }

    /// Removes a peer by name or address; returns whether one was removed.
    pub fn remove(&self, name_or_address: &str) -> Result<bool, TrustError> {
        let mut peers = self.lock();
        let before = peers.len();
        peers.retain(|p| p.address != name_or_address && p.name != name_or_address);
        let removed = peers.len() != before;
        if removed {
            self.persist(&peers)?;
        }
        Ok(removed)
    }

    fn persist(&self, peers: &[PeerInfo]) -> Result<(), TrustError> {
        let data = serde_json::to_vec_pretty(&File {
            format_version: FORMAT_VERSION,
            peers: peers.to_vec(),
        })
        .map_err(|e| TrustError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        crate::write_atomic(&self.path, &data, 0o600).map_err(|source| TrustError::Io {
            op: "writing",
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, addr: &str, fp: &str) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            address: addr.into(),
            fingerprint: fp.into(),
            version: "0.1.0".into(),
            protocol_version: 1,
            trusted_at: 1,
        }
    }

    /// Peers survive a reopen; re-trusting an address replaces the old entry.
    #[test]
    fn persisted_and_replaced() {
        let d = tempfile::tempdir().unwrap();
        let s = TrustStore::open(d.path()).unwrap();
        s.add(peer("b", "10.0.0.2:7443", "AA")).unwrap();
        s.add(peer("c", "10.0.0.3:7443", "CC")).unwrap();
        s.add(peer("b2", "10.0.0.2:7443", "BB")).unwrap();
        let s = TrustStore::open(d.path()).unwrap();
        assert!(!s.is_trusted("AA"));
        assert!(s.is_trusted("BB") && s.is_trusted("CC"));
        assert_eq!(s.find("b2").unwrap().address, "10.0.0.2:7443");
        assert!(s.remove("c").unwrap());
        assert!(!TrustStore::open(d.path()).unwrap().is_trusted("CC"));
    }

    /// A file of an unknown version is refused, not guessed at.
    #[test]
    fn unknown_version_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("peers.json"),
            br#"{"format_version":9,"peers":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            TrustStore::open(d.path()),
            Err(TrustError::Corrupt { .. })
        ));
    }
}
