"""Plain expert-parallel training of the MoE LM: the core's smoke job.

One screen for the step: sample -> forward (+ load-balancing loss) -> DeepSpeed
backward/step -> log, evaluate, checkpoint.  Resumes from the run directory's
latest checkpoint; batches are a pure function of (seed, step, rank), so a
resumed run continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from desmoe import checkpoint
from desmoe.collectives import mean_over_ranks as _mean_over_ranks
from desmoe.config import bad, dump_yaml
from desmoe.data.text_corpus import TextCorpusConfig, load_byte_corpus, sample_windows
from desmoe.models.moe_lm import MoELM, MoELMConfig
from desmoe.monitor import Monitor, ascii_curve, plot_curves, read_metrics, truncate_metrics
from desmoe.training.guards import check_finite
from desmoe.training.preemption import Preemption, exit_for_requeue


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch: int = 8
    seq_len: int = 128
    lr: Optional[float] = None  # None = the DeepSpeed config's optimizer lr
    aux_loss_coef: float = 0.01
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0

    def check(self) -> None:
        for key in ("steps", "micro_batch", "seq_len", "log_every", "eval_every", "eval_batches", "save_every"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        if self.lr is not None and not 0 < self.lr < 1:
            raise bad("lr", "a number in (0, 1)", self.lr)
        if not 0 <= self.aux_loss_coef < float("inf"):
            raise bad("aux_loss_coef", "a finite number >= 0", self.aux_loss_coef)


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str = "smoke"
    resume: bool = True


@dataclass
class LMExperiment:
    model: MoELMConfig = field(default_factory=MoELMConfig)
    data: TextCorpusConfig = field(default_factory=TextCorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise bad("train.seq_len", f"at most model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)


@torch.no_grad()
def evaluate(model: MoELM, data: torch.Tensor, cfg: LMExperiment, rank: int, device) -> float:
    model.eval()
    losses = []
    for i in range(cfg.train.eval_batches):
        batch = sample_windows(data, cfg.train.micro_batch, cfg.train.seq_len + 1, cfg.train.seed + 7, i, rank)
        losses.append(model.loss(batch.to(device))[1])
    model.train()
    return _mean_over_ranks(torch.stack(losses).mean())


def train_lm(cfg: LMExperiment, ds_config_path: str) -> dict:
    import deepspeed.comm as dist

    from desmoe.distributed import init_distributed, is_rank0
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config

    ds_raw = read_ds_config(ds_config_path)  # user errors surface before any process group exists
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % cfg.model.ep_size:
        raise bad("model.ep_size", f"a divisor of the world size {world}", cfg.model.ep_size)
    train_data, val_data = load_byte_corpus(cfg.data)
    model = MoELM(cfg.model)
    model.setup_expert_parallel()
    engine, _ = build_engine(model, resolve_ds_config(ds_raw, cfg.train.micro_batch, lr=cfg.train.lr))
    run_dir = Path(cfg.run.dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.run.resume:
        checkpoint.check_resume_config(run_dir, ckpt_dir, cfg)
    state = checkpoint.load(engine, ckpt_dir) if cfg.run.resume else None
    start = state["step"] if state else 0
    if is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
        truncate_metrics(run_dir, after_step=start)  # rows logged after the checkpoint get redone
    preemption = Preemption()
    monitor = Monitor(run_dir, cfg.train.steps, initial_step=start, desc=f"train {cfg.run.name}")
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.train.steps):
            batch = sample_windows(train_data, cfg.train.micro_batch, cfg.train.seq_len + 1, cfg.train.seed, step, rank)
            loss, lm_loss = engine.module.loss(batch.to(engine.device), cfg.train.aux_loss_coef)
            check_finite(loss, step + 1, rank, ckpt_dir)
            engine.backward(loss)
            engine.step()
            done = step + 1
            monitor.progress(1, loss=lm_loss.item())
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                tokens = cfg.train.micro_batch * cfg.train.seq_len * world * (done - start)
                _log_train(monitor, engine, done, loss, lm_loss, cfg.train.aux_loss_coef, tokens / (time.perf_counter() - t0))
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                monitor.scalars(done, {"val/loss": evaluate(engine.module, val_data, cfg, rank, engine.device)})
            if done % cfg.train.save_every == 0 or done == cfg.train.steps:
                checkpoint.save(engine, ckpt_dir, done)
            elif preemption.requested():
                checkpoint.save(engine, ckpt_dir, done)
                exit_for_requeue(monitor, preemption, done, f"at step {done}")
    finally:
        monitor.close()  # ends the progress bar and flushes TensorBoard, also on failure
    return summarize(run_dir) if is_rank0() else {}


def _log_train(monitor: Monitor, engine, step: int, loss, lm_loss, aux_coef: float, tokens_per_s: float) -> None:
    from desmoe.moe import global_tokens_per_expert

    counts = global_tokens_per_expert(engine.module).float()
    load = counts / counts.sum(dim=1, keepdim=True)
    monitor.scalars(step, {"train/loss": _mean_over_ranks(lm_loss),
                           "train/aux_loss": (loss.detach() - lm_loss).item() / max(aux_coef, 1e-12),
                           "train/lr": engine.get_lr()[0],
                           "moe/max_load_share": load.max().item(),
                           "perf/tokens_per_s": tokens_per_s})
    monitor.heatmap(step, "moe/expert_load", load.cpu().numpy(), xlabel="expert", ylabel="layer")


def summarize(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if train:
        plot_curves(run_dir / "loss.png", {"train": train, "validation": val}, ylabel="cross-entropy (nats/byte)")
        print(ascii_curve(train, label="train loss, nats/byte"), flush=True)
    if val:
        print(f"validation loss {val[0][1]:.3f} -> {val[-1][1]:.3f} nats/byte "
              f"({val[-1][1] / math.log(2):.3f} bits/byte; uniform bytes = 8.000)", flush=True)
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tensorboard'})", flush=True)
    return {"train": train, "val": val}
