"""``/auth/starting?next=PATH``: the "starting your mailbox" page.

The session gate sends a browser here when its agent is not ready within a
moment; this page waits for the start (asking again every second) and then
sends the browser on to the page it asked for.
"""
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import pages
from .browser_connection import Disconnection
from .cookie_policy import session_token
from .manager_cache import ManagerCache
from .next_path import requested_next, with_next
from .session_gate import START_GRACE, answer_failure, last_resort


class StartingPage(Resource):
    """``/auth/starting?next=PATH``: wait for the agent, then go to PATH.

    An agent that is ready within ``grace`` seconds sends the browser on at
    once; only a slower start shows the waiting page (which asks again every
    second), so a quick start costs no refresh.
    """

    isLeaf = True

    def __init__(self, cache: ManagerCache, clock: Any = None,
                 grace: float = START_GRACE) -> None:
        super().__init__()
        self._cache = cache
        self._clock = clock
        self._grace = grace

    def render_GET(self, request: Request) -> Any:
        next_path = requested_next(request)
        token = session_token(request)
        if token is None:
            pages.redirect(request, with_next(pages.LOGIN_PATH, next_path))
            return NOT_DONE_YET
        gone = Disconnection.watch(request)
        d = self._cache.resolve(token)

        def found(username: str) -> Optional[Deferred]:
            if gone.happened:
                return None
            if self._cache.cached_address(username) is not None:
                pages.redirect(request, next_path)
                return None
            failure = self._cache.start_failure(token)
            if failure is not None:
                answer_failure(request, failure, self._cache, token, next_path)
                return None
            started = self._cache.ensure(username, token)
            answered = []

            def too_slow() -> None:
                answered.append(True)
                if not gone.happened:
                    pages.waiting(request, next_path)
            timer = None
            if not started.called:
                if self._clock is None:
                    too_slow()
                else:
                    timer = self._clock.callLater(self._grace, too_slow)

            def ready(_: Any) -> None:
                if timer is not None and timer.active():
                    timer.cancel()
                if not (answered or gone.happened):
                    pages.redirect(request, next_path)

            def failed(failure: Failure) -> None:
                if timer is not None and timer.active():
                    timer.cancel()
                if not (answered or gone.happened):
                    self._failed(request, failure, username, token, next_path)
                # else: the next refresh of the waiting page reports it
            started.addCallbacks(ready, failed)
            return None

        def failed(failure: Failure) -> None:
            if not gone.happened:
                answer_failure(request, failure, self._cache, token, next_path)

        d.addCallbacks(found, failed)
        d.addErrback(last_resort(request, gone))
        return NOT_DONE_YET

    render_HEAD = render_GET

    def _failed(self, request: Request, failure: Failure, username: str,
                token: str, next_path: bytes) -> None:
        self._cache.start_failure(token)
        answer_failure(request, failure, self._cache, token, next_path)

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request, [b"GET", b"HEAD"])
            return NOT_DONE_YET
        return super().render(request)
