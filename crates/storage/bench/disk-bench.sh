#!/usr/bin/env bash
# Disk service vs qemu-nbd, side by side in one run, same client (fio's nbd engine):
#   ours      = `vireo disk serve` on a dynamic VHDX
#   qemu-vhdx = qemu-nbd -f vhdx on a copy of the same VHDX
#   qemu-qcow2= qemu-nbd -f qcow2 on the same data as qcow2
# Each server has its own copy (written patterns change allocation). Reads run on an image
# filled with random data; writes on a fresh (empty) dynamic image, so random writes allocate.
# Prints medians of REPEAT runs and ours/qemu ratios.
#
# usage: crates/storage/bench/disk-bench.sh [RUNTIME=4] [SIZE_MIB=256] [REPEAT=3]
set -euo pipefail
RUNTIME=${1:-4}; SIZE_MIB=${2:-256}; REPEAT=${3:-3}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-storage}
for t in fio qemu-nbd qemu-img python3; do
  command -v "$t" >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
# VIREO=path/to/vireo uses that binary instead of building one.
if [ -z "${VIREO:-}" ]; then
  cargo build --release -q -p vireo
  VIREO=$CARGO_TARGET_DIR/release/vireo
fi
WORK=$(mktemp -d /var/tmp/disk-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

dd if=/dev/urandom of="$WORK/data.raw" bs=1M count="$SIZE_MIB" status=none
prep() { # $1 = full|empty
  rm -f "$WORK"/img.*
  if [ "$1" = full ]; then
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$WORK/data.raw" "$WORK/img.ours.vhdx"
    cp "$WORK/img.ours.vhdx" "$WORK/img.qemu.vhdx"
    qemu-img convert -f raw -O qcow2 "$WORK/data.raw" "$WORK/img.qemu.qcow2"
  else
    "$VIREO" disk new "$WORK/img.ours.vhdx" --size "${SIZE_MIB}M" >/dev/null
    cp "$WORK/img.ours.vhdx" "$WORK/img.qemu.vhdx"
    qemu-img create -q -f qcow2 "$WORK/img.qemu.qcow2" "${SIZE_MIB}M"
  fi
}
start() {
  rm -f "$WORK"/*.sock
  "$VIREO" disk serve "$WORK/img.ours.vhdx" --socket "$WORK/ours.sock" 2>"$WORK/ours.log" & PIDS+=($!)
  qemu-nbd -f vhdx -t -e 16 --cache=writeback --aio=threads --socket="$WORK/qemu-vhdx.sock" "$WORK/img.qemu.vhdx" 2>"$WORK/q1.log" & PIDS+=($!)
  qemu-nbd -f qcow2 -t -e 16 --cache=writeback --aio=threads --socket="$WORK/qemu-qcow2.sock" "$WORK/img.qemu.qcow2" 2>"$WORK/q2.log" & PIDS+=($!)
  wait_sock "$WORK/ours.sock"; wait_sock "$WORK/qemu-vhdx.sock"; wait_sock "$WORK/qemu-qcow2.sock"
}
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }

RESULTS=$WORK/results.txt; : >"$RESULTS"
run() { # name rw bs qd
  local name=$1 rw=$2 bs=$3 qd=$4
  local order=(ours qemu-vhdx qemu-qcow2)
  for rep in $(seq "$REPEAT"); do
    # Rotate who goes first, so drifting load hits every server alike.
    local k=$(( (rep - 1) % 3 ))
    for server in "${order[@]:k}" "${order[@]:0:k}"; do
      out=$WORK/$name-$server.json
      fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/$server.sock" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MIB}M" --time_based \
        --runtime="$RUNTIME" --output-format=json >"$out.raw" 2>"$WORK/fio.err"
      sed -n '/^{/,$p' "$out.raw" >"$out"
      python3 - "$out" "$name" "$server" "$rw" "$rep" >>"$RESULTS" <<'PY'
import json, sys
path, name, server, rw, rep = sys.argv[1:]
d = json.load(open(path))["jobs"][0]["read" if "read" in rw else "write"]
print(name, server, rep, f'{d["iops"]:.0f}', f'{d["bw_bytes"] / 2**20:.1f}')
PY
    done
  done
}
prep full; start
run seq-read-1M read 1M 4; run rand-read-4k-qd1 randread 4k 1; run rand-read-4k-qd32 randread 4k 32
stop
for p in "seq-write-1M write 1M 4" "rand-write-4k-qd1 randwrite 4k 1" "rand-write-4k-qd32 randwrite 4k 32"; do
  prep empty; start; run $p; stop
done
python3 - "$RESULTS" <<'PY'
import sys, statistics, collections
r = collections.defaultdict(list)
per = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    n, s, rep, iops, bw = line.split(); r[(n, s)].append((float(iops), float(bw)))
    per[(n, rep)][s] = float(iops)
names = list(dict.fromkeys(n for n, _ in r))
# Ratios are medians of the per-repetition ratios (each from runs seconds apart), which
# cancels most of the load drift of a shared machine; min-max shows the spread.
print("| pattern | ours (vireo disk serve, VHDX) | qemu-nbd VHDX | qemu-nbd qcow2 | ours/qemu-vhdx (min-max) | ours/qemu-qcow2 (min-max) |")
print("|---|---|---|---|---|---|")
for n in names:
    m = {s: statistics.median(x[0] for x in r[(n, s)]) for s in ("ours", "qemu-vhdx", "qemu-qcow2")}
    b = {s: statistics.median(x[1] for x in r[(n, s)]) for s in ("ours", "qemu-vhdx", "qemu-qcow2")}
    f = lambda s: f'{m[s]:.0f} IOPS, {b[s]:.1f} MiB/s'
    def ratio(other):
        v = [p["ours"] / max(p[other], 1) for (nn, _), p in per.items() if nn == n and "ours" in p and other in p]
        return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
    print(f"| {n} | {f('ours')} | {f('qemu-vhdx')} | {f('qemu-qcow2')} | {ratio('qemu-vhdx')} | {ratio('qemu-qcow2')} |")
PY
