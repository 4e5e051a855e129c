"""The one training loop: every recipe (LM pretraining and the smoke job, DES-MoE and
its baselines, TRGE and its baselines) runs on it.

The trainer owns what every run needs once: process groups, the DeepSpeed engine,
the run directory (config.yaml, metrics truncation on resume), resume and client
state, the per-step LR, the log/eval/save cadence, preemption, the non-finite guard,
monitoring (tokens/s, wall time) and the run summary hand-off.  A recipe owns what
its paper adds: the model and data, its stages, the loss of a step, what happens
before and after a step or a stage, its evaluation, metrics and images, and its
state.  The step, on one screen (``_train_stage``)::

    lr -> recipe.step (batch, forward, loss) -> finite? -> backward -> optimizer step
       -> recipe.end_step -> log / evaluate / save-or-preempt (cadence)

Stages: LM and DES-MoE have one; TRGE has one per task.  Step numbers are global:
stage ``s`` covers steps ``offset_s + 1 .. offset_s + span_s`` with ``span = max(steps, 1)``
(a stage without training, e.g. TRGE zero-shot, still counts one step, so every stage
end has its own checkpoint tag).  A checkpoint's ``step`` is the resume cursor.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from desmoe import checkpoint, recompute, reshard
from desmoe.checkpoint import RESUMABLE_KEYS
from desmoe.config import bad, dump_yaml
from desmoe.environment import describe
from desmoe.errors import TrainingFailure
from desmoe.moe import update_selection_biases
from desmoe.training.step_reads import grads_finite, read_step


@dataclass
class RunConfig:
    """Where a run lives and whether it continues: the same section for every recipe."""

    dir: str = "runs"
    name: str = "run"
    resume: bool = True
    keep_checkpoints: int = 0  # newest checkpoint tags kept (0 = all)

    def check(self) -> None:
        if self.keep_checkpoints < 0:
            raise bad("keep_checkpoints", "an integer >= 0 (0 = keep all)", self.keep_checkpoints)
        # the run is run.dir/run.name: an empty name made run.dir itself the run (checkpoints among the other
        # runs' folders), an absolute one or '..' put it outside run.dir without a word
        name = Path(self.name)
        if not self.name.strip() or name.is_absolute() or ".." in name.parts:
            raise bad("name", "a non-empty folder name inside run.dir (no leading '/', no '..')", self.name)


@dataclass
class Cadence:
    """How often the trainer logs, evaluates and saves, counted in steps of a stage
    (0 = never inside a stage; every stage end is logged, evaluated and saved anyway)."""

    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0


@dataclass
class Setup:
    """What a recipe's ``setup`` hands the trainer to build the engine from."""

    model: torch.nn.Module
    micro_batch: int
    lr: Optional[float] = None  # None: the DeepSpeed JSON's number (engine.fold_lr made it train.lr)
    parts: Optional[Mapping[str, Callable[[str], bool]]] = None  # dense parts frozen separately
    expert_unit: Any = None
    grad_accum: int = 1  # micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)


class Recipe:
    """A method on the trainer.  Override what the method needs; the defaults do nothing."""

    name = "recipe"
    resumable_keys: tuple[str, ...] = RESUMABLE_KEYS  # config keys a resumed run may change
    trainable_only = False  # checkpoints leave out parameters frozen for good
    logs_expert_load = True  # the trainer logs MoE load shares (a collective over the EP groups)
    labels: dict = {}  # categorical log keys -> {value: name}: TensorBoard text, not a smoothed line
    throughput = "tokens"  # what tokens_per_step counts: perf/<throughput>_per_s
    # Why a resume at another world size is refused (one clause, for reshard.plan's one-line refusal); "" = the
    # recipe's state and streams convert exactly (desmoe/reshard.py), which a recipe must show before it says so.
    inelastic = "its state and data streams were not shown to convert exactly"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.trainer: Optional["Trainer"] = None

    # --- set-up --------------------------------------------------------------------------------
    def setup(self, trainer: "Trainer") -> Setup:
        raise NotImplementedError

    def on_engine(self, trainer: "Trainer") -> None:
        """The engine exists; nothing is loaded yet."""

    def attach(self, trainer: "Trainer", state: Optional[dict]) -> None:
        """After the resume: ``state`` is the client state of the checkpoint (None for a fresh run)."""

    def cadence(self) -> Cadence:
        return Cadence()

    def stages(self) -> list[int]:
        """Training steps of each stage."""
        raise NotImplementedError

    def tokens_per_step(self) -> int:
        """Tokens (or samples) all ranks consume per step, for perf/tokens_per_s."""
        return 0

    # --- the step ------------------------------------------------------------------------------
    def begin_stage(self, stage: int, first_step: int) -> None:
        pass

    def lr(self, stage: int, step: int) -> Optional[float]:
        """The learning rate of ``step`` of ``stage``, or None to leave the optimizer's."""
        return None

    def step(self, stage: int, step: int, micro: int) -> tuple[torch.Tensor, float]:
        """Micro-batch ``micro`` of ``step`` (0 .. grad_accum - 1), forward, loss: (the loss to minimise, the
        number the progress bar shows: a float or, better on a GPU, a one-element tensor the trainer reads back
        with the step's losses, once per step).  Whatever decides what trains belongs at ``micro == 0``: every
        micro-batch's gradient must reach the same parameters."""
        raise NotImplementedError

    def end_step(self, stage: int, step: int) -> None:
        pass

    def log(self, done: int) -> dict[str, float]:
        """Scalars at the log cadence (collective: every rank calls it)."""
        return {}

    def after_log(self, done: int) -> None:
        """Every step, after the log: event-driven images (e.g. a refreshed affinity matrix)."""

    def evaluate(self, done: int) -> dict[str, float]:
        return {}

    def end_stage(self, stage: int, done: int) -> None:
        pass

    def state_dict(self) -> dict:
        """Client state saved with every checkpoint (collective: every rank calls it)."""
        return {}

    def export_dir(self) -> Optional[Path]:
        """Where ``finish`` will write an HF export (None: nowhere); checked before training, not after it."""
        return None

    def finish(self, trainer: "Trainer") -> None:
        """After the last stage, the monitor still open (collective: every rank calls it)."""

    def summary(self, trainer: "Trainer") -> dict:
        """After the monitor is closed: reports from the metrics; the run's return value."""
        return {}


class Trainer:
    def __init__(self, recipe: Recipe, ds_config_path: str) -> None:
        self.recipe, self.ds_config_path = recipe, ds_config_path
        recipe.trainer = self
        self.engine = self.trainability = self.monitor = None
        self.train_seconds = 0.0  # time in steps only (no evaluation, no saving)

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.cfg.run.dir) / self.recipe.cfg.run.name

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def check_ep(self, ep_size: int, key: str = "model.ep_size") -> None:
        if self.world % ep_size:
            raise bad(key, f"a divisor of the world size {self.world}", ep_size)

    def bootstrap(self) -> None:
        """Process groups (the DeepSpeed config is read first: user errors before any group exists)."""
        import deepspeed.comm as dist

        from desmoe.distributed import init_distributed
        from desmoe.engine import fold_lr, read_ds_config

        self.ds_raw = read_ds_config(self.ds_config_path)
        fold_lr(self.recipe.cfg, self.ds_raw)  # before setup, the schedules or the config dump read train.lr
        for path, key in ((Path(self.recipe.cfg.run.dir), "run.dir"), (self.run_dir, "run.name")):
            if path.exists() and not path.is_dir():  # else mkdir fails later with a traceback
                raise bad(key, "a directory or a path that does not exist yet", f"{path} (a file)")
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def run(self) -> dict:
        from desmoe.training.runlock import RunLock

        self.bootstrap()
        with RunLock(self.run_dir):  # one job per run directory, taken before anything of the run is read
            return self._run()

    def _run(self) -> dict:
        from desmoe.distributed import is_rank0
        from desmoe.engine import build_engine, resolve_ds_config
        from desmoe.monitor import Monitor, truncate_metrics
        from desmoe.training.preemption import Preemption

        r, cfg = self.recipe, self.recipe.cfg
        s = r.setup(self)
        out = r.export_dir()
        if out is not None:  # a folder the export may not replace, refused before the run, not after
            from desmoe.export import check_destination

            check_destination(self.run_dir, Path(out))
        ds_config = resolve_ds_config(self.ds_raw, s.micro_batch, s.grad_accum, lr=s.lr)
        self.grad_accum = s.grad_accum
        ds_record = checkpoint.ds_record(ds_config, self.world)  # before DeepSpeed sees (and may add to) it
        elastic = None  # the saved DeepSpeed record when resuming at another world size (desmoe/reshard.py)
        if cfg.run.resume:  # before the engine: a changed world size would fail inside DeepSpeed's ZeRO load
            elastic = reshard.plan(self.run_dir, self.ckpt_dir, ds_config, self.world, r)
            checkpoint.check_resume_config(self.run_dir, self.ckpt_dir, cfg,
                                           r.resumable_keys + (reshard.ELASTIC_KEYS if elastic else ()))
            checkpoint.check_resume_deepspeed(self.run_dir, self.ckpt_dir, *reshard.as_saved(ds_config, self.world, elastic))
        # train.activation_checkpointing (desmoe/recompute.py), for every recipe whose train section has it
        recompute.apply(s.model, getattr(getattr(cfg, "train", None), "activation_checkpointing", "none"))
        self.engine, self.trainability = build_engine(s.model, ds_config, parts=s.parts, expert_unit=s.expert_unit)
        r.on_engine(self)
        if elastic:
            state = reshard.load(self.engine, self.ckpt_dir, elastic["world_size"], trainable_only=r.trainable_only)
        else:
            state = checkpoint.load(self.engine, self.ckpt_dir, trainable_only=r.trainable_only) if cfg.run.resume else None
        self.data_layout = reshard.data_layout(state, self.world, self.grad_accum)  # whose stream keys batches use
        self.start = state["step"] if state else 0
        self.train_seconds = self.seconds_at_start = float((state or {}).get("train_seconds", 0.0))
        r.attach(self, state)
        config = dump_yaml(cfg)
        if is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text_atomic(self.run_dir / "config.yaml", config)
            checkpoint.write_text_atomic(self.run_dir / checkpoint.DS_RECORD, ds_record)
            env = json.dumps({"start_step": self.start, **describe(self.world)})  # one line per (re)start
            log = self.run_dir / "environment.jsonl"
            checkpoint.write_text_atomic(log, (log.read_text() if log.is_file() else "") + env + "\n")
            truncate_metrics(self.run_dir, after_step=self.start)  # rows logged after the checkpoint get redone
        spans = [max(n, 1) for n in r.stages()]
        self.preemption = Preemption()
        self.monitor = Monitor(self.run_dir, sum(spans), initial_step=self.start, desc=f"{r.name} {cfg.run.name}")
        # the run's config next to its curves (indented: markdown), at this start's first step: a later resume from the
        # same checkpoint purges from there (at self.start, each resume from one checkpoint left its own config)
        self.monitor.text("run/config", "".join(f"    {line}\n" for line in config.splitlines()), self.start + 1)
        self.t_run = time.perf_counter()
        try:
            offset = 0
            for stage, (steps, span) in enumerate(zip(r.stages(), spans)):
                if self.start < offset + span:
                    self._train_stage(stage, steps, offset, max(0, self.start - offset), len(spans))
                offset += span
            r.finish(self)
        finally:
            self.monitor.close()  # ends the progress bar and flushes TensorBoard, also on failure
        summary = r.summary(self)
        if is_rank0():
            from desmoe.monitor import tensorboard_command

            # every run under run.dir side by side; images=0 makes TensorBoard keep every image step (default 10)
            print(f"compare runs: {tensorboard_command(cfg.run.dir, '--samples_per_plugin', 'images=0')}", flush=True)
        return summary

    def _train_stage(self, stage: int, steps: int, offset: int, first: int, stages: int) -> None:
        r, engine, every = self.recipe, self.engine, self.recipe.cadence()
        r.begin_stage(stage, first)
        t_start, n_start = time.perf_counter(), first
        for i in range(first, steps):
            t0 = time.perf_counter()
            lr = r.lr(stage, i)
            if lr is not None:
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
            shown = self._optimizer_step(stage, i, offset + i + 1)
            update_selection_biases(engine.module)  # no-op unless a router balances by its selection bias
            r.end_step(stage, i)
            self.train_seconds += time.perf_counter() - t0
            done, end = offset + i + 1, i + 1 == steps
            self.monitor.progress(1, loss=shown)
            if end or (every.log_every and (i + 1) % every.log_every == 0):
                tokens = r.tokens_per_step() * (i + 1 - n_start)
                self._log(done, tokens / max(time.perf_counter() - t_start, 1e-9))
            r.after_log(done)
            if every.eval_every and (end or (i + 1) % every.eval_every == 0):
                self.monitor.scalars(done, r.evaluate(done))
            if end:
                break  # the stage end below saves
            stop = self.preemption.requested()  # collective: every rank stops at the same step
            if stop or (every.save_every and (i + 1) % every.save_every == 0):
                self.save(done)
            if stop:
                self.exit_for_requeue(done, f"at step {i + 1}" + (f" of stage {stage + 1}" if stages > 1 else ""))
        done = offset + max(steps, 1)
        r.end_stage(stage, done)
        self.save(done)
        if stage + 1 < stages and self.preemption.requested():
            self.exit_for_requeue(done, f"after stage {stage + 1}")

    def _optimizer_step(self, stage: int, i: int, step: int) -> float:
        """``grad_accum`` micro-batches, each forward and backward; DeepSpeed divides each loss by grad_accum,
        sums the gradients and steps the optimizer after the last.  Returns the mean of the shown numbers."""
        engine, accum = self.engine, self.grad_accum
        before, skipped = engine.global_steps, engine.skipped_steps
        losses, values = [], []  # read back once after the step (a read per micro-batch made each wait for the GPU)
        unchecked = not hasattr(engine.optimizer, "overflow")  # ZeRO and bf16 optimizers check their gradients
        grads_ok = None
        for m in range(accum):
            loss, value = self.recipe.step(stage, i, m)
            losses.append(loss.detach())
            engine.backward(loss)
            if unchecked and m == accum - 1:  # nothing else would notice before the update
                grads_ok = grads_finite(engine.module)
            engine.step()
            values.append(value)
        losses, values, grads_ok = read_step(losses, values, grads_ok)
        bad = [v for v in losses if not math.isfinite(v)]  # this rank's non-finite losses (see check_finite)
        self.check_finite(step, bad, engine.skipped_steps != skipped or not grads_ok)
        shown = sum(value / accum for value in values)  # the mean, summed in micro-batch order as before
        if engine.global_steps != before + 1:  # DeepSpeed's own micro-step count decides where it steps
            raise TrainingFailure(f"step {step}: DeepSpeed stepped the optimizer {engine.global_steps - before} "
                                  f"times over {accum} micro-batches (expected once)")
        return shown

    def _log(self, done: int, tokens_per_s: float) -> None:
        values = self.recipe.log(done)
        if self.recipe.tokens_per_step():
            values[f"perf/{self.recipe.throughput}_per_s"] = tokens_per_s
        values["perf/train_s"] = self.train_seconds  # in steps, over every resume
        values["perf/wall_s"] = time.perf_counter() - self.t_run  # this process, evaluation and saves included
        if self.recipe.logs_expert_load:
            load = self.expert_load()
            values["moe/max_load_share"] = load.max().item()
        self.monitor.scalars(done, values, labels=self.recipe.labels)
        if self.recipe.logs_expert_load:
            layers, experts = load.shape
            self.monitor.heatmap(done, "moe/expert_load", load.cpu().numpy(), xlabel="expert (global id)",
                                 ylabel="MoE layer", yticks=[str(i) for i in range(layers)],
                                 title=f"share of the step's routes per expert (uniform = 1/{experts})",
                                 vmin=0.0, vmax=min(1.0, 4.0 / experts))

    def expert_load(self) -> torch.Tensor:
        """[layers, experts] share of the last step's routes, summed over all ranks."""
        from desmoe.moe import global_tokens_per_expert

        counts = global_tokens_per_expert(self.engine.module).float()
        return counts / counts.sum(dim=1, keepdim=True)

    def check_finite(self, step: int, losses: list[float], skipped: bool) -> None:
        """Stop every rank in one line after a step with a non-finite loss on any rank, or whose non-finite
        gradients made DeepSpeed's ZeRO/bf16 optimizer skip the update (with no fp16 loss scaler to lower,
        it would skip every later step too, silently).  Agreed after the step, not before the backward: a rank
        that stopped alone would leave its peers waiting in the backward's collectives.  Nothing is saved
        after such a step, so the last checkpoint is the last good one."""
        from desmoe.collectives import all_gather_object, any_rank

        if not any_rank(bool(losses) or skipped):
            return
        ranks = [(r, seen[0]) for r, seen in enumerate(all_gather_object(losses)) if seen]
        if ranks:
            (rank, value), more = ranks[0], len(ranks) - 1
            what = f"loss ({value}) at step {step} on rank {rank}" + (f" and {more} other rank(s)" if more else "")
        else:
            what = f"gradients at step {step} (the update was skipped or is lost)"
        raise TrainingFailure(f"non-finite {what}; resume from {self.ckpt_dir} with a lower train.lr")

    def save(self, done: int) -> None:
        state = {**self.recipe.state_dict(), "train_seconds": self.train_seconds,
                 reshard.LAYOUT_KEY: [self.data_layout.world, self.data_layout.accum]}
        checkpoint.save(self.engine, self.ckpt_dir, done, state, trainable_only=self.recipe.trainable_only,
                        keep=self.recipe.cfg.run.keep_checkpoints)

    def export(self, out_dir, extra_files: Optional[dict] = None) -> None:
        """Collective: rank 0 writes the HF folder of the run's newest checkpoint (``desmoe.export``, the same
        code as ``python -m desmoe.export``) while the others wait, however long it takes (``on_rank0``: no
        process-group timeout); a failure there stops every rank."""
        from desmoe.collectives import any_rank, on_rank0
        from desmoe.distributed import is_rank0
        from desmoe.export import export_run

        _, error = on_rank0(lambda: export_run(self.run_dir, out_dir, extra_files=extra_files, verify_hashes=False))
        if error is None and is_rank0():
            print(f"model exported: {out_dir}", flush=True)
        if any_rank(error is not None):
            raise error if error is not None else TrainingFailure(f"export of {self.run_dir} failed on rank 0")

    def exit_for_requeue(self, done: int, where: str) -> None:
        from desmoe.training.preemption import exit_for_requeue

        exit_for_requeue(self.monitor, self.preemption, done, where)

