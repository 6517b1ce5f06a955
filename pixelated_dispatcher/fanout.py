"""One result to many waiters, one event to many listeners.

Two small patterns that the manager, the providers and the proxy all need:

* concurrent callers of an operation that must run once (an agent's start,
  an image pull, the proxy's ``EnsureAgent``) each get their own Deferred of
  the one outcome: :class:`SharedResult`, or :func:`fire_all` for a list of
  waiters kept by hand;
* an event goes to every registered listener, and one listener that raises
  neither stops the others from hearing it nor reaches the code that raised
  the event: :func:`tell_all`.
"""
from typing import Any, Callable, Iterable, List, Optional, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

L = TypeVar("L")


def _deliver(waiter: "Deferred[Any]", result: Any) -> None:
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)


def fire_all(waiters: Iterable["Deferred[Any]"], result: Any) -> None:
    """Deliver ``result`` (a value or a ``Failure``) to every waiter still
    waiting; waiters their callers cancelled already are skipped."""
    for waiter in waiters:
        if not waiter.called:
            _deliver(waiter, result)


class SharedResult:
    """The outcome of ``source``, handed to any number of waiters.

    Each :meth:`wait` gets its own Deferred, so one waiter's callbacks (or
    its cancellation) never change what the others get. A failure of
    ``source`` goes to the waiters and is not logged as unhandled here.
    """

    def __init__(self, source: "Deferred[Any]") -> None:
        self._waiters: List["Deferred[Any]"] = []
        self._outcome: Optional[List[Any]] = None
        source.addBoth(self._fire)

    @property
    def done(self) -> bool:
        """Whether ``source`` has fired."""
        return self._outcome is not None

    def _fire(self, result: Any) -> None:
        self._outcome = [result]
        waiters, self._waiters = self._waiters, []
        fire_all(waiters, result)

    def wait(self) -> "Deferred[Any]":
        """A new Deferred of the outcome (fired already when it is known)."""
        waiter: "Deferred[Any]" = Deferred()
        if self._outcome is None:
            self._waiters.append(waiter)
        else:
            _deliver(waiter, self._outcome[0])
        return waiter


def tell_all(listeners: Iterable[L], tell: Callable[[L], object], what: str,
             log: Logger = _log) -> None:
    """Call ``tell(listener)`` for each listener (a snapshot: a listener may
    unsubscribe while being told). One that raises is logged (``what``
    names the event) and the others still hear it."""
    for listener in list(listeners):
        try:
            tell(listener)
        except Exception:
            log.failure("A listener failed on {what}: {listener!r}", what=what,
                        listener=listener)
