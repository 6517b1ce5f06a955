#!/usr/bin/env python3
"""Regenerate the option lists of the man pages in ``debian/man/`` from the code.

Usage, from the repository root::

    python3 tools/manpages.py           # rewrite the generated parts
    python3 tools/manpages.py --check   # write nothing; exit 1 if a page is stale

The three pages stay hand-written roff, the single source of their prose
(NAME, SYNOPSIS, DESCRIPTION, FILES, ...). Only what lies between a pair of
marker comments is generated::

    .SH OPTIONS
    .\\" BEGIN GENERATED OPTIONS (tools/manpages.py)
    ... written by this script ...
    .\\" END GENERATED OPTIONS

The options come from the code itself, imported, not parsed as text:

* ``twistd pixelated-manager`` and ``twistd pixelated-proxy``: the
  ``twisted.python.usage.Options`` classes of their ``tap`` modules
  (``optParameters``, ``optFlags``, ``opt_*`` methods, ``compData``);
* ``pixelated-ctl``: the ``argparse`` parser of ``pixelated_dispatcher.ctl``
  (its options, and a COMMANDS section for its sub-commands).

Each option is listed with its help text and, for options taking a value,
the code's default ("Default: 512m."). Options are sorted by name; the
sub-commands of pixelated-ctl keep the parser's order (that of
``pixelated-ctl --help``). The output depends on nothing but the code: no
dates, no environment (the ``.TH`` line is left as it is).

Runs with Python >= 3.9 and Twisted >= 22.4 (Debian 12) as well as the newest.
"""
import argparse
import difflib
import importlib
import os
import re
import sys
import unicodedata
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

#: The repository root (this file is ``tools/manpages.py``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BEGIN = '.\\" BEGIN GENERATED {name} (tools/manpages.py)'
END = '.\\" END GENERATED {name}'
#: First line of every generated part, for whoever opens the page.
NOTE = ('.\\" Generated from the code: change the help texts there, then run'
        ' python3 tools/manpages.py.')

#: A help text's trailing "[default: X]" (twisted's own convention, used in
#: docstrings of ``opt_*`` methods whose default the Options cannot hold).
_BRACKETED_DEFAULT = re.compile(r"^(?P<text>.*?)[\s,;]*\[default:\s*(?P<default>[^\]]*)\][.\s]*$",
                                re.IGNORECASE | re.DOTALL)


#: A word that must not be hyphenated: a separator with more of the word after it.
_TECHNICAL = re.compile(r"[/:=@_$.]\S")
_LETTER = re.compile(r"[^\W\d_]")  # words without one (numbers) are never hyphenated


class PageError(Exception):
    """A page cannot be regenerated (e.g. its markers are missing)."""


class Entry(NamedTuple):
    """One item of a generated list: its tag line and its description."""

    tag: str                # roff, already escaped
    text: str               # plain text
    default: Optional[str]  # plain text, or None


class Page(NamedTuple):
    """A man page and how to produce its generated parts."""

    path: str                               # relative to the repository root
    sections: Callable[[], Dict[str, str]]  # marker name -> roff between the markers


class Stale(NamedTuple):
    """A page whose generated parts differ from the code."""

    path: str
    old: str
    new: str

    def diff(self) -> str:
        """A unified diff from the page on disk to the regenerated one."""
        return "".join(difflib.unified_diff(
            self.old.splitlines(True), self.new.splitlines(True),
            "a/" + self.path, "b/" + self.path))


# --- roff --------------------------------------------------------------------

def roff_escape(text: str) -> str:
    """``text`` as roff input that renders as ``text`` itself.

    Whitespace runs become one space (a help text is one filled paragraph),
    ``\\`` becomes ``\\(rs``, ``-`` becomes ``\\-`` (a minus, what options are
    typed with), non-ASCII characters become ``\\[uXXXX]``, and a line starting
    with ``.`` or ``'`` (a request to roff) is guarded with ``\\&``. Words
    like paths, endpoints and host names (letters, with ``/:=@_$.`` inside)
    start with ``\\%``, so that they are never hyphenated.
    """
    escaped = " ".join(("\\%" if _TECHNICAL.search(word) and _LETTER.search(word) else "")
                       + _escape_word(word, text) for word in text.split())
    if escaped.startswith((".", "'")):
        escaped = "\\&" + escaped
    return escaped


def _escape_word(word: str, text: str) -> str:
    out = []
    for char in word:
        if char == "\\":
            out.append("\\(rs")
        elif char == "-":
            out.append("\\-")
        elif " " <= char <= "~":
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise ValueError("cannot write the character %r to a man page (in %r)"
                             % (char, text))
        else:
            out.append("\\[u%04X]" % ord(char))
    return "".join(out)


def _bold(text: str) -> str:
    return "\\fB%s\\fR" % roff_escape(text)


def _italic(text: str) -> str:
    return "\\fI%s\\fR" % roff_escape(text)


def _sentence(text: str, capitalize: bool = False) -> str:
    """``text`` on one line, ending with a full stop (and a capital, if asked)."""
    text = " ".join(text.split())
    if capitalize and text[:1].islower():
        text = text[0].upper() + text[1:]
    if text and text[-1] not in ".!?":
        text += "."
    return text


def render_entries(entries: Iterable[Entry]) -> List[str]:
    """``.TP`` paragraphs: the tag, then the help text and the default."""
    lines = []
    for entry in entries:
        text = _sentence(entry.text)
        if entry.default is not None:
            text = (text + " " if text else "") + "Default: %s." % entry.default
        lines += [".TP", entry.tag]
        if text:
            lines.append(roff_escape(text))
    return lines


# --- twisted.python.usage.Options ---------------------------------------------

def _default_text(value: Any) -> Optional[str]:
    """How a default is shown; None when there is nothing to show."""
    if value is None or value == "" or isinstance(value, (list, tuple, dict, set)) and not value:
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def twisted_entries(options_class: type, warn: Callable[[str], None] = lambda _: None,
                    ) -> List[Entry]:
    """The options that an instance of ``options_class`` accepts, sorted by name.

    ``warn`` is told about options without a help text.
    """
    options = options_class()
    long_options = {name.rstrip("="): name.endswith("=") for name in options.longOpt}
    short_takes_arg = {}
    for index, char in enumerate(options.shortOpt):
        if char != ":":
            short_takes_arg[char] = options.shortOpt[index + 1:index + 2] == ":"
    # Every spelling, grouped under the name the options are stored under.
    spellings: Dict[str, List[str]] = {}
    for name, canonical in options.synonyms.items():
        spellings.setdefault(canonical, []).append(name)
    for name in list(long_options) + list(short_takes_arg):
        spellings.setdefault(options.synonyms.get(name, name), [])
    descriptions = getattr(getattr(options, "compData", None), "descriptions", None) or {}

    entries = []
    for canonical in sorted(spellings, key=lambda name: name.lower()):
        names = set(spellings[canonical]) | {canonical}
        shorts = sorted(name for name in names if len(name) == 1)
        longs = sorted((name for name in names if len(name) > 1),
                       key=lambda name: (name != canonical, name))
        takes_arg = any(long_options.get(name, False) for name in longs) or any(
            short_takes_arg.get(name, False) for name in shorts)
        value = " \\fIVALUE\\fR" if takes_arg else ""
        tag = ", ".join(["%s%s" % (_bold("-" + name), value) for name in shorts] +
                        ["%s%s" % (_bold("--" + name), "=\\fIVALUE\\fR" if takes_arg else "")
                         for name in longs])
        text = options.docs.get(canonical) or descriptions.get(canonical) or ""
        coerce_doc = getattr(getattr(options, "_dispatch", {}).get(canonical), "doc", "")
        if coerce_doc:
            text = "%s %s" % (_sentence(text), coerce_doc) if text else coerce_doc
        text = " ".join(text.split())
        default = _default_text(options.defaults.get(canonical)) if takes_arg else None
        bracketed = _BRACKETED_DEFAULT.match(text)
        if bracketed and default is None:
            text, default = bracketed.group("text"), bracketed.group("default").strip()
        if not text:
            warn("%s: --%s has no help text" % (options_class.__module__, canonical))
        entries.append(Entry(tag, text, default))
    return entries


def twisted_options_roff(options_class: type,
                         warn: Callable[[str], None] = lambda _: None) -> str:
    """The OPTIONS list of a twisted ``usage.Options`` class, as roff."""
    return "\n".join([NOTE] + render_entries(twisted_entries(options_class, warn)))


# --- argparse -----------------------------------------------------------------

def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return "{%s}" % ",".join(str(choice) for choice in action.choices)
    return action.dest.upper()


def _arguments(action: argparse.Action) -> str:
    """The roff of an action's value(s), e.g. ``\\fINAME\\fR [\\fINAME\\fR ...]``."""
    word = _italic(_metavar(action))
    nargs = action.nargs
    if nargs is None or nargs == 1:
        return word
    if nargs == "?":
        return "[%s]" % word
    if nargs in ("*", argparse.REMAINDER):
        return "[%s ...]" % word
    if nargs == "+":
        return "%s [%s ...]" % (word, word)
    if isinstance(nargs, int):
        return " ".join([word] * nargs)
    return word


def _option_strings(action: argparse.Action) -> List[str]:
    """Short spellings first, then long ones."""
    return sorted(action.option_strings, key=lambda option: (option.startswith("--"), option))


def _option_key(action: argparse.Action) -> str:
    return max(action.option_strings, key=len).lstrip("-").lower()


def _help_text(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` shows it (``%(default)s`` and the like filled in)."""
    if not action.help:
        return ""
    params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(choice) for choice in params["choices"])
    return action.help % params


def _argparse_entry(action: argparse.Action, prog: str) -> Entry:
    if action.option_strings:
        value = "" if _is_flag(action) else " " + _arguments(action)
        tag = ", ".join(_bold(option) + value for option in _option_strings(action))
    else:
        tag = _arguments(action)
    default = None
    if (not _is_flag(action) and action.option_strings and "%(default)" not in (action.help or "")
            and action.default is not argparse.SUPPRESS):
        default = _default_text(action.default)
    return Entry(tag, _sentence(_help_text(action, prog), capitalize=True), default)


def _visible(actions: Iterable[argparse.Action]) -> List[argparse.Action]:
    return [action for action in actions if action.help is not argparse.SUPPRESS]


def _subparsers(parser: argparse.ArgumentParser) -> Optional[argparse._SubParsersAction]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def argparse_option_entries(parser: argparse.ArgumentParser) -> List[Entry]:
    """The parser's own options (not its sub-commands'), sorted by name."""
    options = [action for action in _visible(parser._actions) if action.option_strings]
    return [_argparse_entry(action, parser.prog)
            for action in sorted(options, key=_option_key)]


def argparse_option_roff(parser: argparse.ArgumentParser) -> str:
    """The OPTIONS list of an argparse parser, as roff."""
    return "\n".join([NOTE] + render_entries(argparse_option_entries(parser)))


def argparse_commands_roff(parser: argparse.ArgumentParser) -> str:
    """The COMMANDS list of an argparse parser, in the parser's order, as roff.

    Each command's tag is its synopsis; under its description, an indented
    list of its arguments (in order) and options (sorted, ``--help`` left out).
    An argument described by an earlier command in the very same words (the
    user NAME of most commands) is not described again.
    """
    lines = [NOTE]
    described = set()
    commands = _subparsers(parser)
    if commands is None:
        return "\n".join(lines)
    helps = {choice.dest: choice.help for choice in getattr(commands, "_choices_actions", [])}
    names: Dict[int, List[str]] = {}
    parsers: Dict[int, argparse.ArgumentParser] = {}
    for name, sub in commands.choices.items():  # aliases share their parser
        names.setdefault(id(sub), []).append(name)
        parsers[id(sub)] = sub
    for key, sub in parsers.items():
        name, aliases = names[key][0], names[key][1:]
        actions = [action for action in _visible(sub._actions)
                   if not isinstance(action, argparse._HelpAction)]
        positionals = [action for action in actions if not action.option_strings]
        options = sorted((action for action in actions if action.option_strings),
                         key=_option_key)
        synopsis = [_bold(name)]
        for action in options:
            words = _bold(_option_strings(action)[-1])
            if not _is_flag(action):
                words += " " + _arguments(action)
            synopsis.append(words if action.required else "[%s]" % words)
        synopsis += [_arguments(action) for action in positionals]
        text = sub.description or helps.get(name) or ""
        if aliases:
            text = _sentence(text, capitalize=True) + " Also: %s." % ", ".join(aliases)
        lines += render_entries([Entry(" ".join(synopsis), _sentence(text, capitalize=True),
                                       None)])
        entries = [_argparse_entry(action, sub.prog) for action in positionals]
        entries = [entry for entry in entries if entry not in described]
        described.update(entries)
        entries += [_argparse_entry(action, sub.prog) for action in options]
        if entries:
            lines.append(".RS")
            lines += render_entries(entries)
            lines.append(".RE")
    return "\n".join(lines)


# --- the pages ------------------------------------------------------------------

def _import(module: str) -> Any:
    """A module of this tree (the repository root goes first on ``sys.path``)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(module)


def _warn(message: str) -> None:
    print("tools/manpages.py: warning: %s" % message, file=sys.stderr)


def _manager_sections() -> Dict[str, str]:
    tap = _import("pixelated_dispatcher.manager.tap")
    return {"OPTIONS": twisted_options_roff(tap.Options, _warn)}


def _proxy_sections() -> Dict[str, str]:
    tap = _import("pixelated_dispatcher.proxy.tap")
    return {"OPTIONS": twisted_options_roff(tap.Options, _warn)}


def _ctl_sections() -> Dict[str, str]:
    parser = _import("pixelated_dispatcher.ctl")._parser()
    return {"OPTIONS": argparse_option_roff(parser), "COMMANDS": argparse_commands_roff(parser)}


PAGES = (
    Page("debian/man/pixelated-manager.8", _manager_sections),
    Page("debian/man/pixelated-proxy.8", _proxy_sections),
    Page("debian/man/pixelated-ctl.1", _ctl_sections),
)


def splice(text: str, sections: Mapping[str, str], path: str = "page") -> str:
    """``text`` with what lies between each pair of markers replaced."""
    lines = text.split("\n")
    for name, body in sections.items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        starts = [i for i, line in enumerate(lines) if line.rstrip() == begin]
        ends = [i for i, line in enumerate(lines) if line.rstrip() == end]
        if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
            raise PageError("%s needs exactly one pair of lines\n  %s\n  %s\n(in this order)"
                            " around its generated %s" % (path, begin, end, name))
        lines[starts[0] + 1:ends[0]] = body.split("\n") if body else []
    return "\n".join(lines)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def stale_pages(root: str = ROOT, pages: Sequence[Page] = PAGES) -> List[Stale]:
    """The pages under ``root`` whose generated parts are not what the code says."""
    stale = []
    for page in pages:
        old = _read(os.path.join(root, page.path))
        new = splice(old, page.sections(), page.path)
        if new != old:
            stale.append(Stale(page.path, old, new))
    return stale


def check(root: str = ROOT, pages: Sequence[Page] = PAGES) -> List[str]:
    """The paths of the stale pages (empty when every page is up to date)."""
    return [page.path for page in stale_pages(root, pages)]


def regenerate(root: str = ROOT, pages: Sequence[Page] = PAGES) -> List[str]:
    """Rewrite the stale pages; the paths of those rewritten."""
    stale = stale_pages(root, pages)
    for page in stale:
        with open(os.path.join(root, page.path), "w", encoding="utf-8", newline="") as f:
            f.write(page.new)
    return [page.path for page in stale]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (2 for a page without markers)."""
    parser = argparse.ArgumentParser(
        prog="tools/manpages.py",
        description="Regenerate the OPTIONS (and COMMANDS) sections of debian/man/* from the"
                    " code.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and show a diff if a page is out of date")
    parser.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    try:
        if arguments.check:
            stale = stale_pages(arguments.root)
            for page in stale:
                print("%s is out of date; run python3 tools/manpages.py" % page.path,
                      file=sys.stderr)
                sys.stdout.write(page.diff())
            return 1 if stale else 0
        for path in regenerate(arguments.root):
            print("rewrote %s" % path)
        return 0
    except PageError as error:
        print("tools/manpages.py: %s" % error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
