"""Only root, and the proxy for the users it serves, open connections to agents.

The Pixelated user agent trusts whoever connects to it, and it listens on
TCP. Any local account (or another user's agent) that learns its port
(``ss -ltn``, ``/proc/<pid>/cmdline``) could read that user's mailbox. So the
manager keeps an nftables table of its own that lets only two kinds of
sockets open a connection to an agent:

* sockets of uid 0, to every agent: the manager's own readiness probe, and
  Docker's port proxy (``docker-proxy`` runs as root); root is root anyway;
* sockets whose group is ``--proxy-group`` (``meta skgid``: the group the
  socket's creator had, i.e. the proxy's primary group; the proxy runs with
  it, as systemd's ``Group=`` or twistd's ``--gid`` give it), to the agents
  whose endpoint is *granted* (the ``granted`` set). The manager grants an
  agent's endpoint when it answers ``EnsureAgent``/``LocateAgent`` to a
  request that showed a live session of that user, and revokes it when the
  user's last session ends (``manager/agent_grants.py``): a compromised
  proxy reaches the agents of users who are logged in (whose tokens it sees
  at their next request anyway), not the agent of anyone whose session it
  never saw.

Everything else sent to an agent's ``address . port`` from this host is
answered with a TCP reset (``output`` hook), and whatever arrives for it on
another interface than ``lo`` (other hosts, containers, a namespace that
set ``route_localnet``) is dropped (``prerouting`` hook). The rules look at
every packet, not only at new connections: a connection the proxy opened
while a grant held is reset at the first packet it sends after the revocation.
Both chains run at priority -150: after conntrack (-200), before Docker's
DNAT (-100), so they see the destination the client asked for. A drop in any
base chain is final in netfilter, whatever other tables (Docker's) accept,
so this table can only take reachability away, never give it.

The table is per manager instance (its name is derived from the state
directory: two managers on one machine never touch each other's rules) and
holds one set element per agent (``127.0.0.1 . port``), added before the
agent is spawned and deleted after it ended: one manager's rules never
affect ports it did not hand out. Protecting an endpoint and releasing it
both take its grant away, in the same transaction: a port handed to the next
agent is granted to nobody. Docker networks of agents are added as a whole
(:meth:`IAgentFirewall.protect_network`, their bridge address excepted), so
a container's address is filtered from its first moment; only root reaches
them (the proxy uses the published port on 127.0.0.1).

The table is created (or repaired: chains rewritten, set elements kept) at
manager start, trimmed to the adopted agents after ``recover()``, and
removed at manager stop unless agents run on. ``nft`` runs as a child
process (``nft -f -``), never blocking the reactor, one invocation at a time.
"""
import hashlib
import ipaddress
import json
import os
import re
from typing import Any, Callable, Coroutine, Iterable, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

log = Logger()

#: an agent's address as the filter sees it: (IPv4 address, TCP port)
Endpoint = Tuple[str, int]

#: the ``--agent-firewall`` choices
MODES = ("auto", "nftables", "none")

#: table names start with this; the rest is derived from the state directory
TABLE_PREFIX = "pixelated_"

#: what a table's comment says before the state directory of its manager
COMMENT_PREFIX = "pixelated-dispatcher agents of "

#: priority of both base chains: after conntrack (-200), before DNAT (-100)
PRIORITY = -150


class FirewallError(Exception):
    """nft refused or could not run; ``str()`` says what and why."""


def mount_namespace() -> str:
    """This process's mount namespace, as ``mnt:<inode>``.

    A state directory's path means something only in the mount namespace it
    was seen in: a container sharing the host's network (systemd-nspawn, a
    Docker container with ``--network host``) has its own
    ``/var/lib/pixelated``. Its manager's table must neither be taken for
    the host manager's, nor be judged an orphan by a host manager that does
    not see the directory.
    """
    try:
        return "mnt:%d" % os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return "mnt:unknown"


def manager_identity(instance: str) -> str:
    """What names a manager's table: its state directory in its mount namespace."""
    return "%s in %s" % (instance, mount_namespace())


def table_name_for(instance: str) -> str:
    """The table of the manager identified by ``instance`` (its state
    directory): a short, stable name nft accepts. Not its mount namespace:
    systemd gives a sandboxed service a new one at every start, and the
    manager must find its table again after a restart."""
    digest = hashlib.sha256(instance.encode("utf-8")).hexdigest()[:16]
    return TABLE_PREFIX + digest


def check_endpoint(host: str, port: int) -> Endpoint:
    """``(host, port)`` as the table holds it; FirewallError unless an IPv4
    address and a TCP port (nothing else ever reaches an nft script)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise FirewallError("not an IPv4 address: %r" % (host,))
    if type(port) is not int or not 0 < port < 65536:
        raise FirewallError("not a TCP port: %r" % (port,))
    return str(address), port


def check_network(subnet: str, gateway: str) -> Tuple[str, str]:
    try:
        return str(ipaddress.IPv4Network(subnet)), str(ipaddress.IPv4Address(gateway))
    except ValueError as error:
        raise FirewallError("not an IPv4 network and gateway: %s" % (error,))


class IAgentFirewall(Interface):
    """Who may open connections to the manager's agents (see the module
    docstring). Every method fires once the rule is in force (or failed,
    with :class:`FirewallError`); calls apply in the order they were made."""

    enforcing = Attribute("True if this firewall filters anything at all.")

    def start() -> Deferred:
        """Install the table, or repair one a previous manager left: rules
        rewritten, the agents' entries kept (agents outlive managers)."""

    def protect(host: str, port: int) -> Deferred:
        """From now on only root and the proxy may connect to ``host:port``."""

    def release(host: str, port: int) -> Deferred:
        """``host:port`` is no agent's any more."""

    def protect_network(subnet: str, gateway: str) -> Deferred:
        """Every address of ``subnet`` (an agents' Docker network) but
        ``gateway`` (the host's own address on it) is an agent's."""

    def retain_only(endpoints: Iterable[Endpoint]) -> Deferred:
        """Drop every entry, and every grant, but ``endpoints`` (after
        adopting agents: what the previous manager protected and no agent
        holds any more)."""

    def entries() -> Deferred:
        """Fires with the set of protected ``(host, port)``."""

    def grant(host: str, port: int) -> Deferred:
        """From now on the proxy group, too, may connect to ``host:port``
        (until :meth:`revoke`, or until the endpoint is protected anew or
        released: then it is granted to nobody)."""

    def revoke(host: str, port: int) -> Deferred:
        """The proxy group may no longer connect to ``host:port``; packets of
        its connections opened before are refused from now on."""

    def granted() -> Deferred:
        """Fires with the set of granted ``(host, port)``."""

    def networks() -> Deferred:
        """Fires with the set of protected subnets (``"198.18.32.0/24"``)."""

    def close(keep: bool) -> Deferred:
        """The manager stops: remove the table, unless ``keep`` (agents run
        on, and their entries must stay for the next manager)."""


@implementer(IAgentFirewall)
class NoFirewall:
    """No filtering (``--agent-firewall none``, or a manager that is not
    root): agents are reachable by every local user. Says so once at
    start, with ``why`` (providers made without a firewall, in tests, say
    nothing)."""

    enforcing = False

    def __init__(self, why: Optional[str] = None) -> None:
        self.why = why

    def start(self) -> Deferred:
        if self.why is None:
            return defer.succeed(None)
        log.warn("agents are reachable by every local user and process on this host:"
                 " no agent firewall ({why})", why=self.why)
        return defer.succeed(None)

    def protect(self, host: str, port: int) -> Deferred:
        return defer.succeed(None)

    def release(self, host: str, port: int) -> Deferred:
        return defer.succeed(None)

    def protect_network(self, subnet: str, gateway: str) -> Deferred:
        return defer.succeed(None)

    def retain_only(self, endpoints: Iterable[Endpoint]) -> Deferred:
        return defer.succeed(None)

    def entries(self) -> Deferred:
        return defer.succeed(set())

    def grant(self, host: str, port: int) -> Deferred:
        return defer.succeed(None)

    def revoke(self, host: str, port: int) -> Deferred:
        return defer.succeed(None)

    def granted(self) -> Deferred:
        return defer.succeed(set())

    def networks(self) -> Deferred:
        return defer.succeed(set())

    def close(self, keep: bool) -> Deferred:
        return defer.succeed(None)


class _NftProcess(ProcessProtocol):
    """``nft`` with a script on stdin; fires with (stdout, stderr, status)."""

    def __init__(self, script: bytes, done: Deferred) -> None:
        self._script = script
        self._done = done
        self._out: List[bytes] = []
        self._err: List[bytes] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._script)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self._done.callback((b"".join(self._out), b"".join(self._err),
                             -1 if code is None else code))


def _elements(endpoints: Iterable[Endpoint]) -> str:
    return ", ".join("%s . %d" % endpoint for endpoint in sorted(endpoints))


@implementer(IAgentFirewall)
class NftablesFirewall:
    """:class:`IAgentFirewall` with a table of its own in the kernel's
    nftables (see the module docstring).

    :param table: the table's name (:func:`table_name_for`).
    :param proxy_gid: the proxy group's id (None: only root reaches agents).
    :param comment: what the table says it is (``nft list tables`` shows it).
    """

    enforcing = True

    def __init__(self, reactor: Any, table: str, proxy_gid: Optional[int], comment: str = "",
                 nft: str = "nft") -> None:
        if not table.replace("_", "").isalnum():
            raise ValueError("not a table name for nft: %r" % (table,))
        self._reactor = reactor
        self.table = table
        self.proxy_gid = proxy_gid
        self.comment = comment.replace('"', "'")[:120]
        self.nft = nft
        self._lock = DeferredLock()  # one nft at a time, in call order
        # What this manager put in the table, to put it back if the table
        # vanishes under it (``nft flush ruleset``, another tool): the agents
        # would be open to everybody until the next change otherwise.
        self._agents: Set[Endpoint] = set()
        self._granted: Set[Endpoint] = set()
        self._networks_added: Set[Tuple[str, str]] = set()
        self._installed = False   # start() made the table and close() did not remove it

    # -- running nft ---------------------------------------------------------

    def _spawn(self, script: str, args: List[str]) -> Deferred:
        done: Deferred = Deferred()
        try:
            self._reactor.spawnProcess(
                _NftProcess(script.encode("utf-8"), done), self.nft, [self.nft] + args,
                env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}, path="/")
        except OSError as error:
            return defer.fail(FirewallError("cannot run %s: %s" % (self.nft, error)))
        return done

    async def _run(self, script: str, what: str) -> None:
        out, err, code = await self._spawn(script, ["-f", "-"])
        if code != 0:
            raise FirewallError("%s failed (nft exit status %s): %s" % (
                what, code, (err or out).decode("utf-8", "replace").strip()[-2000:]))

    async def _json(self, *args: str) -> list:
        out, err, code = await self._spawn("", ["-j"] + list(args))
        if code != 0:
            raise FirewallError("nft -j %s failed: %s" % (
                " ".join(args), (err or out).decode("utf-8", "replace").strip()[-2000:]))
        return json.loads(out.decode("utf-8") or "{}").get("nftables", [])

    def _queued(self, coroutine_function: Callable[..., Coroutine[Any, Any, Any]],
                *args: Any) -> Deferred:
        return self._lock.run(lambda: defer.ensureDeferred(
            self._repairing(coroutine_function, *args)))

    async def _repairing(self, coroutine_function: Callable[..., Coroutine[Any, Any, Any]],
                         *args: Any) -> Any:
        """Run one operation; if it failed because the table is gone, make
        the table again with everything this manager had put in it, say so,
        and run the operation once more."""
        try:
            return await coroutine_function(*args)
        except FirewallError:
            if not self._installed or await self._table_exists():
                raise
        log.warn("agent firewall: the table inet {table} was gone (removed by something"
                 " else); making it again with {agents} agents, {granted} grants",
                 table=self.table, agents=len(self._agents), granted=len(self._granted))
        await self._run(self.ruleset() + self._elements_script(),
                        "making the agent firewall table %s again" % self.table)
        return await coroutine_function(*args)

    async def _table_exists(self) -> bool:
        _, _, code = await self._spawn("", ["list", "table", "inet", self.table])
        return code == 0

    def _elements_script(self) -> str:
        t = "inet " + self.table
        script = ""
        for name, endpoints in (("agents", self._agents), ("granted", self._granted)):
            if endpoints:
                script += "add element %s %s { %s }\n" % (t, name, _elements(endpoints))
        for network, gateway in sorted(self._networks_added):
            script += ("add element %s agent_nets { %s }\nadd element %s gateways { %s }\n"
                       % (t, network, t, gateway))
        return script

    # -- the ruleset ----------------------------------------------------------

    def ruleset(self) -> str:
        """The script that creates the table, or repairs it keeping its set
        elements (``add`` is idempotent; chains are flushed and refilled in
        the same transaction, so there is no moment without rules)."""
        t = "inet " + self.table
        allowed = ["meta skuid 0 accept"]
        if self.proxy_gid is not None:
            allowed.append("meta skgid %d ip daddr . tcp dport @granted accept"
                           % (self.proxy_gid,))
        lines = [
            'add table %s { comment "%s"; }' % (t, self.comment),
            "add set %s agents { type ipv4_addr . inet_service; }" % (t,),
            "add set %s granted { type ipv4_addr . inet_service; }" % (t,),
            "add set %s agent_nets { type ipv4_addr; flags interval; }" % (t,),
            "add set %s gateways { type ipv4_addr; }" % (t,),
            "add chain %s output { type filter hook output priority %d; policy accept; }"
            % (t, PRIORITY),
            "add chain %s prerouting { type filter hook prerouting priority %d;"
            " policy accept; }" % (t, PRIORITY),
            "flush chain %s output" % (t,),
            "flush chain %s prerouting" % (t,),
        ]
        lines += ["add rule %s output %s" % (t, rule) for rule in allowed]
        lines += [
            "add rule %s output ip daddr . tcp dport @agents reject with tcp reset" % (t,),
            "add rule %s output ip daddr @agent_nets ip daddr != @gateways meta l4proto tcp"
            " reject with tcp reset" % (t,),
            "add rule %s output ip daddr @agent_nets ip daddr != @gateways"
            " reject with icmpx admin-prohibited" % (t,),
            'add rule %s prerouting iifname "lo" accept' % (t,),
            "add rule %s prerouting ip daddr . tcp dport @agents drop" % (t,),
            "add rule %s prerouting ip daddr @agent_nets ip daddr != @gateways"
            " ct state new drop" % (t,),
        ]
        return "\n".join(lines) + "\n"

    # -- IAgentFirewall -------------------------------------------------------

    def start(self) -> Deferred:
        return self._queued(self._start)

    async def _start(self) -> None:
        await self._run(self.ruleset(), "installing the agent firewall table %s" % self.table)
        self._installed = True
        await self._remove_orphans()
        log.info("agent firewall: nftables table inet {table} lets only root{proxy} connect"
                 " to agents", table=self.table,
                 proxy="" if self.proxy_gid is None else
                 " (and gid %d, the proxy, to the agents granted to it)" % (self.proxy_gid,))

    async def _remove_orphans(self) -> None:
        """Remove the tables of managers whose state directory is gone (a
        manager killed, its directory deleted): no manager can ever recover
        them, and their stale entries would keep ports from the proxies of
        other managers. Tables of live state directories, and of managers in
        other mount namespaces (a container on this host's network, a
        sandboxed service: whose directories we cannot see), are never
        touched."""
        try:
            names = [item["table"]["name"] for item in await self._json("list", "tables")
                     if "table" in item and item["table"].get("family") == "inet"
                     and item["table"].get("name", "").startswith(TABLE_PREFIX)
                     and item["table"]["name"] != self.table]
        except (FirewallError, ValueError, KeyError):
            return
        for name in names:
            out, _, code = await self._spawn("", ["list", "table", "inet", name])
            match = re.search(r'comment "%s([^"]*)"' % re.escape(COMMENT_PREFIX),
                              out.decode("utf-8", "replace"))
            if code != 0 or match is None:
                continue
            directory, _, namespace = match.group(1).rpartition(" in ")
            if namespace != mount_namespace():
                continue    # another mount namespace's manager: its paths are not ours
            if not os.path.isabs(directory) or os.path.exists(directory):
                continue
            try:
                await self._run("delete table inet %s\n" % (name,),
                                "removing the orphaned table %s" % (name,))
                log.info("removed the agent firewall table inet {table} of {directory},"
                         " which no longer exists", table=name, directory=directory)
            except FirewallError as error:
                log.warn("{error}", error=str(error))

    def protect(self, host: str, port: int) -> Deferred:
        try:
            endpoint = check_endpoint(host, port)
        except FirewallError:
            return defer.fail()
        return self._queued(self._protect, endpoint)

    async def _protect(self, endpoint: Endpoint) -> None:
        element = _elements([endpoint])
        await self._run("add element inet %s agents { %s }\n" % (self.table, element)
                        + self._ungrant(element), "protecting %s:%d" % endpoint)
        self._agents.add(endpoint)
        self._granted.discard(endpoint)

    def _ungrant(self, element: str) -> str:
        # "delete element" fails for a missing one; "add" first makes it certain
        return ("add element inet %s granted { %s }\ndelete element inet %s granted { %s }\n"
                % (self.table, element, self.table, element))

    def release(self, host: str, port: int) -> Deferred:
        try:
            endpoint = check_endpoint(host, port)
        except FirewallError:
            return defer.fail()
        return self._queued(self._release, endpoint)

    async def _release(self, endpoint: Endpoint) -> None:
        # "delete element" fails for a missing one; "add" first makes it certain
        element = _elements([endpoint])
        await self._run("add element inet %s agents { %s }\n"
                        "delete element inet %s agents { %s }\n"
                        % (self.table, element, self.table, element)
                        + self._ungrant(element), "releasing %s:%d" % endpoint)
        self._agents.discard(endpoint)
        self._granted.discard(endpoint)

    def grant(self, host: str, port: int) -> Deferred:
        try:
            endpoint = check_endpoint(host, port)
        except FirewallError:
            return defer.fail()
        return self._queued(self._grant, endpoint)

    async def _grant(self, endpoint: Endpoint) -> None:
        await self._run("add element inet %s granted { %s }\n" % (
            self.table, _elements([endpoint])), "granting %s:%d to the proxy" % endpoint)
        self._granted.add(endpoint)

    def revoke(self, host: str, port: int) -> Deferred:
        try:
            endpoint = check_endpoint(host, port)
        except FirewallError:
            return defer.fail()
        return self._queued(self._revoke, endpoint)

    async def _revoke(self, endpoint: Endpoint) -> None:
        await self._run(self._ungrant(_elements([endpoint])),
                        "revoking the proxy's grant of %s:%d" % endpoint)
        self._granted.discard(endpoint)

    def granted(self) -> Deferred:
        return self._queued(self._endpoints, "granted")

    def protect_network(self, subnet: str, gateway: str) -> Deferred:
        try:
            network, gateway = check_network(subnet, gateway)
        except FirewallError:
            return defer.fail()
        return self._queued(self._protect_network, network, gateway)

    async def _protect_network(self, network: str, gateway: str) -> None:
        await self._run("add element inet %s agent_nets { %s }\n"
                        "add element inet %s gateways { %s }\n"
                        % (self.table, network, self.table, gateway),
                        "protecting the agents' network %s" % network)
        self._networks_added.add((network, gateway))

    def retain_only(self, endpoints: Iterable[Endpoint]) -> Deferred:
        try:
            keep = {check_endpoint(host, port) for host, port in endpoints}
        except FirewallError:
            return defer.fail()
        return self._queued(self._retain, keep)

    async def _retain(self, keep: Set[Endpoint]) -> None:
        granted = keep & await self._endpoints("granted")
        script = "flush set inet %s agents\nflush set inet %s granted\n" % (
            self.table, self.table)
        if keep:
            script += "add element inet %s agents { %s }\n" % (self.table, _elements(keep))
        if granted:
            script += "add element inet %s granted { %s }\n" % (self.table,
                                                                _elements(granted))
        await self._run(script, "trimming the agent firewall to the adopted agents")
        self._agents, self._granted = set(keep), set(granted)

    def entries(self) -> Deferred:
        return self._queued(self._endpoints, "agents")

    async def _endpoints(self, set_name: str) -> Set[Endpoint]:
        found = set()
        for item in await self._json("list", "set", "inet", self.table, set_name):
            for element in (item.get("set") or {}).get("elem", []):
                host, port = element["concat"]
                found.add((host, int(port)))
        return found

    def networks(self) -> Deferred:
        return self._queued(self._networks)

    async def _networks(self) -> Set[str]:
        found = set()
        for item in await self._json("list", "set", "inet", self.table, "agent_nets"):
            for element in (item.get("set") or {}).get("elem", []):
                if isinstance(element, dict) and "prefix" in element:
                    prefix = element["prefix"]
                    found.add("%s/%d" % (prefix["addr"], prefix["len"]))
                elif isinstance(element, dict) and "range" in element:
                    low, high = element["range"]
                    found.update(str(n) for n in ipaddress.summarize_address_range(
                        ipaddress.IPv4Address(low), ipaddress.IPv4Address(high)))
                else:
                    found.add("%s/32" % (element,))
        return found

    def close(self, keep: bool) -> Deferred:
        return self._queued(self._close, keep)

    async def _close(self, keep: bool) -> None:
        if keep:
            log.info("agent firewall table inet {table} stays: agents run on",
                     table=self.table)
            return
        # "add" first: deleting a table that is gone already is no error here
        await self._run("add table inet %s\ndelete table inet %s\n" % (self.table, self.table),
                        "removing the agent firewall table %s" % self.table)
        self._agents, self._granted, self._networks_added = set(), set(), set()
        self._installed = False
        log.info("removed the agent firewall table inet {table}", table=self.table)


def make_firewall(reactor: Any, mode: str, instance: str, proxy_gid: Optional[int],
                  is_root: bool) -> "IAgentFirewall":
    """The firewall for ``--agent-firewall mode`` of the manager of the state
    directory ``instance``."""
    if mode not in MODES:
        raise ValueError("--agent-firewall must be one of: " + ", ".join(MODES))
    if mode == "none":
        return NoFirewall("--agent-firewall none")
    if not is_root:
        if mode == "nftables":
            raise ValueError("--agent-firewall nftables needs a manager running as root")
        return NoFirewall("the manager is not root")
    return NftablesFirewall(reactor, table_name_for(instance), proxy_gid,
                            COMMENT_PREFIX + manager_identity(instance))
