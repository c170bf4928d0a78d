#!/usr/bin/env bash
# Durable stores side by side, end to end, in one run (issue 16):
#   smtp-source → relay → smtp-sink on 127.0.0.1:2526
# for each target:
#   ceiling   smtp-source straight into the sink
#   redis     mxrelay on a private Redis without persistence
#   aof       mxrelay on a private Redis with appendonly yes, appendfsync always
#   sqlite    mxrelay on its embedded store (WAL, synchronous = FULL)
#   postfix   the seed's Postfix relay, set up by the shared bench's
#             ref-postfix-up.sh ($SHARED_BENCH, default ../shared/bench; the
#             column is left out when it is not there)
# Per cell (median of REPS runs): messages per second delivered (the clock
# stops when the sink has them all), the milliseconds per message that adds
# over the ceiling, node (or Postfix+MariaDB) CPU per message, Redis CPU per
# message, and fsync/fdatasync calls per message (perf's syscall tracepoints,
# machine-wide). Every run ends with a check that the sink got every
# message exactly once: the sink dumps each message to a file (tmpfs), and
# the relay's queue id in the first Received: field must be there once per
# message sent (the ceiling: the file count).
#
# Usage: scripts/bench-durable.sh
# Environment: CELLS="size:sessions:messages …" (default below), REPS=3,
#   TARGETS="ceiling redis aof sqlite postfix", MXRELAY_BIN (else a release build),
#   BASELINE_BIN: another mxrelay binary (an earlier commit's) run beside it
#   as redis-before, aof-before, sqlite-before, for a before/after in one run.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
CELLS=${CELLS:-"1024:1:3000 1024:20:20000 102400:20:5000"}
REPS=${REPS:-3}
TARGETS=${TARGETS:-"ceiling redis aof sqlite postfix"}
BASELINE_BIN=${BASELINE_BIN:+$(realpath "$BASELINE_BIN")}
SHARED_BENCH=${SHARED_BENCH:-../shared/bench}
SINK_PORT=2526
HZ=$(getconf CLK_TCK)
release_binary
bench_init durable
raw=$work/raw.txt
: > "$raw"

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---- the relays -------------------------------------------------------------------------
start_redis() { # NAME ARGS…: a private redis-server on a free port; sets $redis_port $redis_pid
  local name=$1; shift
  redis_port=$(free_port)
  mkdir -p "$work/$name"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --dir "$work/$name" \
    --logfile "$work/$name/redis.log" "$@" &
  redis_pid=$!
  bench_on_exit "kill $redis_pid 2>/dev/null"
  for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis $name did not start"; exit 1
}

declare -A relay_addr node_pid_of redis_pid_of
mysql -h 127.0.0.1 -u root "$db" -e "CREATE TABLE IF NOT EXISTS domains (domain varchar(255) PRIMARY KEY, \
  relay_host varchar(255), relay_port int, enable_virus_spam_scan char(1) DEFAULT '0')"
mysql -h 127.0.0.1 -u root "$db" -e "REPLACE INTO domains VALUES ('dest.example','127.0.0.1',$SINK_PORT,'0')"

start_mxrelay() { # NAME [BINARY]: a delivering node on the store NAME names (its prefix)
  local name=$1 p a node_bin=${2:-$bin}
  p=$(free_port); a=$(free_port)
  bench_embedded=0
  case ${name%-before} in
    redis) start_redis redis --appendonly no; bench_queue_url="redis://127.0.0.1:$redis_port/" ;;
    aof) start_redis aof --appendonly yes --appendfsync always; bench_queue_url="redis://127.0.0.1:$redis_port/" ;;
    sqlite) bench_embedded=1; redis_pid="" ;;
  esac
  { node_config_base --deliver --data-dir "$work/data-$name" "bench-$name" "$p" "$a"
    echo 'message_size_limit = 524288000'
    echo 'smtp.max_connections_per_ip = 500'
  } > "$work/$name.toml"
  bin=$node_bin start_node "$work/$name.toml" "$p" "$a"
  if [ "${name%-before}" = sqlite ]; then
    "$node_bin" domains add dest.example --relay-host 127.0.0.1 --relay-port "$SINK_PORT" --no-scan \
      --config "$work/$name.toml" >/dev/null
  fi
  kill -HUP "$node_pid"
  relay_addr[$name]=127.0.0.1:$p
  node_pid_of[$name]=$node_pid
  redis_pid_of[$name]=${redis_pid:-}
}

postfix_pids=""
if has_target postfix; then
  if [ -x "$SHARED_BENCH/ref-postfix-up.sh" ]; then
    "$SHARED_BENCH/ref-postfix-up.sh" >"$work/ref-up.log" 2>&1 || { cat "$work/ref-up.log"; exit 1; }
    # The stock limit of 50 sessions per client would refuse smtp-source at
    # 100 sessions; lifted for the run, as the shared bench-matrix.sh does.
    old=$(postconf -nh smtpd_client_event_limit_exceptions 2>/dev/null || true)
    if [ -n "$old" ]; then restore="postconf -e 'smtpd_client_event_limit_exceptions = $old'"
    else restore="postconf -X smtpd_client_event_limit_exceptions"; fi
    postconf -e "smtpd_client_event_limit_exceptions = \$mynetworks 127.0.0.0/8" && postfix reload 2>/dev/null
    bench_on_exit "$restore; postfix reload 2>/dev/null"
    relay_addr[postfix]=127.0.0.1:25
    postfix_pids="$(tr -d ' ' < /var/spool/postfix/pid/master.pid)"
    [ -f /run/mysqld/mysqld.pid ] && postfix_pids="$postfix_pids $(cat /run/mysqld/mysqld.pid)"
  else
    echo "# no $SHARED_BENCH/ref-postfix-up.sh: the postfix column is left out"
    TARGETS=${TARGETS/postfix/}
  fi
fi
for t in redis aof sqlite; do
  has_target "$t" || continue
  start_mxrelay "$t"
  if [ -n "$BASELINE_BIN" ]; then
    start_mxrelay "$t-before" "$BASELINE_BIN"
    TARGETS="${TARGETS/$t/$t $t-before}"
  fi
done

# ---- one run ----------------------------------------------------------------------------
ticks() { # CPU ticks of PIDs and their descendants (0 for none)
  [ $# -gt 0 ] || { echo 0; return; }
  # A process may end between the glob and its read: cat then fails.
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v roots="$*" '
    { pid=$1; rest=$0; sub(/^.*\) /, "", rest); split(rest, f, " "); pp[pid]=f[2]; t[pid]=f[12]+f[13]+f[14]+f[15] }
    END { n=split(roots, r, " "); for (k=1; k<=n; k++) sel[r[k]]=1
          do { ch=0; for (p in pp) if (!(p in sel) && (pp[p] in sel)) { sel[p]=1; ch=1 } } while (ch)
          s=0; for (p in sel) if (p in t) s+=t[p]; print s+0 }'
}
sink_count() { { tail -c 80 "$work/sink.log" 2>/dev/null | tr '\r' '\n' | grep -oE 'mesg=[0-9]+' | tail -1 | cut -d= -f2; } || true; }
# fsync and fdatasync calls machine-wide (Postfix's come from short-lived
# children; during a run the relay under test is what writes durably).
fsync_watch() { # sets $perf_pid $perf_out; counts until fsync_count
  perf_out=$work/perf.$RANDOM
  # A command to count over (a background job ignores SIGINT, so perf
  # could not be stopped that way): a sleep that fsync_stop ends. Not a
  # polling loop: one that forked a sleep every 20 ms took 4 % of the
  # machine's CPU from the run it measured.
  perf stat -a -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -o "$perf_out" -- \
    sleep infinity 2>>"$work/perf.err" &
  perf_pid=$!
}
fsync_stop() { # in this shell, not $(…)
  # (perf may not have started its sleep yet in a very short run)
  for _ in $(seq 1 100); do pkill -TERM -P "$perf_pid" -x sleep && break; sleep 0.05; done
  wait "$perf_pid" 2>/dev/null || true
}
fsync_count() { awk -F, '/syscalls:sys_enter_f/ {s += $1} END {print s+0}' "$perf_out"; }

run_one() { # TARGET SIZE SESSIONS COUNT
  local target=$1 size=$2 sess=$3 n=$4 dest dump watched node0 redis0 t0 t1 t2 got rc=0
  dump=/dev/shm/mxr-bench-sink-$$
  rm -rf "$dump"; mkdir -p "$dump"; chown nobody "$dump"
  if (exec 3<>"/dev/tcp/127.0.0.1/$SINK_PORT") 2>/dev/null; then
    echo "127.0.0.1:$SINK_PORT is in use: stop whatever listens there"; exit 1
  fi
  smtp-sink -u nobody -c -d "$dump/%H%M/" "127.0.0.1:$SINK_PORT" 1000 > "$work/sink.log" 2>&1 &
  local sinkpid=$!
  bench_on_exit "kill $sinkpid 2>/dev/null; rm -rf $dump"
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SINK_PORT") 2>/dev/null && break; sleep 0.05; done
  local base; base=$(sink_count); base=${base:-0}
  case $target in
    ceiling) dest=127.0.0.1:$SINK_PORT; watched="" ;;
    postfix) dest=${relay_addr[postfix]}; watched=$postfix_pids ;;
    *) dest=${relay_addr[$target]}; watched=${node_pid_of[$target]} ;;
  esac
  local rpid=${redis_pid_of[$target]:-}
  # shellcheck disable=SC2086 # the watched PIDs are words
  node0=$(ticks $watched); redis0=$(ticks $rpid)
  fsync_watch
  t0=${EPOCHREALTIME/,/.}
  smtp-source -s "$sess" -m "$n" -l "$size" -M client.src.example -f sender@src.example \
    -t rcpt@dest.example "$dest" > "$work/source.log" 2>&1 || rc=$?
  t1=${EPOCHREALTIME/,/.}
  local deadline=$((SECONDS + 300))
  while :; do
    got=$(sink_count); got=${got:-0}
    [ "$((got - base))" -ge "$n" ] && break
    if [ "$rc" != 0 ] || [ "$SECONDS" -ge "$deadline" ]; then break; fi
    sleep 0.02
  done
  t2=${EPOCHREALTIME/,/.}
  local node1 redis1 fsyncs=0
  # shellcheck disable=SC2086
  node1=$(ticks $watched); redis1=$(ticks $rpid)
  fsync_stop
  fsyncs=$(fsync_count)
  # Exactly once: a late duplicate would still be on its way, so wait for
  # the relay's queue to settle a moment before counting the files.
  sleep 1
  kill "$sinkpid" 2>/dev/null; wait "$sinkpid" 2>/dev/null || true
  local files ids unique check
  files=$(find "$dump" -type f | wc -l)
  if [ "$target" = ceiling ]; then
    ids=$files; unique=$files
  else
    find "$dump" -type f -print0 | xargs -0 -r grep -m1 -ohE ' id [^ ;]+' > "$work/ids" || true
    ids=$(wc -l < "$work/ids"); unique=$(sort -u "$work/ids" | wc -l)
  fi
  if [ "$rc" = 0 ] && [ "$files" = "$n" ] && [ "$ids" = "$n" ] && [ "$unique" = "$n" ]; then check=ok
  else
    check="FAILED(source_rc=$rc,files=$files,ids=$ids,unique=$unique)"
    # Kept for the post-mortem: the node's log, and the sink's files of
    # every queue id that came more than once.
    local kept; kept=$(mktemp -d /tmp/mxr-bench-failed.XXXXXX)
    [ -f "$work/$target.log" ] && cp "$work/$target.log" "$kept/"
    sort "$work/ids" | uniq -d | while read -r _ id; do
      grep -rlF " id $id" "$dump" | xargs -r cp -t "$kept/" || true
    done
    check="$check kept=$kept"
  fi
  rm -rf "$dump"
  awk -v t="$target" -v s="$size" -v c="$sess" -v n="$n" -v a="$t0" -v b="$t1" -v e="$t2" -v hz="$HZ" \
      -v nd=$((node1 - node0)) -v rd=$((redis1 - redis0)) -v f="$fsyncs" -v ck="$check" 'BEGIN{
    printf "target=%s size=%d sessions=%d msgs=%d inject_rate=%.0f e2e_rate=%.0f node_cpu_us=%.0f redis_cpu_us=%.0f fsyncs_per_msg=%.3f check=%s\n",
      t, s, c, n, n/(b-a), n/(e-a), 1e6*nd/hz/n, 1e6*rd/hz/n, f/n, ck }' | tee -a "$raw"
}

for cell in $CELLS; do
  IFS=: read -r size sess n <<<"$cell"
  for r in $(seq 1 "$REPS"); do
    for t in $TARGETS; do run_one "$t" "$size" "$sess" "$n"; done
  done
done

# ---- medians ----------------------------------------------------------------------------
echo
echo "| target | size | sessions | msgs/s delivered (median) | of ceiling | ms/msg over ceiling | node CPU µs/msg | Redis CPU µs/msg | fsyncs/msg | runs (check ok) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
awk '
  function kv(k,   i, a) { for (i = 1; i <= NF; i++) { split($i, a, "="); if (a[1] == k) return a[2] } return "" }
  function med(s,   a, n, i, j, t) { n = split(s, a, " "); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n ? (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : 0 }
  { key = kv("target") "|" kv("size") "|" kv("sessions"); if (!(key in seen)) { seen[key] = 1; order[++nk] = key }
    runs[key]++; if (kv("check") == "ok") ok[key]++
    rate[key] = rate[key] " " kv("e2e_rate"); node[key] = node[key] " " kv("node_cpu_us")
    redis[key] = redis[key] " " kv("redis_cpu_us"); fs[key] = fs[key] " " kv("fsyncs_per_msg") }
  END { for (k = 1; k <= nk; k++) { key = order[k]; split(key, p, "|"); r = med(rate[key])
          c = med(rate["ceiling|" p[2] "|" p[3]])
          share = (c > 0 ? sprintf("%.0f %%", 100 * r / c) : "-"); over = (c > 0 && r > 0 ? sprintf("%.2f", 1000 / r - 1000 / c) : "-")
          if (p[1] == "ceiling") { share = "-"; over = "-" }
          printf "| %s | %s | %s | **%.0f** | %s | %s | %.0f | %.0f | %.3f | %d (%d) |\n", p[1], p[2], p[3], r, share, over,
            med(node[key]), med(redis[key]), med(fs[key]), runs[key], ok[key] } }' "$raw"
if grep -q "check=FAILED" "$raw"; then echo "some runs FAILED the exactly-once check"; exit 1; fi
