//! Just enough ELF64 (little-endian) to read a kernel module's `.modinfo` section and to tell
//! a static executable (no `PT_INTERP`) from a dynamic one.

use anyhow::{bail, Result};

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    match b.get(off..off + 2) {
        Some(s) => Ok(u16::from_le_bytes([s[0], s[1]])),
        None => bail!("ELF truncated at {off:#x}"),
    }
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    match b.get(off..off + 4) {
        Some(s) => Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        None => bail!("ELF truncated at {off:#x}"),
    }
}

fn u64_at(b: &[u8], off: usize) -> Result<u64> {
    match b.get(off..off + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            Ok(u64::from_le_bytes(a))
        }
        None => bail!("ELF truncated at {off:#x}"),
    }
}

fn check_header(b: &[u8]) -> Result<()> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("not a little-endian ELF64 file");
    }
    Ok(())
}

fn usize_of(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| anyhow::anyhow!("ELF offset {v:#x} out of range"))
}

/// Returns the bytes of the section called `name`, if present.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    check_header(b)?;
    let shoff = usize_of(u64_at(b, 0x28)?)?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    let shstrndx = usize::from(u16_at(b, 0x3e)?);
    if shentsize < 64 || shstrndx >= shnum {
        bail!("bad ELF section header table");
    }
    let sh = |i: usize| -> Result<(u32, usize, usize)> {
        let base = shoff + i * shentsize;
        Ok((
            u32_at(b, base)?,
            usize_of(u64_at(b, base + 0x18)?)?,
            usize_of(u64_at(b, base + 0x20)?)?,
        ))
    };
    let (_, stroff, strsize) = sh(shstrndx)?;
    let strtab = b
        .get(stroff..stroff.saturating_add(strsize))
        .ok_or_else(|| anyhow::anyhow!("ELF string table out of bounds"))?;
    for i in 0..shnum {
        let (nameoff, off, size) = sh(i)?;
        let n = strtab.get(nameoff as usize..).unwrap_or_default();
        let n = &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())];
        if n == name.as_bytes() {
            return match b.get(off..off.saturating_add(size)) {
                Some(s) => Ok(Some(s)),
                None => bail!("ELF section {name} out of bounds"),
            };
        }
    }
    Ok(None)
}

/// True when the executable has no program interpreter (static or static-pie).
pub fn is_static(b: &[u8]) -> Result<bool> {
    check_header(b)?;
    let phoff = usize_of(u64_at(b, 0x20)?)?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(b, phoff + i * phentsize)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The `depends=` list of a kernel module (names as written, may be empty).
pub fn module_depends(b: &[u8]) -> Result<Vec<String>> {
    let Some(info) = section(b, ".modinfo")? else {
        bail!("no .modinfo section (not a kernel module?)");
    };
    for entry in info.split(|&c| c == 0) {
        if let Some(v) = entry.strip_prefix(b"depends=") {
            let v = String::from_utf8_lossy(v);
            return Ok(v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect());
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Truncated or foreign input is refused, not read out of bounds.
    #[test]
    fn rejects_garbage() {
        assert!(section(b"hello", ".modinfo").is_err());
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x28] = 0xff; // section headers beyond the file
        b[0x3a] = 64;
        b[0x3c] = 2;
        b[0x3e] = 1;
        assert!(section(&b, ".modinfo").is_err());
    }

    /// The host's busybox-static is static; /bin/sh's dash is dynamic.
    #[test]
    fn static_detection() {
        if let Ok(b) = std::fs::read("/bin/busybox") {
            assert!(is_static(&b).unwrap());
        }
        let dash = std::fs::read("/bin/dash").unwrap();
        assert!(!is_static(&dash).unwrap());
    }
}
