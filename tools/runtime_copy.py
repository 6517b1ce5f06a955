#!/usr/bin/env python3
"""Run a command of ``make demo`` or ``make check`` where every uid can read the code.

Run as root, the demo and the tests start agents (and, in the tests, the
proxy) under accounts of their own. Those must execute the interpreter and
import the project and its dependencies, which live in ``.venv`` inside the
clone. A clone in a directory only its owner may enter (root's home is mode
0700 on Debian; ``mktemp -d`` makes 0700 directories too) shuts them out, and
the agents fail with nothing but "Mailbox unavailable".

So, as root and only when the clone is closed to others, this builds a
*runtime copy*: a virtualenv of the same base interpreter in a new directory
``/tmp/pixelated-runtime-XXXXXX`` (mode 0755, owned by root), with the
clone's ``.venv`` site-packages and the project's code hard-linked (copied
across file systems) into it, runs the command with that virtualenv's python,
and deletes the copy when the command ends (also on Ctrl-C). The permissions
of the user's own directories are never touched. Elsewhere (not root, or a
clone others may enter) the command runs as it is, with ``.venv``.

If the base interpreter itself is closed to others (a pyenv under a private
home), no copy helps: it says so in one sentence and exits with status 2.

Usage: ``tools/runtime_copy.py [--quiet] -- python ARGS...`` (``python`` is
replaced by the right interpreter).
"""
import argparse
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import venv
from typing import Iterator, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CLONE = os.path.realpath(os.path.dirname(HERE))
#: what of the clone the agents and daemons import, relative to the clone
PROJECT_PATHS = ("pixelated_dispatcher", os.path.join("twisted", "plugins",
                                                      "pixelated_dispatcher_plugins.py"))


def closed_directory(path: str) -> Optional[str]:
    """The first directory on the way to ``path`` that other users may not
    enter (no search bit for "others"), or None when they reach it.

    Mode bits, not ``os.access``: root may enter anything, the agents may not.
    """
    path = os.path.realpath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    walked = []
    while True:
        walked.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for directory in reversed(walked):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


def base_interpreter() -> str:
    """The interpreter ``.venv`` was made from (what its ``bin/python`` links to)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file is readable by all (nothing is copied);
    a copy made readable by all where it is not (a umask of 077)."""
    mode = os.stat(source).st_mode
    if mode & stat.S_IROTH:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)
    if not mode & stat.S_IROTH:
        os.chmod(target, stat.S_IMODE(mode) | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))


def _copy_tree(source: str, target: str) -> None:
    """Hard-link (or copy) ``source`` into ``target``, without byte-code
    caches and without the editable install's pointer back into the clone."""
    def ignore(directory: str, names: List[str]) -> List[str]:
        return [name for name in names
                if name == "__pycache__" or name == "dropin.cache"
                or (name.startswith("__editable__") or name.endswith(".egg-link")
                    or (name.endswith(".pth")
                        and _points_into_clone(os.path.join(directory, name))))]
    shutil.copytree(source, target, ignore=ignore, copy_function=_link_or_copy,
                    dirs_exist_ok=True, symlinks=True)


def _points_into_clone(pth: str) -> bool:
    try:
        with open(pth) as f:
            return any(os.path.realpath(line.strip()).startswith(CLONE)
                       for line in f if line.strip() and not line.startswith("import"))
    except OSError:
        return False


def _console_scripts(venv_bin: str) -> Iterator[str]:
    """Scripts of ``.venv/bin`` that run the venv's python (pixelated-ctl, twistd)."""
    for name in sorted(os.listdir(venv_bin)):
        path = os.path.join(venv_bin, name)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        try:
            with open(path, "rb") as f:
                first = f.readline()
        except OSError:
            continue
        if first.startswith(b"#!") and b"python" in first:
            yield name


def build(directory: str) -> str:
    """Make ``directory`` a virtualenv that every uid can use; return its python."""
    venv.EnvBuilder(symlinks=True, with_pip=False).create(directory)
    python = os.path.join(directory, "bin", "python")
    target = subprocess.run([python, "-c",
                             "import sysconfig; print(sysconfig.get_path('purelib'))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    for path in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}:
        _copy_tree(path, target)
    for relative in PROJECT_PATHS:
        source = os.path.join(CLONE, relative)
        if os.path.isdir(source):
            _copy_tree(source, os.path.join(target, relative))
        else:
            os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, relative))
    venv_bin = os.path.dirname(sys.executable)
    for name in _console_scripts(venv_bin):
        with open(os.path.join(venv_bin, name), "rb") as f:
            f.readline()
            body = f.read()
        script = os.path.join(directory, "bin", name)
        with open(script, "wb") as f:
            f.write(b"#!" + python.encode() + b"\n" + body)
        os.chmod(script, 0o755)
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o755)
    return python


def _run_as_it_is(command: List[str]) -> int:
    """Become the command (``.venv``'s python): Ctrl-C then reaches only the
    command, which cleans up after itself, and nothing of ours stays between."""
    os.execv(sys.executable, [sys.executable] + command[1:])
    return 127  # not reached


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command or command[0] != "python":
        parser.error("the command must start with 'python'")
    if os.geteuid() != 0:
        return _run_as_it_is(command)
    interpreter = base_interpreter()
    closed = closed_directory(interpreter)
    if closed is not None:
        target = "demo" if "pixelated_dispatcher.demo" in command else "check"
        print("make %s: agents run under accounts of their own and cannot execute %s,"
              " because %s is closed to other users; use an interpreter they can reach,"
              " for example Debian's: make clean && make PYTHON=/usr/bin/python3 %s"
              % (target, interpreter, closed, target), file=sys.stderr)
        return 2
    closed = closed_directory(CLONE)
    if closed is None:
        return _run_as_it_is(command)
    directory = tempfile.mkdtemp(prefix="pixelated-runtime-")
    # SIGINT goes to the whole foreground group: the command handles it and
    # we wait for it to finish before the copy goes.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if not options.quiet:
            print("%s is closed to other users, so agents could not run from this clone;"
                  " running from a copy in %s (deleted at the end)" % (closed, directory),
                  flush=True)
        python = build(directory)
        child = subprocess.Popen([python] + command[1:],
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
