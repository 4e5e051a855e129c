"""What reality does to a running job, on 2 real ranks (the smoke LM, EP=2, ZeRO-2): a second job in the same
run directory, a crash after steps were logged beyond the checkpoint (TensorBoard after the resume), a
non-finite loss on one rank only, non-finite gradients under a finite loss, and a checkpoint write that
fails on one rank (a real RLIMIT_FSIZE, what a full disk does to a write).  Every failure must stop every
rank in one line naming the step, leave the last complete checkpoint as ``latest``, and hang nothing."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DS = str(ROOT / "configs/zero2.json")


def run_case(run_dir: str, steps: int = 6, fault: str = "", at: int = 0, ds: str = DS):
    """The smoke LM for ``steps`` steps (checkpoint every 2), with ``fault`` at global step ``at``:
    "crash" (an error after step ``at`` is logged), "inf_loss" (rank 1's loss is inf), "nan_grads" (a finite
    loss whose gradient is NaN), "fsize" (rank 1 may write no file over 4 KiB from then on).  Returns
    "ok", or the one-line message of the UserError or TrainingFailure that stopped this rank."""
    import resource

    import deepspeed.comm as dist
    import torch

    from desmoe.config import load_config
    from desmoe.errors import TrainingFailure, UserError
    from desmoe.recipes.lm.recipe import LMExperiment, SmokeRecipe
    from desmoe.training.trainer import Trainer

    cfg = load_config(LMExperiment, ROOT / "configs/smoke.yaml", [
        "model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "train.seq_len=32",
        "train.micro_batch=4", "data.max_bytes=300000", f"train.steps={steps}", "train.log_every=1",
        "train.eval_every=1000", "train.eval_batches=1", "train.save_every=2", f"run.dir={run_dir}", "run.name=r"])
    rank, limit = dist.get_rank(), resource.getrlimit(resource.RLIMIT_FSIZE)

    class Faulty(SmokeRecipe):
        def step(self, stage, step, micro):
            loss, shown = super().step(stage, step, micro)
            if step + 1 == at and fault == "inf_loss" and rank == 1:
                loss = loss * float("inf")
            if step + 1 == at and fault == "nan_grads":  # d sqrt(x)/dx at 0 is inf: 0 * inf = NaN, loss unchanged
                p = next(self.trainer.engine.module.parameters())
                loss = loss + 0.0 * torch.sqrt(p - p.detach()).sum()
            return loss, shown

        def end_step(self, stage, step):
            super().end_step(stage, step)
            if step + 1 == at and fault == "fsize" and rank == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))

        def after_log(self, done):
            super().after_log(done)
            if done == at and fault == "crash":
                raise RuntimeError("crash")

    try:
        Trainer(Faulty(cfg), ds).run()
    except (UserError, TrainingFailure) as err:
        return str(err)
    except RuntimeError as err:
        return str(err) if str(err) == "crash" else repr(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    return "ok"


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def test_a_second_job_is_refused_and_a_dead_ones_lock_is_not_stale(ranks, tmp_path):
    from desmoe.training.runlock import RunLock

    run = tmp_path / "r"
    with RunLock(run):  # another job, here this test's process, holds the run directory
        refused = ranks.run(run_case, str(tmp_path), 2)
    assert refused[0] == refused[1] and "in use by another job" in refused[0] and f"pid\": {os.getpid()}" in \
        refused[0] and "\n" not in refused[0], refused
    assert sorted(p.name for p in run.iterdir()) == [".lock"], "the refused job wrote into the run"
    # a job SIGKILLed while holding the lock (a Slurm requeue after a node failure): the next one starts
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, signal; from desmoe.training.runlock import "
                               "RunLock; RunLock(sys.argv[1]).acquire(); print(flush=True); "
                               "os.kill(os.getpid(), signal.SIGKILL)", str(run)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL and "pid" in (run / ".lock").read_text()
    assert ranks.run(run_case, str(tmp_path), 2) == ["ok", "ok"]


def test_tensorboard_after_a_crash_shows_each_step_once(ranks, tmp_path):
    """Steps 5 (logged, then the job crashed; the checkpoint is step 4) is redone by the resumed run: the
    metrics and TensorBoard must hold the redone value once, not both runs' points at one step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert ranks.run(run_case, str(tmp_path), 6, "crash", 5) == ["crash", "crash"]
    run = tmp_path / "r"
    assert _steps(run) == [1, 2, 3, 4, 5] and (run / "checkpoints/latest").read_text() == "step00000004"
    assert ranks.run(run_case, str(tmp_path), 6) == ["ok", "ok"]
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    shown = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in shown] == [1, 2, 3, 4, 5, 6], shown
    logged = {r["step"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "train/loss" in r}
    assert all(abs(v - logged[s]) < 1e-6 for s, v in shown), (shown, logged)


def test_non_finite_loss_on_one_rank_stops_every_rank(ranks, tmp_path):
    out = ranks.run(run_case, str(tmp_path), 6, "inf_loss", 3)
    assert out[0] == out[1] and out[0].startswith("non-finite loss (inf) at step 3 on rank 1;"), out
    run = tmp_path / "r"
    assert _steps(run) == [1, 2] and (run / "checkpoints/latest").read_text() == "step00000002"


def test_non_finite_gradients_under_a_finite_loss_stop_the_run(ranks, tmp_path):
    """DeepSpeed's ZeRO optimizer skips such an update silently (no fp16 loss scaler to lower here)."""
    out = ranks.run(run_case, str(tmp_path), 6, "nan_grads", 3)
    assert out[0] == out[1] and out[0].startswith("non-finite gradients at step 3"), out
    assert (tmp_path / "r/checkpoints/latest").read_text() == "step00000002"


@pytest.mark.parametrize("stage", [2, 0])
def test_non_finite_gradients_stop_a_bf16_run_too(ranks, tmp_path, stage):
    """DeepSpeed's bf16 engine (the GPU's path): ZeRO-2 keeps its fp32 masters in DeepSpeed's ZeRO optimizer (as
    ZeRO-1 does), stage 0 in its unfused bf16 optimizer (gradient clipping off: with experts over ranks stage 0 refuses it);
    each must stop the run at the step whose gradients are NaN, not skip it silently."""
    cfg = json.loads(Path(DS).read_text())
    cfg["bf16"] = {"enabled": True}
    cfg["zero_optimization"]["stage"] = stage
    if stage == 0:
        cfg["gradient_clipping"] = 0.0
    ds = tmp_path / "ds_bf16.json"
    ds.write_text(json.dumps(cfg))
    out = ranks.run(run_case, str(tmp_path), 6, "nan_grads", 3, str(ds))
    assert out[0] == out[1] and out[0].startswith("non-finite gradients at step 3"), out
    assert (tmp_path / "r/checkpoints/latest").read_text() == "step00000002"


def test_a_checkpoint_write_failing_on_one_rank_stops_every_rank(ranks, tmp_path):
    out = ranks.run(run_case, str(tmp_path), 6, "fsize", 3)
    assert out[0] == out[1] and out[0].startswith("cannot save checkpoint step00000004 (rank 1: ") and \
        out[0].endswith("then resume") and "step00000002" in out[0], out
    ckpt = tmp_path / "r/checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert not (ckpt / "step00000004").exists() and not (ckpt / ".staging/step00000004").exists()
    assert ranks.run(run_case, str(tmp_path), 6) == ["ok", "ok"]  # the resume after the disk is fixed
    assert (ckpt / "latest").read_text() == "step00000006"


def test_a_jit_lock_left_by_a_killed_process_does_not_hang_the_next_start(tmp_path):
    """torch guards every JIT extension load (DeepSpeed's CPU comm op, loaded by every init_distributed) with
    a lock file it waits on without limit; a process SIGKILLed inside the load leaves it behind.  The next
    load must go on, not sleep forever (it did: every launch on the shared box hung in init_distributed)."""
    import threading

    from torch.utils.file_baton import FileBaton

    from desmoe.distributed import without_stale_baton

    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from torch.utils.file_baton import "
                             "FileBaton; assert FileBaton(sys.argv[1]).try_acquire(); os.kill(os.getpid(), "
                             "signal.SIGKILL)", str(tmp_path / "lock")], timeout=120)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "lock").exists()

    def jit_load() -> str:  # what torch.utils.cpp_extension._jit_compile does around a build
        baton = FileBaton(str(tmp_path / "lock"))
        if baton.try_acquire():
            try:
                return "loaded"
            finally:
                baton.release()
        baton.wait()
        return "waited"

    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(r=without_stale_baton(tmp_path, jit_load)), daemon=True)
    loader.start()
    loader.join(60)
    assert result == {"r": "loaded"} and not (tmp_path / "lock").exists()


def test_one_venv_reached_through_two_paths_builds_its_ops_in_two_folders(tmp_path):
    """DeepSpeed's CPU comm op is JIT-built with its sources named through the venv's path: a venv reached
    through a symlink (or an NFS export mounted elsewhere on another node) shared one build folder with the
    direct spelling, saw a changed build command in every process and rebuilt the op at every launch."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not inside a virtual environment")
    link = tmp_path / "venv-link"
    link.symlink_to(Path(sys.prefix).resolve(), target_is_directory=True)
    code = "import os; from desmoe.distributed import prepare_process; prepare_process(); " \
           "print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"} | {"PYTHONPATH": str(ROOT)}
    dirs = [subprocess.run([str(Path(prefix) / "bin" / "python"), "-c", code], capture_output=True, text=True,
                           env=env, timeout=300, check=True).stdout.strip() for prefix in (sys.prefix, link, sys.prefix)]
    real = [os.path.realpath(d) for d in dirs]  # the two spellings name one venv: the folders must still differ
    assert real[0] == real[2] and real[0] != real[1] and real[0].startswith(os.path.realpath(sys.prefix)), dirs


WRITE_UNDER_LIMIT = """
import resource, sys
from transformers import AutoModelForCausalLM
from hf_tiny import tiny_config
from desmoe.errors import TrainingFailure
from desmoe.models.hf_moe import write_hf_folder
cfg = tiny_config("mixtral")
state = AutoModelForCausalLM.from_config(cfg).state_dict()
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))  # what a full disk does to a write
try:
    write_hf_folder(cfg, state, sys.argv[1])
except TrainingFailure as err:
    print(err)
"""


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    """A model folder (export, upcycle, the embedded base) whose weights do not fit on the disk: safetensors
    raised its own SafetensorError (a traceback) and the staging folder stayed."""
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-c", WRITE_UNDER_LIMIT, str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1 and lines[0].startswith(f"{out}: cannot write the model folder (")\
        and "nothing was replaced" in lines[0], (proc.stdout, proc.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a half-written folder was left"


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    """A real SIGINT (Ctrl-C) mid-run: one line, exit 130 (was a traceback per rank); the checkpoints stay
    complete and the next launch resumes."""
    import time

    from jobs import clean_env, smoke_command

    args = ["--config", str(ROOT / "configs/smoke.yaml"), "model.hidden_size=32", "model.ffn_size=32",
            "model.ep_size=1", "train.seq_len=32", "data.max_bytes=100000", "train.eval_every=1000",
            "train.eval_batches=1", "train.save_every=2", f"run.dir={tmp_path}", "run.name=c"]
    # SIGINT as a terminal delivers it: an ignored SIGINT is inherited (Python then keeps it ignored), and an
    # earlier test of the suite leaves this process ignoring it, so the job ran on and this test timed out
    proc = subprocess.Popen(smoke_command(*args, "train.steps=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = tmp_path / "c/checkpoints/latest"
    deadline = time.monotonic() + 300
    while not latest.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("desmoe:")]
    assert proc.returncode == 130 and lines == [lines[0]] and "interrupted (Ctrl-C)" in lines[0] and \
        "Traceback" not in err, err[-3000:]
    done = int(latest.read_text()[4:])
    again = subprocess.run(smoke_command(*args, f"train.steps={done + 1}"), capture_output=True, text=True,
                           timeout=300, env=clean_env(), cwd=ROOT)
    assert again.returncode == 0 and latest.read_text() == f"step{done + 1:08d}", again.stderr[-3000:]
