"""A fine-tuning domain named "general" (configs/desmoe_6dom.yaml's) is evaluated on its own validation
split, not on the held-out set (desmoe/recipes/des_moe/evaluate.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from instructfix import docstrings, hf_tokenizer


def _build(tmp):
    from data_prep.build import build

    texts = [a for _, a in docstrings()]
    folder = tmp / "mine"
    # real text (stdlib docstrings), three disjoint thirds: the domains and the held-out set differ
    for i, d in enumerate(("general", "prose", "heldout")):
        (folder / d).mkdir(parents=True)
        (folder / d / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::3]))
    cfg = {"profile": "gen", "seed": 5, "domains": {"general": [], "prose": []}, "heldout": "heldout",
           "budget_tokens": 3000, "val_fraction": 0.2, "test_fraction": 0.2, "workers": 1, "min_chars": 20,
           "user_data": str(folder), "mathgen": {"enabled": False},
           "tokenizer": {"kind": "hf", "hf_path": str(hf_tokenizer(tmp / "tok", texts))}}
    (tmp / "gen.yaml").write_text(json.dumps(cfg))
    build(str(tmp / "gen.yaml"), tmp / "out", cache=tmp / "cache", quiet=True)
    return tmp / "out"


def test_a_general_fine_tuning_domain_keeps_its_own_validation_loss(tmp_path):
    from desmoe.recipes.des_moe.domains import DomainDataConfig, PreparedDomains
    from desmoe.recipes.des_moe.evaluate import evaluate
    from desmoe.objective import next_token_loss

    data = PreparedDomains(DomainDataConfig(source=str(_build(tmp_path)), domains=["general", "prose"]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(data.tokenizer.vocab_size, 16),
                                torch.nn.Linear(16, data.tokenizer.vocab_size))
    cfg = SimpleNamespace(train=SimpleNamespace(micro_batch=2, seq_len=32, seed=3, eval_batches=2))
    out = evaluate(model, data, cfg, 0, 1, "cpu")

    def loss(pick, split="val"):  # what evaluate is meant to compute, on the same stream
        stream = data.batches(split, 2, 32, 3 + 7, 0, 1, 0, domains=pick, homogeneous=False)
        with torch.no_grad():
            return torch.stack([next_token_loss(model, next(stream).input_ids) for _ in range(2)]).mean().item()

    own, held = loss(["general"]), loss(data.general)
    # float32 losses of ~log(vocab) nats: the same computation agrees to a few ulp; the two texts differ by far more
    assert abs(own - held) > 1e-3
    assert abs(out["val/loss/general"] - own) <= 1e-5 * own  # before: the held-out text's loss
    assert abs(out["val/loss/general_heldout"] - held) <= 1e-5 * held
    assert abs(out["val/loss/domain_mean"] - (own + out["val/loss/prose"]) / 2) <= 1e-5 * own


def test_forgetting_reads_the_held_out_loss_when_general_is_trained():
    from desmoe.recipes.des_moe.report import add_forgetting

    # "general" a fine-tuning domain: its loss falls with training; the held-out text's rises (forgetting)
    rows = [{"run": "base", "method": "vanilla", "general": 3.0, "general_heldout": 2.0},
            {"run": "ft", "method": "desmoe", "general": 2.5, "general_heldout": 2.25}]
    add_forgetting(rows)
    assert rows[1]["forgetting_loss"] == 0.25
    plain = [{"run": "base", "method": "vanilla", "general": 2.0}, {"run": "ft", "method": "fft", "general": 2.5}]
    add_forgetting(plain)
    assert plain[1]["forgetting_loss"] == 0.5
