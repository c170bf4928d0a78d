#!/usr/bin/env bash
# Scanning benchmark (release build, one node, delivery off: acceptance
# only): messages/s accepted (250 after DATA) by Postfix's smtp-source, 100
# KiB messages over 20 concurrent sessions (one message per connection, as
# bench.sh) to a domain in the `domains` table, in three cases:
#   off     enable_virus_spam_scan = '0' (the node has both scanners
#           configured, the domain does not want them);
#   clamd   '1', scan.clamd only;
#   both    '1', scan.clamd and scan.rspamd.
# For each: the node's CPU time per message and peak RSS (VmHWM; a fresh
# node per case), the scanners' CPU, and the node's mxrelay_scan_total and
# mxrelay_scan_errors_total from /metrics (errors should be 0).
# Before the cases, rspamd's own latency (no node involved): the first scan
# of its fresh worker and SCANS more of a short clean message, one at a
# time, as tests/it/scanners_harness.rs sends them (RSPAMD_SCANS, default 20).
#
# The scanners are private, on ephemeral loopback ports, set up as the test
# harness does (tests/it/support/scanners.rs): clamd with a signature database
# built here (the EICAR body signature and a sigtool hash signature; no
# freshclam, nothing downloaded); rspamd with the packaged configuration
# minus Bayes, one normal worker, every network/DNS/Redis module disabled, a
# private dnsmasq answering NXDOMAIN to everything as its only resolver, and
# the Hyperscan cache the tests share (CARGO_TARGET_DIR/tmp/rspamd-hs-cache:
# about 10 s to compile on a cold cache, then well under a second).
# MariaDB and Redis on loopback as scripts/test.sh leaves them; needs
# clamav-daemon, clamav, rspamd, dnsmasq and postfix (smtp-source).
# RSPAMD_WORKERS (default 1, as the tests): the normal worker's count.
# Binary: $MXRELAY_BIN, else `cargo build --release` (honours CARGO_TARGET_DIR).
# Usage: scripts/bench-scan.sh [MESSAGES] [SESSIONS]
#        Prints figures; asserts nothing.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
n=${1:-2000}; sessions=${2:-20}; size=102400; warm=40
workers=${RSPAMD_WORKERS:-1}
target=${CARGO_TARGET_DIR:-target}
release_binary
bench_init bscan
port=$(free_port); admin=$(free_port); cport=$(free_port); rport=$(free_port); dport=$(free_port)
# At exit, after the scanners below are killed: let them go before the work
# dir is removed.
bench_on_exit 'wait 2>/dev/null'

# --- clamd -------------------------------------------------------------------
c=$work/clamd
mkdir -p "$c/db" "$c/tmp"
# shellcheck disable=SC2016 # the EICAR string, as it is
eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
printf 'Eicar-Test-Signature:0:*:%s\n' "$(printf '%s' "$eicar" | od -An -tx1 -v | tr -d ' \n')" > "$c/db/mxrelay.ndb"
printf 'mxrelay scanner test file: harmless, known to the test clamd by its MD5 hash only.\n' > "$c/test-file"
(cd "$c" && sigtool --md5 test-file) | awk -F: '{print $1 ":" $2 ":Mxrelay-Test-File"}' > "$c/db/mxrelay.hdb"
cat > "$c/clamd.conf" <<CONF
TCPSocket $cport
TCPAddr 127.0.0.1
Foreground yes
DatabaseDirectory $c/db
LogFile $c/clamd.log
LogTime yes
PidFile $c/clamd.pid
TemporaryDirectory $c/tmp
SelfCheck 0
Bytecode no
CONF
clamd -c "$c/clamd.conf" </dev/null >/dev/null 2>"$c/clamd.stderr" &
cpid=$!
bench_on_exit "kill -KILL $cpid 2>/dev/null"

# --- dnsmasq: NXDOMAIN for every name (rspamd's only resolver) -----------------
mkdir -p "$work/dns"
/usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address=127.0.0.1 --interface=lo --user=root --port="$dport" \
  --pid-file="$work/dns/pid" --log-facility="$work/dns/log" --address=/#/ >/dev/null 2>&1 &
bench_on_exit "kill $! 2>/dev/null"
for _ in $(seq 1 100); do [ -e "$work/dns/pid" ] && break; sleep 0.1; done

# --- rspamd --------------------------------------------------------------------
r=$work/rspamd
mkdir -p "$r/local.d" "$r/override.d" "$r/db" "$r/run"
hs=$target/tmp/rspamd-hs-cache
mkdir -p "$hs"
hs=$(cd "$hs" && pwd)
cat > "$r/rspamd.conf" <<CONF
# /etc/rspamd/common.conf without statistic.conf (Bayes needs Redis)
lua = "\$RULESDIR/rspamd.lua";
.include "\$CONFDIR/metrics.conf"
.include "\$CONFDIR/actions.conf"
.include "\$CONFDIR/groups.conf"
.include "\$CONFDIR/composites.conf"
.include "\$CONFDIR/modules.conf"
.include "\$CONFDIR/settings.conf"
modules {
  path = "\${PLUGINSDIR}";
  fallback_path = "\${SHAREDIR}/lua";
}
options {
  pidfile = "\$RUNDIR/rspamd.pid";
  .include "\$CONFDIR/options.inc"
  .include(try=true; priority=1,duplicate=merge) "\$LOCAL_CONFDIR/local.d/options.inc"
}
logging {
  type = "file";
  filename = "\$LOGDIR/rspamd.log";
  level = "info";
}
worker "normal" {
  bind_socket = "127.0.0.1:$rport";
  count = $workers;
  mime = true;
}
CONF
cat > "$r/local.d/options.inc" <<CONF
dns {
  nameserver = ["127.0.0.1:$dport"];
  timeout = 1s;
  retransmits = 1;
}
filters = "chartable,regexp";
hs_cache_dir = "$hs";
tempdir = "$r/run";
CONF
for m in arc asn bayes_expiry bimi clickhouse dcc dkim dkim_signing dmarc elastic emails \
  external_services fuzzy_check greylist hfilter history_redis metadata_exporter mid multimap \
  mx_check neural p0f phishing ratelimit rbl replies reputation rspamd_update spamassassin spf \
  surbl url_redirector whitelist; do
  echo "enabled = false;" > "$r/local.d/$m.conf"
done
cat > "$r/local.d/headers_group.conf" <<'CONF'
symbols {
  "RDNS_NONE" { weight = 0.0; }
  "RDNS_DNSFAIL" { weight = 0.0; }
}
CONF
# shellcheck disable=SC2016 # an rspamd variable
echo 'file = ["${CONFDIR}/maps.d/mime_types.inc"];' > "$r/override.d/mime_types.conf"
# The cache grows by some 0.2 MB a start: emptied past 512 MiB, as the tests
# do. On a cold cache the start holds the tests' lock (flock, as Rust's
# File::lock) so that a concurrent test waits instead of compiling too.
if [ "$(du -sb "$hs" | cut -f1)" -gt $((512 << 20)) ]; then
  flock "$hs/lock" find "$hs" -maxdepth 1 -type f ! -name lock -delete
fi
coldlock=
if [ ! -e "$hs/warm" ]; then exec {coldlock}>"$hs/lock"; flock "$coldlock"; fi
# setsid: its own process group (its pid is the group's), killed as a whole.
setsid rspamd -f -i -c "$r/rspamd.conf" --var=LOCAL_CONFDIR="$r" --var=DBDIR="$r/db" \
  --var=RUNDIR="$r/run" --var=LOGDIR="$r" </dev/null >/dev/null 2>"$r/rspamd.stderr" &
rpid=$!
# rspamd runs in its own process group (main process, workers, hs_helper).
bench_on_exit "kill -KILL -- -$rpid 2>/dev/null"

# --- readiness -----------------------------------------------------------------
t0=$(date +%s.%N)
cat > "$work/probe.py" <<'PY'
# probe.py clamd PORT | rspamd PORT: exit 0 when it answers PONG / pong.
import socket, sys
kind, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "clamd":
        s.sendall(b"zPING\0")
    else:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
        if kind == "clamd" and b"\0" in data:
            break
    ok = data.rstrip(b"\0\n") == b"PONG" if kind == "clamd" else (b" 200 " in data.split(b"\r\n")[0] and data.rstrip().endswith(b"pong"))
    sys.exit(0 if ok else 1)
except OSError:
    sys.exit(1)
PY
ready() { # name pid port seconds log...
  local name=$1 p=$2 port=$3 secs=$4; shift 4
  for _ in $(seq 1 $((secs * 10))); do
    python3 "$work/probe.py" "$name" "$port" && return 0
    if ! kill -0 "$p" 2>/dev/null; then echo "$name exited before it was ready:"; tail -n 20 "$@"; exit 1; fi
    sleep 0.1
  done
  echo "$name not ready after ${secs}s:"; tail -n 20 "$@"; exit 1
}
ready clamd "$cpid" "$cport" 60 "$c/clamd.stderr" "$c/clamd.log"
t1=$(date +%s.%N)
ready rspamd "$rpid" "$rport" 180 "$r/rspamd.stderr" "$r/rspamd.log"
t2=$(date +%s.%N)
if [ -n "$coldlock" ]; then touch "$hs/warm"; exec {coldlock}>&-; fi
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN{printf "scanners ready: clamd %.1fs, rspamd %.1fs\n", b-a, c-a}'

# --- rspamd scan latency -------------------------------------------------------
# A short clean message with the envelope a node sends, POSTed to /checkv2
# (a new connection each, as the node's scans): curl's time_total, which has
# no process start in it. The first is the worker's first scan ever.
printf 'From: sender@sender.example\r\nTo: rcpt@friet.pan\r\nSubject: clean\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <clean.1@sender.example>\r\n\r\nHello,\r\n\r\nthe meeting is at ten tomorrow, in the small room.\r\n\r\nSee you there.\r\n' > "$work/clean.eml"
scan_once() { # prints "HTTP-status seconds"
  curl -s -o /dev/null -w '%{http_code} %{time_total}\n' --data-binary @"$work/clean.eml" \
    -H 'IP: 127.0.0.1' -H 'Helo: client.example' -H 'From: sender@sender.example' -H 'Rcpt: rcpt@friet.pan' \
    "http://127.0.0.1:$rport/checkv2"
}
first=$(scan_once)
for _ in $(seq 1 "${RSPAMD_SCANS:-20}"); do scan_once; done | sort -k2 -n | awk -v first="$first" '
  BEGIN { split(first, f, " "); if (f[1] != 200) bad++ }
  { if ($1 != 200) bad++; t[NR] = $2 }
  END {
    printf "rspamd scan latency (short clean message): first %.1f ms; then over %d: min %.1f ms, median %.1f ms, max %.1f ms", f[2] * 1000, NR, t[1] * 1000, t[int((NR + 1) / 2)] * 1000, t[NR] * 1000
    if (bad) printf " (%d answers not 200)", bad
    printf "\n" }'

echo "machine: $(nproc) cores, $(uname -r); $(clamd --version | cut -d/ -f1); $(rspamd --version | head -1 | sed 's/ daemon version//')"
echo "rspamd normal workers: $workers; clamd with the default MaxThreads (10); scan.concurrency default (16)"
echo "load: $n x $((size / 1024)) KiB, $sessions sessions (smtp-source, one message per connection), after $warm warm-up messages per case"

# --- CPU accounting ------------------------------------------------------------
# rspamd: every process of its group (main, worker, hs_helper), with what
# the main process has reaped.
rcpu() {
  python3 - "$rpid" "$clk_tck" <<'PY'
import glob, sys
group, tck, total = sys.argv[1], int(sys.argv[2]), 0
for path in glob.glob("/proc/[0-9]*/stat"):
    try:
        f = open(path).read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if f[2] == group:  # after "(comm)": state ppid pgrp ... utime(11) stime cutime cstime
        total += sum(int(x) for x in f[11:15])
print("%.2f" % (total / tck))
PY
}
metrics() { # prints "name{labels} value" for the scan counters
  curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^mxrelay_scan_(total|errors_total)\{' || true
}

# --- one case ------------------------------------------------------------------
results=()
run_case() { # label flag clamd-addr rspamd-url
  local label=$1 flag=$2 ca=$3 ru=$4
  local d=$work/node-$label
  mkdir -p "$d"
  # A fresh node per case; the scan buffer in data_dir/scan.
  { node_config_base --data-dir "$d/data" bench-scan "$port" "$admin"
    echo 'smtp.max_connections_per_ip = 1000'
    printf '[scan]\nclamd = "%s"\nrspamd = "%s"\n' "$ca" "$ru"
  } > "$d/mxrelay.toml"
  start_node "$d/mxrelay.toml" "$port" "$admin"
  add_domain dest.example 127.0.0.1 2526 "$flag"
  local src=(-s "$sessions" -l "$size" -M bench.example -f sender@src.example -t rcpt@dest.example "127.0.0.1:$port")
  smtp-source -m "$warm" "${src[@]}"
  local q0 m0 n0 k0 r0 a b n1 k1 r1 q1 hwm
  q0=$(queued_in_redis); m0=$(metrics)
  n0=$(cpu_seconds "$node_pid"); k0=$(cpu_seconds "$cpid"); r0=$(rcpu)
  a=$(date +%s.%N)
  smtp-source -m "$n" "${src[@]}"
  b=$(date +%s.%N)
  n1=$(cpu_seconds "$node_pid"); k1=$(cpu_seconds "$cpid"); r1=$(rcpu)
  q1=$(queued_in_redis)
  hwm=$(peak_rss_mib "$node_pid")
  echo "== $label: enable_virus_spam_scan='$flag' scan.clamd=\"$ca\" scan.rspamd=\"$ru\""
  local line
  line=$(awk -v l="$label" -v n="$n" -v a="$a" -v b="$b" -v nc="$n0" -v nd="$n1" -v kc="$k0" -v kd="$k1" \
    -v rc="$r0" -v rd="$r1" -v h="$hwm" -v q=$((q1 - q0)) 'BEGIN{
      t = b - a
      printf "%-6s %5d msgs in %6.2fs = %5.0f msgs/s | node CPU %5.2fs (%4.0f us/msg) peak RSS %3d MiB | clamd CPU %5.2fs (%4.0f us/msg) | rspamd CPU %5.2fs (%4.0f us/msg) | queued %d",
        l, n, t, n / t, nd - nc, (nd - nc) * 1e6 / n, h, kd - kc, (kd - kc) * 1e6 / n, rd - rc, (rd - rc) * 1e6 / n, q }')
  echo "$line"
  results+=("$line")
  # Scan counters over the timed run (warm-up subtracted) and in total.
  awk -v before="$m0" 'BEGIN{
      k = split(before, l, "\n"); for (i = 1; i <= k; i++) { split(l[i], f, " "); if (f[1] != "") was[f[1]] = f[2] }
    }
    { printf "  %s %d (timed run %d)\n", $1, $2, $2 - was[$1] }' <<<"$(metrics)"
  [ -z "$(metrics)" ] && echo "  (no mxrelay_scan_* counters: nothing scanned)"
  # Mean time per scan (from the node's histogram, warm-up included):
  # the scanner's work plus waiting for it, as the node sees it.
  curl -s "http://127.0.0.1:$admin/metrics" | awk '
    /^mxrelay_scan_duration_seconds_(sum|count)\{/ {
      match($1, /scanner="[^"]*"/); sc = substr($1, RSTART + 9, RLENGTH - 10)
      if ($1 ~ /_sum/) sum[sc] = $2; else cnt[sc] = $2 }
    END { for (sc in cnt) if (cnt[sc] > 0) printf "  mean scan time %s: %.1f ms over %d scans\n", sc, sum[sc] * 1000 / cnt[sc], cnt[sc] }'
  local errs
  errs=$(metrics | awk '/^mxrelay_scan_errors_total/{t+=$2} END{print t+0}')
  echo "  scan errors: $errs; queued entries in Redis for the timed run: $((q1 - q0)) of $n"
  log_summary "$node_log" "  "
  stop_node
}
run_case off 0 "127.0.0.1:$cport" "http://127.0.0.1:$rport"
run_case clamd 1 "127.0.0.1:$cport" ""
run_case both 1 "127.0.0.1:$cport" "http://127.0.0.1:$rport"
echo "== summary"
printf '%s\n' "${results[@]}"
