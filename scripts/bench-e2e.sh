#!/usr/bin/env bash
# End-to-end benchmark (release build): Postfix's smtp-source → mxrelay
# node(s) → Postfix's smtp-sink, for 1 KiB and 100 KiB messages at 1, 20
# and 100 sessions, and the same load straight into smtp-sink (the ceiling).
# Needs what scripts/test.sh installs/starts (MariaDB, Redis, postfix tools).
# Usage: scripts/bench-e2e.sh [NODES] [MSGS_1K] [MSGS_100K]   Prints figures.
#        EMBEDDED=1 scripts/bench-e2e.sh 1 …   the single node on its embedded SQLite store.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
nodes=${1:-1}; n1=${2:-5000}; n100=${3:-1000}
bench_embedded=${EMBEDDED:-0}
release_binary
bench_init e2e
sinkport=$(free_port)
sinkuser=$(id -u postfix >/dev/null 2>&1 && echo postfix || echo nobody)
smtp-sink -u "$sinkuser" -c "127.0.0.1:$sinkport" 1000 > "$work/sink.log" 2>&1 &
bench_on_exit "kill $! 2>/dev/null"
targets=()
for i in $(seq 1 "$nodes"); do
  p=$(free_port); a=$(free_port)
  { node_config_base --deliver "bench-$i" "$p" "$a"
    echo 'message_size_limit = 524288000'
    echo 'smtp.max_connections_per_ip = 500'
  } > "$work/node$i.toml"
  start_node "$work/node$i.toml" "$p"
  targets+=("127.0.0.1:$p")
done
add_domain dest.example 127.0.0.1 "$sinkport" 0

sunk() { tr '\r' '\n' < "$work/sink.log" | grep -oE 'mesg=[0-9]+' | tail -1 | cut -d= -f2 || true; }

run() { # label count size sessions target...
  local label=$1 count=$2 size=$3 sess=$4; shift 4
  local base t0 t1 per i
  base=$(sunk); base=${base:-0}
  per=$((count / $#))
  local sources=()
  t0=$(date +%s.%N)
  for t in "$@"; do
    smtp-source -s "$(( (sess + $# - 1) / $# ))" -m "$per" -l "$size" -M bench.example \
      -f sender@src.example -t rcpt@dest.example "$t" &
    sources+=($!)
  done
  wait "${sources[@]}" || true
  local want=$((base + per * $#)) deadline=$(( $(date +%s) + 300 ))
  while :; do
    i=$(sunk); [ "${i:-0}" -ge "$want" ] && break
    [ "$(date +%s)" -ge "$deadline" ] && { echo "$label: timeout, sink has ${i:-0}/$want" >&2; return 1; }
    sleep 0.05
  done
  t1=$(date +%s.%N)
  awk -v l="$label" -v n="$((per * $#))" -v s="$size" -v c="$sess" -v a="$t0" -v b="$t1" \
    'BEGIN{printf "%-8s msgs=%d size=%d sessions=%d e2e_s=%.2f rate=%.0f msg/s\n", l, n, s, c, b-a, n/(b-a)}'
}

echo "nodes=$nodes embedded=${EMBEDDED:-0}"
for size in 1024 102400; do
  count=$n1; [ "$size" = 102400 ] && count=$n100
  for sess in 1 20 100; do
    run ceiling "$count" "$size" "$sess" "127.0.0.1:$sinkport"
    run mxrelay "$count" "$size" "$sess" "${targets[@]}"
  done
done
for i in $(seq 1 "$nodes"); do
  echo "node $i peak RSS: $(peak_rss_mib "${bench_node_pids[i - 1]}") MiB"
done
