//! Guest facts and system actions: OS info, host name, interfaces, clock, memory, power.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::protocol::{
    GuestIpAddress, GuestIpAddressType, GuestNetworkInterface, GuestNetworkInterfaceStat,
    GuestOsInfo, MemoryStatus, ShutdownMode,
};

fn cstr_field(bytes: &[libc::c_char]) -> String {
    let b: Vec<u8> = bytes
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&b).into_owned()
}

/// `uname(2)`: (sysname, release, version, machine).
fn uname() -> Option<(String, String, String, String)> {
    // SAFETY: utsname is plain old data; zeroed is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    Some((
        cstr_field(&u.sysname),
        cstr_field(&u.release),
        cstr_field(&u.version),
        cstr_field(&u.machine),
    ))
}

/// Parses os-release text (`KEY=value`, `KEY="quoted \"value\""`).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            let mut out = String::new();
            let mut esc = false;
            for c in inner.chars() {
                if esc {
                    out.push(c);
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else {
                    out.push(c);
                }
            }
            out
        } else if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
            inner.to_string()
        } else {
            v.to_string()
        };
        m.insert(k.trim().to_string(), v);
    }
    m
}

/// `guest-get-osinfo`: `/etc/os-release` (or `/usr/lib/os-release`) plus `uname`.
pub fn osinfo() -> GuestOsInfo {
    let text = fs::read_to_string("/etc/os-release")
        .or_else(|_| fs::read_to_string("/usr/lib/os-release"))
        .ok();
    let mut info = GuestOsInfo::default();
    if let Some((sys, rel, ver, mach)) = uname() {
        info.kernel_release = Some(rel);
        info.kernel_version = Some(ver);
        info.machine = Some(mach);
        if text.is_none() {
            info.id = Some(sys.to_lowercase());
            info.name = Some(sys.clone());
            info.pretty_name = Some(sys);
        }
    }
    if let Some(text) = text {
        let mut m = parse_os_release(&text);
        info.id = m.remove("ID");
        info.name = m.remove("NAME");
        info.pretty_name = m.remove("PRETTY_NAME");
        info.version = m.remove("VERSION");
        info.version_id = m.remove("VERSION_ID");
        info.variant = m.remove("VARIANT");
        info.variant_id = m.remove("VARIANT_ID");
    }
    info
}

/// `gethostname(2)`.
pub fn hostname() -> Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its whole length.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return Err(format!("gethostname: {}", std::io::Error::last_os_error()));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn read_stat(name: &str, counter: &str) -> Option<u64> {
    fs::read_to_string(
        Path::new("/sys/class/net")
            .join(name)
            .join("statistics")
            .join(counter),
    )
    .ok()?
    .trim()
    .parse()
    .ok()
}

fn statistics(name: &str) -> Option<GuestNetworkInterfaceStat> {
    Some(GuestNetworkInterfaceStat {
        rx_bytes: read_stat(name, "rx_bytes")?,
        rx_packets: read_stat(name, "rx_packets")?,
        rx_errs: read_stat(name, "rx_errors")?,
        rx_dropped: read_stat(name, "rx_dropped")?,
        tx_bytes: read_stat(name, "tx_bytes")?,
        tx_packets: read_stat(name, "tx_packets")?,
        tx_errs: read_stat(name, "tx_errors")?,
        tx_dropped: read_stat(name, "tx_dropped")?,
    })
}

fn prefix_len(mask: &[u8]) -> i64 {
    mask.iter().map(|b| i64::from(b.count_ones())).sum()
}

/// `guest-network-get-interfaces` via `getifaddrs(3)`, in kernel order.
pub fn interfaces() -> Result<Vec<GuestNetworkInterface>, String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: head is a valid out-pointer; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(format!("getifaddrs: {}", std::io::Error::last_os_error()));
    }
    let mut out: Vec<GuestNetworkInterface> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let idx = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                out.push(GuestNetworkInterface {
                    statistics: statistics(&name),
                    name,
                    hardware_address: None,
                    ip_addresses: None,
                });
                out.len() - 1
            }
        };
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family tells its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let entry = &mut out[idx];
        match family {
            libc::AF_PACKET => {
                // SAFETY: AF_PACKET addresses are sockaddr_ll.
                let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
                if ll.sll_halen == 6 {
                    let mac: Vec<String> = ll.sll_addr[..6]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    entry.hardware_address = Some(mac.join(":"));
                }
            }
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: the netmask has the address's family.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                    prefix_len(&m.sin_addr.s_addr.to_ne_bytes())
                };
                entry
                    .ip_addresses
                    .get_or_insert_with(Vec::new)
                    .push(GuestIpAddress {
                        ip_address: ip.to_string(),
                        ip_address_type: GuestIpAddressType::Ipv4,
                        prefix,
                    });
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: the netmask has the address's family.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                    prefix_len(&m.sin6_addr.s6_addr)
                };
                entry
                    .ip_addresses
                    .get_or_insert_with(Vec::new)
                    .push(GuestIpAddress {
                        ip_address: ip.to_string(),
                        ip_address_type: GuestIpAddressType::Ipv6,
                        prefix,
                    });
            }
            _ => {}
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// `guest-get-time`: CLOCK_REALTIME in ns.
pub fn get_time() -> Result<i64, String> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return Err(format!(
            "clock_gettime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(ts.tv_sec * 1_000_000_000 + ts.tv_nsec)
}

/// `guest-set-time`: sets CLOCK_REALTIME to `ns` and then the RTC from it (best effort,
/// `hwclock -w -u`); with `None`, sets the clock from the RTC (`hwclock -s -u`).
pub fn set_time(ns: Option<i64>) -> Result<(), String> {
    match ns {
        Some(ns) => {
            if ns < 0 {
                return Err("Invalid parameter 'time'".into());
            }
            let ts = libc::timespec {
                tv_sec: ns / 1_000_000_000,
                tv_nsec: ns % 1_000_000_000,
            };
            // SAFETY: ts is a valid timespec.
            if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
                return Err(format!(
                    "Failed to set time to guest: {}",
                    std::io::Error::last_os_error()
                ));
            }
            match Command::new("hwclock").args(["-w", "-u"]).status() {
                Ok(s) if s.success() => {}
                other => tracing::debug!(?other, "hwclock -w failed; RTC not updated"),
            }
            Ok(())
        }
        None => match Command::new("hwclock").args(["-s", "-u"]).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("hwclock -s failed: {s}")),
            Err(e) => Err(format!("cannot run hwclock: {e}")),
        },
    }
}

/// Parses `/proc/meminfo` text into bytes.
pub fn parse_meminfo(text: &str) -> Result<MemoryStatus, String> {
    let mut total = None;
    let mut available = None;
    let mut committed = None;
    for line in text.lines() {
        let Some((k, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match k {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "Committed_AS" => &mut committed,
            _ => continue,
        };
        let mut parts = rest.split_whitespace();
        let n: u64 = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("bad /proc/meminfo line '{line}'"))?;
        let mult = match parts.next() {
            Some("kB") => 1024,
            None => 1,
            Some(u) => return Err(format!("unknown unit '{u}' in /proc/meminfo")),
        };
        *slot = Some(n.saturating_mul(mult));
    }
    Ok(MemoryStatus {
        total: total.ok_or("MemTotal missing from /proc/meminfo")?,
        available: available.ok_or("MemAvailable missing from /proc/meminfo")?,
        committed: committed.ok_or("Committed_AS missing from /proc/meminfo")?,
    })
}

/// `vireo-memory-status`.
pub fn memory_status() -> Result<MemoryStatus, String> {
    let text =
        fs::read_to_string("/proc/meminfo").map_err(|e| format!("reading /proc/meminfo: {e}"))?;
    parse_meminfo(&text)
}

/// `guest-get-memory-block-info`.
pub fn memory_block_size() -> Result<u64, String> {
    let p = "/sys/devices/system/memory/block_size_bytes";
    let t = fs::read_to_string(p).map_err(|e| format!("reading {p}: {e}"))?;
    u64::from_str_radix(t.trim(), 16).map_err(|_| format!("bad contents of {p}"))
}

/// `guest-shutdown`: `systemctl` when systemd runs the guest, else `sync` + `reboot(2)`
/// (the busybox test guests have no init system to ask).
pub fn shutdown(mode: ShutdownMode) -> Result<(), String> {
    if Path::new("/run/systemd/system").is_dir() {
        let verb = match mode {
            ShutdownMode::Powerdown => "poweroff",
            ShutdownMode::Reboot => "reboot",
            ShutdownMode::Halt => "halt",
        };
        return match Command::new("systemctl").arg(verb).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("systemctl {verb} failed: {s}")),
            Err(e) => Err(format!("cannot run systemctl: {e}")),
        };
    }
    let cmd = match mode {
        ShutdownMode::Powerdown => libc::RB_POWER_OFF,
        ShutdownMode::Reboot => libc::RB_AUTOBOOT,
        ShutdownMode::Halt => libc::RB_HALT_SYSTEM,
    };
    tracing::info!(?mode, "shutting the guest down");
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(cmd);
    }
    Err(format!("reboot(2): {}", std::io::Error::last_os_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// os-release quoting rules.
    #[test]
    fn os_release() {
        let m = parse_os_release(
            "# c\nNAME=\"Debian GNU/Linux\"\nID=debian\nVERSION='12 (x)'\nX=\"a \\\"q\\\"\"\n",
        );
        assert_eq!(m["NAME"], "Debian GNU/Linux");
        assert_eq!(m["ID"], "debian");
        assert_eq!(m["VERSION"], "12 (x)");
        assert_eq!(m["X"], "a \"q\"");
    }

    /// meminfo parsing in bytes, and refusal of truncated input.
    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:        2000 kB\nMemFree: 5 kB\nMemAvailable:    1000 kB\nCommitted_AS:   300 kB\n",
        )
        .unwrap();
        assert_eq!(
            m,
            MemoryStatus {
                total: 2000 * 1024,
                available: 1000 * 1024,
                committed: 300 * 1024
            }
        );
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\n").is_err());
    }

    /// The host's loopback shows up as qemu-ga shows it.
    #[test]
    fn loopback_interface() {
        let ifs = interfaces().unwrap();
        let lo = ifs.iter().find(|i| i.name == "lo").expect("lo");
        assert_eq!(lo.hardware_address.as_deref(), Some("00:00:00:00:00:00"));
        assert!(lo.ip_addresses.as_ref().unwrap().contains(&GuestIpAddress {
            ip_address: "127.0.0.1".into(),
            ip_address_type: GuestIpAddressType::Ipv4,
            prefix: 8
        }));
    }
}
