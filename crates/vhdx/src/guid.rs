//! GUIDs as VHDX stores them (Microsoft mixed-endian layout) and the well-known
//! GUIDs of the format.

use std::fmt;
use std::str::FromStr;

/// A GUID in its on-disk byte order: `Data1` (u32 LE), `Data2` (u16 LE),
/// `Data3` (u16 LE), `Data4` (8 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

/// A GUID string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("malformed GUID string {0:?}")]
pub struct GuidError(pub String);

impl Guid {
    /// The all-zero GUID (an empty log, "no value").
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds a GUID from its canonical fields.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A new random (version 4) GUID.
    pub fn new_random() -> Guid {
        Guid(*uuid::Uuid::new_v4().as_bytes())
    }

    /// Reads a GUID from 16 on-disk bytes.
    pub fn from_slice(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    fn fields(&self) -> (u32, u16, u16, [u8; 8]) {
        let b = &self.0;
        let mut d4 = [0u8; 8];
        d4.copy_from_slice(&b[8..16]);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            d4,
        )
    }
}

impl fmt::Display for Guid {
    /// Canonical upper-case form without braces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d1, d2, d3, d4) = self.fields();
        write!(
            f,
            "{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

impl FromStr for Guid {
    type Err = GuidError;
    /// Accepts `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` with or without braces, any case.
    fn from_str(s: &str) -> Result<Guid, GuidError> {
        let err = || GuidError(s.chars().take(64).collect());
        let t = s.trim();
        let t = t.strip_prefix('{').unwrap_or(t);
        let t = t.strip_suffix('}').unwrap_or(t);
        let parts: Vec<&str> = t.split('-').collect();
        if parts.len() != 5
            || [8, 4, 4, 4, 12]
                != [
                    parts[0].len(),
                    parts[1].len(),
                    parts[2].len(),
                    parts[3].len(),
                    parts[4].len(),
                ]
        {
            return Err(err());
        }
        let hex = |p: &str| u64::from_str_radix(p, 16).map_err(|_| err());
        let d1 = hex(parts[0])? as u32;
        let d2 = hex(parts[1])? as u16;
        let d3 = hex(parts[2])? as u16;
        let d4a = hex(parts[3])? as u16;
        let d4b = hex(parts[4])?;
        let mut d4 = [0u8; 8];
        d4[..2].copy_from_slice(&d4a.to_be_bytes());
        d4[2..].copy_from_slice(&d4b.to_be_bytes()[2..]);
        Ok(Guid::from_fields(d1, d2, d3, d4))
    }
}

/// Region table entry: the block allocation table.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Region table entry: the metadata region.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: page 83 data (the virtual disk id).
pub const PAGE83_DATA: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata item: parent locator.
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Parent locator type: VHDX.
pub const LOCATOR_TYPE_VHDX: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Display and parse round-trip and the on-disk byte order is mixed-endian.
    #[test]
    fn roundtrip_and_layout() {
        let s = "2DC27766-F623-4200-9D64-115E9BFD4A08";
        let g: Guid = s.parse().unwrap();
        assert_eq!(g, BAT_REGION);
        assert_eq!(g.to_string(), s);
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(format!("{{{}}}", g).parse::<Guid>().unwrap(), g);
        assert!("nonsense".parse::<Guid>().is_err());
        assert!("{2DC27766-F623-4200-9D64-115E9BFD4A0Z}"
            .parse::<Guid>()
            .is_err());
    }
}
