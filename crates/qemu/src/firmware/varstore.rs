//! OVMF variable store (`OVMF_VARS*.fd`) reader and compact rewriter.
//!
//! Layout (edk2 `MdeModulePkg/Include/Guid/VariableFormat.h`, PI spec volume 3):
//!
//! ```text
//! 0x00  EFI_FIRMWARE_VOLUME_HEADER  (GUID gEfiSystemNvDataFvGuid, "_FVH", HeaderLength)
//! HL    VARIABLE_STORE_HEADER       (GUID gEfiAuthenticatedVariableGuid, Size, Format 0x5A, State 0xFE)
//! HL+28 AUTHENTICATED_VARIABLE_HEADER + UTF-16 name + data, each entry 4-byte aligned,
//!       until StartId != 0x55AA (erased flash, 0xFF)
//! ...   fault-tolerant-write working block and spare area (kept as is)
//! ```
//!
//! Flash semantics: a variable is live when its `State` is `VAR_ADDED` (0x3F) or
//! `VAR_ADDED & VAR_IN_DELETED_TRANSITION` (0x3E); deleting clears more bits (0x3D, 0x3C).
//! [`VarStore::to_bytes`] rewrites the store compactly with only live variables, leaving the
//! firmware volume header and everything after the store untouched.

use std::fmt;

/// Errors reading or rewriting a variable store.
#[derive(Debug, thiserror::Error)]
pub enum VarStoreError {
    /// The file is shorter than its headers say.
    #[error("variable store truncated at {offset:#x}")]
    Truncated {
        /// Offset where data ran out.
        offset: usize,
    },
    /// The firmware volume header is not an NV data volume.
    #[error("not an OVMF variable store: {0}")]
    NotVarStore(String),
    /// The store uses the non-authenticated format (no Secure Boot variables).
    #[error("variable store is not in the authenticated format (GUID {0})")]
    NotAuthenticated(Guid),
    /// A variable header is malformed.
    #[error("variable at {offset:#x} is malformed: {why}")]
    BadVariable {
        /// Offset of the header.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The rewritten variables do not fit the store.
    #[error("variables need {need} bytes but the store holds {have}")]
    Full {
        /// Bytes needed.
        need: usize,
        /// Store size.
        have: usize,
    },
}

/// An EFI GUID, kept in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Builds a GUID from its textual fields (`d1-d2-d3-d4[0..2]-d4[2..8]`).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    fn read(b: &[u8], off: usize) -> Option<Guid> {
        b.get(off..off + 16)
            .and_then(|s| s.try_into().ok())
            .map(Guid)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// gEfiSystemNvDataFvGuid.
pub const NV_DATA_FV_GUID: Guid = Guid::from_fields(
    0xfff12b8d,
    0x7696,
    0x4c8b,
    [0xa9, 0x85, 0x27, 0x47, 0x07, 0x5b, 0x4f, 0x50],
);
/// gEfiAuthenticatedVariableGuid (store signature of the authenticated format).
pub const AUTH_VARIABLE_STORE_GUID: Guid = Guid::from_fields(
    0xaaf32c78,
    0x947b,
    0x439a,
    [0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92],
);
/// EFI_GLOBAL_VARIABLE (vendor of `PK`, `KEK`, `Boot####`...).
pub const EFI_GLOBAL_VARIABLE: Guid = Guid::from_fields(
    0x8be4df61,
    0x93ca,
    0x11d2,
    [0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c],
);
/// EFI_IMAGE_SECURITY_DATABASE_GUID (vendor of `db`, `dbx`).
pub const EFI_IMAGE_SECURITY_DATABASE: Guid = Guid::from_fields(
    0xd719b2cb,
    0x3d3a,
    0x4596,
    [0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f],
);

const VAR_START_ID: u16 = 0x55AA;
const VAR_ADDED: u8 = 0x3F;
const VAR_IN_DELETED_TRANSITION: u8 = 0xFE;
const STORE_HEADER_LEN: usize = 28;
const VAR_HEADER_LEN: usize = 60;

/// `EFI_VARIABLE_NON_VOLATILE`.
pub const ATTR_NON_VOLATILE: u32 = 0x1;
/// `EFI_VARIABLE_BOOTSERVICE_ACCESS`.
pub const ATTR_BOOTSERVICE_ACCESS: u32 = 0x2;
/// `EFI_VARIABLE_RUNTIME_ACCESS`.
pub const ATTR_RUNTIME_ACCESS: u32 = 0x4;
/// `EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS`.
pub const ATTR_TIME_BASED_AUTH: u32 = 0x20;

/// One variable record of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Name (UTF-16 in the store).
    pub name: String,
    /// Vendor GUID.
    pub vendor: Guid,
    /// `EFI_VARIABLE_*` attributes.
    pub attributes: u32,
    /// Raw flash state byte.
    pub state: u8,
    /// Monotonic count (counter-based authenticated variables).
    pub monotonic_count: u64,
    /// EFI_TIME of the last authenticated write.
    pub timestamp: [u8; 16],
    /// Public key index (counter-based authenticated variables).
    pub pubkey_index: u32,
    /// Data.
    pub data: Vec<u8>,
    /// Offset of the header in the file (0 for variables added in memory).
    pub offset: usize,
}

impl Variable {
    /// Live (not deleted) variable.
    pub fn is_live(&self) -> bool {
        self.state == VAR_ADDED || self.state == (VAR_ADDED & VAR_IN_DELETED_TRANSITION)
    }

    fn encoded_len(&self) -> usize {
        let name = (self.name.encode_utf16().count() + 1) * 2;
        align4(VAR_HEADER_LEN + name + self.data.len())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let name: Vec<u8> = self
            .name
            .encode_utf16()
            .chain(std::iter::once(0))
            .flat_map(u16::to_le_bytes)
            .collect();
        let start = out.len();
        out.extend_from_slice(&VAR_START_ID.to_le_bytes());
        out.push(VAR_ADDED);
        out.push(0);
        out.extend_from_slice(&self.attributes.to_le_bytes());
        out.extend_from_slice(&self.monotonic_count.to_le_bytes());
        out.extend_from_slice(&self.timestamp);
        out.extend_from_slice(&self.pubkey_index.to_le_bytes());
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.vendor.0);
        out.extend_from_slice(&name);
        out.extend_from_slice(&self.data);
        out.resize(start + self.encoded_len(), 0xFF);
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, VarStoreError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(VarStoreError::Truncated { offset: off })
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, VarStoreError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(VarStoreError::Truncated { offset: off })
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, VarStoreError> {
    let lo = u32_at(b, off)? as u64;
    let hi = u32_at(b, off + 4)? as u64;
    Ok(lo | hi << 32)
}

/// A parsed variable store image.
#[derive(Debug, Clone)]
pub struct VarStore {
    image: Vec<u8>,
    store_offset: usize,
    store_size: usize,
    variables: Vec<Variable>,
}

impl VarStore {
    /// Parses a whole `OVMF_VARS*.fd` image.
    pub fn parse(image: Vec<u8>) -> Result<VarStore, VarStoreError> {
        let b = &image;
        if b.len() < 0x48 {
            return Err(VarStoreError::Truncated { offset: b.len() });
        }
        let fv_guid = Guid::read(b, 16).ok_or(VarStoreError::Truncated { offset: 16 })?;
        if &b[40..44] != b"_FVH" {
            return Err(VarStoreError::NotVarStore("no _FVH signature".into()));
        }
        if fv_guid != NV_DATA_FV_GUID {
            return Err(VarStoreError::NotVarStore(format!(
                "firmware volume GUID {fv_guid} is not the NV data volume"
            )));
        }
        let fv_len = u64_at(b, 32)?;
        if fv_len > b.len() as u64 {
            return Err(VarStoreError::Truncated { offset: b.len() });
        }
        let store_offset = u16_at(b, 48)? as usize;
        let sig = Guid::read(b, store_offset).ok_or(VarStoreError::Truncated {
            offset: store_offset,
        })?;
        if sig != AUTH_VARIABLE_STORE_GUID {
            return Err(VarStoreError::NotAuthenticated(sig));
        }
        let store_size = u32_at(b, store_offset + 16)? as usize;
        let end = store_offset
            .checked_add(store_size)
            .filter(|&e| e as u64 <= fv_len)
            .ok_or(VarStoreError::Truncated { offset: b.len() })?;
        let format = b[store_offset + 20];
        let state = b[store_offset + 21];
        if format != 0x5A || state != 0xFE {
            return Err(VarStoreError::NotVarStore(format!(
                "store format {format:#x} / state {state:#x} is not healthy (0x5a / 0xfe)"
            )));
        }
        let mut variables = Vec::new();
        let mut off = align4(store_offset + STORE_HEADER_LEN);
        while off + VAR_HEADER_LEN <= end {
            if u16_at(b, off)? != VAR_START_ID {
                break;
            }
            let name_size = u32_at(b, off + 36)? as usize;
            let data_size = u32_at(b, off + 40)? as usize;
            let name_off = off + VAR_HEADER_LEN;
            let data_off = name_off
                .checked_add(name_size)
                .ok_or(VarStoreError::BadVariable {
                    offset: off,
                    why: "name size overflows",
                })?;
            let data_end = data_off
                .checked_add(data_size)
                .filter(|&e| e <= end)
                .ok_or(VarStoreError::BadVariable {
                    offset: off,
                    why: "name or data runs past the store",
                })?;
            if name_size % 2 != 0 {
                return Err(VarStoreError::BadVariable {
                    offset: off,
                    why: "odd UTF-16 name size",
                });
            }
            let units: Vec<u16> = b[name_off..data_off]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            let name = String::from_utf16(&units).map_err(|_| VarStoreError::BadVariable {
                offset: off,
                why: "name is not UTF-16",
            })?;
            let mut timestamp = [0u8; 16];
            timestamp.copy_from_slice(&b[off + 16..off + 32]);
            variables.push(Variable {
                name,
                vendor: Guid::read(b, off + 44).ok_or(VarStoreError::Truncated { offset: off })?,
                attributes: u32_at(b, off + 4)?,
                state: b[off + 2],
                monotonic_count: u64_at(b, off + 8)?,
                timestamp,
                pubkey_index: u32_at(b, off + 32)?,
                data: b[data_off..data_end].to_vec(),
                offset: off,
            });
            off = align4(data_end);
        }
        Ok(VarStore {
            image,
            store_offset,
            store_size,
            variables,
        })
    }

    /// Every record, deleted ones included, in store order.
    pub fn records(&self) -> &[Variable] {
        &self.variables
    }

    /// Live variables in store order.
    pub fn live(&self) -> impl Iterator<Item = &Variable> {
        self.variables.iter().filter(|v| v.is_live())
    }

    /// The live variable `name` of `vendor` (the last one if the store holds several).
    pub fn get(&self, name: &str, vendor: Guid) -> Option<&Variable> {
        self.live()
            .filter(|v| v.name == name && v.vendor == vendor)
            .last()
    }

    /// Replaces the data of the live variable `name`/`vendor`, keeping its attributes and
    /// timestamps. Returns false if there is no such variable.
    pub fn set_data(&mut self, name: &str, vendor: Guid, data: Vec<u8>) -> bool {
        let idx = self
            .variables
            .iter()
            .rposition(|v| v.is_live() && v.name == name && v.vendor == vendor);
        match idx {
            Some(i) => {
                self.variables[i].data = data;
                true
            }
            None => false,
        }
    }

    /// Removes every live variable `name`/`vendor`. Returns how many were removed.
    pub fn remove(&mut self, name: &str, vendor: Guid) -> usize {
        let before = self.variables.len();
        self.variables
            .retain(|v| !(v.is_live() && v.name == name && v.vendor == vendor));
        before - self.variables.len()
    }

    /// The image with the store rewritten compactly (live variables only, in order).
    pub fn to_bytes(&self) -> Result<Vec<u8>, VarStoreError> {
        let mut vars = Vec::new();
        for v in self.live() {
            v.encode(&mut vars);
        }
        let first = align4(self.store_offset + STORE_HEADER_LEN);
        let have = self.store_offset + self.store_size - first;
        if vars.len() > have {
            return Err(VarStoreError::Full {
                need: vars.len(),
                have,
            });
        }
        let mut out = self.image.clone();
        out[first..first + vars.len()].copy_from_slice(&vars);
        out[first + vars.len()..self.store_offset + self.store_size].fill(0xFF);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal synthetic store: FV header + store header + records.
    pub(crate) fn synthetic(vars: &[Variable]) -> Vec<u8> {
        let mut img = vec![0u8; 0x2000];
        img[16..32].copy_from_slice(&NV_DATA_FV_GUID.0);
        img[32..40].copy_from_slice(&0x2000u64.to_le_bytes());
        img[40..44].copy_from_slice(b"_FVH");
        img[48..50].copy_from_slice(&0x48u16.to_le_bytes());
        let s = 0x48;
        img[s..s + 16].copy_from_slice(&AUTH_VARIABLE_STORE_GUID.0);
        img[s + 16..s + 20].copy_from_slice(&0x1000u32.to_le_bytes());
        img[s + 20] = 0x5A;
        img[s + 21] = 0xFE;
        img[s + STORE_HEADER_LEN..s + 0x1000].fill(0xFF);
        let mut recs = Vec::new();
        for v in vars {
            let start = recs.len();
            v.encode(&mut recs);
            recs[start + 2] = v.state;
        }
        let first = align4(s + STORE_HEADER_LEN);
        img[first..first + recs.len()].copy_from_slice(&recs);
        img
    }

    fn var(name: &str, state: u8, data: &[u8]) -> Variable {
        Variable {
            name: name.into(),
            vendor: EFI_GLOBAL_VARIABLE,
            attributes: 7,
            state,
            monotonic_count: 0,
            timestamp: [0; 16],
            pubkey_index: 0,
            data: data.to_vec(),
            offset: 0,
        }
    }

    /// GUIDs print in the canonical mixed-endian text form.
    #[test]
    fn guid_display() {
        assert_eq!(
            EFI_GLOBAL_VARIABLE.to_string(),
            "8be4df61-93ca-11d2-aa0d-00e098032b8c"
        );
    }

    /// Deleted records are listed but not live; rewriting drops them and keeps data intact.
    #[test]
    fn parse_rewrite_roundtrip() {
        let img = synthetic(&[
            var("BootOrder", 0x3C, &[1, 0]),
            var("Timeout", 0x3F, &[5, 0]),
            var("BootOrder", 0x3E, &[2, 0, 1, 0]),
        ]);
        let mut st = VarStore::parse(img).unwrap();
        assert_eq!(st.records().len(), 3);
        assert_eq!(st.live().count(), 2);
        assert_eq!(
            st.get("BootOrder", EFI_GLOBAL_VARIABLE).unwrap().data,
            [2, 0, 1, 0]
        );
        assert!(st.set_data("Timeout", EFI_GLOBAL_VARIABLE, vec![9, 0, 0]));
        let out = st.to_bytes().unwrap();
        let st2 = VarStore::parse(out).unwrap();
        assert_eq!(st2.records().len(), 2);
        assert_eq!(
            st2.get("Timeout", EFI_GLOBAL_VARIABLE).unwrap().data,
            [9, 0, 0]
        );
        assert!(st2.records().iter().all(|v| v.state == 0x3F));
    }

    /// Garbage and truncated images are refused, never panic.
    #[test]
    fn malformed_is_refused() {
        assert!(VarStore::parse(vec![0; 10]).is_err());
        assert!(VarStore::parse(vec![0xFF; 0x2000]).is_err());
        let mut img = synthetic(&[var("A", 0x3F, &[1])]);
        // Data size pointing far past the store.
        let first = align4(0x48 + STORE_HEADER_LEN);
        img[first + 40..first + 44].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        assert!(matches!(
            VarStore::parse(img.clone()),
            Err(VarStoreError::BadVariable { .. })
        ));
        img.truncate(0x60);
        assert!(VarStore::parse(img).is_err());
    }
}
