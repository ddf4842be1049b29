//! The KVM probe on this host: answers quickly, never hangs, and agrees with the CPU flags.

use std::time::Instant;

use qemu::{choose_accel, probe_kvm, probe_kvm_at, probe_kvm_cached, AccelRequest};

/// Without a vmx/svm flag KVM cannot run guests at hardware speed: the probe must say so
/// (it runs the loop and times it, or fails to create the VM), and auto must pick TCG.
/// The probe result is cached.
#[test]
fn probe_matches_host() {
    let t = Instant::now();
    let p = probe_kvm();
    let took = t.elapsed();
    eprintln!("probe: {p:?} in {took:?}");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|w| w == "vmx" || w == "svm"));
    if !hw {
        assert!(!p.usable, "{p:?}");
        assert!(p.reason.contains("no vmx/svm cpu flag"), "{}", p.reason);
        let (accel, why) = choose_accel(AccelRequest::Auto, &p);
        assert_eq!(accel, qemu::Accel::Tcg, "{why}");
    }
    if p.usable {
        assert!(p.measured.is_some());
    }
    let c1 = probe_kvm_cached() as *const _;
    let c2 = probe_kvm_cached() as *const _;
    assert_eq!(c1, c2);
}

/// A missing device and a device that is not KVM are "not usable" with the cause named.
#[test]
fn bad_devices_are_not_usable() {
    let p = probe_kvm_at(std::path::Path::new("/nonexistent/kvm"));
    assert!(!p.usable);
    assert!(
        p.reason.contains("cannot open /nonexistent/kvm"),
        "{}",
        p.reason
    );
    let p = probe_kvm_at(std::path::Path::new("/dev/null"));
    assert!(!p.usable);
    assert!(p.reason.contains("/dev/null"), "{}", p.reason);
    let (accel, _) = choose_accel(AccelRequest::Auto, &p);
    assert_eq!(accel, qemu::Accel::Tcg);
}
