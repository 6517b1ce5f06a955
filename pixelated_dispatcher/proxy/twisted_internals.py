"""The private parts of ``twisted.web.http`` that the proxy relies on, in one place.

:class:`.channel.ProxyChannel` checks every line of a request before
``HTTPChannel`` sees it, holds pipelined requests while one is handled, and
turns into a tunnel after an ``Upgrade``; the session gate must know whether
the browser has gone. Twisted has no public API for these, so the proxy
reaches into ``HTTPChannel`` and ``Request`` here, and only here. Every name
below exists from Twisted 22.4 (Debian 12) to the newest release;
``tests/test_proxy_twisted_internals.py`` fails loudly, naming the
attribute, on a release that renames or reshapes one of them, instead of the
proxy misbehaving quietly.
"""
from typing import Any

from twisted.web.http import HTTPChannel

#: ``HTTPChannel`` attributes and methods used below (the test checks them).
CHANNEL_INTERNALS = ("_handlingRequest", "_dataBuffer", "_respondToBadRequestAndDisconnect",
                     "_transferDecoder", "_networkProducer")
#: ``Request`` attributes used below.
REQUEST_INTERNALS = ("_disconnected",)


def handling_request(channel: HTTPChannel) -> bool:
    """Whether a request of this connection is being answered now (bytes
    that arrive meanwhile belong to a later, pipelined request)."""
    return bool(channel._handlingRequest)


def hold_for_later(channel: HTTPChannel, data: bytes) -> None:
    """Keep bytes of a pipelined request until the current answer is done;
    ``HTTPChannel`` feeds them back in itself then."""
    channel._dataBuffer.append(data)


def take_held(channel: HTTPChannel) -> bytes:
    """The bytes kept by :func:`hold_for_later` (and by ``HTTPChannel``),
    now taken away from it: after an ``Upgrade`` they belong to the tunnel."""
    held = getattr(channel, "_dataBuffer", None)
    if not held:
        return b""
    channel._dataBuffer = []
    return b"".join(held)


def refuse_bad_request(channel: HTTPChannel) -> None:
    """Answer ``400 Bad Request`` and close, as ``HTTPChannel`` does itself."""
    channel._respondToBadRequestAndDisconnect()


def forget_body_decoder(channel: HTTPChannel) -> None:
    """The request's body will not be read: drop the decoder the head set up."""
    channel._transferDecoder = None


def network_producer(channel: HTTPChannel) -> Any:
    """What pauses and resumes reading the browser's connection: the
    producer ``HTTPChannel`` itself pauses (the transport, or a stand-in
    for a transport that is not one), else the transport."""
    return getattr(channel, "_networkProducer", None) or channel.transport


def browser_disconnected(request: Any) -> bool:
    """Whether the browser's connection of ``request`` is gone (a request
    that is neither finished nor disconnected may still be answered)."""
    return bool(getattr(request, "_disconnected", False))
