"""The browser's HTTP/1.1 connection: strict about what it accepts, and able
to become a raw tunnel after an ``Upgrade``.

``twisted.web``'s ``HTTPChannel`` accepts things a front-end proxy must not
pass on, and which versions refuse differs (22.4 keeps CR inside values,
folds continuation lines, accepts ``Transfer-Encoding`` next to
``Content-Length`` in some orders, and closes over-long lines without a
word). :class:`ProxyChannel` checks every line itself, the same way on every
Twisted, *before* ``HTTPChannel`` sees it, and answers ``400 Bad Request``
and closes the connection for:

* a request line that is not ``METHOD SP target SP HTTP/1.x`` in visible
  ASCII;
* a header line with a bad name, a value holding CR, LF, NUL or another
  control character (header injection), or an obsolete folded line;
* ``Content-Length`` together with ``Transfer-Encoding``, more than one
  ``Content-Length`` or ``Transfer-Encoding`` header, a ``Content-Length``
  that is not a number, a ``Transfer-Encoding`` other than ``chunked``;
* several ``Host`` headers, or none on HTTP/1.1;
* a line over :attr:`MAX_LENGTH` bytes, more than :attr:`maxHeaders`
  headers, or more than :attr:`totalHeadersSize` bytes of head.

Nothing of such a request reaches the resource tree, so no agent sees it.

:meth:`ProxyChannel.become_tunnel` turns the connection into a byte pipe to
an agent once the agent accepted an ``Upgrade`` (WebSocket): a byte-level
tunnel rather than ``twisted.web.websocket`` (Twisted 25.5+ only).
"""
import re
from typing import Any, Callable

from twisted.web.http import HTTPChannel

_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/1\.[01]")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Control characters other than horizontal tab, and DEL.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class ProxyChannel(HTTPChannel):
    """``HTTPChannel`` that refuses malformed and ambiguous requests."""

    #: Longest request line or header line.
    MAX_LENGTH = 8192
    #: Request line plus all headers.
    totalHeadersSize = 16384
    maxHeaders = 100

    _px_in_head = False
    _px_refused = False
    _px_tunnel = False

    def _px_refuse(self) -> None:
        self._px_refused = True
        self._respondToBadRequestAndDisconnect()

    def dataReceived(self, data: bytes) -> None:
        if self._px_refused:
            return
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._px_refuse()

    def lineReceived(self, line: bytes) -> None:
        if self._px_refused:
            return
        if self._px_in_head:
            if not line:
                self._px_in_head = False
                if self._px_host != 1 and (self._px_host or self._px_version == b"HTTP/1.1"):
                    return self._px_refuse()
            elif not self._px_header_ok(line):
                return self._px_refuse()
        elif line:
            if _REQUEST_LINE.fullmatch(line) is None:
                return self._px_refuse()
            self._px_in_head = True
            self._px_version = line[-8:]
            self._px_host = 0
            self._px_length = 0
            self._px_transfer = 0
        super().lineReceived(line)

    def _px_header_ok(self, line: bytes) -> bool:
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            return False  # also catches folded lines (leading space or tab)
        if _BAD_VALUE.search(value) is not None:
            return False
        lower = name.lower()
        if lower == b"content-length":
            self._px_length += 1
            value = value.strip(b" \t")
            return (self._px_length == 1 and not self._px_transfer
                    and value.isdigit() and len(value) <= 18)
        if lower == b"transfer-encoding":
            self._px_transfer += 1
            return (self._px_transfer == 1 and not self._px_length
                    and value.strip(b" \t").lower() == b"chunked")
        if lower == b"host":
            self._px_host += 1
        return True

    # --- the tunnel ----------------------------------------------------------

    def become_tunnel(self, to_agent: Callable[[bytes], Any],
                      lost: Callable[[Any], Any]) -> None:
        """From now on, every byte from the browser goes to ``to_agent`` and
        the end of the connection to ``lost``; HTTP parsing stops."""
        self._px_tunnel = True
        self.setTimeout(None)
        buffered = b"".join(getattr(self, "_dataBuffer", None) or [])
        if hasattr(self, "_dataBuffer"):
            self._dataBuffer = []
        self.dataReceived = to_agent  # type: ignore[method-assign]
        self.connectionLost = lost  # type: ignore[method-assign]
        if buffered:
            to_agent(buffered)
        if self.transport is not None:
            self.transport.resumeProducing()
