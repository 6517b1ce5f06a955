"""A peer of the manager socket that runs AMP calls as told, for tests that
must ask as another Unix user (a compromised proxy, an admin).

    python -m pixelated_dispatcher.testing.amp_peer SOCKET < calls.json

``calls.json`` is a list of ``[command name, {argument: value}]``; a value
``"$N.key"`` is the ``key`` of answer N. Prints a JSON list with one entry
per call: ``{"answer": {...}}`` or ``{"error": CODE, "message": text}``.
"""
import json
import sys
from typing import Any, Dict, Generator, List

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import react
from twisted.protocols import amp

from pixelated_dispatcher import protocol as p


def _value(value: Any, answers: List[Dict[str, Any]]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        index, key = value[1:].split(".", 1)
        return answers[int(index)]["answer"][key]
    return value


@inlineCallbacks
def main(reactor: Any, path: str) -> Generator[Any, Any, None]:
    calls = json.load(sys.stdin)
    connection = yield connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), amp.AMP())
    answers: List[Dict[str, Any]] = []
    for name, arguments in calls:
        command = getattr(p, name)
        arguments = {key: _value(value, answers) for key, value in arguments.items()}
        try:
            answer = yield connection.callRemote(command, **arguments)
            answers.append({"answer": answer})
        except p.DispatcherError as error:
            answers.append({"error": command.allErrors[type(error)].decode(),
                            "message": str(error)})
    connection.transport.loseConnection()
    print(json.dumps(answers))


if __name__ == "__main__":
    react(main, sys.argv[1:2])
