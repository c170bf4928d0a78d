#!/usr/bin/env bash
# One Redis against a Redis Cluster of 3 primaries (no replicas), the same
# node and the same load on each: accept MESSAGES, then deliver them to
# smtp-sink. Prints throughput, the Redis CPU per message (summed over
# every server, user + system from INFO cpu) and how it splits over the
# primaries, and the ratios cluster ÷ one. For docs/SCALING.md. On a
# 2-core machine the node and Redis share the cores, so the ratios and the
# CPU per message are the figures, not the absolute speed.
# Usage: scripts/bench-cluster.sh [MESSAGES] [SIZE]   Prints figures; asserts nothing.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
n=${1:-5000}
size=${2:-1024}
release_binary
bench_init cluster
sink_port=$(free_port)
smtp-sink -u nobody "127.0.0.1:$sink_port" 1000 >/dev/null 2>&1 &
sink_pid=$!
bench_on_exit 'kill $sink_pid'

ports=()
start_redis() { # DIR EXTRA_ARGS...: a server with AOF (everysec) on a new port, appended to $ports
  local dir=$1 port; shift
  port=$(free_port); mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@"
  bench_on_exit "redis-cli -p $port shutdown nosave >/dev/null 2>&1"
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  ports+=("$port")
}
cpu_of() { redis-cli -p "$1" info cpu | awk -F: '/^used_cpu_(user|sys):/{s+=$2} END{printf "%.6f", s}'; }
cpu_all() { local p; for p in "${ports[@]}"; do cpu_of "$p"; echo; done | awk '{s+=$1} END{printf "%.6f", s}'; }
queued_all() { local p; for p in "${ports[@]}"; do redis-cli -p "$p" --scan --pattern "$prefix:*:msg:*"; done | wc -l; }

# run LABEL: accept $n messages, then deliver them; prints one line each
# and sets $accept_rate, $accept_us, $deliver_rate, $deliver_us.
run() {
  local label=$1 port admin c0 c1 c2 c3 t0 t1 t2 t3 split="" p
  declare -A before
  port=$(free_port); admin=$(free_port)
  node_config_base "accept-$label" "$port" "$admin" > "$work/accept-$label.toml"
  start_node "$work/accept-$label.toml" "$port" "$admin"
  add_domain dest.example 127.0.0.1 "$sink_port" 0
  for p in "${ports[@]}"; do before[$p]=$(cpu_of "$p"); done
  c0=$(cpu_all); t0=$(date +%s.%N)
  smtp-source -s 40 -m "$n" -l "$size" -M bench.example -f sender@src.example -t rcpt@dest.example "127.0.0.1:$port"
  c1=$(cpu_all); t1=$(date +%s.%N)
  stop_node
  for p in "${ports[@]}"; do split+=" $(awk -v a="${before[$p]}" -v b="$(cpu_of "$p")" 'BEGIN{printf "%.2f", b-a}')"; done
  port=$(free_port); admin=$(free_port)
  node_config_base --deliver "deliver-$label" "$port" "$admin" > "$work/deliver-$label.toml"
  c2=$(cpu_all); t2=$(date +%s.%N)
  start_node "$work/deliver-$label.toml" "$port" "$admin"
  while [ "$(queued_all)" -gt 0 ]; do sleep 0.2; done
  c3=$(cpu_all); t3=$(date +%s.%N)
  stop_node
  accept_rate=$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", n/(b-a)}')
  accept_us=$(awk -v n="$n" -v a="$c0" -v b="$c1" 'BEGIN{printf "%.0f", (b-a)*1e6/n}')
  deliver_rate=$(awk -v n="$n" -v a="$t2" -v b="$t3" 'BEGIN{printf "%.0f", n/(b-a)}')
  deliver_us=$(awk -v n="$n" -v a="$c2" -v b="$c3" 'BEGIN{printf "%.0f", (b-a)*1e6/n}')
  echo "$label: accept $accept_rate msg/s, Redis CPU $accept_us µs/msg (per server, s:$split); deliver $deliver_rate msg/s, Redis CPU $deliver_us µs/msg"
}

start_redis "$work/one"
bench_queue_url="redis://127.0.0.1:${ports[0]}/"
prefix="$prefix-one"
run one
one=("$accept_rate" "$accept_us" "$deliver_rate" "$deliver_us")

ports=()
for i in 1 2 3; do start_redis "$work/c$i" --cluster-enabled yes --cluster-port "$(free_port)"; done
redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 1 100); do
  ok=0
  for p in "${ports[@]}"; do redis-cli -p "$p" cluster info | grep -q cluster_state:ok && ok=$((ok + 1)); done
  [ "$ok" = 3 ] && break
  sleep 0.1
done
bench_queue_url="redis+cluster://127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
prefix="${prefix%-one}-cluster"
run cluster
awk -v a="${one[0]}" -v b="$accept_rate" -v c="${one[1]}" -v d="$accept_us" -v e="${one[2]}" -v f="$deliver_rate" \
  -v g="${one[3]}" -v h="$deliver_us" 'BEGIN{printf "cluster / one: accept %.2f× the rate, %.2f× the Redis CPU per message; deliver %.2f× the rate, %.2f× the Redis CPU per message\n", b/a, d/c, f/e, h/g}'
