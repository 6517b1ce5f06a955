"""The demo agent as a real process: what a user sees, and what the
dispatcher's tests rely on (/echo, /blob, /upload, /whoami, exit codes)."""
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from pixelated_dispatcher.demo_agent import BLOB_CHUNK, EXIT_CANNOT_START, MAX_BLOB_SIZE
from pixelated_dispatcher.manager.providers.process import free_loopback_port


def credentials(user="alice", password="hunter2-secret"):
    return json.dumps({"leap_provider_hostname": "example.org", "user": user,
                       "password": password}).encode() + b"\n"


def spawn(data_dir, username="alice", stdin=b"", port=None, log_path=None):
    port = port or free_loopback_port()
    log_path = log_path or os.path.join(data_dir, "..", "agent-%d.log" % port)
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pixelated_dispatcher.demo_agent", "--port", str(port),
         "--data-dir", str(data_dir), "--username", username],
        stdin=subprocess.PIPE, stdout=log, stderr=log)
    log.close()
    process.stdin.write(stdin)
    process.stdin.close()
    process.port = port
    process.log_path = log_path
    return process


def output(process) -> str:
    with open(process.log_path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def wait_healthy(process, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("agent exited with %s:\n%s"
                                 % (process.returncode, output(process)))
        try:
            if request(process, "GET", "/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("agent did not answer within %s s:\n%s" % (timeout, output(process)))


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError("agent did not exit on SIGTERM")
    return process.returncode


@contextlib.contextmanager
def agent(data_dir, username="alice", stdin=None):
    process = spawn(data_dir, username, credentials(username) if stdin is None else stdin)
    try:
        wait_healthy(process)
        yield process
    finally:
        stop(process)


def request(process, method, path, body=None, headers=(), **kwargs):
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
    try:
        connection.putrequest(method, path)
        for name, value in headers:
            connection.putheader(name, value)
        if kwargs.get("chunked"):
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for chunk in body:
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
        else:
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "alice" / "data"
    path.mkdir(parents=True)
    return path


def test_mailbox_page_for_the_right_user(data_dir):
    with agent(data_dir) as a:
        assert request(a, "HEAD", "/")[0] == 200  # probes do not count as visits
        status, headers, body = request(a, "GET", "/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert b"Mailbox of alice" in body
        assert b'<span id="visits">1</span> time.' in body
        assert b'href="/about"' in body
        status, _, about = request(a, "GET", "/about")
        assert status == 200 and b'href="/"' in about
    assert "hunter2" not in output(a)


def test_visits_persist_across_restarts_and_sigterm_exits_cleanly(data_dir):
    with agent(data_dir) as a:
        request(a, "GET", "/")
        request(a, "GET", "/")
    assert a.returncode == 0
    with agent(data_dir) as b:
        body = request(b, "GET", "/")[2]
    assert b'<span id="visits">3</span> times.' in body


def test_credentials_for_another_user_are_refused(data_dir):
    with agent(data_dir, stdin=credentials("mallory")) as a:
        status, _, body = request(a, "GET", "/")
        whoami = json.loads(request(a, "GET", "/whoami")[2])
    assert status == 403
    assert b"did not match" in body and b"Mailbox of" not in body
    assert whoami["authenticated"] is False and whoami["credentials_user"] == "mallory"
    assert not (data_dir / "visits").exists()


@pytest.mark.parametrize("line", [b"", b"{not json\n", b'["alice"]\n'])
def test_missing_or_broken_credentials_serve_unauthenticated(data_dir, line):
    with agent(data_dir, stdin=line) as a:
        assert request(a, "GET", "/")[0] == 403
        whoami = json.loads(request(a, "GET", "/whoami")[2])
    assert whoami == {"username": "alice", "authenticated": False, "credentials_user": None,
                      "leap_provider_hostname": None, "password_received": False,
                      "credentials_sha256": None}
    complaints = [line for line in output(a).splitlines() if "credentials" in line]
    assert len(complaints) == 1, output(a)


def test_whoami_reports_what_the_credentials_said_but_not_the_password(data_dir):
    with agent(data_dir) as a:
        status, headers, body = request(a, "GET", "/whoami")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"username": "alice", "authenticated": True,
                                "credentials_user": "alice",
                                "leap_provider_hostname": "example.org",
                                "password_received": True,
                                "credentials_sha256": hashlib.sha256(
                                    credentials("alice")).hexdigest()}
    assert b"hunter2" not in body


def test_health_and_echo_of_repeated_headers(data_dir):
    with agent(data_dir) as a:
        assert request(a, "GET", "/health")[:3:2] == (200, b"ok\n")
        status, _, body = request(a, "GET", "/echo?x=1", headers=[
            ("Cookie", "a=1"), ("Cookie", "b=2"), ("X-Forwarded-For", "192.0.2.1")])
    echoed = json.loads(body)
    assert status == 200
    assert echoed["method"] == "GET" and echoed["path"] == "/echo"
    assert echoed["uri"] == "/echo?x=1" and echoed["username"] == "alice"
    assert echoed["headers"]["cookie"] == ["a=1", "b=2"]
    assert echoed["headers"]["x-forwarded-for"] == ["192.0.2.1"]


def _pattern(n):
    whole, rest = divmod(n, len(BLOB_CHUNK))
    digest = hashlib.sha256()
    for _ in range(whole):
        digest.update(BLOB_CHUNK)
    digest.update(BLOB_CHUNK[:rest])
    return digest.hexdigest()


def test_blob_has_exactly_the_bytes_asked_for(data_dir):
    size = 3 * 1024 * 1024 + 5
    with agent(data_dir) as a:
        status, headers, body = request(a, "GET", "/blob?size=%d" % size)
        empty = request(a, "GET", "/blob?size=0")
        bad = [request(a, "GET", "/blob" + query)[0] for query in
               ("", "?size=", "?size=abc", "?size=-1", "?size=1.5",
                "?size=%d" % (MAX_BLOB_SIZE + 1), "?size=1&size=2")]
    assert status == 200 and headers["Content-Length"] == str(size)
    assert len(body) == size and hashlib.sha256(body).hexdigest() == _pattern(size)
    assert empty[0] == 200 and empty[2] == b""
    assert bad == [400] * 7


def test_a_huge_blob_streams_without_filling_memory(data_dir):
    with agent(data_dir) as a:
        with socket.create_connection(("127.0.0.1", a.port)) as s:
            s.sendall(b"GET /blob?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % MAX_BLOB_SIZE)
            received = 0
            while received < 64 * 1024 * 1024:
                received += len(s.recv(1024 * 1024))
            rss = psutil.Process(a.pid).memory_info().rss
        assert rss < 150 * 1024 * 1024, "agent holds %d MB for a download" % (rss >> 20)
        assert request(a, "GET", "/health")[0] == 200  # and it survived the hang-up


def test_upload_counts_and_hashes_the_body(data_dir):
    data = os.urandom(5 * 1024 * 1024 + 3)
    with agent(data_dir) as a:
        plain = json.loads(request(a, "POST", "/upload", body=data,
                                   headers=[("Content-Type", "application/octet-stream")])[2])
        chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        chunked = json.loads(request(a, "POST", "/upload", body=chunks, chunked=True)[2])
        assert request(a, "GET", "/upload")[0] == 405
    expected = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert plain == expected and chunked == expected


def test_a_taken_port_makes_it_exit_saying_so(data_dir):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        process = spawn(data_dir, stdin=credentials(), port=squatter.getsockname()[1])
        assert process.wait(10) == EXIT_CANNOT_START
    assert "address already in use" in output(process).lower()


def test_an_unusable_data_dir_makes_it_exit_saying_so(data_dir):
    (data_dir / "visits").mkdir()
    process = spawn(data_dir, stdin=credentials())
    assert process.wait(10) == EXIT_CANNOT_START
    assert "cannot use data directory" in output(process)
