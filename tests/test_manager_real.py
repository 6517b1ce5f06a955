"""The real manager behind the proxy's client: the IManager contract holds end
to end (AMPManagerClient → Unix socket → ManagerAMP → Manager → SQLite and
the process provider with the demo agent)."""
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXServerEndpoint

from pixelated_dispatcher.manager.amp_server import ManagerAMPFactory
from pixelated_dispatcher.manager.passwords import FAST_FOR_TESTS
from pixelated_dispatcher.manager.providers.process import ProcessProvider
from pixelated_dispatcher.manager.peer_policy import PeerPolicy
from pixelated_dispatcher.manager.service import Manager, ManagerSettings
from pixelated_dispatcher.manager.tap import DEFAULT_AGENT_COMMAND
from pixelated_dispatcher.proxy.manager_client import AMPManagerClient

from pixelated_dispatcher.testing.manager_contract import manager_contract_tests


#: this test process is a proxy-group peer of the manager it starts, not
#: an admin: what the proxy may ask is what the contract tests ask
AS_A_PROXY = PeerPolicy(admin_uids=frozenset(), proxy_gid=os.getgid())


@inlineCallbacks
def start_real_manager(test, provider=None, policy=AS_A_PROXY):
    """A Manager on a temporary state dir, serving a temporary socket to
    peers as ``policy`` says (by default: this process is a proxy)."""
    directory = tempfile.mkdtemp(prefix="pxd-")
    test.addCleanup(shutil.rmtree, directory, True)
    provider = provider or ProcessProvider(reactor, DEFAULT_AGENT_COMMAND, start_timeout=30,
                                           stop_grace=2)
    manager = Manager(reactor, os.path.join(directory, "state"), provider,
                      ManagerSettings(leap_provider="example.org", hash_parameters=FAST_FOR_TESTS))
    manager.startService()
    test.addCleanup(manager.stopService)
    yield manager.ready()
    path = os.path.join(directory, "manager.sock")
    port = yield UNIXServerEndpoint(reactor, path, mode=0o660).listen(
        ManagerAMPFactory(manager, policy))
    test.addCleanup(port.stopListening)
    return manager, path


class RealManagerFixture:

    @classmethod
    @inlineCallbacks
    def create(cls, test):
        self = cls()
        self.real, path = yield start_real_manager(test)
        self.manager = AMPManagerClient.for_socket(reactor, path)
        self.manager.service.startService()
        test.addCleanup(self.manager.service.stopService)
        return self

    def add_user(self, username, password):
        return self.real.add_user(username, password)

    def revoke_sessions(self, username):
        return self.real.revoke_sessions(username)


class RealManagerContract(manager_contract_tests(RealManagerFixture.create)):
    """What the proxy's unit tests assume of FakeManager is true of the real manager."""
