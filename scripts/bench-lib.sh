# shellcheck shell=bash
# The set-up the benchmark scripts share (bench.sh, bench-e2e.sh, bench-tls.sh,
# bench-scan.sh source it after `set -euo pipefail`). Sourcing it makes a
# relative $MXRELAY_BIN absolute and changes to the repository root. It gives:
#   bench_init NAME     temp work dir $work, MariaDB database $db (mxr_NAME_PID)
#                       and Redis key prefix $prefix (mxrNAMEPID), all removed
#                       at exit, after the nodes are killed;
#   bench_on_exit CMD   one more clean-up, eval'd at exit (latest first);
#   free_port           prints a free TCP port on 127.0.0.1;
#   release_binary      sets $bin: $MXRELAY_BIN, else `cargo build --release`
#                       (honours CARGO_TARGET_DIR); MXRELAY_BIN is not passed on;
#   node_config_base    prints the TOML keys every bench node shares (log
#                       level $BENCH_LOG_LEVEL, default warn);
#   start_node CONFIG PORT...   starts a node, waits for its ports;
#   stop_node           stops the node started last;
#   add_domain DOMAIN HOST PORT SCAN   adds or replaces the domain, then SIGHUP;
#   queued_in_redis, peak_rss_mib PID, cpu_seconds PID, log_summary LOG [INDENT].
# $bench_embedded=1 (before node_config_base): the node on its embedded SQLite
# store instead of MariaDB and Redis; $bench_queue_url: the Redis it uses.

if [ -n "${MXRELAY_BIN:-}" ]; then MXRELAY_BIN=$(realpath "$MXRELAY_BIN"); fi
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
bench_embedded=0
bench_queue_url=redis://127.0.0.1:6379/ # a script may point its nodes at another Redis
bench_cleanups=()
bench_node_pids=() # the nodes started and not stopped, in order
clk_tck=$(getconf CLK_TCK)

bench_init() { # NAME
  work=$(mktemp -d)
  db="mxr_$1_$$"
  prefix="mxr$1$$"
  bench_on_exit bench_drop_temp
  trap bench_cleanup EXIT
  mysql -h 127.0.0.1 -u root -e "CREATE DATABASE $db"
}

bench_drop_temp() {
  mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $db" || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli del >/dev/null || true
  rm -rf "$work"
}

bench_on_exit() { bench_cleanups+=("$1"); }

bench_cleanup() {
  local i
  if ((${#bench_node_pids[@]})); then kill "${bench_node_pids[@]}" 2>/dev/null || true; fi
  for ((i = ${#bench_cleanups[@]} - 1; i >= 0; i--)); do
    eval "${bench_cleanups[i]}" || true
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

release_binary() {
  if [ -n "${MXRELAY_BIN:-}" ]; then
    bin=$MXRELAY_BIN
  else
    cargo build --release -q
    bin=$(realpath "${CARGO_TARGET_DIR:-target}")/release/mxrelay
  fi
  # The node reads every MXRELAY_* variable as a configuration key and
  # refuses unknown ones.
  unset MXRELAY_BIN
}

# node_config_base [--deliver] [--data-dir DIR] NODE_ID SMTP_PORT ADMIN_PORT
# As the Postfix reference bench: no DNS checks, 127.0.0.1 not in mynetworks
# (every recipient goes through the relay check). Domains in $db and the
# queue in Redis under $prefix: queue.url is explicit, since an unset one
# means the embedded SQLite store (which $bench_embedded=1 asks for).
# data_dir (default $work/data) is in the temp dir. Delivery off (only
# acceptance is timed) unless --deliver. All keys are dotted root keys: a
# script appends more of them (smtp.max_connections_per_ip = …), then its
# own [sections].
node_config_base() {
  local deliver=0 data=$work/data
  while :; do
    case $1 in
      --deliver) deliver=1; shift ;;
      --data-dir) data=$2; shift 2 ;;
      *) break ;;
    esac
  done
  cat <<TOML
node_id = "$1"
data_dir = "$data"
mynetworks = ["127.0.0.255/32"]
reject_unknown_sender_domain = false
reject_unknown_recipient_domain = false
log.level = "${BENCH_LOG_LEVEL:-warn}"
smtp.listen = "127.0.0.1:$2"
smtp.peername_lookup = false
admin.listen = "127.0.0.1:$3"
TOML
  if [ "$bench_embedded" != 1 ]; then
    printf 'domains.url = "mysql://root@127.0.0.1:3306/%s"\nqueue.url = "%s"\nqueue.prefix = "%s"\n' "$db" "$bench_queue_url" "$prefix"
  fi
  if [ "$deliver" != 1 ]; then echo 'delivery.enabled = false'; fi
}

# start_node CONFIG PORT...: `$bin serve`, its stderr in CONFIG's name with
# .log ($node_log); sets $node_pid and $node_config; waits up to 10 s for
# each port, then stops the script if the node has exited.
start_node() {
  local p
  node_config=$1; shift
  node_log=${node_config%.toml}.log
  "$bin" serve --config "$node_config" 2>"$node_log" &
  node_pid=$!
  bench_node_pids+=("$node_pid")
  for p in "$@"; do
    for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
  done
  if ! kill -0 "$node_pid" 2>/dev/null; then echo "the node exited:"; tail -n 20 "$node_log"; exit 1; fi
}

stop_node() {
  local p keep=()
  kill "$node_pid"; wait "$node_pid" 2>/dev/null || true
  for p in "${bench_node_pids[@]}"; do [ "$p" = "$node_pid" ] || keep+=("$p"); done
  bench_node_pids=("${keep[@]}")
}

# add_domain DOMAIN RELAY_HOST RELAY_PORT SCAN('0'|'1'): into $db (replacing
# the row), or with `mxrelay domains add` on the embedded store of the node
# started last; then SIGHUP to every node so that they reload at once.
add_domain() {
  if [ "$bench_embedded" = 1 ]; then
    local scan=--no-scan; [ "$4" = 1 ] && scan=--scan
    "$bin" domains add "$1" --relay-host "$2" --relay-port "$3" "$scan" --config "$node_config" >/dev/null
  else
    mysql -h 127.0.0.1 -u root "$db" -e "REPLACE INTO domains VALUES ('$1','$2',$3,'$4')"
  fi
  kill -HUP "${bench_node_pids[@]}"; sleep 0.5
}

queued_in_redis() { # entries in the queue's four ready streams
  local s
  for s in 0 1 2 3; do redis-cli xlen "$prefix:{q$s}:ready"; done | awk '{t+=$1} END{print t+0}'
}

peak_rss_mib() { awk '/VmHWM/{print int($2/1024)}' "/proc/$1/status"; }

cpu_seconds() { awk -v t="$clk_tck" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }

log_summary() { # LOG [INDENT]: the node's log lines (warn and above), the commonest 5
  local lines
  lines=$(grep -c . "$1" || true)
  echo "${2:-}node log lines (warn and above): $lines"
  if [ "$lines" -gt 0 ]; then
    sed -E 's/^[^ ]+ +//' "$1" | cut -c1-120 | sort | uniq -c | sort -rn | head -5 || true
  fi
}
