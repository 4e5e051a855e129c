"""``train.activation_checkpointing`` for TRGE (desmoe/recompute.py).

On 2 real ranks (gloo, EP=2, ZeRO-2, the trainer end to end, test_trge_accum.py's runs: 3 tasks x 3 steps of
2 micro-batches) a run with ``layers`` equals the same run with ``none`` bit for bit: logged losses, global
gradient norms, every parameter and buffer of the model on each rank at the end, the accuracy matrix,
the task identifier's prototypes and its rows, the inter-group weights, the shared pool's frozen experts.
Two paths: the tiny CLIP (TRGE's group routers in both transformer towers, inter-group weights by task
id set for one forward and cleared after it, gate noise drawn for the whole accumulated step) and the tiny
dual encoder (BERT text tower with dropout, residual groups on cached CNN features, the shared pool's
route counts, which decide what freezes after each task).  Why bit for bit on CPU: test_recompute_ranks.py.

With the recompute's guard broken (``_Replay`` a no-op) both fail inside torch's recompute check: the
group weights were cleared after the forward, so the recompute skips the adapters; the same happens with
``GroupContext`` a plain object again, which the guard cannot see (both checked by hand).

On one process: which blocks are wrapped (the trainable ones and those above them, never the blocks
below a tower's first adapted one or a tower without groups), the frozen model's path (group weights None,
used for f0 and fusion) unchanged, and the key validated."""
import pytest
import torch

from test_recompute_ranks import _same
from test_trge_accum import CASES, STEPS, _rows, accum_case
from test_trge_run import digits_cached  # noqa: F401  (the digit data, once per module)

WRAPPED = {"clip": 4, "dual": 4}  # clip: 2 vision + 2 text blocks; dual: 2 BERT layers + 2 CNN-feature blocks


@pytest.mark.parametrize("case", CASES)
def test_trge_recompute_exact_ep2(ranks, tmp_path, case):
    out = {mode: ranks.run(accum_case, str(tmp_path / mode), case, 4, 2, [f"train.activation_checkpointing={mode}"])
           for mode in ("none", "layers")}
    losses = {mode: [r["train/loss"] for r in _rows(tmp_path / mode / f"{case}2") if "train/loss" in r]
              for mode in out}
    assert len(losses["none"]) == 3 * STEPS and losses["none"] == losses["layers"]
    for rank, (a, b) in enumerate(zip(out["none"], out["layers"])):
        assert (a.pop("wrapped"), b.pop("wrapped")) == (0, WRAPPED[case])  # the trainer applied it
        assert a["global_steps"] == 3 * STEPS and len(a["progress"]["rows"]) == 3
        assert a["progress"]["infos"] and all(g > 0 for g in a["norms"])
        assert bool(a["pool_frozen"]) == (case == "dual")
        moved = [not torch.equal(p0, p1) for b0, b1 in zip(a["initial"], a["params"]) for p0, p1 in zip(b0, b1)]
        assert any(moved)  # trained: the comparison is not of untouched weights
        _same(a, b, f"{case} rank {rank}")


def _model(kind: str, extra=()):
    from desmoe.config import load_config
    from desmoe.recipes.trge.backbones import load_backbone
    from desmoe.recipes.trge.config import TRGEExperiment
    from desmoe.recipes.trge.model import TRGEModel

    cfg = load_config(TRGEExperiment, "configs/trge_digits.yaml",
                      ["groups.num_tasks=3", "groups.ep_size=1", *CASES[kind][1][:2], *extra])
    backbone = load_backbone(cfg.backbone)
    return TRGEModel(backbone.model, cfg.groups, cfg.placement), backbone


def _wrapped(model) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "_desmoe_recompute", False)]


def test_wrapped_blocks_and_frozen_path():
    from desmoe.recipes.trge.inter_group import one_hot_weights
    from desmoe.recompute import apply

    towers = ("base.text_model.encoder.layers", "base.vision_model.encoder.layers")
    for layers, expect in (("[]", [0, 1]), ("[1]", [1]), ("[0]", [0, 1])):  # frozen block 1 above block 0 too
        model, _ = _model("clip", [f"placement.layers={layers}"])
        assert apply(model, "layers") == 2 * len(expect)
        assert _wrapped(model) == [f"{t}.{i}" for t in towers for i in expect]
    model, _ = _model("clip", ["placement.towers=[image]"])  # the text tower has no groups: left plain
    assert apply(model, "layers") == 2 and _wrapped(model) == [f"{towers[1]}.{i}" for i in (0, 1)]

    out = {}
    for mode in ("none", "layers"):  # the frozen model (weights None) and the adapted one, in training mode
        model, backbone = _model("clip")
        apply(model, mode)
        model.train()
        torch.manual_seed(0)
        px = torch.randn(4, 3, backbone.image_size, backbone.image_size)
        ids, mask = backbone.tokenize(["a 1", "a 2", "a 3"])
        frozen = model.image_features(px), model.text_features(ids, mask)
        logits = model(px, ids, mask, one_hot_weights(1, 4, 3), one_hot_weights(1, 3, 3))
        logits.sum().backward()
        out[mode] = frozen, logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _same(out["none"], out["layers"], "one process")
    assert not any(f.requires_grad for f in out["layers"][0])  # the frozen path builds no graph to recompute


def test_key_validated_in_one_line():
    from desmoe.config import load_config
    from desmoe.errors import ConfigError
    from desmoe.recipes.trge.config import TRGEExperiment

    assert load_config(TRGEExperiment, None, ["train.activation_checkpointing=layers"]) \
        .train.activation_checkpointing == "layers"
    with pytest.raises(ConfigError) as err:
        load_config(TRGEExperiment, None, ["train.activation_checkpointing=blocks"])
    assert str(err.value) == ("defaults: key 'train.activation_checkpointing': expected one of 'none', "
                              "'layers', got 'blocks'")
