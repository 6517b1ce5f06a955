#!/bin/bash
# Build the Debian packages, lint them, install them on this Debian 12
# machine (dependencies from Debian only), run the installed daemons exactly
# as their systemd units' ExecStart= lines do (systemd is not PID 1 here),
# add a user with the installed pixelated-ctl, log in through the installed
# proxy over HTTPS (loopback only), then purge and check that the state and
# the plugin cache entries are gone.
#
# Runs as root. Idempotent; every step is bounded in time; the EXIT trap
# stops what it started and purges what it installed. Not (yet) called by
# .ci/run. Usage: bash .ci/debian.sh [--keep-build]   (build dir: $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=$PWD
# Debian's tools with Debian's python3, never a pyenv/venv one.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
unset PYTHONPATH VIRTUAL_ENV PYENV_VERSION
OUT=${OUT:-/tmp/pixelated-debian}
PORT=443                      # the proxy binds 127.0.0.1:443 with CAP_NET_BIND_SERVICE
USERNAME=ci-debian
PACKAGES="pixelated-dispatcher pixelated-dispatcher-manager pixelated-dispatcher-proxy python3-pixelated-dispatcher"
KEEP_BUILD=${1:-}
PIDS=()
CREATED_SNAKEOIL=
ADDED_PACKAGES=""   # what installing the .debs added (ours and their dependencies)
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do timeout 15 tail --pid="$pid" -f /dev/null; kill -KILL "$pid" 2>/dev/null; done
    # Agents of the process provider run under uids 200000-299999.
    for pid in $(ps -eo pid=,uid= | awk '$2 >= 200000 && $2 <= 299999 {print $1}'); do kill -KILL "$pid"; done
    if [ -n "$ADDED_PACKAGES" ]; then
        timeout 300 dpkg --purge $ADDED_PACKAGES >/dev/null 2>&1
    fi
    if [ -n "$CREATED_SNAKEOIL" ]; then
        rm -f /etc/ssl/certs/ssl-cert-snakeoil.pem /etc/ssl/private/ssl-cert-snakeoil.key
    fi
    [ "$rc" = 0 ] && [ "$KEEP_BUILD" != --keep-build ] && rm -rf "$OUT/src"
    echo "== [$(( $(date +%s) - T0 ))s] done, exit status $rc"
    exit $rc
}
trap cleanup EXIT

step "build tools"
timeout 300 apt-get update -qq
timeout 600 apt-get install -y -qq --no-install-recommends \
    build-essential devscripts debhelper dh-python pybuild-plugin-pyproject python3-all \
    python3-setuptools python3-wheel lintian systemd curl ssl-cert >/dev/null

step "build (dpkg-buildpackage -us -uc -b) from git HEAD plus the working debian/"
rm -rf "$OUT" && mkdir -p "$OUT/src"
git -C "$TREE" archive HEAD | tar -x -C "$OUT/src"
rm -rf "$OUT/src/debian" && cp -a "$TREE/debian" "$OUT/src/debian"
(cd "$OUT/src" && timeout 600 dpkg-buildpackage -us -uc -b >"$OUT/build.log" 2>&1) \
    || { tail -40 "$OUT/build.log"; fail "dpkg-buildpackage"; }
ls "$OUT"/*.deb

step "lintian (errors and warnings fail; overrides carry their reasons)"
timeout 300 lintian --fail-on error,warning --info "$OUT"/*.changes || fail "lintian"

step "no dropin.cache and no twisted/plugins/__init__.py in the packages"
for deb in "$OUT"/*.deb; do
    if dpkg-deb -c "$deb" | grep -E 'dropin\.cache|twisted/(plugins/)?__init__\.py'; then fail "$deb"; fi
done

step "install the .debs (dependencies from Debian)"
dpkg-query -W -f='${Package} ${Status}\n' | awk '/ installed$/ {print $1}' | sort >"$OUT/before"
timeout 600 apt-get install -y -qq "$OUT"/*.deb >/dev/null
ADDED_PACKAGES=$(dpkg-query -W -f='${Package} ${Status}\n' | awk '/ installed$/ {print $1}' | sort \
    | comm -13 "$OUT/before" - | paste -sd' ')
echo "   added: $ADDED_PACKAGES"
PLUGINS=/usr/lib/python3/dist-packages/twisted/plugins
HELP=$(twistd3 --help)
grep -q pixelated-manager <<<"$HELP" || fail "twistd3 --help does not list pixelated-manager"
grep -q pixelated-proxy <<<"$HELP" || fail "twistd3 --help does not list pixelated-proxy"
grep -q pixelated_dispatcher_plugins "$PLUGINS/dropin.cache" \
    || fail "the twisted-plugins-cache trigger did not rebuild dropin.cache"
getent passwd pixelated-proxy >/dev/null || fail "no user pixelated-proxy"
id -nG pixelated-proxy | grep -qw ssl-cert || fail "pixelated-proxy is not in ssl-cert"
getent group pixelated-admin >/dev/null || fail "no group pixelated-admin"
[ "$(stat -c %a /var/lib/pixelated)" = 711 ] || fail "/var/lib/pixelated is not 0711"
man -w pixelated-ctl pixelated-manager pixelated-proxy >/dev/null

step "systemd-analyze verify and security (exposure)"
timeout 60 systemd-analyze verify /lib/systemd/system/pixelated-manager.service \
    /lib/systemd/system/pixelated-proxy.service
for unit in manager proxy; do
    timeout 60 systemd-analyze security --offline=yes /lib/systemd/system/pixelated-$unit.service \
        | grep "Overall exposure"
done
timeout 60 systemd-analyze security --offline=yes --threshold=20 \
    /lib/systemd/system/pixelated-proxy.service >/dev/null || fail "proxy exposure above 2.0"

if [ ! -e /etc/ssl/certs/ssl-cert-snakeoil.pem ]; then
    step "ssl-cert made no snakeoil certificate on this machine: make one"
    make-ssl-cert generate-default-snakeoil
    CREATED_SNAKEOIL=yes
fi

# The command line of a unit's ExecStart=, with $OPTIONS split like systemd does.
exec_start() { sed -n 's/^ExecStart=//p' "/lib/systemd/system/$1.service"; }
unit_value() { sed -n "s/^$2=//p" "/lib/systemd/system/$1.service" | tr ' ' '\n' \
    | sed 's/^CAP_/+/' | tr 'A-Z' 'a-z' | paste -sd, ; }

step "start the manager as its unit does: root, bounded to CapabilityBoundingSet, no_new_privs"
mkdir -p /run/pixelated
# The test uses the process provider (the bundled demo agent) instead of the
# packaged default, docker, which would pull an image from the internet.
OPTIONS="--provider process --idle-timeout 0"
read -r -a CMD <<<"$(exec_start pixelated-manager | sed "s|\$OPTIONS|$OPTIONS|")"
[ "${CMD[0]}" = /usr/bin/twistd3 ] || fail "unexpected ExecStart ${CMD[*]}"
echo "   ${CMD[*]}"
(cd / && exec setpriv --no-new-privs --bounding-set="-all,$(unit_value pixelated-manager CapabilityBoundingSet)" \
    "${CMD[@]}") >"$OUT/manager.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S /run/pixelated/manager.sock ] && break; sleep 0.2; done
[ -S /run/pixelated/manager.sock ] || { cat "$OUT/manager.log"; fail "no manager socket"; }
stat -c '%a %U:%G %n' /run/pixelated /run/pixelated/manager.sock

step "start the proxy as its unit does: user pixelated-proxy, ambient CAP_NET_BIND_SERVICE only"
. /etc/default/pixelated-proxy   # the packaged defaults must at least parse
OPTIONS="--listen ssl:$PORT:interface=127.0.0.1:privateKey=/etc/ssl/private/ssl-cert-snakeoil.key:certKey=/etc/ssl/certs/ssl-cert-snakeoil.pem"
read -r -a CMD <<<"$(exec_start pixelated-proxy | sed "s|\$OPTIONS|$OPTIONS|")"
echo "   ${CMD[*]}"
(cd / && exec setpriv --reuid=pixelated-proxy --regid=pixelated-proxy --init-groups --no-new-privs \
    --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
    --bounding-set=-all,+net_bind_service "${CMD[@]}") >"$OUT/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    curl -s -o /dev/null --max-time 2 -k "https://127.0.0.1:$PORT/auth/login" && break; sleep 0.2
done
ps -o user=,args= -p "${PIDS[1]}"

step "add a user with /usr/bin/pixelated-ctl"
PASSWORD=$(head -c 18 /dev/urandom | base64)
/usr/bin/pixelated-ctl remove --purge "$USERNAME" >/dev/null 2>&1 || true
printf '%s\n' "$PASSWORD" | timeout 60 /usr/bin/pixelated-ctl add "$USERNAME" --password-stdin
timeout 30 /usr/bin/pixelated-ctl list

step "log in through the installed proxy over HTTPS (curl, loopback)"
HOST=$(openssl x509 -noout -subject -in /etc/ssl/certs/ssl-cert-snakeoil.pem | sed 's/.*CN *= *//')
JAR=$OUT/cookies
CURL=(curl -sS --max-time 60 --cacert /etc/ssl/certs/ssl-cert-snakeoil.pem
      --resolve "$HOST:$PORT:127.0.0.1" -b "$JAR" -c "$JAR")
BASE="https://$HOST:$PORT"
rm -f "$JAR"
FORM=$("${CURL[@]}" "$BASE/auth/login")
CSRF=$(printf '%s' "$FORM" | grep -o 'name="csrf_token"[^>]*' | sed 's/.*value="\([^"]*\)".*/\1/')
[ -n "$CSRF" ] || fail "no csrf_token on the login page"
CODE=$("${CURL[@]}" -o /dev/null -w '%{http_code}' --data-urlencode "username=$USERNAME" \
       --data-urlencode "password=$PASSWORD" --data-urlencode "csrf_token=$CSRF" "$BASE/auth/login")
[ "$CODE" = 303 ] || fail "login answered $CODE, not 303"
WHOAMI=$("${CURL[@]}" "$BASE/whoami")
echo "   /whoami: $WHOAMI"
printf '%s' "$WHOAMI" | grep -q "\"$USERNAME\"" || fail "the agent behind the proxy is not $USERNAME's"
if "${CURL[@]}" -o /dev/null --tls-max 1.1 "$BASE/" 2>/dev/null; then fail "TLS 1.1 accepted"; fi
echo "   TLS 1.1 refused"
timeout 60 /usr/bin/pixelated-ctl info "$USERNAME"
timeout 60 /usr/bin/pixelated-ctl stop "$USERNAME"

step "stop the daemons"
for pid in "${PIDS[@]}"; do kill -TERM "$pid"; done
for pid in "${PIDS[@]}"; do timeout 20 tail --pid="$pid" -f /dev/null || fail "daemon $pid did not stop"; done
PIDS=()

step "remove keeps the state, purge deletes it and the plugin cache entry"
timeout 300 apt-get remove -y -qq $PACKAGES >/dev/null
[ -n "$(ls -A /var/lib/pixelated)" ] || fail "remove deleted the state"
ls -A /var/lib/pixelated | sed 's/^/   kept: /'
timeout 300 dpkg --purge $(dpkg-query -W -f='${Package}\n' $PACKAGES 2>/dev/null) >/dev/null
ADDED_PACKAGES=$(tr ' ' '\n' <<<"$ADDED_PACKAGES" | grep -vxF -f <(tr ' ' '\n' <<<"$PACKAGES") | paste -sd' ')
[ ! -e /var/lib/pixelated ] || fail "/var/lib/pixelated survived purge"
[ ! -e /etc/default/pixelated-manager ] && [ ! -e /etc/default/pixelated-proxy ] \
    || fail "conffiles survived purge"
ls $PLUGINS/pixelated_dispatcher_plugins.py 2>/dev/null && fail "plugin module survived purge"
if [ -e $PLUGINS/dropin.cache ] && grep -q pixelated $PLUGINS/dropin.cache; then
    fail "dropin.cache still lists the pixelated plugins"
fi
if command -v twistd3 >/dev/null && grep -q pixelated <<<"$(twistd3 --help)"; then
    fail "twistd3 still lists a pixelated plugin"
fi
step "purge the dependencies the .debs brought in"
timeout 300 dpkg --purge $ADDED_PACKAGES >/dev/null
ADDED_PACKAGES=""
step "all checks passed"
