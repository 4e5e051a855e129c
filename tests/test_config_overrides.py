"""Dotted overrides on top of a config file, as users combine them."""
import pytest

from desmoe.config import load_config
from desmoe.recipes.lm.recipe import LMExperiment



@pytest.mark.parametrize("text", ["train:\n  # steps: 5\nrun:\n  name: x\n", "train: null\n", "train: ~\n"])
def test_override_into_a_section_left_empty_in_the_file(tmp_path, text):
    """YAML reads a section whose keys are all commented out as null; the override was refused as
    "'train' is not a section"."""
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    cfg = load_config(LMExperiment, path, ["train.steps=7"])
    assert (cfg.train.steps, cfg.train.micro_batch) == (7, 8)  # the rest of the section at its defaults
