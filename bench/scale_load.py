#!/usr/bin/env python3
"""The load generator of ``bench/scale``: a separate process, one phase per run.

    scale_load.py register  --socket S --first N --count K --password P [--window W]
    scale_load.py resolve   --socket S --tokens FILE --seconds T [--window W]
    scale_load.py stop-agents --socket S [--window W]
    scale_load.py login     --port P --ca CERT --users FILE --sessions FILE ...
    scale_load.py steady    --port P --ca CERT --sessions FILE --rate R --seconds T ...
    scale_load.py recover   --port P --ca CERT --sessions FILE --since EPOCH --timeout T

Each run prints one JSON object on stdout. Every loop is bounded in count and
in time. Only 127.0.0.1 is ever contacted (and the manager's Unix socket).

The AMP parts (register, resolve) use Twisted, like the proxy and
pixelated-ctl do; the HTTPS parts use asyncio and a minimal HTTP/1.1 client
with keep-alive, one connection per browser session, so that the generator
stays cheap on a 2-core machine where it competes with the daemons.
"""
import argparse
import asyncio
import json
import os
import re
import ssl
import sys
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

HOST = "127.0.0.1"
SESSION_COOKIES = ("__Host-pixelated-session", "pixelated-session")
CSRF_COOKIES = ("__Host-pixelated-csrf", "pixelated-csrf")


def emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# --- AMP: registration and ResolveSession -----------------------------------

def _amp_main(coroutine_function, options) -> None:
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    def run(reactor):
        return ensureDeferred(coroutine_function(reactor, options))
    task.react(run)


async def _connect(reactor, path):
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    from twisted.protocols import amp
    return await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=10), amp.AMP())


async def _pipelined(reactor, count: int, seconds: float, window: int, call) -> dict:
    """Keep ``window`` calls in flight until ``count`` are done or time is up."""
    from twisted.internet.defer import Deferred
    started = time.perf_counter()
    deadline = started + seconds
    state = {"sent": 0, "done": 0, "errors": 0, "in_flight": 0, "error_kinds": {}}
    finished: Deferred = Deferred()

    def one_done(_result, ok: bool):
        state["in_flight"] -= 1
        if ok:
            state["done"] += 1
        else:
            state["errors"] += 1
            kind = _result.type.__name__ if hasattr(_result, "type") else "error"
            state["error_kinds"][kind] = state["error_kinds"].get(kind, 0) + 1
        refill()

    def refill():
        while (state["in_flight"] < window and state["sent"] < count
               and time.perf_counter() < deadline):
            index = state["sent"]
            state["sent"] += 1
            state["in_flight"] += 1
            d = call(index)
            d.addCallbacks(one_done, one_done, callbackArgs=(True,), errbackArgs=(False,))
        if state["in_flight"] == 0 and not finished.called:
            finished.callback(None)
    reactor.callLater(0, refill)
    await finished
    elapsed = time.perf_counter() - started
    return {"calls": state["done"], "errors": state["errors"], "seconds": round(elapsed, 3),
            "per_second": round(state["done"] / elapsed, 1) if elapsed else None,
            "error_kinds": state["error_kinds"]}


async def register(reactor, options) -> None:
    from pixelated_dispatcher import protocol as p
    connection = await _connect(reactor, options.socket)

    def call(index):
        name = "user%05d" % (options.first + index)
        return connection.callRemote(p.AddUser, username=name, password=options.password)
    result = await _pipelined(reactor, options.count, options.max_seconds, options.window, call)
    connection.transport.loseConnection()
    result["users_per_second"] = result.pop("per_second")
    emit(result)


async def resolve(reactor, options) -> None:
    from pixelated_dispatcher import protocol as p
    tokens: List[str] = []
    if options.tokens and os.path.exists(options.tokens):
        with open(options.tokens) as f:
            tokens = [s["token"] for s in json.load(f)][:options.max_tokens]
    connection = await _connect(reactor, options.socket)
    if not tokens:
        # No browser sessions yet: resolve an unknown token (same lookup, a miss).
        tokens = ["x" * 43]
    miss = tokens == ["x" * 43]

    def call(i):
        d = connection.callRemote(p.ResolveSession, token=tokens[i % len(tokens)])
        if miss:  # the expected answer for an unknown token is a round trip too
            d.addErrback(lambda f: f.trap(p.InvalidSession) and None)
        return d
    result = await _pipelined(reactor, options.max_calls, options.seconds, options.window,
                              call)
    result["unknown_token"] = miss
    connection.transport.loseConnection()
    result["tokens"] = len(tokens)
    emit(result)


async def stop_agents(reactor, options) -> None:
    """Stop every running agent through the manager (``StopAgent``, pipelined)."""
    from pixelated_dispatcher import protocol as p
    connection = await _connect(reactor, options.socket)
    running, after = [], None
    for _ in range(10000):  # pages; bounded
        page = await connection.callRemote(p.ListUsers, **({"after": after} if after else {}))
        users = p.parse_user_page(page["users"])
        running += [name for name, state in users if state != "stopped"]
        if not page["more"] or not users:
            break
        after = users[-1][0]
    result = await _pipelined(
        reactor, len(running), options.max_seconds, options.window,
        lambda i: connection.callRemote(p.StopAgent, username=running[i]))
    connection.transport.loseConnection()
    result["running_before"] = len(running)
    emit(result)


# --- HTTPS: a minimal keep-alive HTTP/1.1 client ----------------------------

class HTTPError(Exception):
    pass


class Connection:
    """One browser connection to the proxy (keep-alive, reconnects when closed)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.cookies: Dict[str, str] = {}

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            HOST, self.port, ssl=self.context, server_hostname="localhost")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Optional[Dict[str, str]] = None,
                      timeout: float = 30.0) -> Tuple[int, Dict[str, List[str]], bytes]:
        for attempt in (1, 2):
            fresh = self.writer is None
            if fresh:
                await self.open()
            try:
                return await asyncio.wait_for(self._exchange(method, path, body, headers),
                                              timeout)
            except (ConnectionError, asyncio.IncompleteReadError, HTTPError) as error:
                self.close()
                if fresh or attempt == 2:
                    raise HTTPError("%s %s: %s" % (method, path, error or type(error).__name__))
            except asyncio.TimeoutError:
                self.close()
                raise HTTPError("%s %s: timed out after %.0f s" % (method, path, timeout))
        raise AssertionError("unreachable")

    async def _exchange(self, method, path, body, headers):
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: localhost:%d" % self.port]
        if self.cookies:
            lines.append("Cookie: " + "; ".join("%s=%s" % kv for kv in self.cookies.items()))
        for name, value in (headers or {}).items():
            lines.append("%s: %s" % (name, value))
        if body or method == "POST":
            lines.append("Content-Length: %d" % len(body))
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HTTPError("bad status line %r" % status_line[:80])
        status = int(parts[1])
        response_headers: Dict[str, List[str]] = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                response_headers.setdefault(name.strip().lower(), []).append(value.strip())
        data = b""
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif "chunked" in ",".join(response_headers.get("transfer-encoding", [])).lower():
            chunks = []
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(chunks)
        elif "content-length" in response_headers:
            data = await self.reader.readexactly(int(response_headers["content-length"][0]))
        else:
            data = await self.reader.read()
            self.close()
        if "close" in ",".join(response_headers.get("connection", [])).lower():
            self.close()
        for value in response_headers.get("set-cookie", []):
            pair = value.split(";", 1)[0]
            if "=" in pair:
                name, cookie = pair.split("=", 1)
                expired = "max-age=0" in value.lower().replace(" ", "") or cookie == ""
                if expired:
                    self.cookies.pop(name.strip(), None)
                else:
                    self.cookies[name.strip()] = cookie
        return status, response_headers, data


def _context(ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = True
    return context


_CSRF_FIELD = re.compile(rb'name="csrf_token"[^>]*value="([^"]*)"'
                         rb'|value="([^"]*)"[^>]*name="csrf_token"')


def session_token(cookies: Dict[str, str]) -> Optional[str]:
    for name in SESSION_COOKIES:
        if name in cookies:
            return cookies[name]
    return None


async def log_in(connection: Connection, username: str, password: str,
                 timeout: float) -> float:
    """The whole browser login; seconds from the POST to the agent's page."""
    status, _, page = await connection.request("GET", "/auth/login")
    match = _CSRF_FIELD.search(page)
    if status != 200 or match is None:
        raise HTTPError("login form: %d" % status)
    token = (match.group(1) or match.group(2)).decode()
    body = urllib.parse.urlencode({"username": username, "password": password,
                                   "csrf_token": token}).encode()
    started = time.perf_counter()
    deadline = started + timeout
    status, headers, _ = await connection.request(
        "POST", "/auth/login", body,
        {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"},
        timeout=timeout)
    if status != 303:
        raise HTTPError("login POST answered %d" % status)
    location = urllib.parse.urlsplit(headers["location"][0])
    path = location.path + ("?" + location.query if location.query else "")
    status, page = None, b""
    while time.perf_counter() < deadline:
        status, headers, page = await connection.request(
            "GET", path, headers={"Accept": "text/html"},
            timeout=max(1.0, deadline - time.perf_counter()))
        if status in (301, 302, 303, 307):
            location = urllib.parse.urlsplit(headers["location"][0])
            path = location.path + ("?" + location.query if location.query else "")
            continue
        if status == 200 and path.startswith("/auth/starting"):
            await asyncio.sleep(0.05)  # the waiting page; a browser would refresh
            continue
        if status == 200 and username.encode() in page:
            return time.perf_counter() - started
        if status in (503,):
            await asyncio.sleep(0.05)
            continue
        raise HTTPError("after login %s answered %d" % (path, status))
    raise HTTPError("agent page not reached within %.0f s (last: %s %s %r)"
                    % (timeout, path, status, page[:200]))


async def _login_many(port, ca, jobs, concurrency, timeout, offered_rate=0.0,
                      stop_at=None) -> Tuple[List[dict], List[float], List[str]]:
    """Log in each (username, password, kind); bounded concurrency (and rate)."""
    context = _context(ca)
    semaphore = asyncio.Semaphore(concurrency)
    sessions, latencies, errors = [], [], []
    started = time.perf_counter()

    async def one(index, username, password, kind):
        if offered_rate:
            await asyncio.sleep(max(0.0, started + index / offered_rate - time.perf_counter()))
        async with semaphore:
            if stop_at is not None and time.perf_counter() > stop_at:
                return  # offered too late: the window is over
            connection = Connection(port, context)
            try:
                elapsed = await log_in(connection, username, password, timeout)
                latencies.append(elapsed)
                sessions.append({"username": username, "token": session_token(connection.cookies),
                                 "kind": kind, "login_s": round(elapsed, 4)})
            except Exception as error:  # counted and reported, never hidden
                errors.append("%s: %s" % (username, error))
            finally:
                connection.close()
    await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
    return sessions, latencies, errors


def login(options) -> None:
    from scale_report import latency_summary
    with open(options.users) as f:
        jobs = [(u, options.password, options.kind) for u in json.load(f)]
    started = time.perf_counter()
    sessions, latencies, errors = asyncio.run(
        _login_many(options.port, options.ca, jobs, options.concurrency, options.timeout))
    elapsed = time.perf_counter() - started
    existing = []
    if os.path.exists(options.sessions):
        with open(options.sessions) as f:
            existing = json.load(f)
    with open(options.sessions + ".tmp", "w") as f:
        json.dump(existing + sessions, f)
    os.replace(options.sessions + ".tmp", options.sessions)
    emit({"kind": options.kind, "logins": len(sessions), "errors": len(errors),
          "error_samples": errors[:5], "seconds": round(elapsed, 3),
          "logins_per_second": round(len(sessions) / elapsed, 2) if elapsed else None,
          "latency": latency_summary(latencies)})


# --- steady state -----------------------------------------------------------

async def _steady(options) -> dict:
    from scale_report import latency_summary
    with open(options.sessions) as f:
        sessions = json.load(f)[:options.max_sessions]
    context = _context(options.ca)
    connections = []
    for s in sessions:
        c = Connection(options.port, context)
        c.cookies[SESSION_COOKIES[0]] = s["token"]
        connections.append((s["username"], c))
    # Open every connection first (bounded concurrency): the figures are of
    # warm keep-alive traffic, not of TLS handshakes.
    semaphore = asyncio.Semaphore(50)

    async def warm(connection):
        async with semaphore:
            try:
                await connection.open()
            except OSError:
                pass
    await asyncio.gather(*(warm(c) for _, c in connections))

    latencies: List[float] = []
    storm_latencies: List[float] = []
    errors: Dict[str, int] = {}
    samples: List[str] = []
    period = len(connections) / options.rate  # seconds between requests of one session
    started = time.perf_counter() + 0.5
    end = started + options.seconds
    storm_from = end - options.login_seconds if options.login_rate else end + 1

    async def session_loop(index, username, connection):
        # Open loop: request k of this session is due at a fixed time; latency
        # counts from when it was due, so a stall is not hidden by waiting.
        due = started + period * index / len(connections)
        while due < end:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                status, _, body = await connection.request("GET", "/whoami", timeout=30)
                ok = status == 200 and json.loads(body).get("username") == username
                kind = "ok" if ok else "status %d" % status
            except Exception as error:
                kind = type(error).__name__
                if len(samples) < 5:
                    samples.append("%s: %s" % (username, error))
            elapsed = time.perf_counter() - due
            if kind == "ok":
                (storm_latencies if due >= storm_from else latencies).append(elapsed)
            else:
                errors[kind] = errors.get(kind, 0) + 1
            due += period

    tasks = [session_loop(i, u, c) for i, (u, c) in enumerate(connections)]
    login_result = None
    if options.login_rate:
        with open(options.login_users) as f:
            names = json.load(f)
        count = int(options.login_rate * options.login_seconds)
        jobs = [(names[i % len(names)], options.password, "storm") for i in range(count)]

        async def storm():
            await asyncio.sleep(max(0.0, storm_from - time.perf_counter()))
            t0 = time.perf_counter()
            result = await _login_many(options.port, options.ca, jobs, options.login_concurrency,
                                       options.timeout, offered_rate=options.login_rate,
                                       stop_at=end)
            return result, time.perf_counter() - t0
        tasks.append(storm())
    results = await asyncio.gather(*tasks)
    for _, c in connections:
        c.close()
    if options.login_rate:
        (storm_sessions, storm_login_latencies, storm_errors), storm_seconds = results[-1]
        login_result = {"offered_per_second": options.login_rate,
                        "completed": len(storm_sessions), "errors": len(storm_errors),
                        "error_samples": storm_errors[:3],
                        "completed_per_second": round(len(storm_sessions) / storm_seconds, 2),
                        "latency": latency_summary(storm_login_latencies)}
    quiet_seconds = options.seconds - (options.login_seconds if options.login_rate else 0)
    return {"sessions": len(connections), "offered_per_second": options.rate,
            "seconds": options.seconds,
            "requests": len(latencies), "per_second": round(len(latencies) / quiet_seconds, 1),
            "latency": latency_summary(latencies),
            "errors": sum(errors.values()), "error_kinds": errors, "error_samples": samples,
            "during_logins": None if not options.login_rate else {
                "requests": len(storm_latencies),
                "per_second": round(len(storm_latencies) / options.login_seconds, 1),
                "latency": latency_summary(storm_latencies), "logins": login_result}}


def steady(options) -> None:
    emit(asyncio.run(_steady(options)))


# --- recovery after a manager restart --------------------------------------

async def _recover(options) -> dict:
    with open(options.sessions) as f:
        sessions = json.load(f)
    context = _context(options.ca)
    semaphore = asyncio.Semaphore(options.concurrency)
    deadline = time.time() + options.timeout
    served: List[float] = []
    failed: List[str] = []

    async def one(s):
        connection = Connection(options.port, context)
        connection.cookies[SESSION_COOKIES[0]] = s["token"]
        try:
            while time.time() < deadline:
                async with semaphore:
                    try:
                        status, _, body = await connection.request("GET", "/whoami", timeout=30)
                        if status == 200 and json.loads(body).get("username") == s["username"]:
                            served.append(time.time() - options.since)
                            return
                        if status in (401, 403) or (status in (302, 303) and False):
                            break
                    except Exception:
                        pass
                await asyncio.sleep(options.interval)
            failed.append(s["username"])
        finally:
            connection.close()
    await asyncio.gather(*(one(s) for s in sessions))
    return {"sessions": len(sessions), "served": len(served), "not_served": len(failed),
            "not_served_samples": failed[:5],
            "all_served_after_s": round(max(served), 2) if served and not failed else None,
            "median_served_after_s": round(sorted(served)[len(served) // 2], 2) if served
            else None}


def recover(options) -> None:
    emit(asyncio.run(_recover(options)))


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    r = sub.add_parser("register")
    r.add_argument("--socket", required=True)
    r.add_argument("--first", type=int, default=0)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--password", required=True)
    r.add_argument("--window", type=int, default=4)
    r.add_argument("--max-seconds", type=float, default=3600)
    a = sub.add_parser("stop-agents")
    a.add_argument("--socket", required=True)
    a.add_argument("--window", type=int, default=16)
    a.add_argument("--max-seconds", type=float, default=300)
    s = sub.add_parser("resolve")
    s.add_argument("--socket", required=True)
    s.add_argument("--tokens")
    s.add_argument("--max-tokens", type=int, default=1000)
    s.add_argument("--seconds", type=float, default=5)
    s.add_argument("--max-calls", type=int, default=1000000)
    s.add_argument("--window", type=int, default=64)
    for name in ("login", "steady", "recover"):
        h = sub.add_parser(name)
        h.add_argument("--port", type=int, required=True)
        h.add_argument("--ca", required=True)
        h.add_argument("--sessions", required=True)
        h.add_argument("--password", default="")
        h.add_argument("--timeout", type=float, default=120)
        h.add_argument("--concurrency", type=int, default=8)
        if name == "login":
            h.add_argument("--users", required=True)
            h.add_argument("--kind", default="cold")
        if name == "steady":
            h.add_argument("--rate", type=float, default=200)
            h.add_argument("--seconds", type=float, default=60)
            h.add_argument("--max-sessions", type=int, default=100000)
            h.add_argument("--login-rate", type=float, default=0)
            h.add_argument("--login-seconds", type=float, default=20)
            h.add_argument("--login-users")
            h.add_argument("--login-concurrency", type=int, default=64)
        if name == "recover":
            h.add_argument("--since", type=float, required=True)
            h.add_argument("--interval", type=float, default=1.0)
    options = parser.parse_args()
    if options.phase == "register":
        _amp_main(register, options)
    elif options.phase == "resolve":
        _amp_main(resolve, options)
    elif options.phase == "stop-agents":
        _amp_main(stop_agents, options)
    else:
        {"login": login, "steady": steady, "recover": recover}[options.phase](options)


if __name__ == "__main__":
    main()
