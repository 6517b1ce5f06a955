"""The man pages' option lists (tools/manpages.py): up to date, complete, escaped right.

Nothing here writes to the real pages: whatever is rewritten is a copy in a
temporary directory.
"""
import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher import ctl
from pixelated_dispatcher.manager import tap as manager_tap
from pixelated_dispatcher.manager.passwords import PRODUCTION
from pixelated_dispatcher.proxy import tap as proxy_tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "manpages.py")
MANAGER_PAGE = "debian/man/pixelated-manager.8"
PROXY_PAGE = "debian/man/pixelated-proxy.8"
CTL_PAGE = "debian/man/pixelated-ctl.1"
GROFF = shutil.which("groff")


def _load_tool():
    spec = importlib.util.spec_from_file_location("tools_manpages", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manpages = _load_tool()


def read(path, root=ROOT):
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return f.read()


def generated(text, name="OPTIONS"):
    """The lines between a page's markers."""
    lines = text.split("\n")
    start = lines.index(manpages.BEGIN.format(name=name))
    return lines[start + 1:lines.index(manpages.END.format(name=name))]


def entries(lines):
    """Tag line -> description line of the ``.TP`` paragraphs."""
    found = {}
    for index, line in enumerate(lines):
        if line == ".TP":
            text = lines[index + 2] if index + 2 < len(lines) else ""
            found[lines[index + 1]] = "" if text.startswith(".") else text
    return found


def roff_option(name):
    """How the pages spell an option in bold: ``\\fB\\-\\-state\\-dir\\fR``."""
    return "\\fB%s\\fR" % (("--" if len(name) > 1 else "-") + name).replace("-", "\\-")


def unescape(roff):
    """The text that roff shows for the output of ``roff_escape``.

    Fails on anything ``roff_escape`` must not produce: a bare ``-``, a
    control character at the start, an unknown escape.
    """
    if roff.startswith((".", "'")):
        raise AssertionError("a line starting with a control character: %r" % roff)
    text = []
    for match in re.finditer(r"\\\(rs|\\\[u([0-9A-F]{4,6})\]|\\([-&%])|(.)", roff, re.DOTALL):
        escape, code, char = match.group(0), match.group(1), match.group(3)
        if code:
            text.append(chr(int(code, 16)))
        elif escape == "\\(rs":
            text.append("\\")
        elif match.group(2):
            text.append({"-": "-", "&": "", "%": ""}[match.group(2)])
        elif char in "\\-\n":
            raise AssertionError("unescaped %r in %r" % (char, roff))
        else:
            text.append(char)
    return "".join(text)


def render(roff_body):
    """What ``groff -man`` shows for a page of ``roff_body``, whitespace collapsed."""
    page = ".TH T 1\n.nh\n.SH OPTIONS\n%s\n" % roff_body
    result = subprocess.run([GROFF, "-man", "-ww", "-rLL=2000n", "-Tutf8", "-P-cbou"],
                            input=page.encode(),
                            capture_output=True, timeout=30)
    if result.returncode or result.stderr:
        raise AssertionError("groff: %r" % result.stderr.decode(errors="replace"))
    text = result.stdout.decode("utf-8")
    # groff outside Debian shows \- as a minus sign and quotes typographically.
    for fancy, plain in [("\u2212", "-"), ("\u2010", "-"), ("\u2019", "'"), ("\u2018", "`")]:
        text = text.replace(fancy, plain)
    return " ".join(text.split())


@contextlib.contextmanager
def captured():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


class PagesAreUpToDateTests(SynchronousTestCase):

    def test_pages_say_what_the_code_says(self):
        stale = manpages.stale_pages()
        self.assertEqual([page.path for page in stale], [],
                         "the man pages are out of date: run python3 tools/manpages.py\n"
                         + "".join(page.diff() for page in stale))

    def test_the_script_runs_from_the_repository_root(self):
        result = subprocess.run([sys.executable, "tools/manpages.py", "--check"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0,
                         "run python3 tools/manpages.py\n" + result.stderr + result.stdout)


class CompletenessTests(SynchronousTestCase):
    """What a reader looks for is in the page, as the code has it."""

    def assertEveryOptionListed(self, options_class, path):
        page = "\n".join(generated(read(path)))
        for name in options_class().synonyms:
            self.assertIn(roff_option(name), page, "%s does not list --%s" % (path, name))

    def test_every_manager_option_is_in_its_page(self):
        self.assertEveryOptionListed(manager_tap.Options, MANAGER_PAGE)

    def test_every_proxy_option_is_in_its_page(self):
        self.assertEveryOptionListed(proxy_tap.Options, PROXY_PAGE)
        self.assertIn("\\fB\\-\\-listen\\fR=\\fIVALUE\\fR", generated(read(PROXY_PAGE)))

    def test_every_ctl_option_and_command_is_in_its_page(self):
        page = read(CTL_PAGE)
        options, commands = "\n".join(generated(page)), generated(page, "COMMANDS")
        parser = ctl._parser()
        for action in parser._actions:
            for option in action.option_strings:
                self.assertIn("\\fB%s\\fR" % option.replace("-", "\\-"), options)
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        tags = [line for line in commands if line.startswith("\\fB")]
        for name, sub in subparsers[0].choices.items():
            tag = [t for t in tags if t.startswith("\\fB%s\\fR" % name.replace("-", "\\-"))]
            self.assertEqual(len(tag), 1, name)
            for action in sub._actions:
                for option in action.option_strings:
                    if option not in ("-h", "--help"):
                        self.assertIn(option.replace("-", "\\-"), tag[0])

    def test_parameters_show_the_code_defaults(self):
        for options_class, path in [(manager_tap.Options, MANAGER_PAGE),
                                    (proxy_tap.Options, PROXY_PAGE)]:
            listed = entries(generated(read(path)))
            options = options_class()
            for name in (name[:-1] for name in options.longOpt if name.endswith("=")):
                default = options.defaults.get(name)
                if default is None:
                    continue
                text = listed[roff_option(name) + "=\\fIVALUE\\fR"]
                self.assertTrue(unescape(text).endswith("Default: %s." % (default,)),
                                "%s: --%s: %r" % (path, name, text))

    def test_defaults_that_drifted_before(self):
        listed = entries(generated(read(MANAGER_PAGE)))

        def text(name):
            return unescape(listed[roff_option(name) + "=\\fIVALUE\\fR"])
        self.assertTrue(text("argon2-memory").endswith("Default: %d." % PRODUCTION.memory_cost_kib))
        self.assertTrue(text("argon2-time-cost").endswith("Default: %d." % PRODUCTION.time_cost))
        self.assertTrue(text("agent-memory").endswith("Default: 512m."))

    def test_flags_have_no_default(self):
        listed = entries(generated(read(MANAGER_PAGE)))
        self.assertNotIn("Default:", listed[roff_option("stop-agents-on-exit")])
        self.assertEqual(unescape(listed[roff_option("help")]), "Display this help and exit.")

    def test_every_option_has_a_help_text(self):
        for options_class in (manager_tap.Options, proxy_tap.Options):
            missing = []
            manpages.twisted_entries(options_class, missing.append)
            self.assertEqual(missing, [])

    def test_options_are_sorted(self):
        for path in (MANAGER_PAGE, PROXY_PAGE):
            names = [re.match(r"\\fB\\-\\-(.*?)\\fR", tag).group(1).replace("\\-", "-")
                     for tag in entries(generated(read(path)))]
            self.assertEqual(names, sorted(names), path)


class Workspace(SynchronousTestCase):
    """A temporary copy of the three pages."""

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        os.makedirs(os.path.join(self.root, "debian", "man"))
        for page in manpages.PAGES:
            shutil.copy(os.path.join(ROOT, page.path), os.path.join(self.root, page.path))
        self.originals = {page.path: read(page.path) for page in manpages.PAGES}

    def tearDown(self):
        for path, text in self.originals.items():
            self.assertEqual(read(path), text, "the real %s was changed" % path)

    def manager_page(self, options_class):
        return [manpages.Page(MANAGER_PAGE, lambda: {
            "OPTIONS": manpages.twisted_options_roff(options_class)})]


class StalePageTests(Workspace):

    def test_a_new_option_makes_the_check_fail_until_regenerated(self):
        class WithNewOption(manager_tap.Options):
            optParameters = [["frobnicate-level", None, "7", "How hard to frobnicate."]]

        self.assertEqual(manpages.check(self.root, self.manager_page(manager_tap.Options)), [])
        pages = self.manager_page(WithNewOption)
        self.assertEqual(manpages.check(self.root, pages), [MANAGER_PAGE])
        self.assertEqual(manpages.regenerate(self.root, pages), [MANAGER_PAGE])
        self.assertEqual(manpages.check(self.root, pages), [])
        self.assertEqual(entries(generated(read(MANAGER_PAGE, self.root)))[
            "\\fB\\-\\-frobnicate\\-level\\fR=\\fIVALUE\\fR"],
            "How hard to frobnicate. Default: 7.")

    def test_regenerating_keeps_the_prose(self):
        class WithNewFlag(manager_tap.Options):
            optFlags = [["dry-run", None, "Do nothing."]]

        manpages.regenerate(self.root, self.manager_page(WithNewFlag))
        old, new = read(MANAGER_PAGE).split("\n"), read(MANAGER_PAGE, self.root).split("\n")
        begin = manpages.BEGIN.format(name="OPTIONS")
        end = manpages.END.format(name="OPTIONS")
        self.assertEqual(old[:old.index(begin)], new[:new.index(begin)])
        self.assertEqual(old[old.index(end):], new[new.index(end):])
        self.assertIn("\\fB\\-\\-dry\\-run\\fR", new)

    def test_a_changed_default_or_help_text_makes_the_check_fail(self):
        class NewDefault(manager_tap.Options):
            optParameters = [["agent-memory", None, "1g", "Memory limit of each agent."]]

        self.assertEqual(manpages.check(self.root, self.manager_page(NewDefault)), [MANAGER_PAGE])

    def test_a_new_ctl_command_or_option_makes_the_check_fail(self):
        def with_command():
            parser = ctl._parser()
            commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            commands[0].add_parser("frobnicate", help="frobnicate a user",
                                   description="frobnicate a user")
            return parser

        def with_option():
            parser = ctl._parser()
            parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
            return parser

        for make_parser in (ctl._parser, with_command, with_option):
            pages = [manpages.Page(CTL_PAGE, lambda: {
                "OPTIONS": manpages.argparse_option_roff(make_parser()),
                "COMMANDS": manpages.argparse_commands_roff(make_parser())})]
            self.assertEqual(manpages.check(self.root, pages),
                             [] if make_parser is ctl._parser else [CTL_PAGE])
        manpages.regenerate(self.root, pages)
        self.assertEqual(entries(generated(read(CTL_PAGE, self.root)))[
            "\\fB\\-\\-timeout\\fR \\fITIMEOUT\\fR"], "Seconds to wait. Default: 10.0.")

    def test_check_names_the_stale_page_shows_a_diff_and_writes_nothing(self):
        path = os.path.join(self.root, MANAGER_PAGE)
        text = read(MANAGER_PAGE, self.root).replace("Default: 512m.", "Default: 256m.")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        with captured() as (out, err):
            status = manpages.main(["--check", "--root", self.root])
        self.assertEqual(status, 1)
        self.assertIn("%s is out of date; run python3 tools/manpages.py" % MANAGER_PAGE,
                      err.getvalue())
        self.assertNotIn(PROXY_PAGE, err.getvalue())
        line = ("Memory limit of each agent \\%(e.g. 512m, 1g): its container, or its cgroup"
                " with the process provider (0: none). Default: ")
        self.assertIn("-" + line + "256m.\n+" + line + "512m.\n", out.getvalue())
        self.assertEqual(read(MANAGER_PAGE, self.root), text)

        with captured() as (out, err):
            self.assertEqual(manpages.main(["--root", self.root]), 0)
        self.assertEqual(out.getvalue(), "rewrote %s\n" % MANAGER_PAGE)
        self.assertEqual(read(MANAGER_PAGE, self.root), read(MANAGER_PAGE))
        with captured():
            self.assertEqual(manpages.main(["--check", "--root", self.root]), 0)

    def test_a_page_without_markers_is_an_error(self):
        path = os.path.join(self.root, PROXY_PAGE)
        text = read(PROXY_PAGE, self.root).replace(manpages.END.format(name="OPTIONS"), "")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        with captured() as (out, err):
            self.assertEqual(manpages.main(["--root", self.root]), 2)
        self.assertIn(PROXY_PAGE, err.getvalue())
        self.assertEqual(read(PROXY_PAGE, self.root), text)


# Help texts full of what roff would take for requests and escapes.
help_texts = st.lists(
    st.sampled_from(list("abcXYZ019 \t\n.'-\\\"%&()[]{}/:=_$@`~*<>|!?;,#^+")
                    + ["\u00e9", "\u20ac", "\u2014", "\\f", "\\-", "\\&", "\\(", "\\\\",
                       "-\\", "..", ".\\\"", "'\\\"", "\n.", "\n'"]),
    min_size=1, max_size=60).map("".join).filter(lambda text: text.strip())


class EscapingTests(SynchronousTestCase):

    @given(help_texts)
    def test_escaped_text_reads_back_as_the_text(self, text):
        roff = manpages.roff_escape(text)
        self.assertNotIn("\n", roff)
        self.assertEqual(unescape(roff), " ".join(text.split()))

    @settings(max_examples=40, deadline=None)
    @given(help_texts)
    def test_escaped_text_renders_as_the_text(self, text):
        roff = manpages.roff_escape(text)
        if GROFF is None:  # no groff here: the roff itself must read back as the text
            self.assertEqual(unescape(roff), " ".join(text.split()))
            return
        self.assertEqual(render(".TP\n\\fB\\-\\-x\\fR\n" + roff),
                         "T(1) General Commands Manual T(1) OPTIONS --x "
                         + " ".join(text.split()) + " T(1)")

    def test_a_help_text_with_minus_backslash_and_a_leading_dot(self):
        class Tricky(manager_tap.Options):
            optParameters = [["pattern", "p", "-x\\y", ". A leading dot, -x and \\fB."]]

        lines = generated("\n".join([manpages.BEGIN.format(name="OPTIONS"),
                                     manpages.twisted_options_roff(Tricky),
                                     manpages.END.format(name="OPTIONS")]))
        tag = "\\fB\\-p\\fR \\fIVALUE\\fR, \\fB\\-\\-pattern\\fR=\\fIVALUE\\fR"
        text = entries(lines)[tag]
        self.assertEqual(text, "\\&. A leading dot, \\-x and \\(rsfB. Default: \\-x\\(rsy.")
        self.assertEqual(unescape(text), ". A leading dot, -x and \\fB. Default: -x\\y.")
        if GROFF is not None:
            self.assertIn("-p VALUE, --pattern=VALUE . A leading dot, -x and \\fB."
                          " Default: -x\\y.", render("\n".join(lines)))

    def test_a_leading_quote_or_dot_is_guarded(self):
        self.assertEqual(manpages.roff_escape("'quoted' .hidden"), "\\&'quoted' \\%.hidden")
        self.assertEqual(manpages.roff_escape(".hidden"), "\\%.hidden")
        self.assertEqual(manpages.roff_escape("\n . x"), "\\&. x")

    def test_paths_and_endpoints_are_not_hyphenated(self):
        self.assertEqual(manpages.roff_escape("at /run/x.sock or tcp:80, e.g. here."),
                         "at \\%/run/x.sock or \\%tcp:80, \\%e.g. here.")

    def test_control_characters_are_refused(self):
        self.assertRaises(ValueError, manpages.roff_escape, "bell\x07")


class PagesRenderTests(SynchronousTestCase):

    def test_generated_parts_use_only_list_requests(self):
        for page in manpages.PAGES:
            text = read(page.path)
            for name in ("OPTIONS", "COMMANDS"):
                if manpages.BEGIN.format(name=name) not in text:
                    continue
                for line in generated(text, name):
                    if line.startswith((".", "'")):
                        self.assertIn(line.split()[0], (".TP", ".RS", ".RE", ".\\\""), line)
                    else:
                        unescape(re.sub(r"\\f[BIR]", "", line))

    def test_pages_render_without_warnings(self):
        if GROFF is None:  # the test above checked the requests
            return
        for page in manpages.PAGES:
            result = subprocess.run([GROFF, "-man", "-ww", "-z", os.path.join(ROOT, page.path)],
                                    capture_output=True, text=True, timeout=30)
            self.assertEqual((result.returncode, result.stderr), (0, ""), page.path)
