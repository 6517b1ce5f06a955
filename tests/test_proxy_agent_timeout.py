"""``--agent-timeout``: an agent that takes a request and then says nothing
(deadlocked, stopped, swapping) gets the browser a 504, or a cut connection
once the answer has begun, instead of an endless wait.

The fast tests run the proxy's real site on a ``MemoryReactorClock``: the
browser and the agent are ``StringTransport``s, and the test plays the agent
byte by byte while moving the clock. :class:`HungAgentOverSockets` does the
same through real sockets with :mod:`.forwarding_setup`'s agent
stand-in, and :class:`StoppedAgentProcess` with real processes: a
SIGSTOPped demo agent behind the real twistd proxy and manager.
"""
import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.proxy import tap
from pixelated_dispatcher.proxy.agent_client import AGENT_TIMEOUT

from .clocked_proxy import ALICE_AGENT, TIMEOUT, ClockedProxy
from .dispatcher_case import DispatcherCase, agent_pid, wait_until
from .forwarding_setup import NAVIGATION, XHR, ForwardingSetup

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


class NoAnswer(ClockedProxy):
    """The agent took the request and says nothing."""

    def test_no_head_in_time_is_a_504_page(self) -> None:
        browser = self.request(path=b"/inbox?search=secret-words", headers=NAVIGATION)
        agent = self.agent_connects()
        self.assertTrue(agent.received().startswith(b"GET /inbox?search=secret-words "))
        self.clock.advance(TIMEOUT - 0.1)
        self.assert_waiting(browser, agent)
        self.clock.advance(0.1)
        answer = self.assert_answered(browser, b"504")
        self.assertIn(b"Your mailbox did not answer in time", answer)
        self.assertIn(b"reload the page in a moment", answer)
        self.assertIn(b"Content-Type: text/html; charset=utf-8", answer)
        self.assertIn(b"Cache-Control: no-store", answer)
        self.assertIn(b"X-Frame-Options: SAMEORIGIN", answer)
        self.assertTrue(agent.transport.disconnected, "agent connection not aborted")

    def test_the_log_names_the_user_and_the_agent_but_no_query_or_cookie(self) -> None:
        self.request(path=b"/inbox?search=secret-words", headers=NAVIGATION)
        self.agent_connects()
        self.clock.advance(TIMEOUT)  # longer than the session cache keeps alice
        lines = [line for line in self.logged if "sent nothing" in line]
        self.assertEqual(len(lines), 1, self.logged)
        self.assertIn("alice", lines[0])
        self.assertIn("127.0.0.1:41001", lines[0])
        self.assertIn("504", lines[0])
        self.assertNotIn("secret-words", lines[0])
        self.assertNotIn(self.token, lines[0])

    def test_scripts_get_json(self) -> None:
        browser = self.request(headers=XHR)
        self.agent_connects()
        self.clock.advance(TIMEOUT)
        answer = self.assert_answered(browser, b"504")
        self.assertIn(b'{"error": "mailbox did not answer in time"}', answer)

    def test_a_late_answer_never_reaches_the_browser(self) -> None:
        browser = self.request()
        agent = self.agent_connects()
        self.clock.advance(TIMEOUT)
        agent.says(OK_HEAD + b"ok")
        self.assertNotIn(b"200 OK", browser.value())
        self.assertEqual(browser.value().count(b"HTTP/1.1 "), 1)

    def test_a_timed_out_connection_is_not_reused(self) -> None:
        first = self.request()
        agent = self.agent_connects()
        agent.says(OK_HEAD + b"ok")
        self.assert_answered(first, b"200")
        self.assertEqual(self.forwarder.pool.idle_count(), 1)
        second = self.request()  # on the pooled connection
        self.assertEqual(self.clock.tcpClients, [])
        self.clock.advance(TIMEOUT)
        self.assert_answered(second, b"504")
        self.assertTrue(agent.transport.disconnected)
        self.agent_closes(agent)
        self.assertEqual(self.forwarder.pool.idle_count(), 0)
        third = self.request()
        fresh = self.agent_connects()  # a new connection, not the hung one
        fresh.says(OK_HEAD + b"ok")
        self.assertTrue(self.assert_answered(third, b"200").endswith(b"\r\n\r\nok"))
        self.assertEqual(self.forwarder.pool.idle_count(), 1)

    def test_other_connections_of_the_user_carry_on(self) -> None:
        hung_browser = self.request(path=b"/hangs")
        hung = self.agent_connects()
        self.clock.advance(TIMEOUT / 2)
        other_browser = self.request(path=b"/answers")
        other = self.agent_connects()
        self.clock.advance(TIMEOUT / 2)
        self.assert_answered(hung_browser, b"504")
        self.assertTrue(hung.transport.disconnected)
        self.assertFalse(other.closed)
        ensures = self.manager.ensures
        other.says(OK_HEAD + b"ok")
        self.assert_answered(other_browser, b"200")
        self.assertEqual(self.forwarder.pool.idle_count(), 1)
        self.assertIs(self.forwarder.pool.idle_connection(
            (ALICE_AGENT.host, ALICE_AGENT.port)), other.connection)
        # hung, not gone: the agent is not restarted
        self.assertEqual(self.manager.ensures, ensures)

    def test_a_head_request_gets_a_504_without_a_body(self) -> None:
        browser = self.request(method=b"HEAD")
        self.agent_connects()
        self.clock.advance(TIMEOUT)
        answer = self.assert_answered(browser, b"504")
        self.assertTrue(answer.endswith(b"\r\n\r\n"), answer)


class SlowButAlive(ClockedProxy):
    """Any byte from the agent restarts the clock; a slow browser stops it."""

    def test_bytes_slower_in_total_but_faster_between_reads_are_waited_for(self) -> None:
        browser = self.request()
        agent = self.agent_connects()
        step = TIMEOUT * 0.9
        self.clock.advance(step)
        agent.says(b"HTTP/1.1 200 OK\r\n")  # half a head is a sign of life too
        self.clock.advance(step)
        agent.says(b"Transfer-Encoding: chunked\r\n\r\n")
        for piece in (b"one,", b"two,", b"three,", b"four"):
            self.clock.advance(step)
            agent.says(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.clock.advance(step)
        agent.says(b"0\r\n\r\n")
        answer = self.assert_answered(browser, b"200")
        self.assertTrue(answer.endswith(b"0\r\n\r\n"), answer)
        self.assertEqual(answer.count(b"four"), 1)
        self.assertFalse(browser.disconnected)
        self.assertEqual(self.forwarder.pool.idle_count(), 1)  # and back in the pool
        self.assertEqual(self.agent_timers(), [])  # the timer is gone too

    def test_no_clock_while_the_browser_is_still_uploading(self) -> None:
        body = b"0123456789"
        head = (b"POST /upload HTTP/1.1\r\nHost: x\r\nCookie: pixelated-session=%s\r\n"
                b"Content-Length: %d\r\n\r\n" % (self.token.encode(), len(body)))
        browser = self.browser(head + body[:5])
        self.clock.advance(TIMEOUT * 3)  # a slow browser, not a slow agent
        self.assertEqual(browser.value(), b"")
        self.channel.dataReceived(body[5:])
        agent = self.agent_connects()
        self.assertTrue(agent.received().endswith(b"\r\n\r\n" + body))
        self.clock.advance(TIMEOUT * 0.9)
        agent.says(OK_HEAD + b"ok")
        self.assert_answered(browser, b"200")

    def test_an_agent_reading_a_large_upload_is_alive(self) -> None:
        body = b"x" * (300 * 1024)  # streamed from the spool file, 64 KiB a piece
        browser = self.request(method=b"POST", path=b"/upload", body=body)
        agent = self.agent_connects()
        while agent.transport.producer is not None:
            self.clock.advance(TIMEOUT * 0.9)
            self.assert_waiting(browser, agent)
            agent.reads_a_piece()
        self.assertTrue(agent.received().endswith(b"\r\n\r\n" + body))
        self.clock.advance(TIMEOUT * 0.9)
        agent.says(OK_HEAD + b"ok")
        self.assert_answered(browser, b"200")

    def test_an_agent_that_stops_reading_an_upload_is_hung(self) -> None:
        body = b"x" * (300 * 1024)
        browser = self.request(method=b"POST", path=b"/upload", body=body)
        agent = self.agent_connects()
        agent.reads_a_piece()
        self.clock.advance(TIMEOUT)
        self.assert_answered(browser, b"504")
        self.assertTrue(agent.transport.disconnected)

    def test_a_slow_browser_pausing_the_agent_is_not_the_agents_fault(self) -> None:
        browser = self.request(path=b"/download")
        agent = self.agent_connects()
        agent.says(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        self.channel.pauseProducing()  # the browser's buffers are full
        self.assertEqual(agent.transport.producerState, "paused")
        self.clock.advance(TIMEOUT * 3)
        self.assertFalse(agent.closed)
        self.assertFalse(browser.disconnected)
        self.channel.resumeProducing()
        self.clock.advance(TIMEOUT * 0.9)  # a whole timeout again from the resume
        agent.says(b"4\r\nlast\r\n0\r\n\r\n")
        answer = self.assert_answered(browser, b"200")
        self.assertTrue(answer.endswith(b"last\r\n0\r\n\r\n"), answer)


class SilentMidBody(ClockedProxy):
    """The head went to the browser, then the agent stopped."""

    def test_the_browser_connection_is_aborted_not_finished(self) -> None:
        browser = self.request(path=b"/message")
        agent = self.agent_connects()
        agent.says(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        self.clock.advance(TIMEOUT - 0.1)
        self.assertFalse(browser.disconnected)
        self.clock.advance(0.1)
        answer = self.assert_answered(browser, b"200")
        self.assertTrue(answer.endswith(b"\r\n\r\n" + b"x" * 10), answer)  # 10 of 100
        self.assertTrue(browser.disconnected, "browser connection not aborted")
        self.assertTrue(agent.transport.disconnected, "agent connection not aborted")
        self.agent_closes(agent)
        self.assertEqual(self.forwarder.pool.idle_count(), 0)
        lines = [line for line in self.logged if "sent nothing" in line]
        self.assertEqual(len(lines), 1, self.logged)
        self.assertIn("alice", lines[0])
        self.assertIn("127.0.0.1:41001", lines[0])
        self.assertIn("middle of answering", lines[0])

    def test_a_chunked_answer_gets_no_last_chunk(self) -> None:
        browser = self.request(path=b"/stream")
        agent = self.agent_connects()
        agent.says(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        self.clock.advance(TIMEOUT)
        answer = browser.value()
        self.assertTrue(browser.disconnected)
        self.assertIn(b"first", answer)
        self.assertFalse(answer.endswith(b"0\r\n\r\n"), answer)


class Tunnels(ClockedProxy):
    """A switched WebSocket may be idle for hours; before the switch, the
    agent must answer like any other."""

    UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket",
               "Sec-WebSocket-Key": "k", "Sec-WebSocket-Version": "13"}

    def test_an_idle_tunnel_is_left_alone(self) -> None:
        browser = self.request(path=b"/socket", headers=self.UPGRADE)
        agent = self.agent_connects()
        self.clock.advance(TIMEOUT * 0.9)
        agent.says(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\n")
        self.assert_answered(browser, b"101")
        self.clock.advance(TIMEOUT * 100)
        self.assertFalse(agent.closed)
        self.assertFalse(browser.disconnected)
        agent.says(b"still here")
        self.assertTrue(browser.value().endswith(b"still here"))
        self.channel.dataReceived(b"me too")
        self.assertTrue(agent.received().endswith(b"me too"))

    def test_an_upgrade_without_an_answer_is_a_504(self) -> None:
        browser = self.request(path=b"/socket", headers=self.UPGRADE)
        agent = self.agent_connects()
        self.clock.advance(TIMEOUT)
        self.assert_answered(browser, b"504")
        self.assertTrue(agent.transport.disconnected)


class Disabled(ClockedProxy):
    """``--agent-timeout 0``: the proxy waits as long as the agent takes."""

    agent_timeout = 0

    def test_zero_waits_forever(self) -> None:
        browser = self.request()
        agent = self.agent_connects()
        self.assertEqual(self.agent_timers(), [])  # no timer at all
        self.clock.advance(AGENT_TIMEOUT * 1000)
        self.assert_waiting(browser, agent)
        agent.says(OK_HEAD + b"ok")
        self.assert_answered(browser, b"200")


class CommandLine(SynchronousTestCase):
    """``--agent-timeout SECONDS`` on the command line."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"] + list(args))
        return options

    def test_default_is_a_minute(self) -> None:
        self.assertEqual(self.parse()["agent-timeout"], 60.0)
        self.assertEqual(AGENT_TIMEOUT, 60.0)

    def test_seconds_and_zero(self) -> None:
        self.assertEqual(self.parse("--agent-timeout", "2.5")["agent-timeout"], 2.5)
        self.assertEqual(self.parse("--agent-timeout", "0")["agent-timeout"], 0.0)

    def test_bad_values_are_usage_errors(self) -> None:
        for value in ("-1", "abc", "", "nan", "inf", "1s"):
            error = self.assertRaises(UsageError, self.parse, "--agent-timeout", value)
            self.assertIn("--agent-timeout", str(error))
            self.assertIn("number of seconds", str(error))

    def test_the_service_uses_it(self) -> None:
        service = tap.makeService(self.parse("--agent-timeout", "7"), MemoryReactorClock())
        self.assertEqual(service.site.forwarder.pool.agent_timeout, 7.0)


class HungAgentOverSockets(ForwardingSetup):
    """The same through real sockets: the stand-in agent's ``/slow`` takes
    the request and never answers."""

    @inlineCallbacks
    def test_504_and_the_agent_connection_is_closed(self) -> Any:
        self.site.forwarder.pool.agent_timeout = 0.3
        started = time.monotonic()
        response, body = yield self.request("GET", "/slow", headers=NAVIGATION)
        self.assertEqual(response.code, 504)
        self.assertIn(b"Your mailbox did not answer in time", body)
        self.assertLess(time.monotonic() - started, 5)
        yield self.agent.slow_lost.addTimeout(5, reactor)
        response, body = yield self.request("GET", "/sized")  # the agent still serves
        self.assertEqual((response.code, len(body)), (200, 1234))


class StoppedAgentProcess(DispatcherCase):
    """A real, SIGSTOPped agent behind the real proxy (``--agent-timeout 1``)."""

    prefix = "pxd-agent-timeout-"

    @classmethod
    def dispatcher_options(cls) -> dict:
        return {"proxy_args": ["--agent-timeout", "1"]}

    @classmethod
    def prepare(cls) -> None:
        cls.dispatcher.add_user("erin", "erin's password")

    def test_stopped_agent_gets_504_then_answers_again(self) -> None:
        browser = self.browser()
        self.assertEqual(browser.log_in("erin", "erin's password").status, 303)
        self.assertTrue(wait_until(lambda: "Mailbox of erin" in browser.get("/").text,
                                   30, 0.2), self.logs())
        pid = agent_pid(self.dispatcher, "erin")
        self.assertIsNotNone(pid)
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        started = time.monotonic()
        answer = browser.get("/", headers=NAVIGATION)  # the browser's own 60 s bound
        self.assertLess(time.monotonic() - started, 10, self.logs())
        self.assertEqual(answer.status, 504, answer.text + self.logs())
        self.assertIn("Your mailbox did not answer in time", answer.text)
        self.assertTrue(wait_until(
            lambda: "Agent of erin at 127.0.0.1:" in self.logs()
            and "sent nothing for 1 s after a GET request" in self.logs(), 5), self.logs())
        os.kill(pid, signal.SIGCONT)
        again = browser.get("/", headers=NAVIGATION)
        self.assertEqual(again.status, 200, again.text + self.logs())
        self.assertIn("Mailbox of erin", again.text)
        self.assertEqual(agent_pid(self.dispatcher, "erin"), pid)  # the same agent
