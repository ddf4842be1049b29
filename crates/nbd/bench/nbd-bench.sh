#!/usr/bin/env bash
# Side-by-side NBD server benchmark: fio (nbd engine) against Vireo's
# nbd-serve and against qemu-nbd serving the same raw file, same patterns,
# interleaved in one run; prints a ratio table (ours / qemu-nbd).
#
# Each pattern runs REPEAT times per server, alternating which server goes
# first; the table shows medians (the machine is shared, so single runs are
# noisy).
#
# usage: crates/nbd/bench/nbd-bench.sh [RUNTIME_SECONDS=5] [SIZE_MIB=512] [REPEAT=3]
# needs: fio, qemu-nbd (scripts/setup.sh), cargo.
set -euo pipefail

RUNTIME=${1:-5}
SIZE_MIB=${2:-512}
REPEAT=${3:-3}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-nbd}
for t in fio qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
cargo build --release -q -p nbd --example nbd-serve
SERVE=$CARGO_TARGET_DIR/release/examples/nbd-serve

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

IMG=$WORK/disk.raw
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MIB" status=none

start_ours() {
  "$SERVE" --socket "$WORK/ours.sock" --file "$IMG" 2>"$WORK/ours.log" &
  PIDS+=($!)
}
start_qemu() {
  qemu-nbd -f raw -t -e 16 --cache=writeback --aio=threads --socket="$WORK/qemu.sock" "$IMG" \
    2>"$WORK/qemu.log" &
  PIDS+=($!)
}
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

start_ours; start_qemu
wait_sock "$WORK/ours.sock"; wait_sock "$WORK/qemu.sock"

# name rw bs iodepth
PATTERNS=(
  "seq-read-1M read 1M 4"
  "seq-write-1M write 1M 4"
  "rand-read-4k-qd1 randread 4k 1"
  "rand-write-4k-qd1 randwrite 4k 1"
  "rand-read-4k-qd32 randread 4k 32"
  "rand-write-4k-qd32 randwrite 4k 32"
)

RESULTS=$WORK/results.txt
: >"$RESULTS"
for rep in $(seq "$REPEAT"); do
 order="ours qemu"; [ $((rep % 2)) -eq 0 ] && order="qemu ours"
 for p in "${PATTERNS[@]}"; do
  read -r name rw bs qd <<<"$p"
  for server in $order; do
    out=$WORK/$name-$server.json
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/$server.sock" \
      --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MIB}M" --time_based \
      --runtime="$RUNTIME" --ramp_time=1 --output-format=json >"$out.raw" 2>"$WORK/fio.err"
    sed -n '/^{/,$p' "$out.raw" >"$out"
    python3 - "$out" "$name" "$server" "$rw" >>"$RESULTS" <<'PY'
import json, sys
path, name, server, rw = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
d = job["read" if "read" in rw else "write"]
lat = d.get("clat_ns", {}).get("mean", 0) / 1000
print(name, server, f'{d["iops"]:.0f}', f'{d["bw_bytes"] / 2**20:.1f}', f'{lat:.1f}')
PY
  done
 done
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, server, iops, mib, lat = line.split()
    runs.setdefault(name, {}).setdefault(server, []).append((float(iops), float(mib)))
rows = {
    name: {srv: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for srv, v in by.items()}
    for name, by in runs.items()
}
print(f'{"pattern (median)":<20} {"ours IOPS":>10} {"ours MiB/s":>11} {"qemu-nbd IOPS":>14} {"qemu MiB/s":>11} {"ratio":>6}')
for name, r in rows.items():
    o, q = r["ours"], r["qemu"]
    ratio = o[0] / q[0] if q[0] else float("nan")
    print(f'{name:<20} {o[0]:>10.0f} {o[1]:>11.1f} {q[0]:>14.0f} {q[1]:>11.1f} {ratio:>6.2f}')
PY
