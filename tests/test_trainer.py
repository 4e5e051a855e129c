"""The one trainer, per recipe, on 2 real ranks: a run preempted by a real SIGUSR1 (on rank 0 only) saves,
exits for requeue, and its resumed run ends bit identical to an uninterrupted one (every logged value
and the run's summary)."""
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DS = str(ROOT / "configs/zero2.json")


def _config(kind: str, run_dir: str, name: str):
    from desmoe.config import load_config

    run = [f"run.dir={run_dir}", f"run.name={name}"]
    if kind == "lm":
        from desmoe.recipes.lm.recipe import LMExperiment

        return load_config(LMExperiment, ROOT / "configs/smoke.yaml", [
            "model.hidden_size=32", "model.ffn_size=32", "train.seq_len=32", "data.max_bytes=300000", "train.steps=6",
            "train.log_every=1", "train.eval_every=3", "train.eval_batches=1", "train.save_every=100", *run])
    if kind == "pretrain":
        from desmoe.recipes.lm.pretrain import PretrainExperiment

        return load_config(PretrainExperiment, ROOT / "configs/pretrain_base.yaml", [
            "data.source=stdlib_bytes", "train.steps=6", "train.save_every=100", "train.eval_every=3",
            "train.log_every=1", "train.eval_tokens=1000", "train.warmup_steps=2", "train.lr=0.005",
            "train.seq_len=32", "train.micro_batch=4", "model.hidden_size=32", "model.num_layers=2",
            "model.num_experts=4", "model.expert_ffn=32", "model.shared_ffn=32", "model.dense_ffn=64",
            f"output.dir={run_dir}/{name}-export", "output.reuse=false", *run])
    if kind == "desmoe":
        from desmoe.recipes.des_moe.recipe import DESMoEExperiment

        return load_config(DESMoEExperiment, None, [
            "model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "model.num_heads=2",
            "data.domains=[email, xml]", "data.general=[json]", "data.max_bytes_per_domain=40000",
            "train.steps=8", "train.micro_batch=4", "train.seq_len=32", "train.log_every=1", "train.eval_every=4",
            "train.eval_batches=1", "train.save_every=100", "train.lr=0.01", "desmoe.dges.update_every=2",
            "evaluation.downstream=false", *run])
    from desmoe.recipes.trge.recipe import TRGEExperiment

    return load_config(TRGEExperiment, ROOT / "configs/trge_digits.yaml", [
        "backbone.hidden_size=32", "groups.bottleneck=8", "train.steps_per_task=3", "train.micro_batch=8",
        "train.eval_batch=64", "train.proto_samples=48", "data.n_train=64", "data.n_test=32", "train.log_every=1",
        *run])


RECIPES = {"lm": "desmoe.recipes.lm.recipe:SmokeRecipe", "pretrain": "desmoe.recipes.lm.pretrain:PretrainRecipe",
           "desmoe": "desmoe.recipes.des_moe.recipe:DESMoERecipe", "trge": "desmoe.recipes.trge.recipe:TRGERecipe"}


def run_case(kind: str, run_dir: str, name: str, signal_after: int = 0):
    """Run a recipe; with ``signal_after`` rank 0 sends itself SIGUSR1 after that global step."""
    import importlib
    import os
    import signal

    import deepspeed.comm as dist

    from desmoe.training.preemption import Preempted
    from desmoe.training.trainer import Trainer

    module, cls = RECIPES[kind].split(":")
    recipe_cls = getattr(importlib.import_module(module), cls)

    class Signalled(recipe_cls):
        def end_step(self, stage, step):
            super().end_step(stage, step)
            done = sum(max(n, 1) for n in self.stages()[:stage]) + step + 1
            if done == signal_after and dist.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm's --signal=USR1 does, on one rank only

    try:
        summary = Trainer(Signalled(_config(kind, run_dir, name)), DS).run()
    except Preempted as stop:
        return {"preempted_at": stop.step}
    return json.loads(json.dumps(summary, default=str))


def _logged(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in rows for k, v in r.items() if k != "step" and not k.startswith("perf/")}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if "second" not in k and k != "timing"
                                           and not k.endswith(("_s_this_run", "run_dir")))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


@pytest.mark.parametrize("kind,stop", [("lm", 4), ("pretrain", 4), ("desmoe", 5), ("trge", 5)])
def test_preempted_run_resumes_bit_identical(ranks, tmp_path, kind, stop):
    full = ranks.run(run_case, kind, str(tmp_path), "full")
    first = ranks.run(run_case, kind, str(tmp_path), "pre", stop)
    assert first == [{"preempted_at": stop}] * 2, "every rank stops at the step the signal arrived on one rank"
    assert (tmp_path / "pre" / "checkpoints" / "latest").read_text() == f"step{stop:08d}"
    resumed = ranks.run(run_case, kind, str(tmp_path), "pre")
    assert _same(full[0], resumed[0]), (full[0], resumed[0])
    logged_full, logged_resumed = _logged(tmp_path / "full"), _logged(tmp_path / "pre")
    assert logged_full.keys() == logged_resumed.keys()
    differ = [k for k in logged_full if not _same(logged_full[k], logged_resumed[k])]
    assert not differ, [(k, logged_full[k], logged_resumed[k]) for k in differ[:5]]
    # the environment of each start, the resumed one appended, not written over
    starts = [json.loads(line)["start_step"] for line in (tmp_path / "pre" / "environment.jsonl").open()]
    assert starts == [0, stop], starts
    # TensorBoard, written by the trainer for every recipe: throughput and wall time, the run's config as
    # text, images; a categorical value (DES-MoE's step domain) as text, not a smoothed scalar line
    tags = _tensorboard(tmp_path / "full")
    unit = "samples" if kind == "trge" else "tokens"
    assert {f"perf/{unit}_per_s", "perf/wall_s", "perf/train_s"} <= set(tags["scalars"]), tags["scalars"]
    assert "run/config/text_summary" in tags["tensors"] and tags["images"]  # text summaries are tensors
    if kind == "desmoe":
        assert "train/domain/text_summary" in tags["tensors"] and "train/domain" not in tags["scalars"]


def test_environment_names_the_code_the_process_loaded(monkeypatch):
    """A launch imports the code once and may run several runs: a later run's start reports the tree the
    process started from, and the edited tree beside it (``git_now``), not the edit as the code it ran."""
    import desmoe.environment as environment

    trees = iter([{"commit": "a" * 40, "dirty": False}, {"commit": "a" * 40, "dirty": False},
                  {"commit": "b" * 40, "dirty": True, "diff_sha256": "0123456789ab"}])
    monkeypatch.setattr(environment, "_git", lambda: next(trees))
    monkeypatch.setattr(environment, "_PROCESS_GIT", None)
    first, second, third = (environment.describe() for _ in range(3))
    assert first["git"] == second["git"] == third["git"] == {"commit": "a" * 40, "dirty": False}
    assert "git_now" not in first and "git_now" not in second
    assert third["git_now"] == {"commit": "b" * 40, "dirty": True, "diff_sha256": "0123456789ab"}
