#!/bin/bash
# Build the Debian packages, lint them, install them on this Debian 12
# machine (dependencies from Debian only), run the installed daemons exactly
# as their systemd units' ExecStart= lines do (systemd is not PID 1 here),
# add a user with the installed pixelated-ctl, log in through the installed
# proxy over HTTPS (loopback only), then purge and check that the state and
# the plugin cache entries are gone.
#
# Runs as root. Idempotent; every step is bounded in time; the EXIT trap
# stops what it started and purges what it installed. .ci/run calls it with
# every option. Usage:
#   bash .ci/debian.sh [--keep-build] [--unit-tests] [--docker] [--nspawn]
# (build directory: $OUT)
#
# --unit-tests also runs the project's test suite (but the whole_system
# tests, see setup.cfg) once with Debian's
# /usr/bin/python3, python3-twisted 22.4 and friends (python3-pytest,
# python3-hypothesis and python3-selenium from Debian) against the installed
# package; any failure fails the script, and so does any skip under CI=true.
#
# --docker also runs the installed manager with the packaged default
# provider, docker, on the private dockerd of .ci/dockerd.sh (started if
# needed) with the test agent image of tests/dockerd.py, and logs a second
# user in through the installed proxy to a container.
#
# --nspawn also boots a Debian 12 root (debootstrap --variant=minbase, cached
# in $NSPAWN_BASE) with systemd-nspawn --boot --ephemeral, installs the .debs
# there, checks that both services are active under systemd and logs in
# through the proxy (host network, 127.0.0.1:443 only).
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
KEEP_BUILD=
NSPAWN=
UNIT_TESTS=
DOCKER=
for arg in "$@"; do
    case $arg in
        --keep-build) KEEP_BUILD=$arg ;;
        --nspawn) NSPAWN=yes ;;
        --docker) DOCKER=yes ;;
        --unit-tests) UNIT_TESTS=yes ;;
        *) echo "usage: $0 [--keep-build] [--unit-tests] [--docker] [--nspawn]" >&2; exit 2 ;;
    esac
done
NSPAWN_BASE=${NSPAWN_BASE:-/var/tmp/pixelated-bookworm-root}
PIDS=()
NSPAWN_PID=
CONTAINER_MNT=      # the container's mount namespace, named in its manager's nft table
CREATED_SNAKEOIL=
DOCKER_INSTANCE=    # set once docker-provider containers may exist
GUARD_WAS_THERE=
ADDED_PACKAGES=""   # what installing the .debs added (ours and their dependencies)
ADDED_ACCOUNTS=""   # system accounts the packages created here (purge must delete
                    # them; the EXIT trap does if a failure came first)
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# The container's manager keeps its agent firewall table in the host's
# network (shared), and no manager out here removes a table of another mount
# namespace: once the container is gone, remove what it left (the table of
# its /var/lib/pixelated; the host's own managers of this script stopped and
# were purged before the container booted).
remove_container_tables() {
    [ -n "$CONTAINER_MNT" ] || return 0
    local table
    for table in $(nft list tables inet 2>/dev/null | awk '$3 ~ /^pixelated_/ {print $3}'); do
        if nft list table inet "$table" 2>/dev/null \
                | grep 'comment "pixelated-dispatcher agents of /var/lib/pixelated in mnt:' \
                >/dev/null; then     # not -q: nft's SIGPIPE would fail the pipe (pipefail)
            nft delete table inet "$table"
        fi
    done
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$NSPAWN_PID" ]; then
        if [ "$rc" != 0 ] && [ -n "${LEADER:-}" ]; then
            echo "-- the container's manager and proxy logs (last 40 lines each):"
            for unit in pixelated-manager pixelated-proxy; do
                inside journalctl -u "$unit" -n 40 --no-pager 2>/dev/null | cut -c1-300
            done
        fi
        kill -TERM "$NSPAWN_PID" 2>/dev/null
        timeout 60 tail --pid="$NSPAWN_PID" -f /dev/null || kill -KILL "$NSPAWN_PID"
    fi
    remove_container_tables
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do timeout 15 tail --pid="$pid" -f /dev/null; kill -KILL "$pid" 2>/dev/null; done
    # Agents of the process provider run under uids 200000-299999.
    for pid in $(ps -eo pid=,uid= | awk '$2 >= 200000 && $2 <= 299999 {print $1}'); do kill -KILL "$pid"; done
    if [ -n "$ADDED_PACKAGES" ]; then
        timeout 300 dpkg --purge $ADDED_PACKAGES >/dev/null 2>&1
    fi
    if [ -n "$ADDED_ACCOUNTS" ]; then
        case " $ADDED_ACCOUNTS " in *" user "*) deluser --system --quiet pixelated-proxy 2>/dev/null ;; esac
        for group in $ADDED_ACCOUNTS; do
            [ "$group" = user ] || { getent group "$group" >/dev/null && delgroup --system --quiet "$group"; }
        done
    fi
    if [ -n "$DOCKER_INSTANCE" ]; then
        for id in $(docker -H "$DOCKER_HOST" ps -aq --filter "label=org.pixelated.dispatcher=$DOCKER_INSTANCE"); do
            docker -H "$DOCKER_HOST" rm -f "$id" >/dev/null
        done
        # The manager leaves its guard rule in place on purpose (containers
        # outlive it); this test removes the one it caused.
        [ "$GUARD_WAS_THERE" = 0 ] && iptables -t raw -D PREROUTING ! -i lo -d 127.0.0.0/8 \
            -m comment --comment "pixelated-dispatcher loopback guard" -j DROP
    fi
    if [ -n "$CREATED_SNAKEOIL" ]; then
        rm -f /etc/ssl/certs/ssl-cert-snakeoil.pem /etc/ssl/private/ssl-cert-snakeoil.key
    fi
    [ "$rc" = 0 ] && [ -z "$KEEP_BUILD" ] && rm -rf "$OUT/src"
    echo "== [$(( $(date +%s) - T0 ))s] done, exit status $rc"
    exit $rc
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

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
getent passwd pixelated-proxy >/dev/null || ADDED_ACCOUNTS="user"
for group in pixelated-proxy pixelated-admin; do
    getent group "$group" >/dev/null || ADDED_ACCOUNTS="$ADDED_ACCOUNTS $group"
done
timeout 600 apt-get install -y -qq "$OUT"/*.deb ${UNIT_TESTS:+python3-pytest python3-hypothesis python3-selenium} >/dev/null
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

if [ -n "$UNIT_TESTS" ]; then
    step "unit tests with /usr/bin/python3 and Debian's Twisted $(python3 -c 'import twisted; print(twisted.__version__)')"
    # Against a clean tree; agents (other uids, minimal environment) import
    # the installed package.
    rm -rf "$OUT/tests-tree" && mkdir -p "$OUT/tests-tree"
    git -C "$TREE" archive HEAD | tar -x -C "$OUT/tests-tree"
    RC=0
    # The whole_system tests (real Docker engine, swarms, the chaos soak)
    # ran in make check on the newest stack; the steps below run the
    # installed packages against the real dockerd (see setup.cfg).
    (cd "$OUT/tests-tree" && PYTHONPATH="$OUT/tests-tree" timeout 1200 /usr/bin/python3 -m pytest -rfEs -q \
        -p no:cacheprovider -m "not whole_system" tests) >"$OUT/unit-tests.log" 2>&1 || RC=$?
    grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/unit-tests.log" || true
    SUMMARY=$(tail -1 "$OUT/unit-tests.log")
    echo "   $SUMMARY"
    [ "$RC" = 0 ] || { tail -60 "$OUT/unit-tests.log"; fail "unit tests on Debian's Python (exit $RC)"; }
    if [ "${CI:-}" = true ] && grep -q "skipped" <<<"$SUMMARY"; then
        fail "unit tests on Debian's Python skipped tests under CI=true"
    fi
fi

if [ ! -e /etc/ssl/certs/ssl-cert-snakeoil.pem ]; then
    step "ssl-cert made no snakeoil certificate on this machine: make one"
    make-ssl-cert generate-default-snakeoil
    CREATED_SNAKEOIL=yes
fi

# The command line of a unit's ExecStart=, with $OPTIONS split like systemd does.
exec_start() { sed -n 's/^ExecStart=//p' "/lib/systemd/system/$1.service"; }
unit_value() { sed -n "s/^$2=//p" "/lib/systemd/system/$1.service" | tr ' ' '\n' \
    | sed 's/^CAP_/+/' | tr 'A-Z' 'a-z' | paste -sd, ; }

# Log in as $USERNAME/$PASSWORD through the proxy on 127.0.0.1:$PORT, trusting
# exactly the certificate $1, and check that /whoami comes from that user's agent.
https_login() {
    local cert=$1 host form csrf code whoami
    host=$(openssl x509 -noout -subject -in "$cert" | sed 's/.*CN *= *//')
    JAR=$OUT/cookies
    CURL=(curl -sS --max-time 60 --cacert "$cert" --resolve "$host:$PORT:127.0.0.1" -b "$JAR" -c "$JAR")
    BASE="https://$host:$PORT"
    rm -f "$JAR"
    for _ in $(seq 100); do "${CURL[@]}" -o /dev/null "$BASE/auth/login" 2>/dev/null && break; sleep 0.2; done
    form=$("${CURL[@]}" "$BASE/auth/login")
    csrf=$(printf '%s' "$form" | grep -o 'name="csrf_token"[^>]*' | sed 's/.*value="\([^"]*\)".*/\1/')
    [ -n "$csrf" ] || fail "no csrf_token on the login page"
    code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' --data-urlencode "username=$USERNAME" \
           --data-urlencode "password=$PASSWORD" --data-urlencode "csrf_token=$csrf" "$BASE/auth/login")
    [ "$code" = 303 ] || fail "login answered $code, not 303"
    whoami_check
    if "${CURL[@]}" -o /dev/null --tls-max 1.1 "$BASE/" 2>/dev/null; then fail "TLS 1.1 accepted"; fi
    echo "   TLS 1.1 refused"
}
# The agent behind the proxy, with the session of https_login: the demo
# agent's /whoami names its user; the Docker test image's / says "Mailbox of USER".
whoami_check() {
    local page
    if [ "${AGENT_KIND:-demo}" = demo ]; then
        page=$("${CURL[@]}" "$BASE/whoami")
        echo "   /whoami: $page"
        printf '%s' "$page" | grep -q "\"$USERNAME\"" || fail "the agent behind the proxy is not $USERNAME's"
    else
        page=$("${CURL[@]}" "$BASE/")
        echo "   /: $page"
        printf '%s' "$page" | grep -qx "Mailbox of $USERNAME" || fail "the agent behind the proxy is not $USERNAME's"
    fi
}

# Start the manager (OPTIONS=$1) and the proxy exactly as their units'
# ExecStart= lines do, under the units' users and capability sets.
start_daemons() {
    local OPTIONS=$1 CMD
    step "start the manager as its unit does: root, bounded to CapabilityBoundingSet, no_new_privs"
    mkdir -p /run/pixelated
    read -r -a CMD <<<"$(exec_start pixelated-manager | sed "s|\$OPTIONS|$OPTIONS|")"
    [ "${CMD[0]}" = /usr/bin/twistd3 ] || fail "unexpected ExecStart ${CMD[*]}"
    echo "   ${CMD[*]}"
    (cd / && exec setpriv --no-new-privs --bounding-set="-all,$(unit_value pixelated-manager CapabilityBoundingSet)" \
        "${CMD[@]}") >>"$OUT/manager.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S /run/pixelated/manager.sock ] && break; sleep 0.2; done
    [ -S /run/pixelated/manager.sock ] || { cat "$OUT/manager.log"; fail "no manager socket"; }
    stat -c '%a %U:%G %n' /run/pixelated /run/pixelated/manager.sock

    step "start the proxy as its unit does: user pixelated-proxy, ambient CAP_NET_BIND_SERVICE only"
    OPTIONS="--listen ssl:$PORT:interface=127.0.0.1:privateKey=/etc/ssl/private/ssl-cert-snakeoil.key:certKey=/etc/ssl/certs/ssl-cert-snakeoil.pem"
    read -r -a CMD <<<"$(exec_start pixelated-proxy | sed "s|\$OPTIONS|$OPTIONS|")"
    echo "   ${CMD[*]}"
    (cd / && exec setpriv --reuid=pixelated-proxy --regid=pixelated-proxy --init-groups --no-new-privs \
        --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
        --bounding-set=-all,+net_bind_service "${CMD[@]}") >>"$OUT/proxy.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 2 -k "https://127.0.0.1:$PORT/auth/login" && break; sleep 0.2
    done
    ps -o user=,args= -p "${PIDS[1]}"
}

stop_daemons() {
    step "stop the daemons"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid"; done
    for pid in "${PIDS[@]}"; do timeout 20 tail --pid="$pid" -f /dev/null || fail "daemon $pid did not stop"; done
    PIDS=()
}

# Add $USERNAME with /usr/bin/pixelated-ctl, log in, see its agent, stop it.
user_logs_in() {
    step "add $USERNAME with /usr/bin/pixelated-ctl"
    PASSWORD=$(head -c 18 /dev/urandom | base64)
    /usr/bin/pixelated-ctl remove --purge "$USERNAME" >/dev/null 2>&1 || true
    printf '%s\n' "$PASSWORD" | timeout 60 /usr/bin/pixelated-ctl add "$USERNAME" --password-stdin
    timeout 30 /usr/bin/pixelated-ctl list
    step "log in through the installed proxy over HTTPS (curl, loopback)"
    https_login /etc/ssl/certs/ssl-cert-snakeoil.pem
    timeout 60 /usr/bin/pixelated-ctl info "$USERNAME"
    timeout 60 /usr/bin/pixelated-ctl stop "$USERNAME"
}

(. /etc/default/pixelated-proxy && . /etc/default/pixelated-manager) \
    || fail "the packaged /etc/default files do not parse"
# First the process provider (the bundled demo agent).
start_daemons "--provider process --idle-timeout 0"
user_logs_in
stop_daemons

if [ -n "$DOCKER" ]; then
    # Then the packaged default, the docker provider, on the private dockerd
    # (.ci/dockerd.sh) with the test agent image imported from busybox-static
    # (there is no registry to pull from): the packaged OPTIONS plus only what
    # an operator of this machine would add.
    step "docker provider (the packaged default) on the private dockerd"
    [ -x /bin/busybox ] || timeout 300 apt-get install -y -qq busybox-static >/dev/null
    source "$TREE/.ci/dockerd.sh" start
    AGENT_IMAGE=$(cd "$TREE" && /usr/bin/python3 -c \
        "from tests.dockerd import ensure_agent_image; print(ensure_agent_image('$DOCKER_HOST'))")
    DOCKER_INSTANCE=pixelated-debian-test
    GUARD_WAS_THERE=$(iptables -t raw -S PREROUTING | grep -c "pixelated-dispatcher loopback guard" || true)
    . /etc/default/pixelated-manager
    [ "$OPTIONS" = "--provider docker" ] || fail "the packaged manager OPTIONS changed: $OPTIONS"
    USERNAME=ci-debian-docker AGENT_KIND=docker
    start_daemons "$OPTIONS --docker-host $DOCKER_HOST --agent-image $AGENT_IMAGE --docker-instance $DOCKER_INSTANCE --idle-timeout 0"
    user_logs_in
    [ -z "$(docker -H "$DOCKER_HOST" ps -aq --filter "label=org.pixelated.dispatcher=$DOCKER_INSTANCE")" ] \
        || fail "pixelated-ctl stop left the agent's container behind"
    echo "   the agent's container is gone after pixelated-ctl stop"
    iptables -t raw -S PREROUTING | grep -q "pixelated-dispatcher loopback guard" \
        || fail "the manager (CAP_NET_ADMIN) did not install the loopback guard for Docker $(docker -H "$DOCKER_HOST" version -f '{{.Server.Version}}')"
    echo "   loopback guard rule present"
    stop_daemons
    USERNAME=ci-debian AGENT_KIND=demo
fi
PIDS=()

step "remove keeps the state and the accounts, purge deletes them and the plugin cache entry"
timeout 300 apt-get remove -y -qq $PACKAGES >/dev/null
[ -n "$(ls -A /var/lib/pixelated)" ] || fail "remove deleted the state"
ls -A /var/lib/pixelated | sed 's/^/   kept: /'
getent passwd pixelated-proxy >/dev/null || fail "remove deleted the user pixelated-proxy"
timeout 300 dpkg --purge $(dpkg-query -W -f='${Package} ${db:Status-Status}\n' $PACKAGES 2>/dev/null \
    | awk '$2 != "not-installed" {print $1}') >/dev/null
ADDED_PACKAGES=$(tr ' ' '\n' <<<"$ADDED_PACKAGES" | grep -vxF -f <(tr ' ' '\n' <<<"$PACKAGES") | paste -sd' ')
[ ! -e /var/lib/pixelated ] || fail "/var/lib/pixelated survived purge"
case " $ADDED_ACCOUNTS " in *" user "*)
    ! getent passwd pixelated-proxy >/dev/null || fail "the user pixelated-proxy survived purge" ;;
esac
for group in $ADDED_ACCOUNTS; do
    [ "$group" = user ] || ! getent group "$group" >/dev/null || fail "the group $group survived purge"
done
echo "   accounts the installation made are gone:${ADDED_ACCOUNTS:- (none were made)}"
ADDED_ACCOUNTS=""
[ ! -e /etc/default/pixelated-manager ] && [ ! -e /etc/default/pixelated-proxy ] \
    || fail "conffiles survived purge"
ls $PLUGINS/pixelated_dispatcher_plugins.py 2>/dev/null && fail "plugin module survived purge"
if [ -e $PLUGINS/dropin.cache ] && grep -q pixelated $PLUGINS/dropin.cache; then
    fail "dropin.cache still lists the pixelated plugins"
fi
if command -v twistd3 >/dev/null && grep -q pixelated <<<"$(twistd3 --help)"; then
    fail "twistd3 still lists a pixelated plugin"
fi
if [ -n "$NSPAWN" ]; then
    step "nspawn: a Debian 12 root ($NSPAWN_BASE)"
    timeout 300 apt-get install -y -qq --no-install-recommends debootstrap systemd-container >/dev/null
    if [ ! -x "$NSPAWN_BASE/lib/systemd/systemd" ]; then
        rm -rf "$NSPAWN_BASE.tmp"
        timeout 900 debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm \
            "$NSPAWN_BASE.tmp" http://deb.debian.org/debian >"$OUT/debootstrap.log" 2>&1 \
            || { tail "$OUT/debootstrap.log"; fail "debootstrap"; }
        mv "$NSPAWN_BASE.tmp" "$NSPAWN_BASE"
    fi
    step "nspawn: boot it (--ephemeral: the cached root stays clean)"
    # CAP_NET_ADMIN: the manager installs its agent firewall (nftables) as on
    # a real host, whose network the container shares; nspawn drops the
    # capability by default, and a manager that cannot protect its agents
    # does not start.
    systemd-nspawn --boot --register=no --keep-unit --ephemeral --machine=pixelated-test \
        --capability=CAP_NET_ADMIN \
        -D "$NSPAWN_BASE" --bind-ro="$OUT:/debs" >"$OUT/nspawn.log" 2>&1 &
    NSPAWN_PID=$!
    LEADER=
    for _ in $(seq 100); do
        LEADER=$(ps -eo pid=,ppid=,comm= | awk -v p="$NSPAWN_PID" '$2 == p && $3 == "systemd" {print $1}')
        [ -n "$LEADER" ] && break; sleep 0.2
    done
    [ -n "$LEADER" ] || { cat "$OUT/nspawn.log"; fail "the container did not boot"; }
    CONTAINER_MNT=$(stat -L -c %i "/proc/$LEADER/ns/mnt")
    inside() { nsenter -t "$LEADER" -m -u -i -n -p -- /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
    timeout 120 bash -c "until nsenter -t $LEADER -m -p -- /bin/systemctl is-system-running 2>/dev/null \
        | grep -qE 'running|degraded'; do sleep 0.5; done" || fail "the container's systemd did not settle"
    step "nspawn: install the .debs there (the operator's way: apt, systemd starts the services)"
    # Keep it to loopback and to the process provider (no Docker in the
    # container): the operator's edit of /etc/default, made before install.
    # nspawn shows the host's cgroup controllers read-only (no delegation on
    # this cgroup v1 host), so agents run without limits here: the manager
    # would refuse to start otherwise, saying so (the limits themselves are
    # tested on the host: tests/test_process_limits.py).
    echo 'OPTIONS="--provider process --idle-timeout 0 --agent-memory 0 --agent-pids 0 --agent-cpu-shares 0"' \
        >"/proc/$LEADER/root/etc/default/pixelated-manager"
    echo "OPTIONS=\"--listen ssl:$PORT:interface=127.0.0.1:privateKey=/etc/ssl/private/ssl-cert-snakeoil.key:certKey=/etc/ssl/certs/ssl-cert-snakeoil.pem\"" \
        >"/proc/$LEADER/root/etc/default/pixelated-proxy"
    inside timeout 300 apt-get update -qq
    inside timeout 600 apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
        /debs/pixelated-dispatcher_0.1.0_all.deb /debs/pixelated-dispatcher-manager_0.1.0_all.deb \
        /debs/pixelated-dispatcher-proxy_0.1.0_all.deb /debs/python3-pixelated-dispatcher_0.1.0_all.deb \
        >"$OUT/nspawn-apt.log" 2>&1 || { tail -20 "$OUT/nspawn-apt.log"; fail "apt-get install in the container"; }
    sleep 2
    STATES=$(inside systemctl is-active pixelated-manager.service pixelated-proxy.service | paste -sd' ' || true)
    echo "   systemctl is-active: $STATES"
    [ "$STATES" = "active active" ] || { inside journalctl -n 60 --no-pager | cut -c1-300; fail "a service is not active"; }
    inside systemd-analyze security pixelated-manager.service pixelated-proxy.service | grep -i "overall\|→" || true
    printf '%s\n' "$PASSWORD" | inside timeout 60 pixelated-ctl add "$USERNAME" --password-stdin
    https_login "/proc/$LEADER/root/etc/ssl/certs/ssl-cert-snakeoil.pem"
    step "nspawn: systemctl restart pixelated-manager keeps the agent and the session"
    inside systemctl restart pixelated-manager.service
    sleep 2
    whoami_check
    inside pixelated-ctl info "$USERNAME"
    step "nspawn: an upgrade (here a reinstall) restarts both services and keeps the session"
    main_pids() { inside systemctl show -p MainPID --value pixelated-manager.service pixelated-proxy.service \
        | grep . | paste -sd' '; }
    BEFORE=$(main_pids)
    inside timeout 300 apt-get install -y -qq --reinstall -o Dpkg::Options::=--force-confold \
        /debs/pixelated-dispatcher-manager_0.1.0_all.deb /debs/pixelated-dispatcher-proxy_0.1.0_all.deb \
        /debs/python3-pixelated-dispatcher_0.1.0_all.deb >>"$OUT/nspawn-apt.log" 2>&1 \
        || { tail -20 "$OUT/nspawn-apt.log"; fail "apt-get install --reinstall in the container"; }
    AFTER=$(main_pids)
    echo "   MainPID manager, proxy: $BEFORE -> $AFTER"
    read -r M0 P0 <<<"$BEFORE"; read -r M1 P1 <<<"$AFTER"
    [ "$M0" != "$M1" ] && [ "$P0" != "$P1" ] && [ "$M1" != 0 ] && [ "$P1" != 0 ] \
        || fail "the upgrade did not restart both services"
    for _ in $(seq 100); do "${CURL[@]}" -o /dev/null "$BASE/auth/login" 2>/dev/null && break; sleep 0.2; done
    whoami_check
    step "nspawn: purge there"
    inside timeout 300 apt-get purge -y -qq pixelated-dispatcher pixelated-dispatcher-manager \
        pixelated-dispatcher-proxy python3-pixelated-dispatcher >/dev/null
    [ ! -e "/proc/$LEADER/root/var/lib/pixelated" ] || fail "state survived purge in the container"
    for account in "passwd pixelated-proxy" "group pixelated-proxy" "group pixelated-admin"; do
        ! inside getent $account >/dev/null || fail "$account survived purge in the container"
    done
    kill -TERM "$NSPAWN_PID"
    timeout 60 tail --pid="$NSPAWN_PID" -f /dev/null || fail "the container did not stop"
    NSPAWN_PID=
    remove_container_tables
fi

step "purge the dependencies the .debs brought in"
timeout 300 dpkg --purge $ADDED_PACKAGES >/dev/null
ADDED_PACKAGES=""
step "all checks passed"
