"""Pretraining's data section: a domain list it cannot honour as written is refused, not read another way."""
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
