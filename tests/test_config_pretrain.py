"""Values of the LM recipes' sections (pretraining, and the training section DES-MoE shares) that a run
could not honour: refused when the config loads, not read another way or met mid-run."""
import pytest

from desmoe.config import load_config
from desmoe.errors import ConfigError



@pytest.mark.parametrize("item,expected", [
    ("data.domains=[]", "at least one domain, or null for ['general'], got []"),
    ("data.domains=[general, code, general]", "distinct names, got ['general', 'code', 'general']"),
])
def test_pretrain_domains_that_cannot_be_honoured_are_refused(item, expected):
    from desmoe.recipes.lm.pretrain import PretrainExperiment

    with pytest.raises(ConfigError) as err:
        load_config(PretrainExperiment, overrides=[item])
    assert str(err.value) == f"defaults: key 'data.domains': expected {expected}"
    assert load_config(PretrainExperiment, overrides=["data.domains=null"]).data.domains is None


@pytest.mark.parametrize("experiment", ["desmoe.recipes.lm.pretrain:PretrainExperiment",
                                        "desmoe.recipes.des_moe.config:DESMoEExperiment",
                                        "desmoe.recipes.lm.recipe:LMExperiment"])
def test_negative_seed_is_refused_before_the_run(experiment):
    """The prepared-data streams seed numpy's SeedSequence, which raises on a negative seed: a traceback
    after the model was built."""
    import importlib

    import numpy as np

    module, name = experiment.split(":")
    with pytest.raises(ConfigError) as err:
        load_config(getattr(importlib.import_module(module), name), overrides=["train.seed=-1"])
    assert str(err.value) == "defaults: key 'train.seed': expected an integer >= 0, got -1"
    with pytest.raises(ValueError):  # why: what the streams would have met
        np.random.SeedSequence([-1, 0])
