#!/usr/bin/env bash
# End-to-end benchmark (release build): Postfix's smtp-source → mxrelay
# node(s) → Postfix's smtp-sink, for 1 KiB and 100 KiB messages at 1, 20
# and 100 sessions, and the same load straight into smtp-sink (the ceiling).
# Needs what scripts/test.sh installs/starts (MariaDB, Redis, postfix tools).
# Usage: scripts/bench-e2e.sh [NODES] [MSGS_1K] [MSGS_100K]   Prints figures.
#        EMBEDDED=1 scripts/bench-e2e.sh 1 …   the single node on its embedded SQLite store.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-1}; n1=${2:-5000}; n100=${3:-1000}
cargo build --release -q
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/release/mxrelay
work=$(mktemp -d)
db="mxr_e2e_$$"
prefix="mxre2e$$"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sinkport=$(port)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $db" || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli del >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mysql -h 127.0.0.1 -u root -e "CREATE DATABASE $db"
sinkuser=$(id -u postfix >/dev/null 2>&1 && echo postfix || echo nobody)
smtp-sink -u "$sinkuser" -c 127.0.0.1:$sinkport 1000 > "$work/sink.log" 2>&1 &
pids+=($!)
targets=()
for i in $(seq 1 "$nodes"); do
  p=$(port); a=$(port)
  cat > "$work/node$i.toml" <<TOML
node_id = "bench-$i"
mynetworks = ["127.0.0.255/32"]
message_size_limit = 524288000
reject_unknown_sender_domain = false
reject_unknown_recipient_domain = false
log.level = "warn"
[smtp]
listen = "127.0.0.1:$p"
peername_lookup = false
max_connections_per_ip = 500
[admin]
listen = "127.0.0.1:$a"
TOML
  if [ "${EMBEDDED:-0}" = 1 ]; then
    echo "data_dir = \"$work/data\"" | cat - "$work/node$i.toml" > "$work/t" && mv "$work/t" "$work/node$i.toml"
  else
    printf '[domains]\nurl = "mysql://root@127.0.0.1:3306/%s"\n[queue]\nurl = "redis://127.0.0.1:6379/"\nprefix = "%s"\n' "$db" "$prefix" >> "$work/node$i.toml"
  fi
  "$bin" serve --config "$work/node$i.toml" 2>"$work/node$i.log" &
  pids+=($!)
  targets+=("127.0.0.1:$p")
  for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
if [ "${EMBEDDED:-0}" = 1 ]; then
  "$bin" domains add dest.example --relay-host 127.0.0.1 --relay-port "$sinkport" --no-scan --config "$work/node1.toml" >/dev/null
else
  mysql -h 127.0.0.1 -u root "$db" -e "INSERT INTO domains VALUES ('dest.example','127.0.0.1',$sinkport,'0')"
fi
for pid in "${pids[@]:1}"; do kill -HUP "$pid"; done
sleep 1

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
  echo "node $i peak RSS: $(awk '/VmHWM/{print int($2/1024)}' /proc/${pids[$i]}/status) MiB"
done
