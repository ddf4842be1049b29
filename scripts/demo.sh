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
# VIREO_DEMO_PROFILE=debug reuses a debug build (e.g. the test suite's).
PROFILE=${VIREO_DEMO_PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --workspace --bins --quiet
else
  cargo build --workspace --bins --quiet
fi
BIN=${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE
DEMO=$PWD/.demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
vireo() { "$BIN/vireo" "$@"; }

say "building test guests (cached)"
run "$BIN/xtask" guest-image --generation 1 --agent vireo --out "$DEMO/gen1.img"
run "$BIN/xtask" guest-image --generation 2 --agent vireo --out "$DEMO/gen2.img"

say "VHDX: the generation 1 boot disk converted to VHDX, plus a 64 MiB data disk"
run vireo disk convert "$DEMO/gen1.img" "$DEMO/gen1.vhdx"
run vireo disk new "$DEMO/data.vhdx" --size 64M
run vireo disk info "$DEMO/gen1.vhdx"

say "starting two hosts on this machine: A ($DEMO/a) and B ($DEMO/b), trusting each other"
start_host() { # NAME PORT
  "$BIN/vireod" --state-dir "$DEMO/$1/state" --socket "$DEMO/$1.sock" --listen "127.0.0.1:$2" \
    >"$DEMO/$1.log" 2>&1 &
  echo $!
}
A_PID=$(start_host a 7551); B_PID=$(start_host b 7552)
A="$DEMO/a.sock"; B="$DEMO/b.sock"
export VIREO_SOCKET=$A
cleanup() {
  for s in "$A" "$B"; do
    for vm in demo-gen1 demo-gen2; do VIREO_SOCKET=$s "$BIN/vireo" vm turn-off $vm >/dev/null 2>&1 || true; done
    VIREO_SOCKET=$s "$BIN/vireo" switch delete demo-net >/dev/null 2>&1 || true
  done
  kill "$A_PID" "$B_PID" 2>/dev/null || true
  # Switch processes outlive vireod by design (a daemon restart keeps the network up);
  # the demo's are stopped here.
  pkill -f "vireo-switch --config $DEMO/" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$A" ] && [ -S "$B" ] && break; sleep 0.1; done
on_b() { VIREO_SOCKET=$B "$BIN/vireo" "$@"; }
fingerprint() { VIREO_SOCKET=$1 "$BIN/vireo" host show --json | grep -o '"fingerprint": *"[^"]*"' | cut -d'"' -f4; }
run vireo host show
run vireo host trust 127.0.0.1:7552 --fingerprint "$(fingerprint "$B")"
printf '$ (on B) vireo host trust 127.0.0.1:7551\n'
on_b host trust 127.0.0.1:7551 --fingerprint "$(fingerprint "$A")"

say "creating a generation 1 VM (BIOS, IDE, VHDX, dynamic memory) and a generation 2 VM (UEFI, SCSI, Secure Boot)"
run vireo vm new demo-gen1 --generation 1 --memory 256M --disk "$DEMO/gen1.vhdx" --disk "$DEMO/data.vhdx"
run vireo vm new demo-gen2 --generation 2 --memory 512M --disk "$DEMO/gen2.img" \
    --secure-boot on --secure-boot-template microsoft-uefi-ca
run vireo vm set demo-gen2 --dynamic-memory on --startup 512M --min 256M --max 1G --buffer 20
run vireo vm start demo-gen1
run vireo vm start demo-gen2
wait_hb() { # VM [SOCKET]
  for _ in $(seq 360); do
    VIREO_SOCKET=${2:-$A} "$BIN/vireo" vm show "$1" --json | grep -q '"heartbeat": "ok"' && return 0
    sleep 0.5
  done
  echo "no heartbeat from $1"; return 1
}
wait_hb demo-gen1; wait_hb demo-gen2
run vireo vm list
run vireo vm show demo-gen2

say "running commands in the guests through the agent (no guest network)"
run vireo vm exec demo-gen1 -- uname -a
run vireo vm exec demo-gen2 -- sh -c 'dmesg | grep -i "secure boot" | head -2'
run vireo vm kvp demo-gen1 set role demo-frontend
run vireo vm exec demo-gen1 -- cat /run/vireo/kvp/host/role

# The data disk is the guest's 64 MiB disk (names can change between boots: find it by size).
DATA='d=$(for b in /sys/block/sd* /sys/block/vd*; do [ -e $b/size ] && [ "$(cat $b/size)" = 131072 ] && echo /dev/${b##*/}; done | head -1)'
guest_write() { vireo vm exec demo-gen1 -- sh -c "$DATA; dd if=/dev/urandom of=\$d bs=1M count=4 seek=$1 conv=fsync 2>/dev/null; dd if=\$d bs=1M count=4 skip=$1 2>/dev/null | md5sum | cut -d' ' -f1"; }
guest_sum() { vireo vm exec demo-gen1 -- sh -c "$DATA; dd if=\$d bs=1M count=4 skip=$1 2>/dev/null | md5sum | cut -d' ' -f1"; }

say "standard checkpoint (disks + memory) while the VM runs, then apply it"
SUM1=$(guest_write 0); echo "guest wrote 4 MiB, md5 $SUM1"
run vireo vm exec demo-gen1 -- sh -c 'echo before-checkpoint > /run/marker'
run vireo checkpoint new demo-gen1 before-upgrade
SUM2=$(guest_write 0); echo "guest overwrote it after the checkpoint, md5 $SUM2"
run vireo vm exec demo-gen1 -- sh -c 'echo after-checkpoint > /run/marker'
run vireo checkpoint apply demo-gen1 before-upgrade
wait_hb demo-gen1
run vireo vm exec demo-gen1 -- cat /run/marker
NOW=$(guest_sum 0); echo "data disk md5 now $NOW (at the checkpoint: $SUM1)"
[ "$NOW" = "$SUM1" ] || { echo "checkpoint apply did not restore the disk"; exit 1; }

say "a second checkpoint, then removing the first: its layer merges live while the guest writes"
run vireo checkpoint new demo-gen1 after-upgrade --type production
SUM3=$(guest_write 8); echo "guest wrote more, md5 $SUM3"
run vireo checkpoint list demo-gen1
printf '$ vireo checkpoint remove demo-gen1 before-upgrade\n'
OUT=$(vireo checkpoint remove demo-gen1 before-upgrade); echo "$OUT"
JOB=$(echo "$OUT" | grep -o 'job [0-9a-f]*' | head -1 | cut -d' ' -f2)
run vireo job list
if [ -n "$JOB" ]; then
  for _ in $(seq 240); do
    vireo job show "$JOB" --json 2>/dev/null | grep -q '"state": *"copying"' || break
    sleep 0.5
  done
  run vireo job show "$JOB"
fi
run vireo checkpoint list demo-gen1
NOW=$(guest_sum 8); [ "$NOW" = "$SUM3" ] || { echo "data changed by the merge"; exit 1; }
echo "data disk md5 unchanged by the live merge: $NOW"

say "storage live migration: the running VM's disks (whole chains) move to another directory"
run vireo vm move-storage demo-gen1 --path "$DEMO/moved"
run vireo vm show demo-gen1
NOW=$(guest_sum 8); [ "$NOW" = "$SUM3" ] || { echo "data changed by the storage move"; exit 1; }
echo "data disk md5 unchanged by the move: $NOW"

say "live migration to host B (shared storage: both hosts see $DEMO) and back"
run vireo vm move demo-gen1 --to 127.0.0.1:7552
printf '$ (on B) vireo vm list\n'; on_b vm list
NOW=$(VIREO_SOCKET=$B guest_sum 8); echo "on B, data disk md5 $NOW"
[ "$NOW" = "$SUM3" ] || { echo "data changed by the migration"; exit 1; }
printf '$ (on B) vireo vm move demo-gen1 --to 127.0.0.1:7551\n'; on_b vm move demo-gen1 --to 127.0.0.1:7551
run vireo vm list

say "a private virtual switch; NICs hot-plugged into both running VMs; they ping each other"
run vireo switch new demo-net --type private
run vireo vm nic add demo-gen1 --switch demo-net --mac 52:54:00:de:00:01
run vireo vm nic add demo-gen2 --switch demo-net --mac 52:54:00:de:00:02
ipconf() { # VM MAC ADDR
  vireo vm exec "$1" -- sh -c "for i in 1 2 3 4 5 6 7 8 9 10; do for n in /sys/class/net/*; do [ \"\$(cat \$n/address)\" = $2 ] && { /sbin/ip addr add $3/24 dev \${n##*/}; /sbin/ip link set \${n##*/} up; exit 0; }; done; sleep 1; done; exit 1"
}
ipconf demo-gen1 52:54:00:de:00:01 10.77.0.1
ipconf demo-gen2 52:54:00:de:00:02 10.77.0.2
run vireo vm exec demo-gen1 -- ping -c 3 -W 5 10.77.0.2
run vireo switch show demo-net

say "dynamic memory: the balancer's view (demo-gen2 has startup 512M, minimum 256M, maximum 1G)"
run vireo memory status

say "graceful stop through the guest agent"
run vireo vm stop demo-gen1
run vireo vm stop demo-gen2
run vireo vm list
say "demo finished"
