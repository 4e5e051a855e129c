"""DES-MoE (every method the recipe offers) and LM pretraining on a CUDA device, checked on the CPU.

A CPU run cannot mix devices, so a path that fed host tensors to the engine or set device results against
host tensors (a method's statistics, masks or selections built without ``device=``) passed every CPU test
and failed at the first step on a GPU.  tests/device_ledger.py replays CUDA's placement rules during the
recipe's own calls on 2 real ranks (attach, begin_stage, every micro-batch's step, end_step, the log,
evaluation, the checkpoint's state, end_stage, finish with the downstream tasks), in a short run and in its
resume from a mid-run checkpoint (the method's state comes back from the checkpoint), and nothing may be
found.  It also counts the host read-backs of device tensors (each waits for the GPU) each training step
makes on each rank, and bounds where they may come from (``READ_FILES``).
"""
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from instructfix import instruct_data  # noqa: F401  (the session's instruction folder)

ROOT = Path(__file__).resolve().parents[1]
DS = str(ROOT / "configs/zero2.json")
STEPS, SAVE = 6, 3  # the resume starts at step 3: DES-MoE's stabilisation phase (DGES masks, refreshes)

PHASES = ("on_engine", "attach", "begin_stage", "step", "end_step", "log", "after_log", "evaluate", "state_dict",
          "end_stage", "finish")


def _config(kind: str, run_dir: str, extra: list):
    from desmoe.config import load_config

    run = [f"run.dir={run_dir}", f"run.name={kind}", f"train.steps={STEPS}", f"train.save_every={SAVE}",
           "run.keep_checkpoints=0", "train.log_every=2", "train.eval_every=3"]
    if kind == "lm":
        from desmoe.recipes.lm.recipe import LMExperiment

        return load_config(LMExperiment, ROOT / "configs/smoke.yaml", [
            "model.hidden_size=32", "model.ffn_size=32", "train.seq_len=32", "data.max_bytes=300000",
            "train.eval_batches=1", *run, *extra])
    if kind == "pretrain":
        from desmoe.recipes.lm.pretrain import PretrainExperiment

        return load_config(PretrainExperiment, ROOT / "configs/pretrain_base.yaml", [
            "data.source=stdlib_bytes", "train.eval_tokens=600", "train.warmup_steps=2", "train.seq_len=32",
            "train.micro_batch=4", "model.hidden_size=32", "model.num_layers=2", "model.num_experts=4",
            "model.expert_ffn=32", "model.shared_ffn=32", "model.dense_ffn=64", f"output.dir={run_dir}/export",
            "output.reuse=false", *run, *extra])
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment

    hf = any(e.startswith("base.hf=") for e in extra)  # an HF base brings its architecture (model.* refused)
    shape = [] if hf else ["model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "model.num_heads=2"]
    return load_config(DESMoEExperiment, None, [*shape, "model.ep_size=2",
        "data.domains=[email, xml]", "data.general=[json]", "data.max_bytes_per_domain=40000",
        "train.micro_batch=4", "train.seq_len=32", "train.eval_batches=1", "train.lr=0.01",
        "desmoe.dges.update_every=1", "desmoe.schedule.t1=0.34", "desmoe.schedule.t2=0.84",
        "desmoe.baseline.esft_profile_tokens=256", *run, *extra])


@contextmanager
def torch_ops(on: bool):
    """With ``on``, the MoE core runs the torch ops a GPU runs (its branches for a non-CPU tensor), not the
    CPU-only C kernels: the kernels' loader is reset so it reads DESMOE_FUSED_KERNELS=0, and again after."""
    import desmoe.kernels as kernels

    if not on:
        yield
        return
    before = os.environ.get("DESMOE_FUSED_KERNELS")
    os.environ["DESMOE_FUSED_KERNELS"], kernels._tried = "0", False
    try:
        assert kernels.swiglu_cpu() is None and kernels.rows_cpu() is None
        yield
    finally:
        os.environ.pop("DESMOE_FUSED_KERNELS") if before is None else os.environ.update(DESMOE_FUSED_KERNELS=before)
        kernels._tried = False


def ledger_case(kind: str, run_dir: str, extra: list, torch_only: bool = False) -> dict:
    """One run (or its resume) with the recipe's calls under one DeviceLedger: what it found in each call, and
    the host read-backs of device tensors of each training step (begin of micro-batch 0 to end_step)."""
    from device_ledger import DeviceLedger

    from desmoe.recipes.des_moe.recipe import DESMoERecipe
    from desmoe.recipes.lm.pretrain import PretrainRecipe
    from desmoe.training.trainer import Trainer

    from desmoe.recipes.lm.recipe import SmokeRecipe

    base = {"pretrain": PretrainRecipe, "lm": SmokeRecipe}.get(kind, DESMoERecipe)
    ledger = DeviceLedger()
    found: dict[str, list] = {}
    reads: list[dict] = []  # per step: {desmoe file:line: count}

    def watched(name):
        def call(self, *args, **kwargs):
            if self.trainer.engine is not None:
                ledger.mark(self.trainer.engine.module)  # where DeepSpeed put the model (after a resume too)
            if name == "step" and args[2] == 0:
                ledger.host_reads.clear()
            before = len(ledger.found)
            with ledger:
                out = getattr(base, name)(self, *args, **kwargs)
            found.setdefault(name, []).extend(ledger.found[before:])
            if name == "end_step":
                reads.append(dict(ledger.host_reads))
            return out
        return call

    class Watched(Trainer):
        def _log(self, done, tokens_per_s):  # the recipe's log and the MoE core's expert loads, summed over ranks
            before = len(ledger.found)
            with ledger:
                super()._log(done, tokens_per_s)
            found.setdefault("trainer._log", []).extend(ledger.found[before:])

    Recipe = type("Recipe", (base,), {n: watched(n) for n in PHASES})
    cfg = _config(kind, run_dir, extra)
    with torch_ops(torch_only):
        Watched(Recipe(cfg), DS).run()
    return {"found": {k: v[:20] for k, v in found.items() if v}, "calls": sorted(found), "reads": reads}


INSTRUCT = ["model.vocab_size=500", "model.max_seq_len=640",  # the downstream tasks: 512-token prompts
            "data.domains=[qa, prose]", "train.micro_batch=2",
            "train.grad_accum=2", "evaluation.downstream=true", "evaluation.items_per_task=4",
            "evaluation.ppl_tokens=256"]
CASES = {  # DES-MoE with ALR, DGES refreshes every step and both batchings, expert copies, instruction data with
    # gradient accumulation and the downstream tasks; each baseline; the LM recipes; "torch_ops": the MoE core's
    # torch ops, which a GPU runs, instead of the CPU-only C kernels
    "desmoe": ("desmoe", []),
    "desmoe_token": ("desmoe", ["desmoe.dges.batching=token"]),
    "desmoe_copies": ("desmoe", ["desmoe.dges.duplicate_shared=true", "desmoe.dges.spare_experts=2",
                                 "desmoe.dges.duplicate_inference=average"]),
    "desmoe_instruct": ("desmoe", INSTRUCT),
    "desmoe_torch_ops": ("desmoe", ["desmoe.dges.batching=token"]),  # the GPU's ops in the MoE core
    # HF bases (tests/test_hf_methods.py's tiny checkpoints): the ALR on DeepSeek-V3's grouped, biased router
    # with the bias rule on; LoRA on Mixtral's attention
    "desmoe_hf": ("desmoe", ["base.hf=deepseek_v3", "base.bias_update_rate=0.001"]),
    "lora_hf": ("desmoe", ["base.hf=mixtral", "desmoe.method=lora"]),
    "fft": ("desmoe", ["desmoe.method=fft"]),
    "esft_token": ("desmoe", ["desmoe.method=esft_token"]),
    "esft_gate": ("desmoe", ["desmoe.method=esft_gate"]),
    "lora": ("desmoe", ["desmoe.method=lora"]),
    "vanilla": ("desmoe", ["desmoe.method=vanilla"]),  # evaluation only (finish)
    "pretrain": ("pretrain", []),
    "pretrain_torch_ops": ("pretrain", []),
    "lm": ("lm", []),
}
RESUMED = {"desmoe", "desmoe_copies", "esft_token", "pretrain"}  # DGES state, copies, ESFT selection, LM stream


@pytest.mark.parametrize("case", CASES)
def test_every_tensor_where_a_cuda_run_needs_it(ranks, tmp_path, case, request):
    kind, extra = CASES[case]
    if case == "desmoe_instruct":  # the instruction folder (loss masks, chat template, exact-answer tasks)
        extra = [*extra, f"data.source={request.getfixturevalue('instruct_data')}"]
    elif kind == "desmoe" and case != "vanilla":
        extra = [*extra, "evaluation.downstream=false"]
    if case.endswith("_hf"):
        from test_hf_methods import _checkpoint

        family = extra[0].split("=")[1]
        extra = [f"base.hf={_checkpoint(family, str(tmp_path / family))}", *extra[1:]]
    torch_only = case.endswith("torch_ops")
    per_rank = ranks.run(ledger_case, kind, str(tmp_path), extra, torch_only)
    check(per_rank, case, 0 if case == "vanilla" else STEPS)
    if case in RESUMED:  # from the mid-run checkpoint: the method's state is loaded, then trained on
        (tmp_path / kind / "checkpoints" / "latest").write_text(f"step{SAVE:08d}")
        check(ranks.run(ledger_case, kind, str(tmp_path), extra, torch_only), case, STEPS - SAVE)
    print(f"{case}: host read-backs per step (rank 0): {[sum(r.values()) for r in per_rank[0]['reads']]}; "
          f"by line, last step: {per_rank[0]['reads'][-1] if per_rank[0]['reads'] else {}}")


# Where a training step may read a device tensor back: the CPU-only C kernels' index checks (never on the
# GPU path), the EP dispatch's split sizes (all_to_all_single takes host lists: one read per MoE forward)
# and DGES's window, read once at a refresh (here every step: dges.update_every=1).  An HF base run without a
# KV cache (DES-MoE sets use_cache=False) also reads once per forward inside transformers, which checks its
# position ids for packed sequences (masking_utils.find_packed_sequence_indices) when no attention mask is given
READ_FILES = ("desmoe/kernels/", "desmoe/moe/dispatcher.py", "desmoe/recipes/des_moe/dges.py")
HF_READ = "via transformers/masking_utils.py"


def check(per_rank, case, steps):
    for out in per_rank:
        assert len(out["reads"]) == steps, out["reads"]  # the steps run (a resume runs the rest)
        assert out["found"] == {}, "\n".join(f"{k}: {f}" for k, v in out["found"].items() for f in v)
        for step in out["reads"]:
            assert all(where.startswith(READ_FILES) or HF_READ in where for where in step), step
            assert sum(n for where, n in step.items() if "des_moe/dges.py" in where) <= 1, step
        # the ledger saw the calls it checks (a renamed hook would check nothing)
        assert {"attach", "evaluate" if case != "vanilla" else "finish"} <= set(out["calls"]), out["calls"]
        if case != "vanilla":
            assert {"step", "end_step", "begin_stage", "end_stage", "trainer._log"} <= set(out["calls"]), out["calls"]
