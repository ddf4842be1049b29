//! Bootable disk layouts for the two machine generations, built from files without mounting
//! anything (the kernel here reads no partition tables of loop devices and mounts no vfat):
//! a FAT file system made with mkfs.vfat in a separate file, filled with mtools, then copied
//! into the image at its partition's offset.
//!
//! Generation 1 (SeaBIOS, IDE):
//! ```text
//! LBA 0      MBR: syslinux mbr.bin boot code, one active partition, type 0x0c (FAT32 LBA)
//! LBA 2048   partition 1 (1 MiB .. end): FAT32 "VIREOBOOT", syslinux boot sector,
//!            /ldlinux.sys /ldlinux.c32 /syslinux.cfg /vmlinuz /initrd.img
//! ```
//! Generation 2 (OVMF, Secure Boot, virtio-scsi):
//! ```text
//! LBA 0..33  protective MBR + GPT
//! LBA 2048   partition 1 (1 MiB .. size-1 MiB): EFI System Partition, FAT32 "VIREO-ESP",
//!            /EFI/BOOT/BOOTX64.EFI (shim, Microsoft-signed), /EFI/BOOT/grubx64.efi
//!            (Debian-signed grub), /EFI/debian/grub.cfg (+ copy in /EFI/BOOT),
//!            /vmlinuz (Debian-signed), /initrd.img
//! end-1 MiB  backup GPT
//! ```

use crate::cmd;
use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Partitions start at 1 MiB.
pub const PART_OFFSET: u64 = 1 << 20;
/// Smallest image: FAT32 needs 65525 clusters.
pub const MIN_SIZE: u64 = 64 << 20;

/// syslinux's MBR boot code (first 440 bytes of the MBR).
pub const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// The mtools-based syslinux installer (carries ldlinux.sys/ldlinux.c32).
pub const SYSLINUX: &str = "/usr/bin/syslinux";
/// shim signed by Microsoft's UEFI CA (package shim-signed).
pub const SHIM: &str = "/usr/lib/shim/shimx64.efi.signed";
/// GRUB signed by Debian (package grub-efi-amd64-signed); its built-in prefix is /EFI/debian.
pub const GRUB: &str = "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";

/// What the boot partition carries.
pub struct BootFiles<'a> {
    /// Kernel image.
    pub vmlinuz: &'a Path,
    /// Compressed initramfs.
    pub initrd: &'a Path,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// FAT volume id and MBR disk signature (derived from the cache key).
    pub volume_id: u32,
}

fn mtools(program: &str, image: &Path, args: &[&str]) -> Result<()> {
    let mut c = cmd::command(program, ["-i"]);
    c.arg(image).args(args).env("MTOOLS_SKIP_CHECK", "1");
    cmd::run(c)?;
    Ok(())
}

fn mcopy(image: &Path, src: &Path, dst: &str) -> Result<()> {
    let mut c = cmd::command("mcopy", ["-o", "-i"]);
    c.arg(image).arg(src).arg(dst).env("MTOOLS_SKIP_CHECK", "1");
    cmd::run(c)?;
    Ok(())
}

fn mkfs_fat(path: &Path, size: u64, label: &str, volume_id: u32) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    drop(f);
    let mut c = cmd::command(
        "mkfs.vfat",
        [
            "-F",
            "32",
            "-h",
            &(PART_OFFSET / 512).to_string(),
            "-n",
            label,
            "-i",
            &format!("{volume_id:08x}"),
        ],
    );
    c.arg(path);
    cmd::run(c)?;
    Ok(())
}

/// Copies `src` into `dst` at `offset`, leaving all-zero blocks as holes.
fn copy_at(src: &Path, dst: &File, offset: u64) -> Result<()> {
    let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
}

fn new_image(path: &Path, size: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(f)
}

/// CHS bytes of an LBA in an MBR entry (255 heads, 63 sectors; saturates beyond 1023 cylinders).
fn chs(lba: u64) -> [u8; 3] {
    let (c, h, s) = (lba / (255 * 63), (lba / 63) % 255, lba % 63 + 1);
    if c > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    [h as u8, (s as u8) | (((c >> 8) as u8) << 6), c as u8]
}

/// An MBR sector: boot code, disk signature and one active partition entry.
fn mbr(code: &[u8], signature: u32, start: u64, sectors: u64, kind: u8) -> Result<[u8; 512]> {
    if code.len() < 440 {
        bail!("MBR boot code is {} bytes, expected 440", code.len());
    }
    let (Ok(start32), Ok(len32)) = (u32::try_from(start), u32::try_from(sectors)) else {
        bail!("an MBR partition must fit in 2 TiB");
    };
    let mut s = [0u8; 512];
    s[..440].copy_from_slice(&code[..440]);
    s[440..444].copy_from_slice(&signature.to_le_bytes());
    let e = &mut s[446..462];
    e[0] = 0x80; // active
    e[1..4].copy_from_slice(&chs(start));
    e[4] = kind;
    e[5..8].copy_from_slice(&chs(start + sectors - 1));
    e[8..12].copy_from_slice(&start32.to_le_bytes());
    e[12..16].copy_from_slice(&len32.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

/// Refuses sizes that cannot hold the layout.
pub fn check_size(size: u64) -> Result<()> {
    if size < MIN_SIZE || size & (PART_OFFSET - 1) != 0 {
        bail!("image size must be a multiple of 1 MiB and at least 64 MiB, got {size}");
    }
    Ok(())
}

/// Writes a generation 1 image (MBR, syslinux on FAT32) to `out`, using `work` for scratch.
pub fn generation1(out: &Path, size: u64, boot: &BootFiles<'_>, work: &Path) -> Result<()> {
    check_size(size)?;
    cmd::require_file(Path::new(SYSLINUX_MBR), "syslinux-common")?;
    cmd::require_file(Path::new(SYSLINUX), "syslinux")?;
    let part_size = size - PART_OFFSET;
    let part = work.join("boot.fat");
    mkfs_fat(&part, part_size, "VIREOBOOT", boot.volume_id)?;
    let cfg = work.join("syslinux.cfg");
    fs::write(
        &cfg,
        format!(
            "DEFAULT vireo\nPROMPT 0\nTIMEOUT 0\nNOESCAPE 1\nLABEL vireo\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {}\n",
            boot.cmdline
        ),
    )?;
    mcopy(&part, boot.vmlinuz, "::/vmlinuz")?;
    mcopy(&part, boot.initrd, "::/initrd.img")?;
    mcopy(&part, &cfg, "::/syslinux.cfg")?;
    let mut c = cmd::command(SYSLINUX, ["--install"]);
    c.arg(&part).env("MTOOLS_SKIP_CHECK", "1");
    cmd::run(c)?;

    let img = new_image(out, size)?;
    let code = fs::read(SYSLINUX_MBR).with_context(|| format!("reading {SYSLINUX_MBR}"))?;
    let sector = mbr(
        &code,
        boot.volume_id,
        PART_OFFSET / 512,
        part_size / 512,
        0x0c,
    )?;
    img.write_all_at(&sector, 0)?;
    copy_at(&part, &img, PART_OFFSET)?;
    img.sync_all()?;
    Ok(())
}

/// Writes a generation 2 image (GPT, EFI System Partition with shim + signed grub) to `out`.
pub fn generation2(out: &Path, size: u64, boot: &BootFiles<'_>, work: &Path) -> Result<()> {
    check_size(size)?;
    cmd::require_file(Path::new(SHIM), "shim-signed")?;
    cmd::require_file(Path::new(GRUB), "grub-efi-amd64-signed")?;
    let esp_size = size - 2 * PART_OFFSET; // the last MiB holds the backup GPT
    let esp = work.join("esp.fat");
    mkfs_fat(&esp, esp_size, "VIREO-ESP", boot.volume_id)?;
    mtools("mmd", &esp, &["::/EFI", "::/EFI/BOOT", "::/EFI/debian"])?;
    let grub_cfg = work.join("grub.cfg");
    fs::write(
        &grub_cfg,
        format!(
            "set timeout=0\nset timeout_style=hidden\nlinux /vmlinuz {}\ninitrd /initrd.img\nboot\n",
            boot.cmdline
        ),
    )?;
    mcopy(&esp, Path::new(SHIM), "::/EFI/BOOT/BOOTX64.EFI")?;
    mcopy(&esp, Path::new(GRUB), "::/EFI/BOOT/grubx64.efi")?;
    mcopy(&esp, &grub_cfg, "::/EFI/debian/grub.cfg")?;
    mcopy(&esp, &grub_cfg, "::/EFI/BOOT/grub.cfg")?;
    mcopy(&esp, boot.vmlinuz, "::/vmlinuz")?;
    mcopy(&esp, boot.initrd, "::/initrd.img")?;

    let img = new_image(out, size)?;
    let first = PART_OFFSET / 512;
    let last = first + esp_size / 512 - 1;
    let mut c = cmd::command(
        "sgdisk",
        [
            "--clear",
            &format!("--new=1:{first}:{last}"),
            "--typecode=1:ef00",
            "--change-name=1:EFI System Partition",
        ],
    );
    c.arg(out);
    cmd::run(c)?;
    copy_at(&esp, &img, PART_OFFSET)?;
    img.sync_all()?;
    Ok(())
}

/// Writes the raw image `raw` as a dynamic VHDX at `dst` (must not exist) with the
/// project's own `vhdx` crate: zero ranges stay unallocated, so the file holds only what the
/// guest image holds.
pub fn write_vhdx(raw: &Path, dst: &Path) -> Result<()> {
    let opts = vhdx::ConvertOptions {
        format: Some(vhdx::ImageFormat::Vhdx),
        vhdx: vhdx::CreateOptions {
            disk_type: vhdx::DiskType::Dynamic,
            ..Default::default()
        },
    };
    vhdx::convert(
        raw,
        dst,
        &opts,
        &|_, _| {},
        &std::sync::atomic::AtomicBool::new(false),
    )
    .with_context(|| format!("writing {} as VHDX", dst.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partition entry holds the right LBA fields, flag and signature.
    #[test]
    fn mbr_entry() {
        let code = [0x90u8; 440];
        let s = mbr(&code, 0x1234_5678, 2048, 100_000, 0x0c).unwrap();
        assert_eq!(&s[440..444], &0x1234_5678u32.to_le_bytes());
        assert_eq!(s[446], 0x80);
        assert_eq!(s[450], 0x0c);
        assert_eq!(u32::from_le_bytes(s[454..458].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(s[458..462].try_into().unwrap()), 100_000);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(chs(2048), [32, 33, 0]);
        assert!(mbr(&code[..10], 0, 1, 1, 0x0c).is_err());
        assert!(mbr(&code, 0, 1, 1 << 33, 0x0c).is_err());
    }

    /// Sizes that cannot hold the layout are refused.
    #[test]
    fn size_checks() {
        assert!(check_size(32 << 20).is_err());
        assert!(check_size((64 << 20) + 512).is_err());
        assert!(check_size(64 << 20).is_ok());
    }

    /// A raw image written as VHDX by our crate reads back identical through qemu-img
    /// (an independent reader), and its zero tail stays unallocated.
    #[test]
    fn vhdx_output_matches_raw() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        let mut data = vec![0u8; 8 << 20];
        for (i, b) in data.iter_mut().enumerate().take(3 << 20) {
            *b = (i * 7 % 251) as u8;
        }
        std::fs::write(&raw, &data).unwrap();
        let out = dir.path().join("a.vhdx");
        write_vhdx(&raw, &out).unwrap();
        let back = dir.path().join("back.raw");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(&out)
            .arg(&back)
            .status()
            .expect("qemu-img is missing: run scripts/setup.sh (qemu-utils)");
        assert!(st.success());
        assert!(
            std::fs::read(&back).unwrap() == data,
            "VHDX content differs"
        );
        assert!(
            write_vhdx(&raw, &out).is_err(),
            "an existing output is refused"
        );
    }
}
