"""fanout: one outcome reaches every waiter, one event every listener."""
from typing import Any, List

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.fanout import SharedResult, fire_all, tell_all


class SharedResultTests(SynchronousTestCase):
    def test_every_waiter_gets_the_value_before_and_after(self) -> None:
        source: Deferred = Deferred()
        shared = SharedResult(source)
        early = shared.wait()
        self.assertFalse(shared.done)
        self.assertNoResult(early)
        source.callback(42)
        self.assertTrue(shared.done)
        self.assertEqual(self.successResultOf(early), 42)
        self.assertEqual(self.successResultOf(shared.wait()), 42)

    def test_a_failure_reaches_every_waiter_and_is_not_left_unhandled(self) -> None:
        source: Deferred = Deferred()
        shared = SharedResult(source)
        first, second = shared.wait(), shared.wait()
        source.errback(ValueError("no"))
        self.failureResultOf(first, ValueError)
        self.failureResultOf(second, ValueError)
        self.failureResultOf(shared.wait(), ValueError)
        self.assertIsNone(self.successResultOf(source))

    def test_one_waiter_changing_its_result_does_not_touch_the_others(self) -> None:
        source: Deferred = Deferred()
        shared = SharedResult(source)
        first = shared.wait()
        first.addCallback(lambda value: value + 1)
        second = shared.wait()
        second.cancel()
        source.callback(1)
        self.assertEqual(self.successResultOf(first), 2)
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.successResultOf(shared.wait()), 1)


class FireAllTests(SynchronousTestCase):
    def test_skips_cancelled_waiters(self) -> None:
        waiting, cancelled = Deferred(), Deferred()
        cancelled.cancel()
        fire_all([waiting, cancelled], Failure(KeyError("k")))
        self.failureResultOf(waiting, KeyError)
        self.failureResultOf(cancelled, CancelledError)


class TellAllTests(SynchronousTestCase):
    def test_a_failing_listener_is_logged_and_the_others_still_hear(self) -> None:
        heard: List[Any] = []
        logged: List[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)

        def broken(event: str) -> None:
            raise RuntimeError("broken listener")
        listeners = [heard.append, broken, heard.append]
        tell_all(listeners, lambda listener: listener("stopped"), "agent stopped", Logger())
        self.assertEqual(heard, ["stopped", "stopped"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any(event.get("what") == "agent stopped" for event in logged))

    def test_a_listener_may_unsubscribe_while_told(self) -> None:
        heard: List[str] = []
        listeners: List[Any] = []

        def once(event: str) -> None:
            heard.append(event)
            listeners.remove(once)
        listeners.extend([once, heard.append])
        tell_all(listeners, lambda listener: listener("x"), "x")
        self.assertEqual(heard, ["x", "x"])
        self.assertEqual(listeners, [heard.append])
