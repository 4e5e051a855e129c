"""An eval.variants entry whose atoms set one inter key twice: refused in one line, not half ignored."""
import pytest

from test_trge_config_values import DIGITS, _load, _refused  # noqa: F401  (the same loader and refusal reader)


@pytest.mark.parametrize("variant,kind", [
    ("text_image+text_vocabulary", "text"), ("names_unseen+names_route", "names"),
    ("filter_none+oracle+filter_vocabulary", "filter"), ("oracle+oracle", "oracle"), ("no_inter+no_inter", "no_inter")])
def test_a_variant_setting_one_key_twice_is_refused(variant, kind):
    assert _refused(f"eval.variants=[{variant}]") == (
        f"{DIGITS}: key 'eval.variants': expected at most one atom of each kind in a variant ({kind}* twice), "
        f"got '{variant}'")


def test_why_the_first_atom_was_ignored():
    from desmoe.recipes.trge.config import variant_inter
    from desmoe.recipes.trge.inter_group import InterGroupConfig

    cfg = InterGroupConfig()
    assert variant_inter("text_image+text_vocabulary", cfg) == variant_inter("text_vocabulary", cfg)


def test_atoms_of_different_kinds_combine():
    variants = ["oracle+no_fusion", "no_inter+text_image+names_route+filter_none", "oracle"]
    assert _load(f"eval.variants=[{','.join(variants)}]").eval.variants == variants
