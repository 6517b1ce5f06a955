"""The one user name rule: what it accepts and refuses."""
import string

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.usernames import InvalidUsernameError, check_username, is_valid_username

ALLOWED = string.ascii_lowercase + string.digits + "._-"

valid_usernames = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_lowercase + string.digits + "_"),
    st.text(alphabet=ALLOWED, max_size=63))


class UsernameRuleTests(SynchronousTestCase):

    @given(valid_usernames)
    def test_valid_names_pass_unchanged(self, name):
        self.assertTrue(is_valid_username(name))
        self.assertEqual(check_username(name), name)

    @given(st.text(max_size=80))
    def test_rule_matches_its_definition(self, name):
        expected = (1 <= len(name) <= 64 and all(c in ALLOWED for c in name)
                    and name[0] not in ".-")
        self.assertEqual(is_valid_username(name), expected)

    def test_refused_examples(self):
        for name in ["", "Alice", ".hidden", "-rf", "a" * 65, "al ice", "ali/ce", "..",
                     "ålice", "alice\n", "alice\x00", "a:b"]:
            self.assertFalse(is_valid_username(name), name)
            self.assertRaises(InvalidUsernameError, check_username, name)

    def test_error_message_states_the_rule(self):
        with self.assertRaises(InvalidUsernameError) as caught:
            check_username("Bad Name")
        self.assertIn("lowercase letters", str(caught.exception))

    def test_non_strings_are_invalid(self):
        self.assertFalse(is_valid_username(None))
        self.assertFalse(is_valid_username(b"alice"))
