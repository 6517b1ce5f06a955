"""How many passwords an attacker may try per day against one user name,
measured on the manager's real ``LoginLimiter`` with a simulated clock.

    .venv/bin/python -m bench.login_guesses [--days N] [--free 5] [--global-free 100]
                                            [--backoff-max 900]

The attacker is greedy (tries again the moment the limiter allows it, which
is the best it can do: waiting longer never lowers a wait) and never guesses
right. It uses a fresh address for every attempt, so the per-address key
never binds:

* ``one network``: every address in one /24 (or /64);
* ``N networks``: N of them, round robin, e.g. a small botnet;
* ``unlimited``: a new network for every attempt (the global ceiling alone).

For each it prints the attempts per day, and how long the real user had to
wait at most during the last day: from her home network (where she logged in
before) and from a network she never used.
"""
import argparse
from typing import Dict

from twisted.internet.task import Clock

from pixelated_dispatcher.manager.login_limits import LoginLimiter

DAY = 86400.0


def fresh_address(n: int, network_count: int) -> str:
    """The ``n``-th attempt's address: a new one each time, round robin over
    ``network_count`` /24 networks (0: a new network each time)."""
    if network_count == 0:
        return "10.%d.%d.1" % (n // 256 % 256, n % 256)
    net = n % network_count
    return "10.0.%d.%d" % (net, n // network_count % 250 + 1)


#: The user's home network, which alice logged in from before the attack,
#: and a network she has never used (travelling).
HOME, ELSEWHERE = "192.0.2.10", "198.51.100.10"


def attack(days: float, network_count: int, **limits: float) -> Dict[str, float]:
    """Simulate a greedy attack for ``days``; return attempts per day (over
    the whole run) and the user's longest wait during the last day, at home
    and elsewhere."""
    clock = Clock()
    limiter = LoginLimiter(clock, **limits)
    limiter.succeeded("alice", HOME)
    attempts = 0
    waits = {"home": 0.0, "elsewhere": 0.0}
    end = days * DAY
    n = 0
    while clock.seconds() < end:
        if clock.seconds() >= end - DAY:
            waits["home"] = max(waits["home"], limiter.wait_for("alice", HOME))
            waits["elsewhere"] = max(waits["elsewhere"], limiter.wait_for("alice", ELSEWHERE))
        # The network that may try soonest (each with a fresh address).
        candidates = [fresh_address(n + i, network_count)
                      for i in range(max(network_count, 1))]
        wait, client = min((limiter.wait_for("alice", c), c) for c in candidates)
        if wait > 0:
            clock.advance(min(wait, end - clock.seconds()))
            continue
        limiter.failed("alice", client)
        attempts += 1
        n += max(network_count, 1)
    return {"per_day": attempts / days, **waits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--free", type=int, default=5)
    parser.add_argument("--global-free", type=int, default=100)
    parser.add_argument("--backoff-max", type=float, default=900.0)
    options = parser.parse_args()
    limits = dict(free_failures=options.free, global_free_failures=options.global_free,
                  maximum=options.backoff_max)
    print("%.0f days of attack; the user's longest wait on the last day:" % options.days)
    print("attacker              guesses/day   at home   on a new network")
    for label, count in (("one network", 1), ("2 networks", 2), ("5 networks", 5),
                         ("20 networks", 20), ("unlimited networks", 0)):
        result = attack(options.days, count, **limits)
        print("%-20s  %11.0f   %5.0f s   %8.0f s" % (label, result["per_day"], result["home"],
                                                    result["elsewhere"]))


if __name__ == "__main__":
    main()
