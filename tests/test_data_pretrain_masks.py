"""Pretraining reads packed token batches only (``GeneralCorpus.train_batches``): a domain of instruction
records, whose loss counts only the responses, lost its masks there without a word and trained on every
prompt token.  It is refused in one line; plain-text domains of the same folder still pretrain."""
from __future__ import annotations

import pytest

from instructfix import instruct_data  # noqa: F401
from desmoe.errors import UserError


def test_a_domain_of_instruction_records_is_refused_for_pretraining(instruct_data):
    from desmoe.data.pretrain_corpus import GeneralCorpus
    from desmoe.recipes.lm.pretrain import PretrainData

    with pytest.raises(UserError) as err:
        GeneralCorpus(PretrainData(root=str(instruct_data), domains=["prose", "qa"]))
    assert str(err.value) == (f"key 'data.domains': 'qa' of {instruct_data} holds instruction records, whose loss "
                              f"counts their responses only; pretraining counts every token and would train on the "
                              f"prompts (fine-tune on it with launcher/desmoe.py, e.g. desmoe.method=fft)")
    corpus = GeneralCorpus(PretrainData(root=str(instruct_data), domains=["prose"]))
    batch = next(corpus.train_batches(2, 16, seed=0, rank=0, world=1, step=0))
    assert batch.shape == (2, 17)
