#!/usr/bin/env bash
# Receive benchmark (release build): acceptance rate with Postfix's
# smtp-source, and peak RSS while receiving one 200 MB message.
# Needs what scripts/test.sh installs/starts (MariaDB, Redis on loopback).
# Usage: scripts/bench.sh [MESSAGES]      Prints figures; asserts nothing.
set -euo pipefail
# shellcheck source=bench-lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/bench-lib.sh"
n=${1:-10000}
release_binary
bench_init bench
port=$(free_port); admin=$(free_port)
{ node_config_base bench "$port" "$admin"; echo 'message_size_limit = 524288000'; } > "$work/mxrelay.toml"
start_node "$work/mxrelay.toml" "$port"
add_domain dest.example 127.0.0.1 2526 0

rate() { # count size sessions
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -s "$3" -m "$1" -l "$2" -M bench.example -f sender@src.example -t rcpt@dest.example "127.0.0.1:$port"
  t1=$(date +%s.%N)
  awk -v n="$1" -v s="$2" -v c="$3" -v a="$t0" -v b="$t1" \
    'BEGIN{printf "accept msgs=%d size=%d sessions=%d seconds=%.2f rate=%.0f msg/s\n", n, s, c, b-a, n/(b-a)}'
}
rate "$n" 1024 20
rate "$((n / 5))" 102400 20
echo "queued entries in Redis: $(queued_in_redis) (expected $((n + n / 5)))"
echo "RSS after load: $(awk '/VmRSS/{print int($2/1024)}' "/proc/$node_pid/status") MiB"

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
echo "peak RSS (whole run, incl. the 200 MB message): $(peak_rss_mib "$node_pid") MiB"
