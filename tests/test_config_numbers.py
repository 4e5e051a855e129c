"""Number keys as users write them: YAML 1.1 reads 3e-4 (no dot) as text, taken as the number it spells;
an infinite or NaN value (.inf, .nan, or the text inf, nan) is refused for every number key."""
import pytest

from desmoe.config import load_config
from desmoe.errors import ConfigError
from desmoe.recipes.des_moe.config import DESMoEExperiment


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("written", [".inf", ".nan", "-.inf", "inf", "nan", "Infinity", "'inf'"])
def test_non_finite_number_is_refused(tmp_path, written):
    path = write(tmp_path, f"desmoe:\n  alr:\n    tau: {written}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'desmoe\.alr\.tau': expected a finite number, got "):
        load_config(DESMoEExperiment, path)


@pytest.mark.parametrize("item", ["desmoe.baseline.lora_alpha=.nan", "desmoe.alr.tau=inf", "train.lr=.nan"])
def test_non_finite_override_is_refused(item):
    key = item.split("=")[0].replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^defaults: key '{key}': expected a finite number, got "):
        load_config(DESMoEExperiment, overrides=[item])


@pytest.mark.parametrize("written,value", [("3e-4", 3e-4), ("3.0e-4", 3e-4), ("2", 2.0), ("'0.5'", 0.5),
                                           ("1_000", 1000.0)])
def test_finite_numbers_are_read_as_written(tmp_path, written, value):
    cfg = load_config(DESMoEExperiment, write(tmp_path, f"desmoe:\n  alr:\n    tau: {written}\n"))
    assert cfg.desmoe.alr.tau == value and type(cfg.desmoe.alr.tau) is float


@pytest.mark.parametrize("alpha", ["0", "-16"])
def test_lora_alpha_that_cannot_train_is_refused(alpha):
    with pytest.raises(ConfigError, match=rf"^defaults: key 'desmoe\.baseline\.lora_alpha': expected a number > 0, "
                                          rf"got {float(alpha)}$"):
        load_config(DESMoEExperiment, overrides=[f"desmoe.baseline.lora_alpha={alpha}"])


@pytest.mark.parametrize("tokens", ["0", "-4096"])
def test_esft_profile_of_no_tokens_is_refused(tokens):
    with pytest.raises(ConfigError, match=rf"^defaults: key 'desmoe\.baseline\.esft_profile_tokens': expected a "
                                          rf"positive integer, got {tokens}$"):
        load_config(DESMoEExperiment, overrides=[f"desmoe.baseline.esft_profile_tokens={tokens}"])


@pytest.mark.parametrize("item,expected", [
    ("base.bias_update_rate=2", "a number in [0, 1), got 2.0"),
    ("base.bias_update_rate=0.1", "0 unless base.hf names a model with selection biases, got 0.1"),
])
def test_section_check_names_its_key_once(item, expected):
    """A section's check names keys relative to it (the tree walk adds 'base.'): it was base.base.…"""
    with pytest.raises(ConfigError) as err:
        load_config(DESMoEExperiment, overrides=[item])
    assert str(err.value) == f"defaults: key 'base.bias_update_rate': expected {expected}"


def test_integer_beyond_float_range_is_one_line():
    """An integer too large for a float raised OverflowError (a traceback) in the conversion."""
    with pytest.raises(ConfigError, match=r"^defaults: key 'desmoe\.alr\.tau': expected a finite number, got 1000"):
        load_config(DESMoEExperiment, overrides=["desmoe.alr.tau=1" + "0" * 400])
