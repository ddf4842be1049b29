//! A host's identity: a self-signed certificate and its key, created once in
//! `<state_dir>/tls/` (key readable by root only). Peers pin the certificate's fingerprint.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Identity failures.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file of the identity.
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
    /// Generating the certificate.
    #[error("generating the host certificate")]
    Generate(#[source] rcgen::Error),
    /// The stored key or certificate is unusable.
    #[error("the host key in {0} is unusable (remove the tls directory to make a new identity; peers must then trust this host again)")]
    BadKey(PathBuf),
}

impl IdentityError {
    /// Classification.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            IdentityError::Io { .. } => crate::ErrorKind::Io,
            IdentityError::Generate(_) => crate::ErrorKind::InvalidInput,
            IdentityError::BadKey(_) => crate::ErrorKind::Corrupt,
        }
    }
}

/// This host's certificate and key.
#[derive(Clone)]
pub struct HostIdentity {
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    fingerprint: String,
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a certificate's DER as upper-case hex pairs joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fingerprint typed by a user (any case, with or without `:`) in canonical form, or
/// `None` when it is not 32 hex bytes.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let hex: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let up = hex.to_ascii_uppercase();
    Some(
        up.as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":"),
    )
}

impl HostIdentity {
    /// Loads the identity from `<state_dir>/tls/`, creating it on first use.
    pub fn load_or_create(state_dir: &Path, hostname: &str) -> Result<Self, IdentityError> {
        let dir = state_dir.join("tls");
        let cert_path = dir.join("host-cert.der");
        let key_path = dir.join("host-key.der");
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { op, path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert_der = std::fs::read(&cert_path).map_err(io("reading", &cert_path))?;
            let key_der = std::fs::read(&key_path).map_err(io("reading", &key_path))?;
            if cert_der.is_empty() || key_der.is_empty() {
                return Err(IdentityError::BadKey(dir));
            }
            let fingerprint = fingerprint(&cert_der);
            return Ok(HostIdentity {
                cert_der,
                key_der,
                fingerprint,
            });
        }
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let mut names = vec!["vireo-host".to_string()];
        if !hostname.is_empty() && hostname != "vireo-host" {
            names.push(hostname.to_string());
        }
        let ck = rcgen::generate_simple_self_signed(names).map_err(IdentityError::Generate)?;
        let cert_der = ck.cert.der().to_vec();
        let key_der = ck.key_pair.serialize_der();
        crate::write_atomic(&key_path, &key_der, 0o600).map_err(io("writing", &key_path))?;
        crate::write_atomic(&cert_path, &cert_der, 0o644).map_err(io("writing", &cert_path))?;
        tracing::info!(fingerprint = %fingerprint(&cert_der), "created the host certificate");
        Ok(HostIdentity {
            fingerprint: fingerprint(&cert_der),
            cert_der,
            key_der,
        })
    }

    /// The certificate's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub(crate) fn key_der(&self) -> &[u8] {
        &self.key_der
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity is made once and read back unchanged; the key is root-only.
    #[test]
    fn created_once_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        let a = HostIdentity::load_or_create(d.path(), "h1").unwrap();
        let b = HostIdentity::load_or_create(d.path(), "h1").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), fingerprint(a.cert_der()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("tls/host-key.der"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key must be private");
    }

    /// User-typed fingerprints are accepted in any case with or without colons.
    #[test]
    fn normalize() {
        let f = fingerprint(b"x");
        assert_eq!(
            normalize_fingerprint(&f.to_lowercase()).as_deref(),
            Some(&*f)
        );
        assert_eq!(
            normalize_fingerprint(&f.replace(':', "")).as_deref(),
            Some(&*f)
        );
        assert_eq!(normalize_fingerprint("AB:CD"), None);
        assert_eq!(normalize_fingerprint(&"zz".repeat(32)), None);
    }
}
