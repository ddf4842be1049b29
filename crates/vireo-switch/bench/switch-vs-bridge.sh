#!/bin/bash
# Benchmark: vireo-switch vs the Linux bridge on the same topology, side by side in one run.
#
#   ns A [veth] ── root: oA ─┐                 ┌─ oB ── [veth] ns B
#                            └ bridge | switch ┘
#
# Measures iperf3 TCP (Gbit/s) and UDP with 64-byte payloads (received frames/s) through
# each, and prints a ratio table (switch / bridge). Needs root, iperf3, and a release build:
#   CARGO_TARGET_DIR=target-switch cargo build --release -p vireo-switch
#   crates/vireo-switch/bench/switch-vs-bridge.sh [path/to/vireo-switch] [seconds]
set -euo pipefail
BIN=${1:-target-switch/release/vireo-switch}
T=${2:-5}
command -v iperf3 >/dev/null || { echo "iperf3 missing: run scripts/setup.sh" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no switch binary at $BIN" >&2; exit 1; }
S=vb$$
A=${S}a B=${S}b BR=${S}br
DIR=$(mktemp -d)
SWPID=
cleanup() {
  [ -n "$SWPID" ] && kill "$SWPID" 2>/dev/null || true
  ip netns pids $A 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns pids $B 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true
  ip link del ${S}oA 2>/dev/null || true; ip link del ${S}oB 2>/dev/null || true
  ip link del $BR 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
for n in A B; do
  ns=${S}$(echo $n | tr AB ab)
  ip netns add $ns
  ip link add ${S}o$n type veth peer name eth0 netns $ns
  ip -n $ns link set lo up; ip -n $ns link set eth0 up
  ip link set ${S}o$n up
done
ip -n $A addr add 10.99.0.1/24 dev eth0
ip -n $B addr add 10.99.0.2/24 dev eth0

cpu_ticks() { # user+system clock ticks of a pid (0 if none)
  if [ -n "${1:-}" ]; then awk '{print $14+$15}' /proc/$1/stat; else echo 0; fi
}

measure() { # prints: tcp_gbps udp_pps switch_cpu_s_during_udp
  ip netns exec $B iperf3 -s -D -1 -p 5201 >/dev/null
  sleep 0.3
  local tcp udp
  tcp=$(ip netns exec $A iperf3 -c 10.99.0.2 -p 5201 -t "$T" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
  ip netns exec $B iperf3 -s -D -1 -p 5202 >/dev/null
  sleep 0.3
  local c0 c1
  c0=$(cpu_ticks "$SWPID")
  udp=$(ip netns exec $A iperf3 -c 10.99.0.2 -p 5202 -u -l 64 -b 0 -P 2 -t "$T" -J | python3 -c '
import json,sys
s=json.load(sys.stdin)["end"]["sum"]
print((s["packets"]-s["lost_packets"])/s["seconds"])')
  c1=$(cpu_ticks "$SWPID")
  echo "$tcp $udp $(( c1 - c0 ))"
}

# Linux bridge
ip link add $BR type bridge
ip link set $BR up
ip link set ${S}oA master $BR; ip link set ${S}oB master $BR
ip netns exec $A ping -c 1 -W 2 10.99.0.2 >/dev/null 2>&1 || ip netns exec $A busybox ping -c 1 -W 2 10.99.0.2 >/dev/null
read -r BR_TCP BR_UDP _ < <(measure)
ip link set ${S}oA nomaster; ip link set ${S}oB nomaster; ip link del $BR

# vireo-switch
cat > "$DIR/cfg.json" <<JSON
{"name":"bench","type":"private","ports":[
 {"name":"a","backend":{"kind":"packet","ifname":"${S}oA"}},
 {"name":"b","backend":{"kind":"packet","ifname":"${S}oB"}}]}
JSON
"$BIN" --config "$DIR/cfg.json" --control "$DIR/c.sock" --run-dir "$DIR/run" 2>"$DIR/switch.log" &
SWPID=$!
for i in 1 2 3 4 5; do
  sleep 1
  ip netns exec $A busybox ping -c 1 -W 2 10.99.0.2 >/dev/null 2>&1 && break
  [ $i = 5 ] && { echo "no connectivity through vireo-switch:" >&2; cat "$DIR/switch.log" >&2; exit 1; }
done
read -r SW_TCP SW_UDP SW_TICKS < <(measure)

python3 - "$BR_TCP" "$BR_UDP" "$SW_TCP" "$SW_UDP" "$SW_TICKS" "$T" "$(getconf CLK_TCK)" <<'PY'
import sys
bt, bu, st, su, ticks, t, hz = map(float, sys.argv[1:])
print("| path | Linux bridge | vireo-switch | ratio (switch/bridge) |")
print("|---|---|---|---|")
print(f"| iperf3 TCP, 1 stream | {bt:.2f} Gbit/s | {st:.2f} Gbit/s | {st/bt:.2f} |")
print(f"| iperf3 UDP 64 B payload (2 streams), received | {bu/1e3:.0f} kframes/s | {su/1e3:.0f} kframes/s | {su/bu:.2f} |")
cpu = ticks / hz
if cpu > 0:
    # frames the switch moved (iperf3 packets) per second of its own CPU time
    print(f"\nvireo-switch during the UDP run: {cpu:.2f} CPU-s for {su*t/1e3:.0f} kframes "
          f"= {su*t/cpu/1e6:.2f} Mframes per CPU-second")
PY
