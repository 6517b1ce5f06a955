"""Facts about the browser's connection: who it is, and whether it is still
there.

Answers often come later than the request (after the manager or an agent
replies); by then the browser may have gone, and ``Request.finish()`` on a
lost connection raises. ``Request.notifyFinish()`` is the public way to learn
about it, but it only reports a loss to those who asked *before* it happened,
so watch at the start of rendering.
"""
import attr
from twisted.web.server import Request


def client_ip(request: Request) -> str:
    """The browser's IP address as the proxy sees it (``"unix"`` on a Unix
    socket listener), for ``X-Forwarded-For`` and the manager's rate limits."""
    host = getattr(request.getClientAddress(), "host", None)
    return host if isinstance(host, str) else "unix"


@attr.s(auto_attribs=True)
class Disconnection:
    """Whether the browser's connection was lost before the answer was done."""

    happened: bool = False

    @classmethod
    def watch(cls, request: Request) -> "Disconnection":
        """Start watching ``request``; call while it is still being rendered."""
        watcher = cls()
        request.notifyFinish().addErrback(watcher._lost)
        return watcher

    def _lost(self, reason: object) -> None:
        self.happened = True
