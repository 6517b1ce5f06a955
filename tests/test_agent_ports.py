"""Agents' ports: the range, the check against the ephemeral ports, the
random choice and the quarantine."""
import os
import socket
import tempfile

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.manager.providers.agent_ports import (
    NoFreePort, PortAllocator, PortRange, check_outside_ephemeral, port_is_free)


class PortRangeTests(SynchronousTestCase):

    @given(st.integers(1024, 65535), st.integers(1024, 65535))
    def test_ranges_round_trip(self, a, b):
        first, last = min(a, b), max(a, b)
        parsed = PortRange.parse("%d-%d" % (first, last))
        self.assertEqual((parsed.first, parsed.last, str(parsed)),
                         (first, last, "%d-%d" % (first, last)))
        self.assertEqual(len(parsed), last - first + 1)

    @given(st.text(max_size=20))
    def test_anything_else_is_a_clear_value_error(self, text):
        try:
            parsed = PortRange.parse(text)
        except ValueError as error:
            self.assertIn("range", str(error))
        else:
            self.assertTrue(1024 <= parsed.first <= parsed.last <= 65535)

    def test_overlap_with_the_kernels_ephemeral_ports_is_refused(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("32768\t60999\n")
        self.addCleanup(os.unlink, f.name)
        check_outside_ephemeral(PortRange(20000, 29999), f.name)
        check_outside_ephemeral(PortRange(61000, 65535), f.name)
        for bad in (PortRange(30000, 32768), PortRange(60999, 61000), PortRange(1024, 65535)):
            error = self.assertRaises(ValueError, check_outside_ephemeral, bad, f.name)
            self.assertIn("32768-60999", str(error))
        check_outside_ephemeral(PortRange(32768, 60999), "/nonexistent")  # unknown: allowed


class PortAllocatorTests(SynchronousTestCase):

    def test_ports_come_from_the_range_and_skip_busy_and_taken_ones(self):
        taken = set(range(21000, 21005))
        allocator = PortAllocator(Clock(), PortRange(21000, 21009),
                                  is_free=lambda port: port not in taken)
        chosen = {allocator.choose("alice", busy={21005, 21006}) for _ in range(50)}
        self.assertEqual(chosen, {21007, 21008, 21009})

    def test_a_full_range_is_a_clear_error(self):
        allocator = PortAllocator(Clock(), PortRange(21000, 21001), is_free=lambda port: False)
        error = self.assertRaises(NoFreePort, allocator.choose, "alice")
        self.assertIn("--agent-port-range", str(error))

    def test_another_users_released_port_is_quarantined_for_a_while(self):
        clock = Clock()
        allocator = PortAllocator(clock, PortRange(21000, 21001), quarantine=600,
                                  is_free=lambda port: True)
        allocator.released(21000, "bob")
        self.assertEqual({allocator.choose("alice") for _ in range(30)}, {21001})
        self.assertEqual(len({allocator.choose("bob") for _ in range(60)}), 2)  # bob's own
        clock.advance(601)
        self.assertEqual(len({allocator.choose("alice") for _ in range(60)}), 2)

    def test_a_listening_port_is_not_free(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            self.assertFalse(port_is_free(port))
        self.assertTrue(port_is_free(port))
