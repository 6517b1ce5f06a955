"""The shared IAgentProvider contract (pixelated_dispatcher.testing.provider_contract), run against
DockerProvider on a real dockerd with the test agent image.

The fixture's main provider stops its agents at close (``keep_on_close=False``,
as the contract's ``provider`` must); ``new_provider(keep_on_close=True)`` is
the production setting, whose containers the next manager adopts.
"""
import os
import shutil
import tempfile
import uuid

import attr
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from pixelated_dispatcher.manager.providers.docker import (
    LABEL, USER_LABEL, DockerAgentSettings, DockerProvider)
from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine

from . import dockerd
from pixelated_dispatcher.testing.provider_contract import make_provider_tests


class DockerFixture:
    #: an adopted container's end is seen in Docker's events like any other
    adopted_exit_reason = "was killed by signal 9 (SIGKILL, exit code 137)"

    def __init__(self, test):
        self.test = test
        self.host = dockerd.engine_or_skip()
        image = dockerd.ensure_agent_image(self.host)
        self.instance = "pxcontract-%s" % uuid.uuid4().hex[:8]
        test.addCleanup(dockerd.remove_labelled, self.host, "%s=%s" % (LABEL, self.instance))
        self.settings = DockerAgentSettings(image=image, instance=self.instance,
                                            memory=64 * 1024 * 1024, pids=64,
                                            start_timeout=30, stop_grace=2)
        self.directory = tempfile.mkdtemp(prefix="pxcontract-")
        test.addCleanup(shutil.rmtree, self.directory, True)
        self.provider = self.new_provider(keep_on_close=False)
        self.provider.recover()

    def new_provider(self, keep_on_close):
        provider = DockerProvider(reactor, DockerEngine(reactor, self.host), self.settings,
                                  keep_on_close=keep_on_close)
        self.test.addCleanup(provider.close)
        return provider

    def data_dir(self, username):
        path = os.path.join(self.directory, username)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def settle(self, d):
        return d

    @inlineCallbacks
    def received(self, username, provider=None):
        port = (provider or self.provider).running()[username].address.port
        response = yield treq.get("http://127.0.0.1:%d/cgi-bin/echo" % port, persistent=False)
        text = yield response.text()
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        return {"credentials_user": fields.get("user"),
                "leap_provider_hostname": fields.get("leap_provider_hostname"),
                "password_received": fields.get("password_received") == "yes",
                "authenticated": fields.get("user") == username}

    def kill_from_outside(self, username, provider=None):
        dockerd.api(self.host, "POST", "/containers/%s-%s/kill" % (self.instance, username))

    def break_next_start(self, username):
        """The next start runs a command that fails at once."""
        provider, healthy = self.provider, self.provider.settings
        provider.settings = attr.evolve(healthy, command="sh -c 'echo broken >&2; exit 3'")
        original = provider.start

        def start_once(*args, **kwargs):
            provider.start = original
            d = original(*args, **kwargs)

            def restore(result):
                provider.settings = healthy
                return result
            return d.addBoth(restore)
        provider.start = start_once

    def live_agents(self, username):
        found = dockerd.api(self.host, "GET", "/containers/json", params={
            "filters": '{"label": ["%s=%s", "%s=%s"]}' % (LABEL, self.instance,
                                                          USER_LABEL, username)})
        return len(found)


class DockerProviderContractTests(make_provider_tests(DockerFixture, measures_memory=True)):
    timeout = 120
