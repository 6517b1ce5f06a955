"""A wrong command line makes ``twistd`` exit with status 1 on every Twisted.

Twisted 22.4 (Debian 12's ``twistd3``) prints the usage text and the error
and then exits with status 0; under systemd a ``pixelated-*.service`` with a
typo in ``/etc/default`` would look like it stopped cleanly ("inactive
(dead)", ``status=0/SUCCESS``) instead of "failed". Newer Twisted exits 1.
The plugins hand ``twistd`` their ``Options`` wrapped by
:func:`exiting_on_usage_error`: the error is one sentence on stderr (the
journal), without the page of usage text, and the exit status is 1.
The ``tap`` modules' own ``Options`` still raise ``UsageError`` (tests).
"""
import sys
from typing import List, Optional, Type

from twisted.python.usage import Options, UsageError


def exiting_on_usage_error(options: Type[Options], name: str) -> Type[Options]:
    """``options`` whose ``parseOptions`` exits 1 with one clear line on a
    ``UsageError`` (``name``: the plugin, for the message)."""

    class ExitingOptions(options):  # type: ignore[valid-type, misc]
        def parseOptions(self, arguments: Optional[List[str]] = None) -> None:  # noqa: N802
            try:
                super().parseOptions(arguments)
            except UsageError as error:
                sys.stderr.write("twistd %s: %s\n(twistd %s --help lists the options)\n"
                                 % (name, error, name))
                sys.stderr.flush()
                raise SystemExit(1)

    ExitingOptions.__name__ = ExitingOptions.__qualname__ = options.__name__
    return ExitingOptions
