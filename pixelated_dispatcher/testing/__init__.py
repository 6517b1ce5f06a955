"""Test doubles and contract suites, shipped for whoever extends the dispatcher.

Like ``treq.testing``, this is a public part of the package: a new agent
provider or a new front-end can import the in-memory fakes its tests need
and the contract suite that holds it to what the manager or the proxy
expects. Each fake passes the same suite as the real thing (flocker's
"verified fakes"), so what a test learns from a fake holds in production.

``fake_manager``
    :class:`~.fake_manager.FakeManager`, an ``IManager`` in memory.
``fake_manager_server``
    that fake behind the manager's real AMP commands on a Unix socket.
``fake_provider``
    :class:`~.fake_provider.FakeProvider`, an ``IAgentProvider`` on a clock.
``fake_docker``
    :class:`~.fake_docker.FakeDockerEngine`, an ``IDockerEngine`` in memory.
``fake_firewall``
    :class:`~.fake_firewall.FakeFirewall`, an ``IAgentFirewall`` in memory.
``manager_contract``, ``provider_contract``, ``agent_firewall_contract``
    the contract suites (trial test cases built from a fixture).

Nothing in the running dispatcher imports this package.
"""
