"""twistd pixelated-manager: its options and what makeService wires."""
import os
import tempfile

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.manager import tap
from pixelated_dispatcher.manager.agent_firewall import NoFirewall
from pixelated_dispatcher.manager.service import Manager


class PluginTests(SynchronousTestCase):

    def test_both_plugins_are_discoverable_by_twistd(self):
        names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
        self.assertTrue({"pixelated-manager", "pixelated-proxy"} <= names, names)


class OptionsTests(SynchronousTestCase):

    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_defaults_are_the_packaged_paths_and_the_process_provider(self):
        options = self.parse()
        self.assertEqual(options["socket"], "/run/pixelated/manager.sock")
        self.assertEqual(options["state-dir"], "/var/lib/pixelated")
        self.assertEqual(options["provider"], "process")
        self.assertTrue(options["leap-provider"])

    def test_relative_paths_become_absolute(self):
        options = self.parse("--socket", "run/m.sock", "--state-dir", "state")
        self.assertEqual(options["socket"], os.path.abspath("run/m.sock"))
        self.assertEqual(options["state-dir"], os.path.abspath("state"))

    def test_unknown_provider_is_a_usage_error(self):
        error = self.assertRaises(usage.UsageError, self.parse, "--provider", "lxc")
        self.assertIn("process", str(error))

    def test_agent_command_must_be_a_command_line_with_a_port(self):
        self.assertEqual(self.parse("--agent-command", "agent --port {port} --json '{}'")
                         ["agent-command"], "agent --port {port} --json '{}'")
        self.assertRaises(usage.UsageError, self.parse, "--agent-command", "agent 'unclosed")
        self.assertRaises(usage.UsageError, self.parse, "--agent-command", "   ")
        error = self.assertRaises(usage.UsageError, self.parse, "--agent-command", "agent")
        self.assertIn("{port}", str(error))
        options = self.parse("--agent-command", "agent --port {port} --home '{data_dir}'")
        self.assertEqual(options["agent-command"], "agent --port {port} --home '{data_dir}'")


    def test_the_agent_port_range_must_lie_outside_the_ephemeral_ports(self):
        self.assertEqual(str(self.parse()["agent-port-range"]), "20000-29999")
        self.assertEqual(str(self.parse("--agent-port-range", "21000-21999")
                             ["agent-port-range"]), "21000-21999")
        for bad in ("40000-41000", "80-90", "2-1", "many"):
            error = self.assertRaises(usage.UsageError, self.parse, "--agent-port-range", bad)
            self.assertIn("--agent-port-range", str(error))
        error = self.assertRaises(usage.UsageError, self.parse,
                                  "--agent-port-range", "32000-33000")
        self.assertIn("ip_local_port_range", str(error))

    def test_the_agent_firewall_is_auto_nftables_or_none(self):
        self.assertEqual(self.parse()["agent-firewall"], "auto")
        self.assertEqual(self.parse("--agent-firewall", "none")["agent-firewall"], "none")
        error = self.assertRaises(usage.UsageError, self.parse, "--agent-firewall", "pf")
        self.assertIn("nftables", str(error))


class MakeServiceTests(SynchronousTestCase):

    def test_socket_is_created_mode_0660_in_a_private_directory(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(directory))
        options = tap.Options()
        options.parseOptions(["--socket", os.path.join(directory, "run", "manager.sock"),
                              "--state-dir", os.path.join(directory, "state"),
                              # a group that exists nowhere: MemoryReactor makes no
                              # socket file that could be given to it
                              "--proxy-group", "pxd-no-such-group"])
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        (listening,) = reactor.unixServers
        path, factory, backlog, mode, want_pid = listening
        self.assertEqual(path, os.path.join(directory, "run", "manager.sock"))
        self.assertEqual(mode, 0o660)
        self.assertTrue(want_pid)
        self.assertEqual(os.stat(os.path.join(directory, "run")).st_mode & 0o777, 0o750)

    def test_the_manager_grants_in_the_firewall_its_provider_protects_with(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(directory))
        options = tap.Options()
        options.parseOptions(["--socket", os.path.join(directory, "run", "manager.sock"),
                              "--state-dir", os.path.join(directory, "state"),
                              "--agent-firewall", "none"])
        service = tap.makeService(options, reactor=MemoryReactorClock())
        (manager,) = [child for child in service if isinstance(child, Manager)]
        self.assertIs(manager.grants.firewall, manager.supervisor._provider.firewall)

    def test_swarm_agents_on_other_nodes_get_no_agent_firewall(self):
        options = tap.Options()
        options.parseOptions(["--provider", "swarm", "--agent-firewall", "nftables"])
        self.assertIsInstance(tap.make_agent_firewall(MemoryReactorClock(), options),
                              NoFirewall)
