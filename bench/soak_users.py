#!/usr/bin/env python3
"""The simulated users of ``bench/soak``: a separate process, one asyncio loop.

    soak_users.py CONFIG.json

Each user is one keep-alive HTTPS browser connection to the proxy: it logs in
through the real login form once, then asks ``GET /whoami`` at a steady rate
(``/cgi-bin/whoami`` for the Docker test agent) until the deadline, keeping
the cookie it got at login. Every answer becomes one JSON line on stdout (an
*event*) that ``bench/soak`` reads while it runs (to time recoveries and to
wait for them) and classifies afterwards with ``soak_report``. A user that is
sent back to the login form logs in again (the event says so: that is a forced
login, a lost session) so that the run goes on.

Four requests in five are scripts (``X-Requested-With: XMLHttpRequest``: the
proxy answers 503 with ``Retry-After`` while an agent starts); the fifth is a
page load (``Accept: text/html``: the proxy's "starting your mailbox" page).

Every loop is bounded in count and time; only 127.0.0.1 is contacted. The
HTTP client and the login are ``scale_load``'s.
"""
import asyncio
import json
import os
import random
import re
import sys
import time
from typing import Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale_load import Connection, _context, log_in, session_token  # noqa: E402

_WAITING = re.compile(rb'http-equiv="refresh" content="\d+;url=/auth/starting')


def _text(body: bytes) -> str:
    """A page's words, without its markup and style."""
    text = re.sub(r"<style.*?</style>|<[^>]+>", " ", body.decode("utf-8", "replace"),
                  flags=re.S)
    return " ".join(text.split())


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def classify(username: str, status: int, headers: Dict[str, list], body: bytes) -> str:
    """What one answer to ``GET /whoami`` means for the user who asked.

    ``ok`` (their own agent, which got their credentials), ``wrong_user``,
    ``unauthenticated`` (their agent, started without their credentials),
    ``retry`` (503 with Retry-After), ``no_retry_after`` (503 without),
    ``starting`` (the waiting page), ``logged_out`` (401 or the login form),
    ``timed_out`` (504 from the proxy's --agent-timeout), else ``status N``.
    """
    if status == 200:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "username" in answer:
            if answer["username"] != username:
                return "wrong_user"
            return "ok" if answer.get("authenticated") is True else "unauthenticated"
        return "starting" if _WAITING.search(body) else "status 200 (not whoami)"
    if status == 503:
        return "retry" if headers.get("retry-after") else "no_retry_after"
    if status == 401:
        return "logged_out"
    if status in (302, 303):
        location = (headers.get("location") or [""])[0]
        if "/auth/login" in location:
            return "logged_out"
        if "/auth/starting" in location:
            return "starting"
    if status == 504:
        return "timed_out"
    return "status %d" % status


async def one_user(index: int, user: dict, config: dict, context, start_gate: asyncio.Event,
                   logins: asyncio.Semaphore) -> None:
    username, password = user["name"], user["password"]
    connection = Connection(config["port"], context)
    period = 1.0 / config["rate"]
    limit = config["request_timeout"]
    rng = random.Random(config["seed"] * 100003 + index)

    async def login(reason: str) -> Optional[str]:
        connection.cookies.clear()
        connection.close()
        async with logins:
            started = time.time()
            try:
                await log_in(connection, username, password, config["login_timeout"])
                token = session_token(connection.cookies)
                emit({"e": "login", "u": username, "t": started, "d": time.time() - started,
                      "ok": token is not None, "why": reason})
                return token
            except Exception as error:  # counted and reported, never hidden
                emit({"e": "login", "u": username, "t": started, "d": time.time() - started,
                      "ok": False, "why": reason, "error": str(error)[:300]})
                return None

    token = None
    for _ in range(5):  # bounded: a user whose first login fails five times is reported
        token = await login("first")
        if token is not None:
            break
        await asyncio.sleep(1.0)
    await start_gate.wait()
    deadline = config["end"]
    due = time.time() + rng.uniform(0, period)
    count = 0
    while due < deadline and count < config["max_requests"]:
        count += 1
        await asyncio.sleep(max(0.0, due - time.time()))
        if token is None:
            token = await login("no session")
            due = time.time() + period
            continue
        navigation = count % 5 == 0
        headers = ({"Accept": "text/html"} if navigation
                   else {"Accept": "application/json", "X-Requested-With": "XMLHttpRequest"})
        sent = time.time()
        try:
            status, answer_headers, body = await connection.request(
                "GET", config["whoami_path"], headers=headers, timeout=limit)
            kind = classify(username, status, answer_headers, body)
            detail = None
            if kind == "retry":
                detail = "Retry-After %s: %s" % (answer_headers["retry-after"][0],
                                                 _text(body)[-80:])
            elif kind not in ("ok", "starting"):
                detail = _text(body)[-200:]
        except Exception as error:
            status, kind, detail = 0, ("hang" if "timed out" in str(error) else "conn_error"), \
                str(error)[:200]
        event = {"e": "req", "u": username, "t": sent, "d": round(time.time() - sent, 4),
                 "k": kind, "s": status}
        if detail:
            event["x"] = detail
        now_token = session_token(connection.cookies)
        if now_token != token:
            event["cookie_changed"] = True
        emit(event)
        if kind == "logged_out" or now_token is None:
            token = await login("sent to the login form")
        else:
            token = now_token
        due += period
        if due < time.time() - period:
            due = time.time()  # do not fire a burst to catch up after a long answer
    connection.close()


async def main_async(config: dict) -> None:
    context = _context(config["ca"])
    gate = asyncio.Event()
    logins = asyncio.Semaphore(config.get("login_concurrency", 8))
    tasks = [asyncio.ensure_future(one_user(i, user, config, context, gate, logins))
             for i, user in enumerate(config["users"])]
    # Everyone logs in first; the steady requests start together once all
    # logins are done (or their time is up), which the harness waits for.
    login_deadline = time.time() + config["login_phase_timeout"]
    config["end"] = login_deadline + config["duration"]
    while time.time() < login_deadline:
        await asyncio.sleep(0.2)
        if os.path.exists(config["go_file"]):
            with open(config["go_file"]) as f:
                config["end"] = json.load(f)["end"]
            break
    gate.set()
    await asyncio.wait(tasks, timeout=max(1.0, config["end"] - time.time()
                                          + config["request_timeout"] + 30))
    for task in tasks:
        task.cancel()
    emit({"e": "done", "t": time.time()})


def main() -> None:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    asyncio.run(main_async(config))


if __name__ == "__main__":
    main()
