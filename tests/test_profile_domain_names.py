"""A domain or held-out name is a folder name (raw/<name>, the data folder's <name>/, user_data/<name>): "../x" or
"a/b" wrote outside the data folder, and a name starting with "." never received user data (hidden folders are
skipped) and stopped the build as "empty" without saying why.  Refused in one line naming the key."""
import pytest

from data_prep.config import load_profile
from desmoe.errors import ConfigError


@pytest.mark.parametrize("key, name", [("domains", "../escape"), ("domains", "a/b"), ("domains", ".hidden"),
                                       ("domains", "two words"), ("heldout", "../up"), ("heldout", "")])
def test_a_name_that_is_no_folder_name_is_refused(key, name):
    override = f"domains={{{name!r}: [botchan]}}" if key == "domains" else f"heldout={name!r}"
    with pytest.raises(ConfigError) as err:
        load_profile("tiny", [override])
    msg = str(err.value)
    assert "\n" not in msg and "folder name" in msg and (name in msg or key in msg), msg


@pytest.mark.parametrize("name", ["médecine", "code-v2", "law.eu", "医学"])
def test_ordinary_names_in_any_script_are_kept(name):
    cfg = load_profile("tiny", [f"domains={{{name!r}: [botchan]}}"])
    assert name in cfg.domains
