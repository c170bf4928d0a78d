#!/usr/bin/env bash
# What one message costs Redis: CPU (user + system, from INFO cpu) per
# message accepted and per message delivered, and memory per queued
# message, measured on a private Redis (appendonly yes, everysec) that
# only this node uses, so every figure is the queue's own. For
# docs/SCALING.md. The node binary matters little here (Redis does the
# same commands for a debug build); throughput is bench.sh's business.
# Usage: scripts/bench-redis.sh [MESSAGES] [SIZE]   Prints figures; asserts nothing.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
n=${1:-5000}
size=${2:-1024}
release_binary
bench_init redis
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec \
  --dir "$work" --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
bench_on_exit 'redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1'
for _ in $(seq 1 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
bench_queue_url="redis://127.0.0.1:$rport/"
sink_port=$(free_port)
smtp-sink -u nobody "127.0.0.1:$sink_port" 1000 >/dev/null 2>&1 &
sink_pid=$!
bench_on_exit 'kill $sink_pid'

redis_cpu() { redis-cli -p "$rport" info cpu | awk -F: '/^used_cpu_(user|sys):/{s+=$2} END{printf "%.6f", s}'; }
redis_mem() { redis-cli -p "$rport" info memory | awk -F: '/^used_memory:/{print $2+0}'; }
queued() { redis-cli -p "$rport" --scan --pattern "$prefix:*:msg:*" | wc -l; }
per_msg_us() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN{printf "%.0f", (b-a)*1e6/n}'; }

# Accept only: the messages stay queued.
port=$(free_port); admin=$(free_port)
node_config_base accept "$port" "$admin" > "$work/accept.toml"
start_node "$work/accept.toml" "$port" "$admin"
add_domain dest.example 127.0.0.1 "$sink_port" 0
cpu0=$(redis_cpu); mem0=$(redis_mem)
smtp-source -s 20 -m "$n" -l "$size" -M bench.example -f sender@src.example -t rcpt@dest.example "127.0.0.1:$port"
cpu1=$(redis_cpu); mem1=$(redis_mem); q=$(queued)
stop_node
echo "accept: $q of $n messages of $size bytes queued; Redis CPU $(per_msg_us "$cpu0" "$cpu1" "$n") µs per message; memory $(( (mem1 - mem0) / q )) bytes per queued message"

# Deliver what is queued: the same node with delivery on, to smtp-sink.
port=$(free_port); admin=$(free_port)
node_config_base --deliver deliver "$port" "$admin" > "$work/deliver.toml"
cpu2=$(redis_cpu); t0=$(date +%s.%N)
start_node "$work/deliver.toml" "$port" "$admin"
while [ "$(queued)" -gt 0 ]; do sleep 0.2; done
cpu3=$(redis_cpu); t1=$(date +%s.%N)
awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{printf "deliver: %d messages drained in %.1f s (%.0f msg/s); ", n, b-a, n/(b-a)}'
echo "Redis CPU $(per_msg_us "$cpu2" "$cpu3" "$n") µs per message (the node's idle polling included)"
echo "Redis memory after the drain: $(( $(redis_mem) - mem0 )) bytes above the start"
