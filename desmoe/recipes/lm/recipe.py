"""Language-model training on the trainer: the core's smoke job, and what pretraining shares with it.

The smoke job trains desmoe's own MoELM expert-parallel on byte-level text; batches
are a pure function of (seed, step, rank), so a resumed run continues exactly where
an uninterrupted one would be.  ``LMRecipe`` is the part both LM recipes share (the
step, its log); ``desmoe.recipes.lm.pretrain`` adds HF models, prepared data, the LR
schedule and the export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from desmoe import reshard
from desmoe.collectives import mean_over_ranks
from desmoe.config import bad
from desmoe.data.text_corpus import TextCorpusConfig, load_byte_corpus, sample_windows
from desmoe.models.moe_lm import MoELM, MoELMConfig
from desmoe.monitor import loss_curves, tensorboard_command
from desmoe.objective import heldout_loss, lm_loss
from desmoe.recompute import check_mode
from desmoe.training.trainer import Cadence, Recipe, RunConfig, Setup, Trainer


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees micro_batch * grad_accum samples a rank
    seq_len: int = 128
    # 3e-4: what configs/zero2.json held before its lr became "auto"; None: the DeepSpeed JSON's number
    lr: Optional[float] = 3e-4
    aux_loss_coef: float = 0.01
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    activation_checkpointing: str = "none"  # none | layers: recompute each decoder layer in backward (desmoe.recompute)

    def check(self) -> None:
        for key in ("steps", "micro_batch", "grad_accum", "seq_len", "log_every", "eval_every", "eval_batches",
                    "save_every"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        check_mode(self.activation_checkpointing)
        if self.seed < 0:  # the data streams seed numpy's SeedSequence, which raised on it mid-run
            raise bad("seed", "an integer >= 0", self.seed)
        if self.lr is not None and not 0 < self.lr < 1:
            raise bad("lr", "a number in (0, 1)", self.lr)
        if not 0 <= self.aux_loss_coef < float("inf"):
            raise bad("aux_loss_coef", "a finite number >= 0", self.aux_loss_coef)


@dataclass
class LMExperiment:
    model: MoELMConfig = field(default_factory=MoELMConfig)
    data: TextCorpusConfig = field(default_factory=TextCorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="smoke"))

    def check(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise bad("train.seq_len", f"at most model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)


class LMRecipe(Recipe):
    """Next-token training of an MoE LM in one stage; subclasses supply model, batches and evaluation."""

    def cadence(self) -> Cadence:
        t = self.cfg.train
        return Cadence(t.log_every, t.eval_every, t.save_every)

    def stages(self) -> list[int]:
        return [self.cfg.train.steps]

    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch * t.grad_accum * t.seq_len * self.trainer.world

    def batch(self, index: int) -> torch.Tensor:
        """The ``index``-th micro-batch of the run on this rank (step * grad_accum + micro)."""
        raise NotImplementedError

    def step(self, stage, step, micro):
        engine, t = self.trainer.engine, self.cfg.train
        batch = self.batch(step * t.grad_accum + micro).to(engine.device)
        loss, lm = lm_loss(engine.module, batch, t.aux_loss_coef)
        if micro == 0:
            self.loss = self.lm = 0.0
        self.loss = self.loss + loss.detach() / t.grad_accum  # the step's means, logged
        self.lm = self.lm + lm.detach() / t.grad_accum
        return loss, lm.detach()  # read back by the trainer with the step's losses, once per step

    def setup_for(self, model) -> Setup:
        t = self.cfg.train
        return Setup(model, t.micro_batch, lr=t.lr, grad_accum=t.grad_accum)

    def log(self, done):
        aux = self.cfg.train.aux_loss_coef
        return {"train/loss": mean_over_ranks(self.lm),
                "train/aux_loss": (self.loss - self.lm).item() / max(aux, 1e-12),
                "train/lr": self.trainer.engine.get_lr()[0]}


class SmokeRecipe(LMRecipe):
    # resumes at another world size (desmoe/reshard.py): no state but the trainer's, batches keyed by the run's
    # stream layout; tested 2 <-> 1 ranks (tests/test_elastic.py), as are pretraining and DES-MoE.
    inelastic = ""
    name = "train"

    def setup(self, trainer: Trainer) -> Setup:
        trainer.check_ep(self.cfg.model.ep_size)
        self.train_data, self.val_data = load_byte_corpus(self.cfg.data)
        model = MoELM(self.cfg.model)
        model.setup_expert_parallel()
        return self.setup_for(model)

    def batch(self, index):
        t = self.cfg.train
        index, rank, _ = reshard.key(self.trainer, index)  # the run's own stream layout (another world size)
        return sample_windows(self.train_data, t.micro_batch, t.seq_len + 1, t.seed, index, rank)

    def evaluate(self, done):
        t, tr = self.cfg.train, self.trainer
        batches = (sample_windows(self.val_data, t.micro_batch, t.seq_len + 1, t.seed + 7, i, tr.rank)
                   for i in range(t.eval_batches))
        return {"val/loss": heldout_loss(tr.engine.module, batches, tr.engine.device)}

    def summary(self, trainer):
        from desmoe.distributed import is_rank0

        return summarize(trainer.run_dir) if is_rank0() else {}


def train_lm(cfg: LMExperiment, ds_config_path: str) -> dict:
    return Trainer(SmokeRecipe(cfg), ds_config_path).run()


def summarize(run_dir: Path) -> dict:
    train, val = loss_curves(run_dir, "validation", "nats/byte")
    if val:
        print(f"validation loss {val[0][1]:.3f} -> {val[-1][1]:.3f} nats/byte "
              f"({val[-1][1] / math.log(2):.3f} bits/byte; uniform bytes = 8.000)", flush=True)
    print(f"run directory: {run_dir}  ({tensorboard_command(run_dir / 'tensorboard')})", flush=True)
    return {"train": train, "val": val}
