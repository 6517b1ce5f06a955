"""Image pulls against a real dockerd, from a tiny registry served by the test.

There is no Docker Hub here, so the test serves the test agent image itself
(Docker Registry HTTP API v2: ``/v2/``, a schema 2 manifest, two blobs) on
127.0.0.1, which dockerd treats as an insecure registry by default. A
registry that serves a corrupted layer makes dockerd report the error in the
middle of its 200 progress stream: exactly the case a client that only
checks the status code gets wrong.
"""
import gzip
import hashlib
import json
import shutil
import tempfile
import uuid

import pytest
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from twisted.web.http import HTTPChannel

from pixelated_dispatcher.manager.providers.docker import DockerAgentSettings, DockerProvider
from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine, PullFailed

from . import dockerd
from .dockerd import coroutine_tests
from .real_docker_case import credentials, get

pytestmark = pytest.mark.whole_system

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def _digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry(resource.Resource):
    """One repository with one tag, read-only."""
    isLeaf = True

    def __init__(self, repository, tag, corrupt_layer=False):
        super().__init__()
        # a file of its own, so that the layer is new to the engine and is downloaded
        root = dockerd._root_tar([("/etc/pxtest-image", repository.encode())])
        self.layer = gzip.compress(root, mtime=0)
        self.config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/entrypoint"], "ExposedPorts": {"4567/tcp": {}},
                       "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [_digest(root)]},
            "history": [{"created_by": "tests/test_docker_pull.py"}],
        }).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": len(self.config), "digest": _digest(self.config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(self.layer), "digest": _digest(self.layer)}],
        }).encode()
        self.blobs = {_digest(self.config): self.config,
                      _digest(self.layer): (self.layer[:-64] + b"\0" * 64) if corrupt_layer
                      else self.layer}
        self.repository, self.tag = repository, tag

    def render_HEAD(self, request):
        return self.render_GET(request)

    def render_GET(self, request):
        path = request.path.decode()
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        prefix = "/v2/%s/" % self.repository
        if path == "/v2/":
            return b"{}"
        if path in (prefix + "manifests/" + self.tag,
                    prefix + "manifests/" + _digest(self.manifest)):
            request.setHeader(b"Content-Type", MANIFEST_TYPE.encode())
            request.setHeader(b"Docker-Content-Digest", _digest(self.manifest).encode())
            return self.manifest
        if path.startswith(prefix + "blobs/") and path[len(prefix) + 6:] in self.blobs:
            request.setHeader(b"Content-Type", b"application/octet-stream")
            return self.blobs[path[len(prefix) + 6:]]
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                       "message": "manifest unknown"}]}).encode()


class _PlainHTTPChannel(HTTPChannel):
    """dockerd tries TLS first; hang up on a ClientHello at once instead of
    letting it wait 10 s for a handshake timeout before it falls back to HTTP."""

    def dataReceived(self, data):
        if not getattr(self, "_seen_data", False):
            self._seen_data = True
            if data[:1] == b"\x16":
                self.transport.loseConnection()
                return
        super().dataReceived(data)


@coroutine_tests
class PullTests(TestCase):
    timeout = 120

    def setUp(self):
        self.host = dockerd.engine_or_skip()
        self.repository = "pxtest/agent-%s" % uuid.uuid4().hex[:8]

    def serve(self, corrupt_layer=False):
        registry = Registry(self.repository, "1", corrupt_layer)
        site = server.Site(registry)
        site.protocol = _PlainHTTPChannel
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reference = "127.0.0.1:%d/%s:1" % (port.getHost().port, self.repository)
        self.addCleanup(dockerd.api, self.host, "DELETE", "/images/" + reference,
                        params={"force": "1"}, expect=(200, 404, 409))
        return reference

    def engine(self):
        engine = DockerEngine(reactor, self.host)
        self.addCleanup(engine.close)
        return engine

    async def test_pull_reports_progress_and_brings_the_image(self):
        reference = self.serve()
        engine = self.engine()
        progress = []
        await engine.pull_image(reference, progress.append)
        statuses = [p.get("status", "") for p in progress]
        self.assertTrue(any(s.startswith("Pulling from %s" % self.repository) for s in statuses),
                        statuses)
        # a layer's progress as Docker reports it (it may fold "Download
        # complete" into the next status when the layer is small)
        self.assertTrue({"Download complete", "Pull complete"} & set(statuses), statuses)
        self.assertTrue(statuses[-1].startswith("Status: Downloaded newer image"), statuses)
        info = await engine.inspect_image(reference)
        self.assertEqual(info["Config"]["Cmd"], ["/entrypoint"])

    async def test_error_inside_the_200_stream_fails_the_pull(self):
        reference = self.serve(corrupt_layer=True)
        error = await self.assertFailure(self.engine().pull_image(reference, lambda p: None),
                                         PullFailed)
        self.assertEqual(error.status, 200, "the engine said 200 and then reported the error")
        self.assertIn("verification failed", str(error))

    async def test_a_start_pulls_the_missing_image_with_progress_in_the_log(self):
        reference = self.serve()
        messages = []
        observer = lambda event: messages.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        instance = "pxpull-%s" % uuid.uuid4().hex[:8]
        self.addCleanup(dockerd.remove_labelled, self.host,
                        "org.pixelated.dispatcher=%s" % instance)
        provider = DockerProvider(reactor, self.engine(), DockerAgentSettings(
            image=reference, instance=instance, memory=64 * 1024 * 1024,
            start_timeout=30))
        self.addCleanup(provider.close)
        data = tempfile.mkdtemp(prefix="pxpull-")
        self.addCleanup(shutil.rmtree, data, True)
        agent = await provider.start("alice", data, credentials("alice", "pw"))
        code, page = await get(agent.address.port)
        self.assertEqual((code, page.strip()), (200, "Mailbox of alice"))
        self.assertIn("agent image %s is not here: pulling it" % reference, messages)
        self.assertTrue(any(m.startswith("pulling %s: " % reference)
                            and ("Download complete" in m or "Pull complete" in m)
                            for m in messages), messages)
        self.assertIn("pulled %s" % reference, messages)
