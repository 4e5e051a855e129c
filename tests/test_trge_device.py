"""TRGE's tensors on a CUDA device, checked on the CPU: which tensors would live on the accelerator.

A CPU run cannot mix devices, so a TRGE path that fed host-side data (the task's images and labels,
tokenizer output, weights built without ``device=``) to the engine, or set device results against host
tensors, passed every CPU test and failed at the first step on a GPU.  ``DeviceLedger`` replays CUDA's
placement rules during the recipe's own calls on 2 real ranks: the model's parameters and buffers, the
result of every ``.to(device)`` / ``.cuda()`` and of every factory given ``device=``, and everything computed
from those are "device" tensors; anything else is host-side.  An op that would fail on CUDA is recorded:
a device tensor with a host tensor of one or more dimensions (a host 0-dim tensor is a scalar CUDA accepts),
an in-place op writing device values into a host tensor, a host tensor indexed by device indices, and
``.numpy()`` of a device tensor.  (``.to("cpu")`` counts as a move here: the CPU is the engine's device.)
"""
import pytest

from device_ledger import DeviceLedger
from test_trge_run import case_config, digits_cached  # noqa: F401  (the digit data, once per module)


def ledger_case(run_dir, method, extra):
    """A short run (or its resume) with every recipe call that touches data under the ledger; returns what
    the ledger found in training (begin_stage, step) and in evaluation (attach, end_stage), and how often
    each micro-batch's loss was read back (on each rank)."""
    from desmoe.recipes.trge.recipe import TRGERecipe
    from desmoe.training.trainer import Trainer

    ledgers = {"train": DeviceLedger(), "eval": DeviceLedger()}
    ledgers["eval"].device = ledgers["train"].device  # one record of where tensors are, two lists of findings
    loss_reads = []

    def watched(name, phase):
        def call(self, *args, **kwargs):
            ledger = ledgers[phase]
            ledger.mark(self.model)
            with ledger:
                out = getattr(TRGERecipe, name)(self, *args, **kwargs)
            if name == "step":
                loss_reads.append(ledger.reads.get(out[0], 0))
            return out
        return call

    phases = {"attach": "eval", "begin_stage": "train", "step": "train", "end_stage": "eval"}
    Recipe = type("Recipe", (TRGERecipe,), {n: watched(n, p) for n, p in phases.items()})
    cfg = case_config(run_dir, method, ["train.save_every=1", "run.keep_checkpoints=0", *extra])
    Trainer(Recipe(cfg), "configs/zero2.json").run()
    return {"train": ledgers["train"].found[:20], "eval": ledgers["eval"].found[:20], "loss_reads": loss_reads}


CASES = {  # TRGE with its routing readings, the identifiers' fitting and the CNN feature table; the pool
    "trge": ("trge", ["identifier.backend=gaussian", "identifier.threshold_quantile=0.05",
                      "eval.variants=[oracle,no_fusion]", "train.steps_per_task=2"]),
    "pool": ("shared_pool", ["backbone.kind=tiny_dual", "backbone.hidden_size=16", "train.feature_cache=",
                             "train.cache_image_features=true", "groups.pool_freeze_per_task=1", "eval.variants=[]",
                             "train.steps_per_task=2"]),
}


@pytest.mark.parametrize("case", CASES)
def test_trge_keeps_every_tensor_where_a_cuda_run_needs_it(ranks, tmp_path, case):
    method, extra = CASES[case]
    check(ranks.run(ledger_case, str(tmp_path), method, extra))
    # resumed after task 1 (its end-of-task checkpoint): the identifier and prototypes refitted from the
    # stored features must land where the uninterrupted run fitted them
    run = tmp_path / method
    (run / "checkpoints" / "latest").write_text("step00000002")
    check(ranks.run(ledger_case, str(tmp_path), method, extra))


def check(per_rank):
    for found in per_rank:
        assert found["train"] == [], "\n".join(found["train"])  # the training step's inputs and loss
        assert found["eval"] == [], "\n".join(found["eval"])  # prototypes, identifier, routing, evaluation
        # no read-back of the loss inside a micro-batch (each waits for the device): the trainer reads the
        # step's values once, the logged mean at the log cadence
        assert found["loss_reads"] and set(found["loss_reads"]) == {0}, found["loss_reads"]
