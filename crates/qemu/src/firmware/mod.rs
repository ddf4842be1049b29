//! Firmware: where OVMF and SeaBIOS live, Secure Boot templates, per-VM variable stores.
//!
//! Secure Boot templates map onto OVMF variable stores:
//!
//! | template | PK / KEK | db | source |
//! |---|---|---|---|
//! | [`SecureBootTemplate::MicrosoftWindows`] | Microsoft KEK | Windows certificates only ("Microsoft Windows Production PCA 2011") | derived from the Microsoft store by removing every non-Windows db certificate |
//! | [`SecureBootTemplate::MicrosoftUefiCa`] | Microsoft KEK | Windows PCA + "Microsoft Corporation UEFI CA 2011" (trusts shim, so Debian/Ubuntu/Fedora boot) | the distribution's `OVMF_VARS_4M.ms.fd` as shipped |
//! | [`SecureBootTemplate::None`] | none | none (setup mode: nothing is enforced) | the blank `OVMF_VARS_4M.fd` |
//!
//! Distributions ship no Windows-only store, so [`varstore`] edits one: it parses the firmware
//! volume and the authenticated variable store, and [`siglist`] decodes `db` into X.509
//! entries named by their subject CN.

pub mod siglist;
pub mod varstore;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ErrorKind;
use siglist::{encode_signature_lists, parse_signature_lists, SigListError};
use varstore::{VarStore, VarStoreError, EFI_IMAGE_SECURITY_DATABASE};

/// Errors of firmware handling.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// No OVMF installation was found.
    #[error("no OVMF firmware found (looked in {0}); install the ovmf package (scripts/setup.sh)")]
    OvmfNotFound(String),
    /// The distribution ships no Microsoft-enrolled variable store.
    #[error("no variable store with Microsoft keys found next to {0}")]
    NoMicrosoftVars(PathBuf),
    /// Reading a firmware file failed.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// Writing the per-VM store failed.
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The per-VM store already exists (it holds the VM's boot entries; never overwritten).
    #[error("variable store {0} already exists")]
    Exists(PathBuf),
    /// The variable store is malformed.
    #[error("variable store {0}")]
    VarStore(PathBuf, #[source] VarStoreError),
    /// A signature database is malformed.
    #[error("signature database in {0}")]
    SigList(PathBuf, #[source] SigListError),
    /// The template store lacks what the template needs.
    #[error("template store {0} is unsuitable: {1}")]
    Unsuitable(PathBuf, String),
}

impl FirmwareError {
    /// Classification for callers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FirmwareError::OvmfNotFound(_) | FirmwareError::NoMicrosoftVars(_) => {
                ErrorKind::NotFound
            }
            FirmwareError::Read(_, e) if e.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            FirmwareError::Read(..) | FirmwareError::Write(..) => ErrorKind::Io,
            FirmwareError::Exists(_) => ErrorKind::InvalidInput,
            FirmwareError::VarStore(..) | FirmwareError::SigList(..) => ErrorKind::Corrupt,
            FirmwareError::Unsuitable(..) => ErrorKind::Unsupported,
        }
    }
}

/// Secure Boot key set of a generation 2 VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecureBootTemplate {
    /// Microsoft KEK; db trusts only Windows ("Microsoft Windows Production PCA 2011").
    MicrosoftWindows,
    /// Microsoft KEK; db trusts Windows and the Microsoft UEFI CA (shim-based Linux).
    MicrosoftUefiCa,
    /// No keys: setup mode, Secure Boot not enforced.
    None,
}

impl SecureBootTemplate {
    /// Whether the VM runs the Secure Boot OVMF build with the SMM-locked variable store.
    pub fn secure_boot(self) -> bool {
        !matches!(self, SecureBootTemplate::None)
    }

    /// The OVMF code image to pair with this template.
    pub fn code(self, ovmf: &OvmfPaths) -> &Path {
        if self.secure_boot() {
            &ovmf.code_secboot
        } else {
            &ovmf.code
        }
    }
}

impl std::str::FromStr for SecureBootTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "microsoft-windows" => Ok(SecureBootTemplate::MicrosoftWindows),
            "microsoft-uefi-ca" => Ok(SecureBootTemplate::MicrosoftUefiCa),
            "none" => Ok(SecureBootTemplate::None),
            o => Err(format!(
                "unknown Secure Boot template {o:?} (microsoft-windows, microsoft-uefi-ca, none)"
            )),
        }
    }
}

/// OVMF files of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvmfPaths {
    /// Code without Secure Boot (no SMM requirement).
    pub code: PathBuf,
    /// Code with Secure Boot (needs `smm=on` and `cfi.pflash01 secure=on`).
    pub code_secboot: PathBuf,
    /// Blank variable store (setup mode).
    pub vars_blank: PathBuf,
    /// Variable store with Microsoft keys enrolled, if the distribution ships one.
    pub vars_microsoft: Option<PathBuf>,
}

/// Candidate layouts: (code, code_secboot, vars_blank, vars_microsoft).
const OVMF_LAYOUTS: &[(&str, &str, &str, &str)] = &[
    // Debian, Ubuntu.
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
    ),
    // Fedora, RHEL, CentOS.
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd",
    ),
    // Arch Linux.
    (
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_CODE.secboot.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
        "",
    ),
    // openSUSE.
    (
        "/usr/share/qemu/ovmf-x86_64-4m-code.bin",
        "/usr/share/qemu/ovmf-x86_64-smm-ms-code.bin",
        "/usr/share/qemu/ovmf-x86_64-4m-vars.bin",
        "/usr/share/qemu/ovmf-x86_64-smm-ms-vars.bin",
    ),
    // Older Debian / 2 MiB builds.
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_CODE.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
        "/usr/share/OVMF/OVMF_VARS.ms.fd",
    ),
];

impl OvmfPaths {
    /// Finds the OVMF installation: `$VIREO_OVMF_DIR` (Debian file names) first, then the
    /// known distribution layouts.
    pub fn discover() -> Result<OvmfPaths, FirmwareError> {
        if let Some(dir) = std::env::var_os("VIREO_OVMF_DIR") {
            let d = PathBuf::from(dir);
            let p = OvmfPaths {
                code: d.join("OVMF_CODE_4M.fd"),
                code_secboot: d.join("OVMF_CODE_4M.secboot.fd"),
                vars_blank: d.join("OVMF_VARS_4M.fd"),
                vars_microsoft: Some(d.join("OVMF_VARS_4M.ms.fd")).filter(|p| p.exists()),
            };
            if p.code_secboot.exists() && p.vars_blank.exists() {
                return Ok(p);
            }
        }
        for (code, sb, blank, ms) in OVMF_LAYOUTS {
            if Path::new(sb).exists() && Path::new(blank).exists() {
                return Ok(OvmfPaths {
                    code: if Path::new(code).exists() { code } else { sb }.into(),
                    code_secboot: sb.into(),
                    vars_blank: blank.into(),
                    vars_microsoft: Some(PathBuf::from(ms))
                        .filter(|p| !p.as_os_str().is_empty() && p.exists()),
                });
            }
        }
        Err(FirmwareError::OvmfNotFound(
            OVMF_LAYOUTS
                .iter()
                .map(|l| l.1)
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }

    /// The template store of a Secure Boot template (before derivation).
    fn source_vars(&self, template: SecureBootTemplate) -> Result<&Path, FirmwareError> {
        match template {
            SecureBootTemplate::None => Ok(&self.vars_blank),
            _ => self
                .vars_microsoft
                .as_deref()
                .ok_or_else(|| FirmwareError::NoMicrosoftVars(self.vars_blank.clone())),
        }
    }
}

/// SeaBIOS image QEMU uses by default for generation 1 (QEMU finds it itself; this is for
/// diagnostics).
pub fn seabios_path() -> Option<PathBuf> {
    [
        "/usr/share/seabios/bios-256k.bin",
        "/usr/share/qemu/bios-256k.bin",
        "/usr/share/seabios/bios.bin",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The variable store image of a template (derived in memory where needed).
pub fn template_vars(
    ovmf: &OvmfPaths,
    template: SecureBootTemplate,
) -> Result<Vec<u8>, FirmwareError> {
    let src = ovmf.source_vars(template)?;
    let image = std::fs::read(src).map_err(|e| FirmwareError::Read(src.to_path_buf(), e))?;
    match template {
        SecureBootTemplate::None | SecureBootTemplate::MicrosoftUefiCa => {
            // Validate what we hand out.
            VarStore::parse(image.clone())
                .map_err(|e| FirmwareError::VarStore(src.to_path_buf(), e))?;
            Ok(image)
        }
        SecureBootTemplate::MicrosoftWindows => windows_only(src, image),
    }
}

/// Rewrites a Microsoft store so that `db` holds only Windows certificates.
fn windows_only(src: &Path, image: Vec<u8>) -> Result<Vec<u8>, FirmwareError> {
    let mut store =
        VarStore::parse(image).map_err(|e| FirmwareError::VarStore(src.to_path_buf(), e))?;
    let db = store
        .get("db", EFI_IMAGE_SECURITY_DATABASE)
        .ok_or_else(|| FirmwareError::Unsuitable(src.to_path_buf(), "no db variable".into()))?;
    let entries = parse_signature_lists(&db.data)
        .map_err(|e| FirmwareError::SigList(src.to_path_buf(), e))?;
    let (keep, dropped): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|e| e.subject_cn().is_some_and(|cn| cn.contains("Windows")));
    if keep.is_empty() {
        return Err(FirmwareError::Unsuitable(
            src.to_path_buf(),
            "db holds no Windows certificate".into(),
        ));
    }
    for d in &dropped {
        tracing::debug!(entry = %d.describe(), "dropping db entry for microsoft-windows");
    }
    store.set_data(
        "db",
        EFI_IMAGE_SECURITY_DATABASE,
        encode_signature_lists(&keep),
    );
    store
        .to_bytes()
        .map_err(|e| FirmwareError::VarStore(src.to_path_buf(), e))
}

/// Writes a per-VM copy of the template's variable store to `dest` (new file, fsynced,
/// renamed into place). Refuses to overwrite an existing store.
pub fn prepare_vars(template: SecureBootTemplate, dest: &Path) -> Result<(), FirmwareError> {
    prepare_vars_with(&OvmfPaths::discover()?, template, dest)
}

/// [`prepare_vars`] with explicit OVMF paths.
pub fn prepare_vars_with(
    ovmf: &OvmfPaths,
    template: SecureBootTemplate,
    dest: &Path,
) -> Result<(), FirmwareError> {
    if dest.exists() {
        return Err(FirmwareError::Exists(dest.to_path_buf()));
    }
    let image = template_vars(ovmf, template)?;
    let werr = |e| FirmwareError::Write(dest.to_path_buf(), e);
    let tmp = dest.with_extension("tmp-vars");
    let mut f = std::fs::File::create(&tmp).map_err(werr)?;
    let res = f.write_all(&image).and_then(|_| f.sync_all());
    if let Err(e) = res.and_then(|_| {
        // Refuse if someone created dest meanwhile; link() fails on an existing target.
        std::fs::hard_link(&tmp, dest)
    }) {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(FirmwareError::Exists(dest.to_path_buf()));
        }
        return Err(werr(e));
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// One variable of a store, for listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariableInfo {
    /// Name.
    pub name: String,
    /// Vendor GUID (text).
    pub vendor: String,
    /// Attributes.
    pub attributes: u32,
    /// Data size.
    pub size: usize,
    /// For `PK`, `KEK`, `db`, `dbx`: the decoded entries (`X509 CN=...`, `SHA256 ...`).
    pub entries: Vec<String>,
}

/// Lists the live variables of a variable store image.
pub fn list_variables(image: Vec<u8>) -> Result<Vec<VariableInfo>, VarStoreError> {
    let store = VarStore::parse(image)?;
    Ok(store
        .live()
        .map(|v| VariableInfo {
            name: v.name.clone(),
            vendor: v.vendor.to_string(),
            attributes: v.attributes,
            size: v.data.len(),
            entries: if matches!(v.name.as_str(), "PK" | "KEK" | "db" | "dbx") {
                parse_signature_lists(&v.data)
                    .map(|es| es.iter().map(|e| e.describe()).collect())
                    .unwrap_or_else(|e| vec![format!("undecodable: {e}")])
            } else {
                Vec::new()
            },
        })
        .collect())
}

/// Recognises firmware / shim refusals of a boot loader in a serial console log.
///
/// Returns the offending console line (escape sequences removed), e.g.
/// `BdsDxe: failed to load Boot0001 "UEFI QEMU QEMU HARDDISK " from PciRoot(0x0)/...: Access Denied`.
/// The daemon shows it as "firmware refused the boot loader: ...".
pub fn detect_boot_refusal(console_log: &str) -> Option<String> {
    const PATTERNS: &[&str] = &[
        "Access Denied",
        "Security Violation",
        "Verification failed",
        "SB policy violation",
    ];
    let clean = strip_ansi(console_log);
    clean
        .split(['\n', '\r'])
        .map(str::trim)
        // The firmware's own shell is refused too under Secure Boot; that is not the VM's
        // boot loader.
        .filter(|l| !l.contains("EFI Internal Shell"))
        .find(|l| PATTERNS.iter().any(|p| l.contains(p)))
        .map(str::to_string)
}

/// Removes ANSI/VT100 escape sequences (OVMF draws its console with them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters until a final byte in 0x40..=0x7e.
                for c2 in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c2) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OVMF's refusal line is found through escape sequences; shim output that only
    /// fails to find grub is not a refusal.
    #[test]
    fn refusal_detection() {
        let log = "\u{1b}[2J\u{1b}[01;01HBdsDxe: loading Boot0001 \"UEFI QEMU QEMU HARDDISK \" from PciRoot(0x0)/Pci(0x3,0x0)/Scsi(0x0,0x0)\r\n\u{1b}[0m\u{1b}[40mBdsDxe: failed to load Boot0001 \"UEFI QEMU QEMU HARDDISK \" from PciRoot(0x0)/Pci(0x3,0x0)/Scsi(0x0,0x0): Access Denied\r\n";
        assert_eq!(
            detect_boot_refusal(log).as_deref(),
            Some("BdsDxe: failed to load Boot0001 \"UEFI QEMU QEMU HARDDISK \" from PciRoot(0x0)/Pci(0x3,0x0)/Scsi(0x0,0x0): Access Denied")
        );
        let shell = "BdsDxe: failed to start Boot0002 \"EFI Internal Shell\" from Fv(7CB8BDC9-F8EB-4F34-AAEA-3EE4AF6516A1)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1): Security Violation\r\n";
        assert_eq!(detect_boot_refusal(shell), None);
        let ok = "Failed to open \\EFI\\BOOT\\grubx64.efi - Not Found\r\nstart_image() returned Not Found\r\n";
        assert_eq!(detect_boot_refusal(ok), None);
    }

    /// Templates parse from their API spelling.
    #[test]
    fn template_names() {
        assert_eq!(
            "microsoft-windows".parse::<SecureBootTemplate>(),
            Ok(SecureBootTemplate::MicrosoftWindows)
        );
        assert!("windows".parse::<SecureBootTemplate>().is_err());
        assert!(!SecureBootTemplate::None.secure_boot());
    }
}
