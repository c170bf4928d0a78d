#!/usr/bin/env bash
# Receive benchmark (release build): acceptance rate with Postfix's
# smtp-source, and peak RSS while receiving one 200 MB message.
# Needs what scripts/test.sh installs/starts (MariaDB, Redis on loopback).
# Usage: scripts/bench.sh [MESSAGES]      Prints figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
cargo build --release -q
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/release/mxrelay
work=$(mktemp -d)
db="mxr_bench_$$"
prefix="mxrbench$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mysql -h 127.0.0.1 -u root -e "CREATE DATABASE $db"
cleanup() {
  kill "$pid" 2>/dev/null || true
  mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $db" || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli del >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# As the Postfix reference bench: no DNS checks, 127.0.0.1 is not in mynetworks.
cat > "$work/mxrelay.toml" <<TOML
node_id = "bench"
mynetworks = ["127.0.0.255/32"]
message_size_limit = 524288000
reject_unknown_sender_domain = false
reject_unknown_recipient_domain = false
log.level = "warn"
[smtp]
listen = "127.0.0.1:$port"
peername_lookup = false
[admin]
listen = "127.0.0.1:$admin"
[domains]
url = "mysql://root@127.0.0.1:3306/$db"
[queue]
url = "redis://127.0.0.1:6379/"
prefix = "$prefix"
[delivery]
enabled = false
TOML
$bin serve --config "$work/mxrelay.toml" 2>"$work/log" &
pid=$!
for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
mysql -h 127.0.0.1 -u root "$db" -e "INSERT INTO domains VALUES ('dest.example','127.0.0.1',2526,'0')"
kill -HUP $pid; sleep 0.5

rate() { # count size sessions
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -s "$3" -m "$1" -l "$2" -M bench.example -f sender@src.example -t rcpt@dest.example 127.0.0.1:$port
  t1=$(date +%s.%N)
  awk -v n="$1" -v s="$2" -v c="$3" -v a="$t0" -v b="$t1" \
    'BEGIN{printf "accept msgs=%d size=%d sessions=%d seconds=%.2f rate=%.0f msg/s\n", n, s, c, b-a, n/(b-a)}'
}
rate "$n" 1024 20
rate "$((n / 5))" 102400 20
queued=$(for s in 0 1 2 3; do redis-cli xlen "$prefix:{q$s}:ready"; done | awk '{t+=$1} END{print t}')
echo "queued entries in Redis: $queued (expected $((n + n / 5)))"
echo "RSS after load: $(awk '/VmRSS/{print int($2/1024)}' /proc/$pid/status) MiB"

python3 - "$port" <<'PY'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
def reply():
    while True:
        l = f.readline()
        if l[3:4] != b"-":
            return l
reply(); s.sendall(b"EHLO bench.example\r\n"); reply()
for c in (b"MAIL FROM:<sender@src.example> SIZE=210000000\r\n", b"RCPT TO:<big@dest.example>\r\n", b"DATA\r\n"):
    s.sendall(c); reply()
block = (b"0123456789" * 10 + b"\r\n") * 10000
t0 = time.time()
s.sendall(b"Subject: big\r\n\r\n")
for _ in range(200):
    s.sendall(block)
s.sendall(b".\r\n")
r = reply()
print("200 MB message: %.2fs, %s" % (time.time() - t0, r.decode().strip()[:40]))
PY
echo "peak RSS (whole run, incl. the 200 MB message): $(awk '/VmHWM/{print int($2/1024)}' /proc/$pid/status) MiB"
