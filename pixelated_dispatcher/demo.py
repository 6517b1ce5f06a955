"""Run a throw-away dispatcher on this machine: ``python -m pixelated_dispatcher.demo``.

It is what ``make demo`` runs, and what the integration tests use to start the
real daemons: a self-signed certificate, a temporary state directory,
``twistd -n pixelated-manager`` with the process provider and the demo agent,
``twistd -n pixelated-proxy`` on ``https://localhost:8443/``, and a user
``demo`` with a random password. Ctrl-C stops everything; the manager stops
its agents before it exits, so nothing is left behind.
"""
import argparse
import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

TWISTD = [sys.executable, "-c",
          "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
CTL = [sys.executable, "-c", "from pixelated_dispatcher.ctl import main; main()"]


def write_self_signed_certificate(directory: str, hostname: str = "localhost") -> Dict[str, str]:
    """Write ``key.pem`` and ``cert.pem`` for ``hostname``, 127.0.0.1 and ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    paths = {"key": os.path.join(directory, "key.pem"),
             "cert": os.path.join(directory, "cert.pem")}
    with open(os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(paths["cert"], "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str,
              process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise RuntimeError("%s exited with status %s" % (what, process.returncode))
        time.sleep(0.05)
    raise RuntimeError("%s was not ready after %.0f s" % (what, timeout))


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Dispatcher:
    """Manager and proxy as real ``twistd`` processes in one directory.

    :ivar url: the proxy's HTTPS address.
    """

    def __init__(self, directory: str, port: int = 0,
                 manager_args: Optional[List[str]] = None,
                 proxy_args: Optional[List[str]] = None,
                 proxy_twistd_args: Optional[List[str]] = None,
                 keep_agents: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self.port = port or free_port()
        self.url = "https://localhost:%d/" % self.port
        self.socket = os.path.join(self.directory, "run", "manager.sock")
        self.state_dir = os.path.join(self.directory, "state")
        self.manager_log = os.path.join(self.directory, "manager.log")
        self.proxy_log = os.path.join(self.directory, "proxy.log")
        self._manager_args = manager_args or []
        self._proxy_args = proxy_args or []
        self._proxy_twistd_args = proxy_twistd_args or []
        #: whether agents outlive the manager (production) or stop with it (demo)
        self.keep_agents = keep_agents
        self.manager: Optional[subprocess.Popen] = None
        self.proxy: Optional[subprocess.Popen] = None
        os.makedirs(self.directory, exist_ok=True)
        # Agents run under uids of their own when the manager is root: they
        # must pass through (not list) this directory to reach their data.
        os.chmod(self.directory, 0o711)
        self.tls = write_self_signed_certificate(self.directory)

    def twistd_command(self, plugin: str) -> List[str]:
        """How ``twistd`` is run for ``plugin`` (tests wrap it, e.g. in a
        seccomp filter like the systemd unit's)."""
        return list(TWISTD)

    def _twistd(self, log: str, plugin: str, args: List[str],
                twistd_args: Sequence[str] = ()) -> subprocess.Popen:
        # cwd: the daemons import the code from the interpreter's path, as
        # under systemd, not from wherever the caller stands (a clone the
        # proxy's account cannot read once it dropped root).
        return subprocess.Popen(
            self.twistd_command(plugin) + ["-n", "--pidfile=", "--logfile=" + log]
            + list(twistd_args) + [plugin] + args,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.directory)

    def start_manager(self, timeout: float = 30) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.manager = self._twistd(self.manager_log, "pixelated-manager", [
            "--socket", self.socket, "--state-dir", self.state_dir,
            "--provider", "process"] + self._manager_args
            + ([] if self.keep_agents else ["--stop-agents-on-exit"]))
        _wait_for(lambda: os.path.exists(self.socket), timeout, "pixelated-manager",
                  self.manager)

    def start_proxy(self, timeout: float = 30) -> None:
        listen = "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (
            self.port, self.tls["key"].replace(":", "\\:"), self.tls["cert"].replace(":", "\\:"))
        extra = list(self._proxy_args)
        if os.getuid() == 0 and "--uid" not in self._proxy_twistd_args:
            extra.append("--allow-root")  # a throw-away dispatcher, not a deployment
        self.proxy = self._twistd(self.proxy_log, "pixelated-proxy", [
            "--manager-socket", self.socket, "--listen", listen] + extra,
            self._proxy_twistd_args)
        _wait_for(lambda: _port_open(self.port), timeout, "pixelated-proxy", self.proxy)

    def start(self) -> None:
        self.start_manager()
        self.start_proxy()

    def log_tails(self, chars: int = 4000) -> str:
        """The end of each daemon's log, headed by its path: what a failing
        test shows of the daemons."""
        tails = []
        for path in (self.manager_log, self.proxy_log):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tails.append("---- %s\n%s" % (path, f.read()[-chars:]))
        return "\n".join(tails)

    def ctl(self, *args: str, password: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run the real ``pixelated-ctl`` against this dispatcher."""
        return subprocess.run(CTL + ["--socket", self.socket] + list(args),
                              input=password + "\n" if password is not None else None,
                              capture_output=True, text=True, timeout=60)

    def add_user(self, name: str, password: str) -> None:
        result = self.ctl("add", name, "--password-stdin", password=password)
        if result.returncode != 0:
            raise RuntimeError("pixelated-ctl add failed: " + result.stderr.strip())

    @staticmethod
    def _stop(process: Optional[subprocess.Popen], timeout: float) -> None:
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_proxy(self, timeout: float = 15) -> None:
        self._stop(self.proxy, timeout)

    def stop_manager(self, timeout: float = 30) -> None:
        self._stop(self.manager, timeout)

    def stop_agents(self) -> None:
        """Stop every running agent through the manager."""
        if self.manager is None or self.manager.poll() is not None:
            return
        for name in self.ctl("running").stdout.split():
            self.ctl("stop", name)

    def stop(self) -> None:
        self.stop_proxy()
        if self.keep_agents:
            self.stop_agents()
        self.stop_manager()


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--dir", help="where to keep state (default: a new temporary directory)")
    options = parser.parse_args(argv)
    directory = options.dir or tempfile.mkdtemp(prefix="pixelated-demo-")
    dispatcher = Dispatcher(directory, options.port)
    password = secrets.token_urlsafe(12)
    # Both explicitly: a shell may start us with SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        dispatcher.start()
        dispatcher.add_user("demo", password)
        print("\npixelated-dispatcher demo is running (state in %s)\n\n"
              "  URL:      %s\n  user:     demo\n  password: %s\n\n"
              "The certificate is self-signed: your browser will warn about it.\n"
              "Add users with: %s --socket %s add NAME\n"
              "Press Ctrl-C to stop.\n" % (directory, dispatcher.url, password,
                                           os.path.join(os.path.dirname(sys.executable),
                                                        "pixelated-ctl"),
                                           dispatcher.socket), flush=True)
        manager, proxy = dispatcher.manager, dispatcher.proxy
        assert manager is not None and proxy is not None  # started
        while manager.poll() is None and proxy.poll() is None:
            time.sleep(0.5)
        print("a daemon exited; see the logs in %s" % directory, file=sys.stderr)
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:
        print("demo failed: %s (logs in %s)" % (error, directory), file=sys.stderr)
    finally:
        # A second Ctrl-C (or make passing the signal on) must not cut the
        # clean-up short and leave daemons behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping...", flush=True)
        dispatcher.stop()
        if not options.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
