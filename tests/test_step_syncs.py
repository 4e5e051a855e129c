"""Host read-backs per training step (each waits for the GPU on CUDA), on 2 real ranks: the smoke LM with
gradient accumulation.  A read per micro-batch (the loss's non-finite check, the progress bar's number)
made every micro-batch wait; one read per step is the floor for a non-finite check that stops the run at
the step it happens (tests/test_run_faults.py), plus the ranks' agreement on it (a collective)."""
import sys
from pathlib import Path

from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"}  # what reads a tensor on the host


class _HostReads(TorchFunctionMode):
    """Records reads made by desmoe's own code (file:function), outside the MoE core (tests/test_gpu_paths.py
    checks the routed forward; expert parallelism reads its all-to-all's split sizes, which it must), the
    CPU-only kernels and the data pipeline (host tensors of the corpus, before the batch is moved)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            code = sys._getframe(1).f_code
            where = code.co_filename.replace("\\", "/")
            if "/desmoe/" in where and not any(f"/desmoe/{p}/" in where for p in ("moe", "kernels", "data")):
                self.seen.append(f"{where.rsplit('/desmoe/', 1)[1]}:{code.co_name}")
        return func(*args, **(kwargs or {}))


def step_reads_case(run_dir: str):
    from desmoe.config import load_config
    from desmoe.recipes.lm.recipe import LMExperiment, SmokeRecipe
    from desmoe.training.trainer import Trainer

    cfg = load_config(LMExperiment, ROOT / "configs/smoke.yaml", [
        "model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "train.seq_len=32",
        "train.micro_batch=2", "train.grad_accum=3", "data.max_bytes=300000", "train.steps=3",
        "train.log_every=2", "train.eval_every=1000", "train.eval_batches=1", "train.save_every=1000",
        f"run.dir={run_dir}", "run.name=r"])
    reads: list[list[str]] = []

    class Recorded(Trainer):
        def _optimizer_step(self, stage, i, step):
            with _HostReads() as mode:
                shown = super()._optimizer_step(stage, i, step)
            reads.append(mode.seen)
            return shown

    Trainer_ = Recorded(SmokeRecipe(cfg), str(ROOT / "configs/zero2.json"))
    Trainer_.run()
    return reads


def test_one_read_per_step_not_per_micro_batch(ranks, tmp_path):
    for reads in ranks.run(step_reads_case, str(tmp_path)):
        assert len(reads) == 3
        for seen in reads:
            assert seen == ["training/step_reads.py:read_step", "collectives.py:reduce_number"], seen
