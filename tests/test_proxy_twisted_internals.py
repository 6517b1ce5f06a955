"""The private parts of twisted.web that the proxy uses still exist and still
mean what proxy/twisted_internals.py says, on this Twisted. A release that
changes one fails here, by name, rather than in a subtle proxy behaviour."""
import twisted
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel, Request
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.resource import Resource

from pixelated_dispatcher.proxy import twisted_internals as internals


class Hold(Resource):
    """Answers nothing until the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


def connected_channel() -> tuple:
    resource = Hold()
    # No idle timeout: it would leave a DelayedCall on the global reactor.
    site = Site(resource, timeout=None)
    site.protocol = HTTPChannel  # as the proxy's sites do (a ProxyChannel)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, resource


class Present(SynchronousTestCase):
    def test_every_name_exists(self) -> None:
        channel, _, _ = connected_channel()
        for name in internals.CHANNEL_INTERNALS:
            self.assertTrue(hasattr(channel, name),
                            "HTTPChannel.%s is gone in Twisted %s: update "
                            "proxy/twisted_internals.py" % (name, twisted.__version__))
        request = Request(channel)
        for name in internals.REQUEST_INTERNALS:
            self.assertTrue(hasattr(request, name),
                            "Request.%s is gone in Twisted %s: update "
                            "proxy/twisted_internals.py" % (name, twisted.__version__))


class Meaning(SynchronousTestCase):
    def test_a_request_being_answered_is_seen_and_a_pipelined_one_held(self) -> None:
        channel, transport, resource = connected_channel()
        self.assertFalse(internals.handling_request(channel))
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(resource.requests), 1)
        self.assertTrue(internals.handling_request(channel))
        internals.hold_for_later(channel, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(resource.requests), 1)
        # HTTPChannel itself feeds held bytes back once the answer is done.
        resource.requests[0].finish()
        self.assertEqual([r.uri for r in resource.requests], [b"/a", b"/b"])

    def test_held_bytes_can_be_taken_for_a_tunnel(self) -> None:
        channel, _, resource = connected_channel()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        internals.hold_for_later(channel, b"first ")
        internals.hold_for_later(channel, b"second")
        self.assertEqual(internals.take_held(channel), b"first second")
        self.assertEqual(internals.take_held(channel), b"")
        resource.requests[0].finish()
        self.assertEqual(len(resource.requests), 1)  # nothing was left to replay

    def test_refusing_answers_400_and_closes(self) -> None:
        channel, transport, _ = connected_channel()
        internals.refuse_bad_request(channel)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_the_network_producer_pauses_reading(self) -> None:
        channel, transport, _ = connected_channel()
        internals.network_producer(channel).pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        internals.network_producer(channel).resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_a_disconnected_browser_is_seen(self) -> None:
        channel, transport, resource = connected_channel()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        request = resource.requests[0]
        self.assertFalse(internals.browser_disconnected(request))
        channel.connectionLost(None)
        self.assertTrue(internals.browser_disconnected(request))
