"""The swarm calls every ISwarmEngine must answer alike: the real one and the fake.

``make_swarm_engine_tests(fixture)`` returns a trial TestCase class run by
``test_swarm_engine.py`` against ``FakeSwarmEngine`` and against a real
one-node swarm (``tests/swarm_cluster.py``), so the swarm provider's fast
tests on the fake mean something for a real swarm.

The fixture is an object with:

* ``engine(testcase)``: an ISwarmEngine, manager of a swarm of one node;
* ``not_a_manager(testcase)``: an engine that is not in a swarm;
* ``unreachable_engine(testcase)``: one whose daemon cannot be reached;
* ``image``: an image on the node whose entrypoint reads the credentials
  file named by ``$PIXELATED_CREDENTIALS_FILE`` and serves HTTP on 4567.
"""
import uuid

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from .docker_engine_contract import sleep
from .dockerd import coroutine_tests

from pixelated_dispatcher.manager.providers.docker_engine import (
    Conflict, DockerEngineError, EngineUnavailable, ISwarmEngine, NoSuchNode, NoSuchSecret,
    NoSuchService, NotSwarmManager)

SECRET_FILE = "pixelated-credentials"


def make_swarm_engine_tests(fixture):
    @coroutine_tests
    class SwarmEngineContract(TestCase):
        timeout = 120

        def setUp(self):
            self.engine = fixture.engine(self)
            self.value = uuid.uuid4().hex[:12]
            self.label = "org.pixelated.test.swarm"
            self.addCleanup(lambda: ensureDeferred(self._remove_ours()))

        async def _remove_ours(self):
            ours = ["%s=%s" % (self.label, self.value)]
            for service in await self.engine.list_services(ours):
                try:
                    await self.engine.remove_service(service["ID"])
                except NoSuchService:
                    pass
            for _ in range(50):        # a removed service releases its secrets
                secrets = await self.engine.list_secrets(ours)
                if not secrets:
                    return
                for secret in secrets:
                    try:
                        await self.engine.remove_secret(secret["ID"])
                    except DockerEngineError:
                        pass
                await sleep(0.1)

        def name(self, suffix="a"):
            return "pxswarm-%s-%s" % (self.value, suffix)

        async def node_id(self):
            return (await self.engine.info())["Swarm"]["NodeID"]

        async def secret(self, data=b'{"user": "alice", "password": "s3cret"}\n'):
            return await self.engine.create_secret(self.name("s"), data,
                                                   {self.label: self.value})

        async def spec(self, secret_id=None, image=None, constraints=None):
            container = {"Image": image or fixture.image, "User": "65534:65534",
                         "ReadOnly": True, "CapabilityDrop": ["ALL"],
                         "Labels": {self.label: self.value},
                         "Mounts": [{"Type": "tmpfs", "Target": "/tmp",
                                     "TmpfsOptions": {"SizeBytes": 8 << 20, "Mode": 0o1777}}]}
            if secret_id is not None:
                container["Env"] = ["PIXELATED_CREDENTIALS_FILE=/run/secrets/" + SECRET_FILE]
                container["Secrets"] = [{
                    "File": {"Name": SECRET_FILE, "UID": "65534", "GID": "65534",
                             "Mode": 0o400},
                    "SecretID": secret_id, "SecretName": self.name("s")}]
            return {
                "Name": self.name(), "Labels": {self.label: self.value, "user": "alice"},
                "TaskTemplate": {
                    "ContainerSpec": container,
                    "Resources": {"Limits": {"MemoryBytes": 64 << 20, "Pids": 64}},
                    "RestartPolicy": {"Condition": "on-failure", "MaxAttempts": 1},
                    "Placement": {"Constraints": constraints
                                  or ["node.id==%s" % await self.node_id()]}},
                "Mode": {"Replicated": {"Replicas": 1}},
                "EndpointSpec": {"Ports": [{"Protocol": "tcp", "TargetPort": 4567,
                                            "PublishedPort": 0, "PublishMode": "host"}]}}

        async def settled_task(self, service, states, timeout=30.0):
            """The service's first task once it reached one of ``states``."""
            found = []

            async def check():
                tasks = await self.engine.list_tasks([service])
                found[:] = [t for t in tasks if t["Status"]["State"] in states]
            elapsed = 0.0
            while True:
                await check()
                if found or elapsed >= timeout:
                    break
                await sleep(0.1)
                elapsed += 0.1
            self.assertTrue(found, "no task of %s reached %s within %g s"
                            % (service, states, timeout))
            return found[0]

        def test_interface(self):
            self.assertTrue(verifyObject(ISwarmEngine, self.engine))

        async def test_info_and_nodes_name_this_manager(self):
            info = await self.engine.info()
            node_id = info["Swarm"]["NodeID"]
            self.assertEqual(info["Swarm"]["LocalNodeState"], "active")
            self.assertTrue(info["Swarm"]["ControlAvailable"])
            nodes = await self.engine.list_nodes()
            ours = [n for n in nodes if n["ID"] == node_id]
            self.assertEqual(len(ours), 1)
            node = await self.engine.inspect_node(node_id)
            self.assertEqual(node["Status"]["State"], "ready")
            self.assertEqual(node["Spec"]["Availability"], "active")
            self.assertEqual(node["Spec"]["Role"], "manager")
            self.assertTrue(node["Status"]["Addr"])
            self.assertIsInstance(node["Version"]["Index"], int)
            self.assertIsInstance(node["Spec"].get("Labels") or {}, dict)
            error = await self.assertFailure(self.engine.inspect_node("pxnonode0000"),
                                             NoSuchNode)
            self.assertIn("pxnonode0000", str(error))

        async def test_a_secret_is_never_shown_with_its_data(self):
            secret_id = await self.secret(b"very-secret-line\n")
            info = await self.engine.inspect_secret(secret_id)
            self.assertEqual(info["Spec"]["Name"], self.name("s"))
            self.assertEqual(info["Spec"]["Labels"], {self.label: self.value})
            self.assertNotIn("Data", info["Spec"])
            self.assertNotIn("very-secret", repr(info))
            listed = await self.engine.list_secrets(["%s=%s" % (self.label, self.value)])
            self.assertEqual([s["ID"] for s in listed], [secret_id])
            self.assertNotIn("very-secret", repr(listed))
            await self.assertFailure(ensureDeferred(self.secret()), Conflict)
            await self.engine.remove_secret(secret_id)
            await self.assertFailure(self.engine.inspect_secret(secret_id), NoSuchSecret)
            await self.assertFailure(self.engine.remove_secret(secret_id), NoSuchSecret)

        async def test_service_runs_one_task_with_a_host_port_and_the_secret(self):
            secret_id = await self.secret()
            service_id = await self.engine.create_service(await self.spec(secret_id))
            task = await self.settled_task(service_id, ("running",))
            self.assertEqual(task["NodeID"], await self.node_id())
            self.assertEqual(task["DesiredState"], "running")
            ports = task["Status"]["PortStatus"]["Ports"]
            self.assertEqual({(p["TargetPort"], p["PublishMode"]) for p in ports},
                             {(4567, "host")})
            self.assertGreater(ports[0]["PublishedPort"], 1024)
            service = await self.engine.inspect_service(self.name())
            self.assertEqual(service["ID"], service_id)
            self.assertEqual(service["Spec"]["Labels"]["user"], "alice")
            container = service["Spec"]["TaskTemplate"]["ContainerSpec"]
            self.assertEqual(container["CapabilityDrop"], ["ALL"])
            self.assertTrue(container["ReadOnly"])
            self.assertEqual(container["Secrets"][0]["File"]["Mode"], 0o400)
            self.assertNotIn("s3cret", repr(service) + repr(task))
            listed = await self.engine.list_services(["%s=%s" % (self.label, self.value)])
            self.assertEqual([s["ID"] for s in listed], [service_id])
            wanted = await self.engine.list_running_tasks()
            self.assertIn(task["ID"], [t["ID"] for t in wanted])
            self.assertEqual({t["DesiredState"] for t in wanted}, {"running"})
            # the name is taken; the secret is in use
            await self.assertFailure(self.engine.create_service(await self.spec(secret_id)),
                                     Conflict)
            error = await self.assertFailure(self.engine.remove_secret(secret_id),
                                             DockerEngineError)
            self.assertIn(self.name(), str(error))
            await self.engine.remove_service(service_id)
            # its tasks leave the running set (a real swarm: within moments)
            for _ in range(100):
                running = [t["ServiceID"] for t in await self.engine.list_running_tasks()]
                if service_id not in running:
                    break
                await sleep(0.1)
            self.assertNotIn(service_id, running)
            await self.assertFailure(self.engine.inspect_service(service_id), NoSuchService)
            await self.assertFailure(self.engine.list_tasks([service_id]), NoSuchService)
            await self.assertFailure(self.engine.remove_service(service_id), NoSuchService)

            async def secret_released():
                try:
                    await self.engine.remove_secret(secret_id)
                    return True
                except NoSuchSecret:
                    return True
                except DockerEngineError:
                    return False
            for _ in range(50):
                if await secret_released():
                    break
                await sleep(0.1)
            await self.assertFailure(self.engine.inspect_secret(secret_id), NoSuchSecret)

        async def test_unsatisfiable_placement_leaves_the_task_pending(self):
            service_id = await self.engine.create_service(await self.spec(
                constraints=["node.labels.pxswarm-nowhere==true"]))
            task = await self.settled_task(service_id, ("pending",))
            await sleep(0.5)
            tasks = await self.engine.list_tasks([service_id])
            self.assertEqual({t["Status"]["State"] for t in tasks}, {"pending"})
            self.assertIn("no suitable node", tasks[0]["Status"].get("Err", ""))
            self.assertFalse(task["Status"].get("PortStatus"))

        async def test_missing_image_rejects_the_task_naming_it(self):
            missing = "sha256:" + "0" * 63 + "1"
            service_id = await self.engine.create_service(await self.spec(image=missing))
            task = await self.settled_task(service_id, ("rejected", "failed"))
            self.assertIn("No such image", task["Status"]["Err"])
            self.assertIn("0000000001", task["Status"]["Err"])

        async def test_not_a_manager_is_named(self):
            engine = fixture.not_a_manager(self)
            for d in (engine.list_nodes(), engine.list_services(["x"]),
                      engine.list_secrets(["x"]), engine.list_tasks(["x"])):
                error = await self.assertFailure(d, NotSwarmManager)
                self.assertIn("not a swarm manager", str(error))
            info = await engine.info()
            self.assertEqual(info["Swarm"]["LocalNodeState"], "inactive")

        async def test_unreachable_engine_is_named(self):
            engine = fixture.unreachable_engine(self)
            for d in (engine.info(), engine.list_nodes(), engine.list_tasks(["x"]),
                      engine.create_secret("x", b"y", {})):
                error = await self.assertFailure(d, EngineUnavailable)
                self.assertIn("cannot reach the Docker engine", str(error))

    return SwarmEngineContract
