"""The behaviour every IDockerEngine must have: the real one and the fake.

``make_docker_engine_tests(fixture)`` returns a trial TestCase class whose
tests run against whatever engine the fixture makes. ``test_docker_engine.py``
runs it against ``FakeDockerEngine`` and against a real ``dockerd`` (flocker's
"verified fake" pattern): a test of the provider that passes with the fake
then means something for the real engine.

The fixture is an object with:

* ``engine(testcase)``: an IDockerEngine, ready for use (may skip the test);
* ``unreachable_engine(testcase)``: one whose daemon cannot be reached;
* ``image``: a local image whose default command waits for a line on stdin
  and then serves HTTP on 4567/tcp, and which has ``echo``;
* ``settle``: seconds to wait for events to arrive (0 for the fake).
"""
import os
import uuid

from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from .dockerd import coroutine_tests

from pixelated_dispatcher.manager.providers.docker_engine import (
    CLIENT_MAX_API, CLIENT_MIN_API, Conflict, DockerEngineError, EngineUnavailable,
    IDockerEngine, IEventStream, NoSuchContainer, NoSuchImage, PullFailed, parse_version)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(predicate, timeout=10.0):
    """Wait (on the reactor) until ``predicate()`` is true; fail the test otherwise."""
    elapsed = 0.0
    while not predicate():
        if elapsed >= timeout:
            raise AssertionError("condition not met within %g s" % timeout)
        await sleep(0.05)
        elapsed += 0.05


def make_docker_engine_tests(fixture):
    @coroutine_tests
    class DockerEngineContract(TestCase):
        timeout = 120

        def setUp(self):
            self.engine = fixture.engine(self)
            self.label = "org.pixelated.test.contract"
            self.value = uuid.uuid4().hex[:12]
            self.labels = {self.label: self.value, "org.pixelated.dispatcher.user": "alice"}
            self.addCleanup(lambda: ensureDeferred(self._remove_ours()))

        async def _remove_ours(self):
            try:
                for c in await self.engine.list_containers(["%s=%s" % (self.label, self.value)]):
                    try:
                        await self.engine.remove_container(c["Id"])
                    except NoSuchContainer:
                        pass
            except EngineUnavailable:
                pass

        def name(self, suffix="a"):
            return "pxcontract-%s-%s" % (self.value, suffix)

        def config(self, **extra):
            config = {
                "Image": fixture.image,
                "Labels": dict(self.labels),
                "User": "65534:65534",
                "OpenStdin": True, "StdinOnce": True,
                "ExposedPorts": {"4567/tcp": {}},
                "HostConfig": {
                    "Memory": 64 * 1024 * 1024, "MemorySwap": 64 * 1024 * 1024,
                    "PidsLimit": 32, "CapDrop": ["ALL"],
                    "SecurityOpt": ["no-new-privileges"],
                    "PortBindings": {"4567/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
                    "RestartPolicy": {"Name": "no"},
                },
            }
            config.update(extra)
            return config

        def test_interface(self):
            self.assertTrue(verifyObject(IDockerEngine, self.engine))

        async def test_version_is_negotiated_within_our_range(self):
            info = await self.engine.version()
            self.assertIn("ApiVersion", info)
            chosen = parse_version(self.engine.api_version)
            self.assertGreaterEqual(chosen, parse_version(CLIENT_MIN_API))
            self.assertLessEqual(chosen, parse_version(CLIENT_MAX_API))
            self.assertLessEqual(chosen, parse_version(info["ApiVersion"]))

        async def test_ping(self):
            self.assertIsNone(await self.engine.ping())

        async def test_created_container_keeps_name_labels_user_and_hardening(self):
            cid = await self.engine.create_container(self.name(), self.config())
            info = await self.engine.inspect_container(cid)
            self.assertEqual(info["Id"], cid)
            self.assertEqual(info["Name"], "/" + self.name())
            self.assertEqual(info["Config"]["Labels"], self.labels)
            self.assertEqual(info["Config"]["User"], "65534:65534")
            self.assertTrue(info["Config"]["OpenStdin"])
            self.assertTrue(info["Config"]["StdinOnce"])
            host = info["HostConfig"]
            self.assertEqual(host["Memory"], 64 * 1024 * 1024)
            self.assertEqual(host["PidsLimit"], 32)
            self.assertEqual(host["CapDrop"], ["ALL"])
            self.assertEqual(host["SecurityOpt"], ["no-new-privileges"])
            self.assertEqual(host["RestartPolicy"]["Name"], "no")
            self.assertEqual(host["PortBindings"]["4567/tcp"][0]["HostIp"], "127.0.0.1")
            self.assertFalse(info["State"]["Running"])
            # by name too, as the provider finds an old container of a user
            self.assertEqual((await self.engine.inspect_container(self.name()))["Id"], cid)

        async def test_missing_image_is_named(self):
            error = await self.assertFailure(
                self.engine.create_container(self.name(), self.config(Image="pxnone/missing:1")),
                NoSuchImage)
            self.assertIn("pxnone/missing", str(error))
            error = await self.assertFailure(self.engine.inspect_image("pxnone/missing:1"),
                                             NoSuchImage)
            self.assertIn("pxnone/missing", str(error))

        async def test_present_image_is_inspected(self):
            info = await self.engine.inspect_image(fixture.image)
            self.assertTrue(info["Id"].startswith("sha256:"))

        async def test_name_taken_is_a_conflict(self):
            await self.engine.create_container(self.name(), self.config())
            error = await self.assertFailure(
                self.engine.create_container(self.name(), self.config()), Conflict)
            self.assertIn(self.name(), str(error))

        async def test_rename_frees_the_name(self):
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.create_container(self.name("b"), self.config())
            await self.assertFailure(self.engine.rename_container(cid, self.name("b")),
                                     Conflict)
            await self.engine.rename_container(cid, self.name("c"))
            info = await self.engine.inspect_container(cid)
            self.assertEqual(info["Name"], "/" + self.name("c"))
            await self.engine.create_container(self.name(), self.config())  # free again
            await self.assertFailure(self.engine.rename_container("pxcontract-nothere", "x"),
                                     NoSuchContainer)

        async def test_missing_container_is_named(self):
            for call in (self.engine.inspect_container, self.engine.start_container,
                         self.engine.remove_container, self.engine.kill_container,
                         self.engine.container_stats,
                         lambda name: self.engine.stop_container(name, 1),
                         lambda name: self.engine.container_logs(name, 5)):
                error = await self.assertFailure(call("pxcontract-nothere"), NoSuchContainer)
                self.assertIn("pxcontract-nothere", str(error))
            await self.assertFailure(self.engine.attach_stdin("pxcontract-nothere", b"x\n"),
                                     NoSuchContainer)

        async def test_start_publishes_an_ephemeral_port_on_loopback_only(self):
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.start_container(cid)
            info = await self.engine.inspect_container(cid)
            self.assertTrue(info["State"]["Running"])
            self.assertGreater(info["State"]["Pid"], 0)
            bindings = info["NetworkSettings"]["Ports"]["4567/tcp"]
            self.assertEqual([b["HostIp"] for b in bindings], ["127.0.0.1"])
            self.assertGreater(int(bindings[0]["HostPort"]), 1024)
            # starting a running container again is fine
            await self.engine.start_container(cid)

        async def test_list_finds_our_label_including_stopped(self):
            running = await self.engine.create_container(self.name("r"), self.config())
            created = await self.engine.create_container(self.name("c"), self.config())
            other = await self.engine.create_container(
                self.name("other"), self.config(Labels={self.label: "someone-else"}))
            self.addCleanup(self.engine.remove_container, other)
            await self.engine.start_container(running)
            found = await self.engine.list_containers(["%s=%s" % (self.label, self.value)])
            states = {c["Id"]: c["State"] for c in found}
            self.assertEqual(states, {running: "running", created: "created"})
            names = {c["Names"][0] for c in found}
            self.assertEqual(names, {"/" + self.name("r"), "/" + self.name("c")})
            only_running = await self.engine.list_containers(
                ["%s=%s" % (self.label, self.value)], all=False)
            self.assertEqual([c["Id"] for c in only_running], [running])
            self.assertEqual(found[0]["Labels"]["org.pixelated.dispatcher.user"], "alice")

        async def test_events_report_start_and_death_with_exit_code(self):
            events = []
            stream = await self.engine.follow_events(
                events.append, ["%s=%s" % (self.label, self.value)])
            self.assertTrue(IEventStream.providedBy(stream))
            other = await self.engine.create_container(
                self.name("other"), self.config(Labels={self.label: "someone-else"}))
            self.addCleanup(lambda: self.engine.remove_container(other).addErrback(
                lambda f: f.trap(NoSuchContainer)))
            await self.engine.start_container(other)
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.start_container(cid)
            await self.engine.kill_container(cid, "SIGKILL")
            await eventually(lambda: any(e["Action"] == "die" for e in events))
            stream.stop()
            self.assertIsNone(await stream.done)
            ours = [e for e in events if e.get("Type") == "container"]
            self.assertTrue(all(e["Actor"]["ID"] == cid for e in ours), ours)
            actions = [e["Action"] for e in ours]
            self.assertLess(actions.index("start"), actions.index("die"))
            die = [e for e in ours if e["Action"] == "die"][0]
            self.assertEqual(die["Actor"]["Attributes"]["exitCode"], "137")
            self.assertEqual(die["Actor"]["Attributes"]["org.pixelated.dispatcher.user"], "alice")
            self.assertEqual(die["Actor"]["Attributes"]["name"], self.name())
            await self.engine.remove_container(other)

        async def test_stop_ends_the_container(self):
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.start_container(cid)
            await self.engine.stop_container(cid, 1)
            info = await self.engine.inspect_container(cid)
            self.assertFalse(info["State"]["Running"])
            await self.engine.remove_container(cid)
            await self.assertFailure(self.engine.inspect_container(cid), NoSuchContainer)

        async def test_remove_forces_a_running_container(self):
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.start_container(cid)
            await self.engine.remove_container(cid)
            await self.assertFailure(self.engine.inspect_container(cid), NoSuchContainer)

        async def test_logs_tail_of_an_exited_container(self):
            cid = await self.engine.create_container(
                self.name(), self.config(Cmd=["echo", "hello from", "the container"]))
            await self.engine.start_container(cid)

            async def exited():
                info = await self.engine.inspect_container(cid)
                return not info["State"]["Running"]
            for _ in range(100):
                if await exited():
                    break
                await sleep(0.05)
            info = await self.engine.inspect_container(cid)
            self.assertEqual(info["State"]["ExitCode"], 0)
            self.assertEqual(await self.engine.container_logs(cid, 5),
                             ["hello from the container"])
            self.assertEqual(await self.engine.container_logs(cid, 0), [])

        async def test_attach_stdin_to_a_running_container(self):
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.start_container(cid)
            self.assertIsNone(await self.engine.attach_stdin(cid, b'{"user": "alice"}\n'))

        async def test_stats_of_a_running_container(self):
            cid = await self.engine.create_container(self.name(), self.config())
            await self.engine.start_container(cid)
            stats = await self.engine.container_stats(cid)
            self.assertGreater(stats["memory_stats"]["usage"], 0)
            self.assertEqual(stats["memory_stats"]["limit"], 64 * 1024 * 1024)

        async def test_pull_failure_carries_dockers_message(self):
            progress = []
            error = await self.assertFailure(
                self.engine.pull_image("127.0.0.1:9/pxcontract/none:1", progress.append),
                PullFailed)
            self.assertIn("127.0.0.1:9", str(error))
            self.assertIsInstance(error, DockerEngineError)

        async def test_unreachable_engine_is_named(self):
            engine = fixture.unreachable_engine(self)
            for call in (engine.ping(), engine.version(), engine.list_containers(["x"]),
                         engine.follow_events(lambda e: None, ["x"]),
                         engine.attach_stdin("abc", b"x\n")):
                error = await self.assertFailure(call, EngineUnavailable)
                self.assertIn("cannot reach the Docker engine", str(error))

    return DockerEngineContract


def real_socket_missing_path():
    return "unix://" + os.path.join("/tmp", "pixelated-no-docker-%s.sock" % uuid.uuid4().hex)
