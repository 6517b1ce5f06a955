"""Reading an original dispatcher's root: every user directory is reported,
the importable ones with their old hash (which verifies the old password),
the others with a reason an operator can act on; nothing is ever written.
(The import through the manager and ctl runs in tests/test_end_to_end.py.)"""
import hashlib
import os
import shutil
import tempfile
from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.manager.legacy_import import read_legacy_root
from pixelated_dispatcher.manager.passwords import _verify_legacy_scrypt

SALT = "3139303037363439"


def old_hash(password: str, salt: str = SALT) -> str:
    """What the original dispatcher stored: hex scrypt of the password."""
    return hashlib.scrypt(password.encode(), salt=salt.encode(), n=16384, r=8, p=1,
                          dklen=64).hex()


class ReadLegacyRoot(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="pxd-legacy-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def user(self, name: str, config: Optional[str] = None, data: bool = True) -> str:
        directory = os.path.join(self.root, name)
        os.makedirs(directory)
        if config is not None:
            with open(os.path.join(directory, "user.cfg"), "w") as f:
                f.write(config)
        if data:
            os.mkdir(os.path.join(directory, "data"))
        return directory

    def snapshot(self) -> dict:
        found = {}
        for top, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = os.path.join(top, name)
                status = os.lstat(path)
                found[path] = (status.st_mode, status.st_mtime_ns, status.st_size)
        return found

    def test_a_user_with_a_password_and_data(self) -> None:
        directory = self.user("alice", "[auth]\nsalt = %s\nhashed_password = %s\n"
                              % (SALT, old_hash("old secret").upper()))
        [alice] = read_legacy_root(self.root)
        self.assertEqual((alice.username, alice.data_dir, alice.problem),
                         ("alice", os.path.join(directory, "data"), None))
        self.assertTrue(_verify_legacy_scrypt(alice.password_hash, "old secret"))
        self.assertFalse(_verify_legacy_scrypt(alice.password_hash, "old secreT"))

    def test_users_sorted_and_non_users_left_out(self) -> None:
        config = "[auth]\nsalt = %s\nhashed_password = %s\n" % (SALT, old_hash("x"))
        for name in ("carol", "alice", "providers", "virtualenv"):
            self.user(name, config)
        with open(os.path.join(self.root, "notes.txt"), "w") as f:
            f.write("not a user")
        os.symlink(os.path.join(self.root, "alice"), os.path.join(self.root, "linked"))
        self.assertEqual([u.username for u in read_legacy_root(self.root)], ["alice", "carol"])

    def test_each_problem_is_named(self) -> None:
        self.user("Bad.Name", "[auth]\nsalt = s\nhashed_password = %s\n" % old_hash("x"))
        self.user("nocfg")
        self.user("nopassword", "[auth]\nsalt = %s\n" % SALT, data=False)
        self.user("shorthash", "[auth]\nsalt = %s\nhashed_password = abcd\n" % SALT)
        self.user("nothex", "[auth]\nsalt = %s\nhashed_password = %s\n" % (SALT, "z" * 128))
        self.user("garbled", "no section header\n")
        problems = {u.username: u.problem for u in read_legacy_root(self.root)}
        self.assertEqual(problems["Bad.Name"], "the name breaks the user name rule")
        self.assertEqual(problems["nocfg"], "no user.cfg")
        self.assertEqual(problems["nopassword"], "no password set in user.cfg")
        self.assertIn("unusable password hash", problems["shorthash"])
        self.assertIn("unusable password hash", problems["nothex"])
        self.assertIn("unreadable user.cfg", problems["garbled"])
        for user in read_legacy_root(self.root):
            self.assertIsNone(user.password_hash)

    def test_a_data_directory_that_is_a_symlink_is_not_taken(self) -> None:
        elsewhere = tempfile.mkdtemp(prefix="pxd-elsewhere-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        directory = self.user("mallory", "[auth]\nsalt = %s\nhashed_password = %s\n"
                              % (SALT, old_hash("x")), data=False)
        os.symlink(elsewhere, os.path.join(directory, "data"))
        [mallory] = read_legacy_root(self.root)
        self.assertIsNone(mallory.data_dir)

    def test_reading_changes_nothing(self) -> None:
        self.user("alice", "[auth]\nsalt = %s\nhashed_password = %s\n" % (SALT, old_hash("x")))
        self.user("nocfg")
        before = self.snapshot()
        read_legacy_root(self.root)
        self.assertEqual(self.snapshot(), before)

    def test_a_missing_root_is_an_error(self) -> None:
        self.assertRaises(FileNotFoundError, read_legacy_root,
                          os.path.join(self.root, "absent"))
