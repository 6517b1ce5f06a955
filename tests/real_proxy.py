"""A real ``twistd pixelated-proxy`` process (or several sharing a port) on
127.0.0.1 with the benchmarks' stand-in manager and a real demo agent, and
what the tests that measure it share: reading ``/proc`` (memory, listening
sockets), waiting for a port, reading a response head off a socket."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

from pixelated_dispatcher.demo import TWISTD, free_port


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CREDENTIALS = b'{"leap_provider_hostname": "example.org", "user": "bench", "password": "x"}\n'
PATTERN = bytes(range(256)) * 256


def status_kib(pid: int, field: str) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def wait_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("exited with %s" % process.returncode)
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %d" % port)


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (``/proc/net/tcp``)."""
    wanted = "0100007F:%04X" % (port,)
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[1] == wanted and line.split()[3] == "0A")


def wait_listeners(port: int, count: int, process: subprocess.Popen,
                   timeout: float = 30) -> None:
    """Wait until ``count`` sockets listen on the port (several processes
    sharing it with ``reusePort``: the first one's socket answers before
    the others listen)."""
    deadline = time.monotonic() + timeout
    while listeners(port) < count:
        if process.poll() is not None:
            raise RuntimeError("exited with %s" % process.returncode)
        if time.monotonic() > deadline:
            raise RuntimeError("%d of %d listening on %d" % (listeners(port), count, port))
        time.sleep(0.05)


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed during the head: %r" % data)
        data += chunk
    return data


def reset_peak(pid: int) -> None:
    """Let ``VmHWM`` of ``pid`` start again from its current RSS (Linux 4.0+;
    without it, the peak counts from the process's start, which only makes
    a limit stricter)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
    except OSError:
        pass


class RealProxy(unittest.TestCase):
    """A real ``twistd pixelated-proxy`` on 127.0.0.1 with the benchmarks'
    stand-in manager, whose one user's agent listens on the port
    :meth:`start_agent` gives; logged in as that user (``cookie``).
    ``proxy_count`` processes listen on the port, with ``listen_options``
    added to the ``tcp:`` description (``proxies``; ``proxy`` is the first)."""

    proxy_count = 1
    listen_options = ""

    @classmethod
    def setUpClass(cls) -> None:
        cls.directory = tempfile.mkdtemp(prefix="pxd-mem-")
        cls.processes = []
        env = dict(os.environ, PYTHONPATH=ROOT)
        try:
            agent_port = cls.start_agent(env)
            sock = os.path.join(cls.directory, "m.sock")
            cls.start([sys.executable, os.path.join(ROOT, "bench", "proxy_bench_manager.py"),
                       sock, "bench", "bench-password", str(agent_port)], env=env)
            deadline = time.monotonic() + 20
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.05)
            cls.port = free_port()
            cls.proxies = []
            for n in range(cls.proxy_count):
                proxy = cls.start(TWISTD + [
                    "-n", "--pidfile=", "--logfile=" + os.path.join(
                        cls.directory, "proxy%d.log" % n),
                    "pixelated-proxy", "--manager-socket", sock, "--allow-root",
                    "--listen", "tcp:%d:interface=127.0.0.1%s" % (cls.port, cls.listen_options)],
                    env=env)
                cls.proxies.append(proxy)
                wait_port(cls.port, proxy)
                wait_listeners(cls.port, n + 1, proxy)
            cls.proxy = cls.proxies[0]
            cls.cookie = cls.log_in()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def start_agent(cls, env: dict) -> int:
        """Start the agent; return its port. Here: the demo agent."""
        agent_port = free_port()
        data = os.path.join(cls.directory, "data")
        os.mkdir(data)
        agent = cls.start([sys.executable, "-m", "pixelated_dispatcher.demo_agent",
                           "--port", str(agent_port), "--data-dir", data,
                           "--username", "bench"], stdin=subprocess.PIPE, env=env)
        agent.stdin.write(CREDENTIALS)
        agent.stdin.close()
        wait_port(agent_port, agent)
        return agent_port

    @classmethod
    def start(cls, args, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(args, start_new_session=True, **kwargs)
        cls.processes.append(process)
        return process

    @classmethod
    def tearDownClass(cls) -> None:
        for process in reversed(cls.processes):
            if process.poll() is None:
                process.terminate()
        for process in cls.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(cls.directory, ignore_errors=True)

    @classmethod
    def log_in(cls) -> str:
        import http.client
        import re
        connection = http.client.HTTPConnection("127.0.0.1", cls.port, timeout=30)
        connection.request("GET", "/auth/login")
        response = connection.getresponse()
        page = response.read().decode()
        csrf_cookie = response.getheader("Set-Cookie").split(";", 1)[0]
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        connection.request("POST", "/auth/login", body=urllib.parse.urlencode(
            {"username": "bench", "password": "bench-password", "csrf_token": token}),
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Cookie": csrf_cookie})
        response = connection.getresponse()
        response.read()
        assert response.status == 303, response.status
        return [c.split(";", 1)[0] for c in response.headers.get_all("Set-Cookie")
                if "session" in c][0]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        self.addCleanup(sock.close)
        return sock

    def grown(self, before: int) -> int:
        grown = status_kib(self.proxy.pid, "VmHWM") * 1024 - before
        sys.stderr.write("[%s: proxy RSS %.1f MiB before, peak %.1f MiB more] "
                         % (self.id().rsplit(".", 1)[-1], before / 2 ** 20, grown / 2 ** 20))
        return grown
