"""Revocation closes what is already open, with the real manager, proxy,
``pixelated-ctl`` and demo agents (process provider), over TLS.

A WebSocket-like tunnel (``/tunnel`` of the demo agent: ``101``, then an
echo) and a long poll (``/wait``, no answer for two minutes) are open
through the proxy; ``pixelated-ctl logout NAME``, ``passwd NAME``,
``remove NAME`` and the user's own logout each close both within a second,
while another user's tunnel keeps working.
"""
import socket
import ssl
import time

from .dispatcher_case import DispatcherCase

#: The promise: closed within a second of the command's return (the push
#: happens before the manager answers the command).
WITHIN = 1.0


class OpenConnection:
    """A raw TLS connection through the proxy, with the user's cookie."""

    def __init__(self, case, cookie, path, headers=b""):
        context = ssl.create_default_context(cafile=case.dispatcher.tls["cert"])
        raw = socket.create_connection(("127.0.0.1", case.dispatcher.port), timeout=30)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: localhost\r\nCookie: %s=%s\r\n%s\r\n"
                          % (path, cookie[0].encode(), cookie[1].encode(), headers))

    def head(self):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    def echo(self, payload=b"ping"):
        self.sock.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    def seconds_until_ended(self, limit=5.0):
        """Seconds until the proxy closes the connection or answers the
        request in flight with a page of its own (None: neither within
        ``limit``); the agent's answer never comes."""
        start = time.monotonic()
        self.sock.settimeout(0.05)
        while time.monotonic() - start < limit:
            try:
                data = self.sock.recv(4096)
                assert b"waited" not in data, data
                if data == b"" or data.startswith(b"HTTP/1.1 "):
                    return time.monotonic() - start
            except socket.timeout:
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                return time.monotonic() - start
        return None

    def close(self):
        self.sock.close()


class RevocationClosesOpenConnections(DispatcherCase):
    prefix = "pxd-revocation-"
    names = ("alice", "bob", "carol", "dave", "erin")

    @classmethod
    def prepare(cls):
        for name in cls.names:
            cls.dispatcher.add_user(name, name + "'s password")

    def logged_in(self, name):
        browser = self.browser()
        self.assertEqual(browser.log_in(name, name + "'s password").status, 303)
        page = browser.get("/")
        self.assertEqual(page.status, 200, page.text + self.logs())
        return browser

    def open_both(self, browser):
        """A tunnel (checked to echo) and a long poll (checked to wait)."""
        cookie = browser.session_cookie()
        tunnel = OpenConnection(self, cookie, b"/tunnel",
                                b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
        self.addCleanup(tunnel.close)
        head = tunnel.head()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head + self.logs().encode())
        self.assertEqual(tunnel.echo(), b"ping")
        poll = OpenConnection(self, cookie, b"/wait?seconds=120")
        self.addCleanup(poll.close)
        poll.sock.settimeout(0.5)
        self.assertRaises(socket.timeout, poll.sock.recv, 1)  # in flight
        return tunnel, poll

    def assert_closed_within_a_second(self, connections, revoke):
        revoke()
        for connection in connections:
            seconds = connection.seconds_until_ended()
            self.assertIsNotNone(seconds, "still open 5 s after the revocation" + self.logs())
            self.assertLess(seconds, WITHIN)

    def ctl(self, *args, password=None):
        def run():
            result = self.dispatcher.ctl(*args, password=password)
            self.assertEqual(result.returncode, 0, result.stderr)
        return run

    def test_ctl_logout_closes_tunnels_and_long_polls_and_spares_others(self):
        erin = self.open_both(self.logged_in("erin"))
        alice = self.open_both(self.logged_in("alice"))
        self.assert_closed_within_a_second(alice, self.ctl("logout", "alice"))
        self.assertEqual(erin[0].echo(b"still here"), b"still here")

    def test_passwd_closes_them(self):
        bob = self.open_both(self.logged_in("bob"))
        self.assert_closed_within_a_second(
            bob, self.ctl("passwd", "bob", "--password-stdin", password="bob's new one"))

    def test_remove_closes_them(self):
        carol = self.open_both(self.logged_in("carol"))
        self.assert_closed_within_a_second(carol, self.ctl("remove", "carol"))

    def test_the_users_own_logout_closes_them(self):
        browser = self.logged_in("dave")
        dave = self.open_both(browser)
        self.assert_closed_within_a_second(
            dave, lambda: self.assertEqual(browser.log_out().status, 303))
