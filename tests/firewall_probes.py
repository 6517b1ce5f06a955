"""What the agent firewall's tests share: ids of "another local user" and of
the proxy group, connecting to a port as another uid, and reading the
kernel's nftables (the tables, the ports a table protects or grants), reading
a page as another uid. Needs root and
nft: :func:`require_nft` skips without them, and fails under ``CI=true``."""
import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest


#: a uid and gid no account has: "another local user"
STRANGER = 3990101
#: the proxy group of these tests (no /etc/group entry needed: the kernel
#: only compares numbers)
PROXY_GID = 3990102


def require_nft(test_case=None, root_for="to change the kernel's nftables") -> None:
    """Fail under CI=true, skip elsewhere, unless root with nft (no
    ``test_case``: from ``setUpClass``)."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root " + root_for
    elif shutil.which("nft") is None:
        reason = "needs nft (apt-get install nftables)"
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        raise AssertionError(reason + " (CI=true, so this is a failure, not a skip)")
    raise SkipTest(reason)


def nft_tables():
    """``nft list tables`` as a set of lines."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return set(out.stdout.split("\n")) - {""}


#: connect to PORT (on 127.0.0.1 or HOST) as whoever runs it; prints
#: "connected" or the error
CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def connect_as(uid, gid, port, host="127.0.0.1"):
    """What a process of ``uid``/``gid`` (None: root) gets when it connects."""
    argv = [sys.executable, "-c", CONNECT, str(port), host]
    if uid is not None:
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
                "--"] + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin"}).stdout.strip()


#: GET URL as whoever runs it; prints the body or the error
FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode("utf-8", "replace"))
except Exception as e:
    print(type(getattr(e, "reason", e)).__name__)
"""


def fetch_as(uid, gid, url):
    """What a process of ``uid``/``gid`` (primary group, no other) reads at ``url``."""
    argv = ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups", "--",
            sys.executable, "-c", FETCH, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin"}).stdout.strip()


def granted_ports_of(table):
    """The ports ``table`` grants to the proxy group (None: no such table)."""
    return protected_ports_of(table, "granted")


def protected_ports_of(table, set_name="agents"):
    """The ports in the agents set of ``table`` (None: no such table)."""
    out = subprocess.run(["nft", "-j", "list", "set", "inet", table, set_name],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    ports = set()
    for item in json.loads(out.stdout)["nftables"]:
        for element in (item.get("set") or {}).get("elem", []):
            ports.add(element["concat"][1])
    return ports
