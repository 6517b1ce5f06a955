"""tools/runtime_copy.py: what lets ``make demo`` and ``make check`` work
from a clone that other users may not enter (root's home, a ``mktemp -d``).

The whole suite run by ``.ci/run`` from such a clone is the end-to-end proof;
these tests pin the two decisions it rests on.
"""
import importlib.util
import os
import shutil
import stat
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "runtime_copy", os.path.join(ROOT, "tools", "runtime_copy.py"))
runtime_copy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_copy)  # type: ignore[union-attr]


class ClosedDirectoryTests(unittest.TestCase):
    def setUp(self):
        self.top = tempfile.mkdtemp(prefix="pxd-runtime-test-")
        self.addCleanup(shutil.rmtree, self.top)
        os.chmod(self.top, 0o755)

    def test_the_first_directory_others_may_not_enter_is_named(self):
        private = os.path.join(self.top, "home")
        clone = os.path.join(private, "src", "pixelated-dispatcher")
        os.makedirs(clone)
        os.chmod(private, 0o700)
        self.assertEqual(runtime_copy.closed_directory(clone), private)
        self.assertEqual(runtime_copy.closed_directory(os.path.join(clone, "Makefile")), private)

    def test_a_path_others_reach_has_none(self):
        clone = os.path.join(self.top, "src")
        os.makedirs(clone, mode=0o755)
        os.chmod(clone, 0o711)  # enter, not list: enough to run code inside
        self.assertIsNone(runtime_copy.closed_directory(clone))


class CopyTests(unittest.TestCase):
    def test_a_file_only_its_owner_may_read_is_copied_readable_and_the_original_kept(self):
        top = tempfile.mkdtemp(prefix="pxd-runtime-test-")
        self.addCleanup(shutil.rmtree, top)
        source = os.path.join(top, "module.py")
        with open(source, "w") as f:
            f.write("x = 1\n")
        os.chmod(source, 0o600)  # a umask of 077
        target = os.path.join(top, "copy.py")
        runtime_copy._link_or_copy(source, target)
        self.assertEqual(stat.S_IMODE(os.stat(source).st_mode), 0o600)
        self.assertTrue(os.stat(target).st_mode & stat.S_IROTH)
        self.assertNotEqual(os.stat(source).st_ino, os.stat(target).st_ino)

    def test_a_readable_file_is_linked_not_copied(self):
        top = tempfile.mkdtemp(prefix="pxd-runtime-test-")
        self.addCleanup(shutil.rmtree, top)
        source = os.path.join(top, "module.py")
        with open(source, "w") as f:
            f.write("x = 1\n")
        os.chmod(source, 0o644)
        target = os.path.join(top, "link.py")
        runtime_copy._link_or_copy(source, target)
        self.assertEqual(os.stat(source).st_ino, os.stat(target).st_ino)
