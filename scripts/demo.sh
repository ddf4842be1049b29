#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is missing, build, start a host,
# build test guests, and run generation 1 and 2 VMs through the headline features.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_PROGRESS_WHEN=never
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "installing what is missing (scripts/setup.sh)"
bash scripts/setup.sh
say "building"
cargo build --release --workspace --bins --quiet
BIN=$PWD/target/release
DEMO=$PWD/.demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
export VIREO_SOCKET=$DEMO/vireod.sock
vireo() { "$BIN/vireo" "$@"; }

say "building test guests (cached)"
run "$BIN/xtask" guest-image --generation 1 --agent vireo --out "$DEMO/gen1.img"
run "$BIN/xtask" guest-image --generation 2 --agent vireo --out "$DEMO/gen2.img"

say "starting vireod (state in $DEMO/state)"
"$BIN/vireod" --state-dir "$DEMO/state" --socket "$VIREO_SOCKET" >"$DEMO/vireod.log" 2>&1 &
DAEMON=$!
cleanup() {
  vireo vm turn-off demo-gen1 >/dev/null 2>&1 || true
  vireo vm turn-off demo-gen2 >/dev/null 2>&1 || true
  kill "$DAEMON" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$VIREO_SOCKET" ] && break; sleep 0.1; done
run vireo host show

say "creating a generation 1 VM (BIOS, IDE) and a generation 2 VM (UEFI, SCSI, Secure Boot)"
run vireo vm new demo-gen1 --generation 1 --memory 256M --disk "$DEMO/gen1.img"
run vireo vm new demo-gen2 --generation 2 --memory 512M --disk "$DEMO/gen2.img" \
    --secure-boot on --secure-boot-template microsoft-uefi-ca
run vireo vm start demo-gen1
run vireo vm start demo-gen2
wait_hb() {
  for _ in $(seq 240); do
    vireo vm show "$1" --json | grep -q '"heartbeat": "ok"' && return 0
    sleep 0.5
  done
  echo "no heartbeat from $1"; return 1
}
wait_hb demo-gen1; wait_hb demo-gen2
sleep 2
run vireo vm list
run vireo vm show demo-gen1
run vireo vm show demo-gen2

say "running commands in the guests through the agent (no guest network)"
run vireo vm exec demo-gen1 -- uname -a
run vireo vm exec demo-gen2 -- sh -c 'dmesg | grep -i "secure boot" | head -2'

say "key-value pairs both ways"
run vireo vm kvp demo-gen1 set role demo-frontend
run vireo vm exec demo-gen1 -- sh -c 'cat /run/vireo/kvp/host/role; vireo-guest kvp set uptime "$(cut -d" " -f1 /proc/uptime)"'
run vireo vm kvp demo-gen1 list

say "save and restore generation 1"
run vireo vm save demo-gen1
run vireo vm list
run vireo vm start demo-gen1
wait_hb demo-gen1

say "graceful stop through the guest agent"
run vireo vm stop demo-gen1
run vireo vm stop demo-gen2
run vireo vm list
say "demo finished"
