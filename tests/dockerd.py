"""Find (or start) a Docker engine for the tests, and build the test agent image.

``engine_or_skip()`` answers the ``DOCKER_HOST`` to use. When no engine is
reachable the caller's tests skip with a one-line reason, unless ``CI=true``,
where that is a failure: CI must run them.

Where it looks, in order: ``$DOCKER_HOST``; the private daemon of
``.ci/dockerd.sh`` (``/var/tmp/pixelated-dockerd/docker.sock``);
``/var/run/docker.sock``. If none answers and we are root with ``dockerd``
installed, it starts the private daemon with ``.ci/dockerd.sh start`` and stops
it again when the test process exits (``PIXELATED_TEST_START_DOCKERD=no``
turns that off).

Everything here is synchronous on purpose (plain sockets, no reactor): it runs
once per test process, before the reactor-driven tests, and it checks the
engine with code that is independent of the client under test.
"""
import atexit
import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import tarfile
import urllib.parse

from twisted.trial.unittest import SkipTest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IMAGE_DIR = os.path.join(HERE, "agent_image")
DOCKERD_SH = os.path.join(REPO, ".ci", "dockerd.sh")
PRIVATE_DIR = os.environ.get("PIXELATED_DOCKERD_DIR", "/var/tmp/pixelated-dockerd")
BUSYBOX = "/bin/busybox"
IMAGE_REPO = "pixelated-test-agent"

_found = None       # (host, reason)


def in_ci():
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _connection(host, timeout=30):
    if host.startswith("unix://"):
        return _UnixHTTPConnection(host[len("unix://"):], timeout)
    if host.startswith("tcp://"):
        hostport = host[len("tcp://"):]
        return http.client.HTTPConnection(hostport, timeout=timeout)
    raise ValueError("unsupported DOCKER_HOST %r" % (host,))


def api(host, method, path, body=None, params=None, headers=None, timeout=60,
        expect=(200, 201, 204, 304)):
    """One synchronous Docker API call (unversioned path); JSON or bytes back."""
    if params:
        path += "?" + urllib.parse.urlencode(params)
    conn = _connection(host, timeout)
    try:
        hdrs = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status not in expect:
        raise RuntimeError("%s %s: %d %s" % (method, path, resp.status, data[:500]))
    if resp.getheader("Content-Type", "").startswith("application/json") and data:
        return json.loads(data)
    return data


def _answers(host):
    try:
        return api(host, "GET", "/_ping", timeout=3) == b"OK"
    except Exception:
        return False


def _start_private():
    if os.environ.get("PIXELATED_TEST_START_DOCKERD", "") == "no":
        return None
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/dockerd"):
        return None
    out = subprocess.run(["bash", DOCKERD_SH, "start"], capture_output=True, text=True,
                         timeout=90)
    if out.returncode != 0:
        return None
    atexit.register(subprocess.run, ["bash", DOCKERD_SH, "stop"], capture_output=True,
                    timeout=60)
    return "unix://" + os.path.join(PRIVATE_DIR, "docker.sock")


def default_candidates():
    candidates = []
    if os.environ.get("DOCKER_HOST"):
        candidates.append(os.environ["DOCKER_HOST"])
    return candidates + ["unix://" + os.path.join(PRIVATE_DIR, "docker.sock"),
                         "unix:///var/run/docker.sock"]


def probe_engines(candidates, start=_start_private):
    """``(docker_host, None)`` for the first engine that answers, else ``(None, reason)``."""
    for host in candidates:
        if _answers(host):
            return host, None
    host = start()
    if host and _answers(host):
        return host, None
    return None, ("no Docker engine reachable (tried %s); start one with"
                  " 'bash .ci/dockerd.sh start'" % ", ".join(candidates))


def find_engine():
    """:func:`probe_engines` on the usual places, once per test process."""
    global _found
    if _found is None:
        _found = probe_engines(default_candidates())
    return _found


def decide(host, reason):
    """The host; or skip with ``reason``; or, with CI=true, fail with it."""
    if host is None:
        if in_ci():
            raise AssertionError("CI=true but " + reason)
        raise SkipTest(reason)
    return host


def engine_or_skip():
    """The DOCKER_HOST of a reachable engine; skip (or, in CI, fail) otherwise."""
    return decide(*find_engine())


# --- the test agent image ----------------------------------------------------

def _image_files():
    """(path in image, mode, bytes) of our own files, sorted."""
    files = []
    for root, _dirs, names in os.walk(IMAGE_DIR):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, IMAGE_DIR)
            with open(full, "rb") as f:
                files.append(("/" + rel, 0o755 if os.access(full, os.X_OK) else 0o644,
                              f.read()))
    return sorted(files)


def _applets():
    out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    return sorted(a for a in out.stdout.split() if a and "/" not in a)


def agent_image_tag():
    """A tag that changes whenever the image's content would change."""
    digest = hashlib.sha256()
    for path, mode, data in _image_files():
        digest.update(path.encode() + b"\0" + str(mode).encode() + b"\0" + data)
    with open(BUSYBOX, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    return "%s:%s" % (IMAGE_REPO, digest.hexdigest()[:12])


def _root_tar(extra_files=()):
    """The image's root file system as a tar; ``extra_files``: (path, bytes) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_dir(name, mode=0o755):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
            tar.addfile(info)

        def add_file(name, mode, data):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))

        for d in ("/bin", "/www", "/www/cgi-bin", "/mnt", "/mnt/user", "/etc"):
            add_dir(d)
        add_dir("/tmp", 0o1777)
        with open(BUSYBOX, "rb") as f:
            add_file("/bin/busybox", 0o755, f.read())
        for applet in _applets():
            if applet == "busybox":
                continue
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", 0
            tar.addfile(info)
        add_file("/etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n"
                                       b"nobody:x:65534:65534:nobody:/:/bin/sh\n")
        add_file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        for path, mode, data in _image_files():
            add_file(path, mode, data)
        for path, data in extra_files:
            add_file(path, 0o644, data)
    return buf.getvalue()


def ensure_agent_image(host):
    """Import the test agent image (``docker import`` over the API) unless present."""
    tag = agent_image_tag()
    try:
        api(host, "GET", "/images/%s/json" % tag)
        return tag
    except RuntimeError:
        pass
    repo, version = tag.split(":")
    params = [("fromSrc", "-"), ("repo", repo), ("tag", version),
              ("changes", 'CMD ["/entrypoint"]'), ("changes", "EXPOSE 4567/tcp"),
              ("changes", "WORKDIR /")]
    out = api(host, "POST", "/images/create?" + urllib.parse.urlencode(params),
              body=_root_tar(), headers={"Content-Type": "application/x-tar"},
              timeout=120)
    if b'"error"' in out:
        raise RuntimeError("docker import of the test agent image failed: %r" % (out,))
    return tag


def remove_labelled(host, label):
    """Force-remove every container and network carrying ``label`` (test clean-up)."""
    found = api(host, "GET", "/containers/json",
                params={"all": "1", "filters": json.dumps({"label": [label]})})
    for c in found:
        api(host, "DELETE", "/containers/%s" % c["Id"], params={"force": "1"},
            expect=(204, 404, 409))
    # and the agents' networks the docker provider made for that instance
    networks = api(host, "GET", "/networks",
                   params={"filters": json.dumps({"label": [label]})})
    for network in networks or []:
        api(host, "DELETE", "/networks/%s" % network["Id"], expect=(204, 404, 403, 409, 500))


def coroutine_tests(cls):
    """Class decorator: run ``async def test_*`` methods as Deferreds.

    trial runs coroutine test methods natively only from Twisted 23; on
    Debian 12's 22.4 they would be called, never awaited, and "pass". Wrapping
    them in ``ensureDeferred`` makes them real tests on both.
    """
    import functools
    import inspect

    from twisted.internet.defer import ensureDeferred

    for name, value in list(vars(cls).items()):
        if name.startswith("test") and inspect.iscoroutinefunction(value):
            def wrap(method):
                @functools.wraps(method)
                def test(self, *args, **kwargs):
                    return ensureDeferred(method(self, *args, **kwargs))
                return test
            setattr(cls, name, wrap(value))
    return cls
