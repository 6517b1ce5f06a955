"""DockerEngine on the wire, against a scripted engine on a Unix socket.

What a real dockerd does only in rare moments is scripted here: an error in
the middle of a 200 pull stream, an event stream that trickles, an old or a
too-new engine, an attach refused, an engine that vanishes mid-stream.
"""
import json
import os
import shutil
import tempfile

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from pixelated_dispatcher.manager.providers.docker_engine import (
    DockerEngine, EngineUnavailable, NoSuchContainer, PullFailed, UnsupportedEngine,
    choose_api_version, demultiplex, split_reference)

from .dockerd import coroutine_tests


class _Version(resource.Resource):
    isLeaf = True

    def __init__(self, api="1.41", minimum="1.12"):
        super().__init__()
        self.api, self.minimum = api, minimum

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"Version": "20.10.24", "ApiVersion": self.api,
                           "MinAPIVersion": self.minimum}).encode()


class _Script(resource.Resource):
    """Answers every versioned path from a dict of ``(method, path) -> handler``."""
    isLeaf = True

    def __init__(self, routes):
        super().__init__()
        self.routes = routes
        self.seen = []

    def render(self, request):
        path = b"/" + b"/".join(request.postpath)
        self.seen.append((request.method, path, request.args))
        handler = self.routes.get((request.method, path))
        if handler is None:
            request.setResponseCode(404)
            return json.dumps({"message": "page not found"}).encode()
        return handler(request)


class ScriptedEngineTestCase(TestCase):
    timeout = 30

    def serve(self, routes, api="1.41", minimum="1.12"):
        directory = tempfile.mkdtemp(prefix="pxwire-")
        self.addCleanup(shutil.rmtree, directory, True)
        root = resource.Resource()
        root.putChild(b"version", _Version(api, minimum))
        self.script = _Script(routes)
        version_prefix = ("v" + min(api, "1.47", key=lambda v: tuple(map(int, v.split("."))))
                          ).encode()
        root.putChild(version_prefix, self.script)
        self.requests = []
        site = server.Site(root)
        path = os.path.join(directory, "docker.sock")
        d = UNIXServerEndpoint(reactor, path).listen(site)

        def listening(port):
            self.addCleanup(port.stopListening)
            engine = DockerEngine(reactor, "unix://" + path, timeout=5)
            self.addCleanup(engine.close)
            return engine
        return d.addCallback(listening)


def _stream(chunks, end=True):
    """A handler writing ``chunks`` one by one, 50 ms apart, then finishing."""
    def handler(request):
        request.setHeader(b"Content-Type", b"application/json")
        calls = []

        def write(remaining):
            if request.finished or getattr(request, "_gone", False):
                return
            if remaining:
                request.write(remaining[0])
                calls.append(reactor.callLater(0.05, write, remaining[1:]))
            elif end:
                request.finish()
            else:
                request.transport.abortConnection()

        def gone(_):
            request._gone = True
            for call in calls:
                if call.active():
                    call.cancel()
        request.notifyFinish().addErrback(gone)
        write(list(chunks))
        return server.NOT_DONE_YET
    return handler


@coroutine_tests


class PullStreamTests(ScriptedEngineTestCase):

    async def test_error_inside_a_200_stream_fails_the_pull(self):
        engine = await self.serve({(b"POST", b"/images/create"): _stream([
            b'{"status":"Pulling from pixelated/agent","id":"1.0"}\n',
            b'{"status":"Downloading","progressDetail":{"current":10,"total":100},"id":"ab"}\r\n',
            b'{"errorDetail":{"message":"unexpected EOF"},"error":"unexpected EOF"}\n'])})
        progress = []
        error = await self.assertFailure(engine.pull_image("pixelated/agent:1.0", progress.append),
                                         PullFailed)
        self.assertEqual(str(error), "unexpected EOF")
        self.assertEqual([p["status"] for p in progress], ["Pulling from pixelated/agent",
                                                           "Downloading"])
        method, path, args = self.script.seen[-1]
        self.assertEqual(args, {b"fromImage": [b"pixelated/agent"], b"tag": [b"1.0"]})

    async def test_untagged_pull_asks_for_latest_not_every_tag(self):
        engine = await self.serve({(b"POST", b"/images/create"): _stream([
            b'{"status":"Pulling from pixelated/agent","id":"latest"}\n',
            b'{"status":"Status: Downloaded newer image for pixelated/agent:latest"}\n'])})
        progress = []
        await engine.pull_image("pixelated/agent", progress.append)
        self.assertEqual(self.script.seen[-1][2],
                         {b"fromImage": [b"pixelated/agent"], b"tag": [b"latest"]})
        self.assertEqual(len(progress), 2)

    async def test_pull_refused_before_the_stream_carries_dockers_message(self):
        def refuse(request):
            request.setResponseCode(500)
            return b'{"message":"Get \\"https://registry.example.org/v2/\\": no route to host"}'
        engine = await self.serve({(b"POST", b"/images/create"): refuse})
        error = await self.assertFailure(engine.pull_image("registry.example.org/a:1", print),
                                         PullFailed)
        self.assertIn("no route to host", str(error))


@coroutine_tests


class EventStreamTests(ScriptedEngineTestCase):

    async def test_events_arrive_one_by_one_while_the_stream_is_open(self):
        arrived = []
        first = Deferred()
        events = [b'{"Type":"container","Action":"start","id":"c1"}\n',
                  b'{"Type":"container","Action":"die","id":"c1",',      # split mid-object
                  b'"Actor":{"ID":"c1","Attributes":{"exitCode":"1"}}}\n']
        engine = await self.serve({(b"GET", b"/events"): _stream(events, end=False)})

        def on_event(event):
            arrived.append((reactor.seconds(), event))
            if not first.called:
                first.callback(None)
        stream = await engine.follow_events(on_event, ["org.pixelated.dispatcher=x"])
        await first
        self.assertEqual(len(arrived), 1, "the first event is delivered before the rest is sent")
        error = await self.assertFailure(stream.done, EngineUnavailable)
        self.assertIn("lost the stream from the Docker engine", str(error))
        self.assertEqual([e["Action"] for _, e in arrived], ["start", "die"])
        self.assertEqual(arrived[1][1]["Actor"]["Attributes"]["exitCode"], "1")
        filters = json.loads(self.script.seen[-1][2][b"filters"][0])
        self.assertEqual(filters, {"type": ["container"], "label": ["org.pixelated.dispatcher=x"]})

    async def test_stream_that_ends_means_the_engine_went_away(self):
        engine = await self.serve({(b"GET", b"/events"): _stream([], end=True)})
        stream = await engine.follow_events(lambda e: None, [])
        error = await self.assertFailure(stream.done, EngineUnavailable)
        self.assertIn("ended the event stream", str(error))

    async def test_stopping_the_stream(self):
        engine = await self.serve({(b"GET", b"/events"): _stream([b"{}\n"] * 100)})
        stream = await engine.follow_events(lambda e: None, [])
        stream.stop()
        self.assertIsNone(await stream.done)
        await task.deferLater(reactor, 0.01, lambda: None)   # the server notices


@coroutine_tests


class VersionTests(ScriptedEngineTestCase):

    async def test_docker_29_is_spoken_to_in_a_version_it_accepts(self):
        engine = await self.serve({(b"GET", b"/_ping"): lambda r: b"OK"}, api="1.52",
                                  minimum="1.44")
        await engine.version()
        self.assertEqual(engine.api_version, "1.47")

    async def test_too_new_an_engine_is_refused_by_name(self):
        engine = await self.serve({}, api="1.60", minimum="1.50")
        error = await self.assertFailure(engine.version(), UnsupportedEngine)
        self.assertIn("speaks API 1.50 to 1.60; this dispatcher speaks 1.40 to 1.47", str(error))

    async def test_attach_refused_carries_dockers_message(self):
        def refuse(request):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"message":"No such container: pixelated-agent-alice"}'
        engine = await self.serve({(b"POST", b"/containers/pixelated-agent-alice/attach"): refuse})
        error = await self.assertFailure(
            engine.attach_stdin("pixelated-agent-alice", b"secret\n"), NoSuchContainer)
        self.assertEqual(str(error), "No such container: pixelated-agent-alice")


class PureFunctionTests(SynchronousTestCase):

    def test_api_version_choice(self):
        self.assertEqual(choose_api_version("1.41", "1.12"), "1.41")
        self.assertEqual(choose_api_version("1.52", "1.44"), "1.47")
        self.assertRaises(UnsupportedEngine, choose_api_version, "1.39", "1.12")

    def test_references(self):
        self.assertEqual(split_reference("pixelated/agent"), ("pixelated/agent", "latest"))
        self.assertEqual(split_reference("pixelated/agent:1"), ("pixelated/agent", "1"))
        self.assertEqual(split_reference("localhost:5000/agent"),
                         ("localhost:5000/agent", "latest"))
        self.assertEqual(split_reference("localhost:5000/agent:2"), ("localhost:5000/agent", "2"))
        self.assertEqual(split_reference("agent@sha256:abc"), ("agent@sha256:abc", ""))

    def test_multiplexed_logs(self):
        framed = (b"\x01\x00\x00\x00\x00\x00\x00\x04out\n"
                  b"\x02\x00\x00\x00\x00\x00\x00\x04err\n")
        self.assertEqual(demultiplex(framed), b"out\nerr\n")
        self.assertEqual(demultiplex(b"plain tty output\n"), b"plain tty output\n")


