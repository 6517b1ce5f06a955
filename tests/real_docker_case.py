"""A test case around the docker provider on a real dockerd and the test
agent image (:class:`RealDockerTestCase`: a unique instance name whose
containers go at cleanup, providers that record their agents' exits), and
what its tests share: the credentials line and an HTTP GET of an agent's
published port. Skips without a Docker engine; fails instead under
``CI=true`` (see ``tests/dockerd.py``)."""
import json
import os
import shutil
import tempfile
import uuid

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.providers.docker import (
    LABEL, DockerAgentSettings, DockerProvider)
from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine

from . import dockerd


def credentials(username, password):
    return json.dumps({"leap_provider_hostname": "example.org", "user": username,
                       "password": password}).encode() + b"\n"


async def get(port, path="/"):
    response = await treq.get("http://127.0.0.1:%d%s" % (port, path), persistent=False,
                              timeout=5)
    return response.code, await response.text()


class RealDockerTestCase(TestCase):
    timeout = 120

    def setUp(self):
        self.host = dockerd.engine_or_skip()
        self.image = dockerd.ensure_agent_image(self.host)
        self.instance = "pxtest-%s" % uuid.uuid4().hex[:8]
        self.addCleanup(dockerd.remove_labelled, self.host, "%s=%s" % (LABEL, self.instance))
        self.exits = []

    def settings(self, **extra):
        extra.setdefault("image", self.image)
        extra.setdefault("instance", self.instance)
        extra.setdefault("memory", 64 * 1024 * 1024)
        extra.setdefault("pids", 64)
        extra.setdefault("start_timeout", 30)
        extra.setdefault("stop_grace", 2)
        return DockerAgentSettings(**extra)

    def provider(self, host=None, **extra):
        engine = DockerEngine(reactor, host or self.host)
        provider = DockerProvider(reactor, engine, self.settings(**extra))
        provider.on_exit(lambda username, reason: self.exits.append((username, reason)))
        self.addCleanup(provider.close)
        return provider

    def data_dir(self, username):
        path = tempfile.mkdtemp(prefix="pxdata-%s-" % username)
        os.chmod(path, 0o700)
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def inspect(self, name):
        return dockerd.api(self.host, "GET", "/containers/%s/json" % name)

    def container_name(self, username):
        return "%s-%s" % (self.instance, username)

    def gone(self, name):
        try:
            self.inspect(name)
        except RuntimeError as error:
            return "404" in str(error)
        return False
