//! `EFI_SIGNATURE_LIST` (the data of `PK`, `KEK`, `db`, `dbx`) and just enough DER to name
//! an X.509 certificate by its subject CN.
//!
//! ```text
//! EFI_SIGNATURE_LIST { SignatureType: GUID, SignatureListSize: u32, SignatureHeaderSize: u32,
//!                      SignatureSize: u32, header[SignatureHeaderSize],
//!                      EFI_SIGNATURE_DATA { SignatureOwner: GUID, data[SignatureSize-16] }* }
//! ```

use super::varstore::Guid;

/// `EFI_CERT_X509_GUID`.
pub const EFI_CERT_X509: Guid = Guid::from_fields(
    0xa5c059a1,
    0x94e4,
    0x4aa7,
    [0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72],
);
/// `EFI_CERT_SHA256_GUID`.
pub const EFI_CERT_SHA256: Guid = Guid::from_fields(
    0xc1c41626,
    0x504c,
    0x4092,
    [0xac, 0xa9, 0x41, 0xf9, 0x36, 0x93, 0x43, 0x28],
);

/// Errors decoding a signature database.
#[derive(Debug, thiserror::Error)]
pub enum SigListError {
    /// A list header or size is inconsistent.
    #[error("signature list at {offset:#x} is malformed: {why}")]
    Malformed {
        /// Offset in the variable data.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// One entry of a signature list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    /// Type of the list it came from (X.509, SHA-256, ...).
    pub sig_type: Guid,
    /// Owner GUID of the entry.
    pub owner: Guid,
    /// The certificate (DER) or hash.
    pub data: Vec<u8>,
}

impl SignatureEntry {
    /// Subject common name, for X.509 entries that carry one.
    pub fn subject_cn(&self) -> Option<String> {
        if self.sig_type == EFI_CERT_X509 {
            x509_subject_cn(&self.data)
        } else {
            None
        }
    }

    /// A one-line description (`X509 CN=...`, `SHA256 ab12...`).
    pub fn describe(&self) -> String {
        if self.sig_type == EFI_CERT_X509 {
            format!(
                "X509 CN={}",
                self.subject_cn().unwrap_or_else(|| "?".into())
            )
        } else if self.sig_type == EFI_CERT_SHA256 {
            let hex: String = self.data.iter().map(|b| format!("{b:02x}")).collect();
            format!("SHA256 {hex}")
        } else {
            format!("type {} ({} bytes)", self.sig_type, self.data.len())
        }
    }
}

/// Decodes a signature database into its entries.
pub fn parse_signature_lists(data: &[u8]) -> Result<Vec<SignatureEntry>, SigListError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let bad = |why| SigListError::Malformed { offset: off, why };
        let hdr = data.get(off..off + 28).ok_or(bad("truncated header"))?;
        let sig_type = Guid(hdr[0..16].try_into().map_err(|_| bad("guid"))?);
        let rd =
            |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]) as usize;
        let (list_size, header_size, sig_size) = (rd(16), rd(20), rd(24));
        let end = off
            .checked_add(list_size)
            .filter(|&e| e <= data.len() && list_size >= 28)
            .ok_or(bad("list size runs past the data"))?;
        if sig_size < 16 {
            return Err(bad("signature size below 16"));
        }
        let mut p = off
            .checked_add(28 + header_size)
            .filter(|&p| p <= end)
            .ok_or(bad("header size runs past the list"))?;
        if (end - p) % sig_size != 0 {
            return Err(bad("entries do not fill the list"));
        }
        while p < end {
            out.push(SignatureEntry {
                sig_type,
                owner: Guid(data[p..p + 16].try_into().map_err(|_| bad("owner"))?),
                data: data[p + 16..p + sig_size].to_vec(),
            });
            p += sig_size;
        }
        off = end;
    }
    Ok(out)
}

/// Encodes entries as signature lists: one list per run of same-type, same-size entries.
pub fn encode_signature_lists(entries: &[SignatureEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let first = &entries[i];
        let mut j = i + 1;
        while j < entries.len()
            && entries[j].sig_type == first.sig_type
            && entries[j].data.len() == first.data.len()
        {
            j += 1;
        }
        let sig_size = 16 + first.data.len();
        let list_size = 28 + sig_size * (j - i);
        out.extend_from_slice(&first.sig_type.0);
        out.extend_from_slice(&(list_size as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(sig_size as u32).to_le_bytes());
        for e in &entries[i..j] {
            out.extend_from_slice(&e.owner.0);
            out.extend_from_slice(&e.data);
        }
        i = j;
    }
    out
}

/// One DER TLV: (tag, content, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = len << 8 | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

fn decode_string(tag: u8, v: &[u8]) -> Option<String> {
    match tag {
        // BMPString: UTF-16BE.
        0x1e => {
            let units: Vec<u16> = v
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        // UTF8String, PrintableString, T61String, IA5String.
        0x0c | 0x13 | 0x14 | 0x16 => Some(String::from_utf8_lossy(v).into_owned()),
        _ => None,
    }
}

/// Subject CN of a DER X.509 certificate (minimal parser: enough to name Secure Boot keys).
pub fn x509_subject_cn(der: &[u8]) -> Option<String> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // version
        rest = tlv(rest)?.2; // serial
    } else {
        rest = r; // that was the serial
    }
    rest = tlv(rest)?.2; // signature algorithm
    rest = tlv(rest)?.2; // issuer
    rest = tlv(rest)?.2; // validity
    let (0x30, mut name, _) = tlv(rest)? else {
        return None;
    };
    let mut cn = None;
    while !name.is_empty() {
        let (_, mut set, r) = tlv(name)?;
        name = r;
        while !set.is_empty() {
            let (_, atv, r) = tlv(set)?;
            set = r;
            let (0x06, oid, r) = tlv(atv)? else {
                continue;
            };
            if oid == OID_CN {
                let (t, v, _) = tlv(r)?;
                cn = decode_string(t, v);
            }
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists round-trip through encode/parse and malformed sizes are refused.
    #[test]
    fn lists_roundtrip_and_refuse_garbage() {
        let e = |t, n: u8, len| SignatureEntry {
            sig_type: t,
            owner: Guid([n; 16]),
            data: vec![n; len],
        };
        let entries = vec![
            e(EFI_CERT_X509, 1, 40),
            e(EFI_CERT_X509, 2, 50),
            e(EFI_CERT_SHA256, 3, 32),
            e(EFI_CERT_SHA256, 4, 32),
        ];
        let bytes = encode_signature_lists(&entries);
        assert_eq!(parse_signature_lists(&bytes).unwrap(), entries);
        let mut bad = bytes.clone();
        bad[16] = 0xff; // list size
        bad[17] = 0xff;
        assert!(parse_signature_lists(&bad).is_err());
        assert!(parse_signature_lists(&bytes[..20]).is_err());
    }

    /// A hand-built certificate skeleton yields its subject CN.
    #[test]
    fn cn_from_minimal_der() {
        fn seq(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
            let body: Vec<u8> = parts.concat();
            let mut v = vec![tag];
            if body.len() < 128 {
                v.push(body.len() as u8);
            } else {
                v.push(0x82);
                v.extend_from_slice(&(body.len() as u16).to_be_bytes());
            }
            v.extend(body);
            v
        }
        let cn_atv = seq(0x30, &[&[0x06, 3, 0x55, 4, 3], &seq(0x0c, &[b"Test CA"])]);
        let name = seq(0x30, &[&seq(0x31, &[&cn_atv])]);
        let tbs = seq(
            0x30,
            &[
                &seq(0xa0, &[&[2, 1, 2]]),
                &[2, 1, 1],
                &seq(0x30, &[]),
                &name,
                &seq(0x30, &[]),
                &name,
            ],
        );
        let cert = seq(0x30, &[&tbs]);
        assert_eq!(x509_subject_cn(&cert).as_deref(), Some("Test CA"));
        assert_eq!(x509_subject_cn(&cert[..cert.len() - 3]), None);
        assert_eq!(x509_subject_cn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
