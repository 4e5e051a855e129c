"""Training data of a tokenizer whose default encoding starts with BOS (Llama/Mistral/Mixtral style).

A Llama-type base saw ``<s>`` at position 0 of every pretraining sequence, and lm-eval's HF model feeds it
before every context: every document and instruction record of such a tokenizer starts with it, its label
never counts (it follows the previous document's eos in a packed sample: markup, not text), the folder
records the prefix, and a folder built without it is refused in one line.  Tokenizers without a prefix
(GPT-2, Qwen, SmolLM2, desmoe's own sentencepiece) build what they always built: no ``prefix`` key, so
their meta.json and token files stay byte for byte what earlier builds wrote."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from instructfix import instruct_data, profile, user_folder  # noqa: F401 - instruct_data is a fixture
from tokfix import hf_folder, sentencepiece
from desmoe.errors import UserError


@pytest.fixture(scope="module")
def bos_data(tmp_path_factory):
    from data_prep.build import build

    tmp = tmp_path_factory.mktemp("bos")
    tok = hf_folder("llama-bos", tmp / "tok")
    build(str(profile(tmp, user_folder(tmp), tok)), tmp / "out", cache=tmp / "cache", quiet=True)
    return tmp / "out"


def test_every_document_and_record_starts_with_bos_and_never_learns_it(bos_data):
    from desmoe.data.prepared import PreparedData

    data = PreparedData(bos_data)
    tok = data.tokenizer
    bos, eos = tok.tok.bos_token_id, tok.eos_id
    assert tok.prefix == [bos] and data.meta["tokenizer"]["prefix"] == [bos] and data.masked == ["qa"]
    for domain in [*data.domains, data.heldout_name]:
        for split in (("test",) if domain == data.heldout_name else ("train", "val", "test")):
            ds = data.indexed(domain, split)
            texts = list(data.raw(split, domain)["text"])
            assert len(ds) == len(texts) > 0
            for i in range(len(ds)):
                ids = ds[i].tolist()
                assert ids[0] == bos and ids.count(bos) == 1 and ids[-1] == eos, (domain, split, i)
                assert "<s>" not in texts[i] and texts[i] == tok.decode(ids[1:-1])  # BOS is no text
                if domain in data.masked:
                    assert data.indexed(domain, split, mask=True)[i][0] == 0
    # packed samples: a document's BOS follows the previous one's eos and is never a label, in the data's
    # batches and in DES-MoE's streams (its fine-tuning domains, and the held-out general text it evaluates)
    from desmoe.recipes.des_moe.domains import DomainDataConfig, PreparedDomains

    streams = PreparedDomains(DomainDataConfig(source=str(bos_data), domains=[]))
    for name, it in [("data", data.batches("train", 4, 64, seed=1, rank=0, world=1, homogeneous=False)),
                     ("desmoe", streams.batches("train", 4, 64, 1, 0, 1, 0, homogeneous=False)),
                     ("general", streams.batches("test", 4, 64, 1, 0, 1, 0, domains=streams.general))]:
        seen = 0
        for b, batch in zip(range(6), it):
            ids, mask = batch.input_ids.numpy(), batch.loss_mask.numpy()
            at = np.argwhere(ids[:, 1:] == bos) + [0, 1]
            for r, t in at:
                assert ids[r, t - 1] == eos and not mask[r, t], (name, b, r, t)
            seen += len(at)
            assert mask[:, 1:].any()
        assert seen > 5, name


def test_a_folder_built_without_the_prefix_is_refused_in_one_line(bos_data, tmp_path):
    from desmoe import integrity
    from desmoe.data.prepared import PreparedData

    old = tmp_path / "old"
    shutil.copytree(bos_data, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer"]["prefix"]
    (old / "meta.json").write_text(json.dumps(meta))
    integrity.seal(old)
    # built from a profile file: no command reproduces it (`--profile instruct` is no profile of data_prep's)
    want = (f"{old}/meta.json: key 'tokenizer.prefix': absent, expected [1] (tokenizer {old}/tokenizer starts every "
            f"text with it: its BOS); rebuild it with python -m data_prep.build --out {old} and the profile and "
            f"overrides it was built with (its meta.json 'config' records them: profile 'instruct')")
    for use in (lambda d: d.tokenizer, lambda d: next(d.batches("train", 2, 16, seed=0, rank=0, world=1))):
        with pytest.raises(UserError) as err:
            use(PreparedData(old))
        assert str(err.value) == want


def test_tokenizers_without_a_prefix_build_what_they_built(instruct_data, tmp_path):  # noqa: F811
    from desmoe.data.prepared import PreparedData

    data = PreparedData(instruct_data)  # GPT-2-style byte-level, <s> defined but never added
    tok = data.tokenizer
    assert tok.prefix == [] and "prefix" not in data.meta["tokenizer"]
    assert tok.prefix_id == tok.tok.bos_token_id  # lm-eval's prefix token for empty contexts: bos when defined
    spm = sentencepiece(tmp_path / "spm")  # desmoe's own: a bos piece nothing adds; the demo base never saw it
    assert spm.prefix == [] and spm.prefix_id == spm.eos_id
    batch = next(data.batches("train", 2, 32, seed=0, rank=0, world=1, domains=["prose"]))
    assert batch.mask_for_loss("cpu") is None  # plain text: every label counts, the unmasked path as before


def test_a_tokenizer_that_appends_to_every_text_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from desmoe.data.tokenizer import HFTokenizer

    tk = Tokenizer.from_file(str(hf_folder("gpt2", tmp_path / "gpt2") / "tokenizer.json"))
    eos = ("</s>", tk.token_to_id("</s>"))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[eos])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "eos")
    with pytest.raises(UserError) as err:
        HFTokenizer(tmp_path / "eos")
    assert str(err.value) == (f"{tmp_path / 'eos'}: its default encoding appends ['</s>'] to every text, so a causal "
                              f"LM's context would end in it; expected nothing after the text (e.g. \"add_eos_token\": "
                              f"false in tokenizer_config.json)")


def test_a_document_cut_to_its_prefix_alone_is_left_out():
    """The budget cuts the last training document of a domain to the tokens that still fit; cut to its BOS
    alone it became the sample "BOS, eos", whose one counted label teaches that a text ends right after BOS."""
    from types import SimpleNamespace

    from data_prep.build import Builder

    builder = Builder.__new__(Builder)
    builder.cfg = SimpleNamespace(val_fraction=0.1, test_fraction=0.1, heldout="heldout")
    builder.records_only, builder.prefix_len = set(), 1
    first, second = SimpleNamespace(text="a b c"), SimpleNamespace(text="d e")
    rows = [(first, [1, 5, 6, 7]), (second, [1, 8, 9])]  # 5 + 4 tokens with their eos
    assert builder._select({("prose", "train"): rows}, 8)[("prose", "train")] == [(first, [1, 5, 6, 7]),
                                                                                    (second, [1, 8])]
    assert builder._select({("prose", "train"): rows}, 7)[("prose", "train")] == [(first, [1, 5, 6, 7])]
    builder.prefix_len = 0  # a tokenizer without a prefix: cut as before
    assert builder._select({("prose", "train"): rows}, 7)[("prose", "train")] == [(first, [1, 5, 6, 7]), (second, [1])]


def test_the_rebuild_command_reproduces_the_folder_or_is_not_offered(tmp_path):
    """The refusal named `--profile <meta's profile> --out <folder>` plus the tokenizer: for a folder built from
    a profile file (profile 'instruct', 'custom', ...) that command stops with "no such profile", and for a
    built-in profile with other overrides (user_data, budget_tokens, domains) it builds another data set into
    the user's folder.  The command is offered only where it reproduces the recorded config."""
    import dataclasses
    from types import SimpleNamespace

    from data_prep.config import load_profile
    from desmoe.data.prepared import PreparedData

    tok_args = ["tokenizer.kind=hf", f"tokenizer.hf_path={tmp_path / 'hf'}"]

    def refusal(overrides):
        config = dataclasses.asdict(load_profile("tiny", tok_args + overrides))
        del config["workers"]
        data = PreparedData.__new__(PreparedData)
        data.root = tmp_path / "data"
        data.meta = {"tokenizer": {"kind": "hf"}, "profile": "tiny", "config": json.loads(json.dumps(config))}
        with pytest.raises(UserError) as err:
            data.check_prefix(SimpleNamespace(prefix=[1], path=tmp_path / "data" / "tokenizer"))
        return str(err.value)

    head = (f"{tmp_path}/data/meta.json: key 'tokenizer.prefix': absent, expected [1] (tokenizer {tmp_path}/data/"
            f"tokenizer starts every text with it: its BOS); rebuild it with ")
    assert refusal([]) == head + (f"python -m data_prep.build --profile tiny --out {tmp_path}/data "
                                  f"tokenizer.kind=hf tokenizer.hf_path={tmp_path / 'hf'}")
    assert refusal(["budget_tokens=1234"]) == head + (f"python -m data_prep.build --out {tmp_path}/data and the "
                                                      f"profile and overrides it was built with (its meta.json "
                                                      f"'config' records them: profile 'tiny')")
