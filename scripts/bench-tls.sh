#!/usr/bin/env bash
# TLS benchmark (release build, one node, delivery off: acceptance only):
#  1. TLS handshakes/s on the implicit-TLS listener (openssl s_time -new),
#     TLS 1.3 and TLS 1.2;
#  2. 1 KiB messages/s accepted (250 after DATA) with 20 concurrent sessions
#     of one Python smtplib client: plain and STARTTLS, each with many
#     messages per session (connection reuse) and with one message per
#     session (a new connection, and for STARTTLS a new handshake, per
#     message);
#  3. peak RSS of the node (VmHWM) per TLS run.
# Self-signed P-256 certificate made here; MariaDB and Redis on loopback as
# scripts/test.sh leaves them. Honours CARGO_TARGET_DIR.
# Usage: scripts/bench-tls.sh [MESSAGES] [SESSIONS] [S_TIME_SECONDS]
#        Prints figures; asserts nothing.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
n=${1:-5000}; sessions=${2:-20}; stime=${3:-10}
release_binary
bench_init btls
port=$(free_port); tport=$(free_port); admin=$(free_port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null

# The per-IP connection limit is raised since every client is 127.0.0.1.
{ node_config_base bench-tls "$port" "$admin"
  echo 'smtp.max_connections_per_ip = 1000'
  cat <<TOML
[tls]
cert = "$work/cert.pem"
key = "$work/key.pem"
security_level = "may"
implicit_listen = "127.0.0.1:$tport"
TOML
} > "$work/mxrelay.toml"
start_node "$work/mxrelay.toml" "$port" "$tport"
add_domain dest.example 127.0.0.1 2526 0

echo "machine: $(nproc) cores, $(uname -r); $(openssl version | cut -d' ' -f1-2); Python $(python3 -c 'import platform; print(platform.python_version())')"
handshakes() { # prints: ok failed
  python3 - "$admin" <<'PY'
import sys, urllib.request
m = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1]).read().decode()
v = {r: 0 for r in ("ok", "failed")}
for l in m.splitlines():
    if l.startswith("mxrelay_smtp_tls_handshakes_total{"):
        for r in v:
            if 'result="%s"' % r in l:
                v[r] = int(float(l.split()[-1]))
print(v["ok"], v["failed"])
PY
}
handshakes_since() { # BEFORE (from handshakes): prints "ok=N failed=M" since then
  local ok0 bad0 ok1 bad1 now
  now=$(handshakes)
  read -r ok0 bad0 <<<"$1"; read -r ok1 bad1 <<<"$now"
  echo "ok=$((ok1 - ok0)) failed=$((bad1 - bad0))"
}
# Peak RSS per run: VmHWM is reset through clear_refs where the kernel allows it.
reset_peak() { echo 5 > "/proc/$node_pid/clear_refs" 2>/dev/null || echo "(could not reset VmHWM: peak is since start)"; }
maxpeak=0
cpu() { cpu_seconds "$node_pid"; }
cpuper() { # label before after count: node CPU seconds and per item
  awk -v l="$1" -v a="$2" -v b="$3" -v c="$4" \
    'BEGIN{printf "  node CPU %.2fs (%.0f us per %s)\n", b-a, c ? (b-a)*1e6/c : 0, l}'
}
peak() {
  local m; m=$(peak_rss_mib "$node_pid")
  [ "$m" -gt "$maxpeak" ] && maxpeak=$m
  echo "  node peak RSS during this run: $m MiB"
}

s_time() { # label extra-openssl-args...
  local label=$1; shift
  local before counted t0 t1 out
  before=$(handshakes); reset_peak; c0=$(cpu)
  t0=$(date +%s.%N)
  out=$(openssl s_time -connect "127.0.0.1:$tport" -new -time "$stime" "$@" 2>&1 || true)
  t1=$(date +%s.%N)
  c1=$(cpu); counted=$(handshakes_since "$before")
  echo "$out" | grep -E 'connections in|rror' | head -3 | sed 's/^/  s_time: /'
  local conns
  conns=$(echo "$out" | grep -oE '^[0-9]+ connections in [0-9.]+ real' | head -1 | cut -d' ' -f1 || true)
  awk -v l="$label" -v c="${conns:-0}" -v a="$t0" -v b="$t1" -v h="$counted" \
    'BEGIN{printf "%s handshakes (s_time -new): %d in %.2fs = %.0f/s; node counted %s\n", l, c, b-a, c/(b-a), h}'
  # s_time closes right after its Finished without reading the server's
  # TLS 1.3 session tickets, so the node often reads a reset and counts the
  # handshake as failed: its share of the work (key exchange, signature) was
  # done all the same. CPU is divided by s_time's count.
  cpuper handshake "$c0" "$c1" "${conns:-0}"
  peak
}
s_time "TLS 1.3" -tls1_3
if openssl s_time -help 2>&1 | grep -q -- '-tls1_2'; then
  s_time "TLS 1.2" -tls1_2
else
  echo "TLS 1.2: s_time has no -tls1_2 here, skipped"
fi

cat > "$work/client.py" <<'PY'
# Usage: client.py PORT MODE MESSAGES SESSIONS; MODE = plain|starttls + -reuse|-each
import collections, os, smtplib, ssl, sys, threading, time
port, mode, n, sessions = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tls, reuse = mode.startswith("starttls"), mode.endswith("reuse")
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # a benchmark: the certificate is self-signed
head = b"From: <sender@src.example>\r\nTo: <rcpt@dest.example>\r\nSubject: bench\r\n\r\n"
line = b"0123456789" * 7 + b"\r\n"
body = (line * 20)[: 1024 - len(head) - 2] + b"\r\n"
msg = head + body
assert len(msg) == 1024
ok = 0
errors = collections.Counter()
cipher = []
lock = threading.Lock()
start = threading.Barrier(sessions + 1)

def session():
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example", timeout=60)
    s.ehlo()
    if tls:
        code, resp = s.starttls(context=ctx)
        s.ehlo()
        if not cipher:
            cipher.append("%s %s" % (s.sock.version(), s.sock.cipher()[0]))
    return s

def send(s):
    global ok
    s.mail("sender@src.example")
    code, resp = s.rcpt("rcpt@dest.example")
    if code != 250:
        raise smtplib.SMTPResponseException(code, resp)
    code, resp = s.data(msg)
    with lock:
        if code == 250:
            ok += 1
        else:
            errors["DATA %d %s" % (code, resp[:40])] += 1

def worker(count):
    start.wait()
    s, left = None, count
    while left:
        try:
            if s is None:
                s = session()
            send(s)
            if not reuse:
                s.quit()
                s = None
        except Exception as e:
            with lock:
                errors["%s: %s" % (type(e).__name__, str(e)[:60])] += 1
            try:
                s and s.close()
            except Exception:
                pass
            s = None
        left -= 1
    if s is not None:
        s.quit()

threads = [threading.Thread(target=worker, args=(n // sessions + (i < n % sessions),)) for i in range(sessions)]
for t in threads:
    t.start()
start.wait()
t0 = time.perf_counter()
for t in threads:
    t.join()
dt = time.perf_counter() - t0
ct = sum(os.times()[:2])
err = sum(errors.values())
print("%-15s %5d x 1 KiB, %d sessions: %d accepted in %.2fs = %.0f msg/s, %d errors%s"
      % (mode, n, sessions, ok, dt, ok / dt, err, " (" + cipher[0] + ")" if cipher else ""))
print("  client CPU %.2fs (this Python process)" % ct)
for e, c in errors.most_common(5):
    print("  error x%d: %s" % (c, e))
PY
accept() { # mode
  local before counted
  before=$(handshakes); reset_peak; c0=$(cpu)
  python3 "$work/client.py" "$port" "$1" "$n" "$sessions"
  c1=$(cpu); counted=$(handshakes_since "$before")
  echo "  node counted TLS handshakes $counted"
  cpuper message "$c0" "$c1" "$n"
  peak
}
accept plain-reuse
# The same plain load from a C client (Postfix's smtp-source), for the
# Python client's share: -d reuses each connection, without it one message
# per connection (its default, as in bench.sh).
srcref() { # label smtp-source-flags...
  local label=$1 t0 t1 c0 c1; shift
  t0=$(date +%s.%N); c0=$(cpu)
  smtp-source "$@" -s "$sessions" -m "$n" -l 1024 -M bench.example -f sender@src.example -t rcpt@dest.example "127.0.0.1:$port"
  t1=$(date +%s.%N); c1=$(cpu)
  awk -v l="$label" -v n="$n" -v c="$sessions" -v a="$t0" -v b="$t1" \
    'BEGIN{printf "%-15s %5d x 1 KiB, %d sessions (smtp-source, reference): %.2fs = %.0f msg/s\n", l, n, c, b-a, n/(b-a)}'
  cpuper message "$c0" "$c1" "$n"
}
if command -v smtp-source >/dev/null; then
  srcref plain-reuse -d
  srcref plain-each
fi
accept starttls-reuse
accept plain-each
accept starttls-each
echo "queued entries in Redis: $(queued_in_redis) (the runs above sent $n each)"
echo "node peak RSS, highest of the runs above: $maxpeak MiB"
log_summary "$node_log"
