#!/bin/bash
# Start or stop a private Docker daemon for the test suite.
#
#   bash .ci/dockerd.sh start   # start (or reuse) it, wait until it answers, print DOCKER_HOST=...
#   bash .ci/dockerd.sh stop    # stop it and wait until it is gone
#   bash .ci/dockerd.sh status  # exit 0 if it answers
#   source .ci/dockerd.sh start # same as start, and export DOCKER_HOST into the calling shell
#
# The daemon has its own socket, data root, exec root and pidfile under
# $PIXELATED_DOCKERD_DIR (default /var/tmp/pixelated-dockerd), so it never
# touches a system dockerd's /var/run/docker.sock or /var/lib/docker.
# tests/dockerd.py finds it there without DOCKER_HOST. Needs root.
# Its bridge and the networks it makes take addresses from 198.18.0.0/15, the
# range reserved for tests (PIXELATED_DOCKERD_BIP, PIXELATED_DOCKERD_POOL).
# Another instance (another PIXELATED_DOCKERD_DIR) gets a bridge of its own
# (PIXELATED_DOCKERD_BRIDGE, default pxd<hash of the directory>) and no
# iptables rules (PIXELATED_DOCKERD_IPTABLES=true to have them), so it never
# disturbs the default one.
# (no "set -u": this file may be sourced into an interactive shell)

_pd_dir=${PIXELATED_DOCKERD_DIR:-/var/tmp/pixelated-dockerd}
_pd_dockerd=${DOCKERD:-/usr/sbin/dockerd}
_pd_sock="$_pd_dir/docker.sock"
_pd_pidfile="$_pd_dir/dockerd.pid"
_pd_log="$_pd_dir/dockerd.log"
_pd_host="unix://$_pd_sock"
_pd_bip=${PIXELATED_DOCKERD_BIP:-198.18.0.1/24}
if [ "$_pd_dir" = /var/tmp/pixelated-dockerd ]; then
    _pd_bridge=${PIXELATED_DOCKERD_BRIDGE:-docker0}
else
    # a name of at most 15 characters, the same for the same directory
    _pd_bridge=${PIXELATED_DOCKERD_BRIDGE:-pxd$(printf %s "$_pd_dir" | md5sum | cut -c1-8)}
fi

_pd_answers() {
    # An HTTP "OK" from /_ping over the socket, without needing the docker CLI.
    [ -S "$_pd_sock" ] || return 1
    python3 - "$_pd_sock" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk: break
    data += chunk
sys.exit(0 if data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0] + b" " else 1)
PY
}

_pd_running_pid() {
    [ -f "$_pd_pidfile" ] || return 1
    local pid; pid=$(cat "$_pd_pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

_pd_start() {
    if _pd_running_pid >/dev/null && _pd_answers; then
        echo "DOCKER_HOST=$_pd_host"; return 0
    fi
    if [ "$(id -u)" != 0 ]; then echo "dockerd.sh: must run as root" >&2; return 1; fi
    if [ ! -x "$_pd_dockerd" ]; then echo "dockerd.sh: $_pd_dockerd not found (apt-get install docker.io)" >&2; return 1; fi
    mkdir -p "$_pd_dir/data" "$_pd_dir/exec"
    rm -f "$_pd_sock" "$_pd_pidfile"
    # The default instance owns docker0. A second one on this host gets a
    # bridge of its own (a second --bip would re-address docker0 under the
    # first) and, unless told otherwise, leaves iptables to the first.
    local _pd_network _pd_docker0=
    if [ "$_pd_bridge" != docker0 ]; then
        # dockerd (20.10, and since) restarting with --default-address-pool
        # and a stored "bridge" network deletes the link named docker0,
        # whatever its --bridge: another instance's restart would take the
        # default instance's bridge away. Note it to put it back below.
        _pd_docker0=$(ip -4 -o addr show dev docker0 2>/dev/null | awk '{print $4; exit}')
    fi
    if [ "$_pd_bridge" = docker0 ]; then
        _pd_network=(--bip "$_pd_bip")
    else
        ip link show "$_pd_bridge" >/dev/null 2>&1 || ip link add name "$_pd_bridge" type bridge
        ip addr replace "$_pd_bip" dev "$_pd_bridge"
        ip link set "$_pd_bridge" up
        _pd_network=(--bridge "$_pd_bridge" --iptables="${PIXELATED_DOCKERD_IPTABLES:-false}")
    fi
    # setsid: the daemon must not die with the shell (or the CI step) that started it.
    setsid "$_pd_dockerd" \
        --host "$_pd_host" \
        --data-root "$_pd_dir/data" \
        --exec-root "$_pd_dir/exec" \
        --pidfile "$_pd_pidfile" \
        --group root \
        "${_pd_network[@]}" \
        --default-address-pool "base=${PIXELATED_DOCKERD_POOL:-198.18.128.0/18},size=24" \
        >"$_pd_log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do
        if _pd_answers; then
            if [ -n "$_pd_docker0" ] && ! ip link show docker0 >/dev/null 2>&1; then
                ip link add name docker0 type bridge && ip addr add "$_pd_docker0" dev docker0 \
                    && ip link set docker0 up \
                    && echo "dockerd.sh: put back docker0 ($_pd_docker0), which dockerd removed" >&2
            fi
            echo "DOCKER_HOST=$_pd_host"; return 0
        fi
        if ! kill -0 $! 2>/dev/null; then
            echo "dockerd.sh: dockerd exited; last lines of $log:" >&2; tail -n 20 "$_pd_log" >&2; return 1
        fi
        sleep 0.5
    done
    echo "dockerd.sh: dockerd did not answer on $_pd_sock within 60 s; last lines of $log:" >&2
    tail -n 20 "$_pd_log" >&2
    return 1
}

_pd_remove_bridge() {
    [ "$_pd_bridge" = docker0 ] || ip link delete "$_pd_bridge" type bridge 2>/dev/null || true
}

_pd_stop() {
    local pid; pid=$(_pd_running_pid) || { echo "dockerd.sh: not running"; return 0; }
    kill -TERM "$pid"
    local i
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || { _pd_remove_bridge; echo "dockerd.sh: stopped"; return 0; }
        sleep 0.5
    done
    echo "dockerd.sh: dockerd $pid did not stop within 30 s, killing it" >&2
    kill -KILL "$pid" 2>/dev/null
    _pd_remove_bridge
    return 0
}

case "${1:-start}" in
    start)  _pd_start && export DOCKER_HOST="$_pd_host" ;;
    stop)   _pd_stop ;;
    status) _pd_answers && echo "DOCKER_HOST=$_pd_host" ;;
    *)      echo "usage: $0 start|stop|status" >&2; false ;;
esac
_pd_status=$?
# 'return' when sourced, 'exit' when run
return $_pd_status 2>/dev/null || exit $_pd_status
