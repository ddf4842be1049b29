#!/usr/bin/env bash
# Vireo host setup: installs what the build, the tests and the test guests need.
#
# Run as root on Debian 12, as often as you like. It is quiet when nothing is missing and
# prints one line per action otherwise. Exit status is non-zero, with a message, on failure.
#
#   scripts/setup.sh            # packages + guest artefacts (kernel/qemu-guest-agent .debs)
#   SETUP_SKIP_GUEST=1 scripts/setup.sh   # packages only
#   scripts/setup.sh --bench    # also the benchmarks' comparison peers (libvirt, rsync); not for CI
#
# To add a package: append it to PACKAGES below (one array, one place).
set -euo pipefail

PACKAGES=(
    # machine emulator, firmware, disk tools
    qemu-system-x86 qemu-utils ovmf ipxe-qemu  # ipxe-qemu: NIC option ROMs (e1000, virtio-net, PXE)
    # test guests: initramfs, boot media (see docs/test-guests.md)
    busybox-static cpio xz-utils gzip dosfstools mtools
    extlinux syslinux syslinux-common gdisk
    grub-efi-amd64-bin grub-pc-bin grub-common shim-signed grub-efi-amd64-signed
    sbsigntool efitools
    # NBD peers, load generators, cluster store, networking
    libnbd-bin python3-libnbd fio iperf3 etcd-server dnsmasq-base iproute2 tcpdump curl
    # real qemu-ga on the host: the agent crate checks protocol compatibility against it
    qemu-guest-agent
    # static build of the guest agent (crt-static links against glibc's libc.a)
    gcc libc6-dev
)

# `--bench`: peers only the benchmarks compare with (`vireo bench migration` runs two
# libvirtd of its own; policy-rc.d below keeps the packaged service from starting).
BENCH_PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu rsync)
[[ "${1:-}" == --bench ]] && PACKAGES+=("${BENCH_PACKAGES[@]}")

# A package counts as present when an equivalent newer build is already on PATH
# (qemu-utils here may be a backport installed outside dpkg). Never downgrade.
declare -A PROVIDED_BY_COMMAND=(
    [qemu-utils]=qemu-img
)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="$(mktemp /tmp/vireo-setup.XXXXXX.log)"
trap 'rm -f "$LOG"' EXIT

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    if [[ -s "$LOG" ]]; then
        printf 'setup: last lines of the log:\n' >&2
        tail -n 20 "$LOG" >&2
    fi
    exit 1
}

[[ "$(id -u)" == 0 ]] || die "must run as root"
command -v dpkg-query >/dev/null && command -v apt-get >/dev/null || die "needs a Debian system (dpkg, apt-get)"

installed() {
    local pkg="$1" cmd="${PROVIDED_BY_COMMAND[$1]:-}"
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null)" == "ii " ]] && return 0
    [[ -n "$cmd" ]] && command -v "$cmd" >/dev/null 2>&1 && return 0
    return 1
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

export DEBIAN_FRONTEND=noninteractive
if ((${#missing[@]})); then
    say "apt-get update"
    apt-get update -qq >>"$LOG" 2>&1 || die "apt-get update failed"
    say "installing ${missing[*]}"
    # Do not let package scripts start services (etcd-server would start a cluster member on :2379).
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    rc=0
    apt-get install -y -qq --no-install-recommends --no-upgrade -o Dpkg::Use-Pty=0 \
        "${missing[@]}" >>"$LOG" 2>&1 || rc=$?
    ((policy_created)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
    for p in "${missing[@]}"; do
        installed "$p" || die "package $p still not installed after apt-get install"
    done
fi

# Rust: the static guest binary is built for the host target with +crt-static.
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
host="$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')"
[[ "$host" == x86_64-unknown-linux-gnu ]] ||
    die "rustc host target is '$host', the static guest agent needs x86_64-unknown-linux-gnu"

# Prove it: a static-pie hello world must link and have no program interpreter.
tmpd="$(mktemp -d /tmp/vireo-setup.XXXXXX)"
printf 'fn main() {}\n' >"$tmpd/m.rs"
if ! rustc -C target-feature=+crt-static -o "$tmpd/m" "$tmpd/m.rs" >>"$LOG" 2>&1; then
    rm -rf "$tmpd"
    die "rustc cannot link a static (+crt-static) executable; is libc6-dev installed?"
fi
if LC_ALL=C ldd "$tmpd/m" 2>&1 | grep -q '=>'; then
    rm -rf "$tmpd"
    die "rustc -C target-feature=+crt-static produced a dynamic executable"
fi
rm -rf "$tmpd"

# Guest artefacts: the test-guest kernel and qemu-guest-agent are NOT installed on the host;
# they are downloaded (apt-get download) and unpacked into the guest cache by the xtask.
if [[ "${SETUP_SKIP_GUEST:-0}" != 1 ]]; then
    policy="$(apt-cache policy linux-image-amd64 2>/dev/null || true)"
    if [[ "$policy" != *"Candidate: "[0-9]* ]]; then
        say "apt-get update (no candidate for linux-image-amd64)"
        apt-get update -qq >>"$LOG" 2>&1 || die "apt-get update failed"
    fi
    (cd "$REPO" && cargo xtask guest-fetch) || die "fetching guest kernel/agent (cargo xtask guest-fetch) failed"
fi
