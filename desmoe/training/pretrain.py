"""Pretraining an HF MoE from scratch on the general corpus: the embedded CPU base.

Rank 0 writes a randomly initialised HF checkpoint of the configured
architecture; every rank loads it onto desmoe's EP blocks (its own experts
only).  Then one screen of training: batch -> forward (+ load balancing) ->
DeepSpeed step -> log / evaluate / checkpoint, resumable and preemptible like
``desmoe.training.lm``.  At the end the model is exported as an ordinary HF
checkpoint (experts gathered from all ranks) with the tokenizer and a report
comparing its held-out perplexity to a unigram model of the training tokens.
A finished export whose report holds the same config is reused, not retrained.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from desmoe import checkpoint
from desmoe.collectives import mean_over_ranks
from desmoe.config import bad, to_dict
from desmoe.errors import UserError
from desmoe.models.hf_build import MoEModelSpec, hf_config, write_initial_checkpoint
from desmoe.monitor import ascii_curve, plot_curves, read_metrics
from desmoe.training.lm import LMRecipe
from desmoe.objective import heldout_loss
from desmoe.training.trainer import RunConfig, Setup, Trainer


@dataclass
class PretrainData:
    source: Literal["prepared", "stdlib_bytes"] = "prepared"  # stdlib_bytes: byte-level Python sources (tests)
    root: str = "data/demo"  # prepared data folder (python -m data_prep.build --profile demo)
    domains: Optional[list[str]] = None  # training domains; None = ["general"]


@dataclass
class PretrainTrain:
    steps: int = 1000
    micro_batch: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    aux_loss_coef: float = 0.01
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 20000  # held-out general tokens for perplexity (all ranks together)
    save_every: int = 100
    seed: int = 0

    def check(self) -> None:
        for key in ("steps", "micro_batch", "seq_len", "log_every", "eval_every", "eval_tokens", "save_every"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        if not 0 < self.lr < 1:
            raise bad("lr", "a number in (0, 1)", self.lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)


@dataclass
class PretrainInit:
    """Where the weights start: a fresh model of ``model`` (scratch), an HF MoE checkpoint
    (checkpoint), or a dense Llama/Mistral checkpoint upcycled to a Mixtral MoE (upcycle;
    continued pretraining then makes its router a real one)."""

    kind: Literal["scratch", "checkpoint", "upcycle"] = "scratch"
    path: Optional[str] = None
    num_experts: int = 8  # upcycle only
    top_k: int = 2
    mode: Literal["copy", "segment"] = "copy"

    def check(self) -> None:
        if self.kind != "scratch" and not self.path:
            raise bad("path", f"the checkpoint directory for kind={self.kind}")


@dataclass
class PretrainOutput:
    dir: str = "cache/base/embedded_moe"  # the exported HF checkpoint (+ tokenizer, report.json)
    reuse: bool = True  # skip training when dir holds an export of the same config


@dataclass
class PretrainExperiment:
    model: MoEModelSpec = field(default_factory=MoEModelSpec)  # used by init.kind=scratch; ep_size always
    init: PretrainInit = field(default_factory=PretrainInit)
    data: PretrainData = field(default_factory=PretrainData)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="pretrain_base"))
    output: PretrainOutput = field(default_factory=PretrainOutput)

    def check(self) -> None:
        if self.train.seq_len + 1 > self.model.max_seq_len:
            raise bad("train.seq_len", f"below model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)


class GeneralCorpus:
    """What pretraining reads from a prepared data folder (``desmoe.data.PreparedData``):
    packed training batches of the chosen domains, the held-out general text as one
    token stream, and token counts of the training split (for the unigram baseline)."""

    def __init__(self, cfg: PretrainData) -> None:
        from desmoe.data import PreparedData

        self.data = PreparedData(cfg.root)
        self.domains = list(cfg.domains) if cfg.domains else ["general"]
        for d in self.domains:
            self.data.domain_id(d)  # one line naming the known domains if wrong
        self.tokenizer = self.data.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.special = {"bos_id": self.tokenizer.bos_id, "eos_id": self.tokenizer.eos_id,
                        "pad_id": self.tokenizer.pad_id}

    def train_batches(self, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int):
        for batch in self.data.batches("train", micro_batch, seq_len, seed, rank, world, step, self.domains,
                                       homogeneous=False):
            yield batch.input_ids

    def heldout_stream(self, max_tokens: int) -> torch.Tensor:
        ds = self.data.indexed(self.data.heldout_name, "test")
        return _first_tokens((ds[i] for i in range(len(ds))), max_tokens)

    def test_stream(self, max_tokens: int) -> torch.Tensor:
        """The training domains' own test split (in-domain held-out documents)."""
        docs = (ds[i] for ds in (self.data.indexed(d, "test") for d in self.domains) for i in range(len(ds)))
        return _first_tokens(docs, max_tokens)

    def train_counts(self) -> torch.Tensor:
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for d in self.domains:
            ds = self.data.indexed(d, "train")
            for i in range(len(ds)):
                counts += np.bincount(np.asarray(ds[i], dtype=np.int64), minlength=self.vocab_size)[:self.vocab_size]
        return torch.from_numpy(counts)


class StdlibBytes:
    """The same three things over Python's own sources, byte-level (tests; no data folder needed)."""

    tokenizer = None
    vocab_size = 256
    special: dict = {}

    def __init__(self) -> None:
        from desmoe.data.text_corpus import TextCorpusConfig, load_byte_corpus

        self.train, self.heldout = load_byte_corpus(TextCorpusConfig(max_bytes=2_000_000))

    def train_batches(self, micro_batch: int, seq_len: int, seed: int, rank: int, world: int, step: int):
        from desmoe.data.text_corpus import sample_windows

        while True:
            yield sample_windows(self.train, micro_batch, seq_len + 1, seed, step, rank + 1000 * world)
            step += 1

    def heldout_stream(self, max_tokens: int) -> torch.Tensor:
        return self.heldout[:max_tokens].long()

    test_stream = heldout_stream

    def train_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.long(), minlength=256)


def _first_tokens(docs, max_tokens: int) -> torch.Tensor:
    out, n = [], 0
    for doc in docs:
        out.append(np.asarray(doc, dtype=np.int64))
        n += len(out[-1])
        if n >= max_tokens:
            break
    return torch.from_numpy(np.concatenate(out)[:max_tokens]) if out else torch.zeros(0, dtype=torch.long)


def open_data(cfg: PretrainData):
    return StdlibBytes() if cfg.source == "stdlib_bytes" else GeneralCorpus(cfg)


def heldout_batches(stream: torch.Tensor, seq_len: int, micro_batch: int, rank: int, world: int) -> list[torch.Tensor]:
    """Non-overlapping windows of the held-out stream, the same number of batches on every
    rank (each forward of an EP model is a collective)."""
    width = seq_len + 1
    windows = [stream[i:i + width] for i in range(0, len(stream) - width + 1, seq_len)]
    per_rank = len(windows) // world // micro_batch * micro_batch
    if per_rank == 0:
        raise UserError(f"held-out text too short: {len(stream)} tokens give fewer than "
                        f"{world * micro_batch} windows of {width} tokens")
    mine = windows[rank * per_rank:(rank + 1) * per_rank]
    return [torch.stack(mine[i:i + micro_batch]) for i in range(0, per_rank, micro_batch)]


def lr_at(step: int, cfg: PretrainTrain) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def unigram_nll(counts: torch.Tensor, batches: list[torch.Tensor]) -> float:
    """Held-out NLL of an add-one unigram model of the training tokens, on the same targets."""
    logp = ((counts.double() + 1) / (counts.sum() + len(counts))).log()
    nll = torch.stack([-logp[b[:, 1:].reshape(-1)].mean() for b in batches]).mean().float()
    return mean_over_ranks(nll)


def _cached(cfg: PretrainExperiment) -> Optional[dict]:
    report = Path(cfg.output.dir) / "report.json"
    if not (cfg.output.reuse and report.is_file()):
        return None
    saved = json.loads(report.read_text())
    same = saved.get("config") == {k: to_dict(cfg)[k] for k in ("model", "init", "data", "train")}
    return saved if same else None


class PretrainRecipe(LMRecipe):
    """An HF MoE from scratch, a checkpoint or an upcycled dense model, on the general corpus;
    warm-up + cosine LR; at the end an HF export and a report against a unigram model."""

    name = "pretrain"

    def setup(self, trainer: Trainer) -> Setup:
        import deepspeed.comm as dist

        from desmoe.distributed import is_rank0
        from desmoe.models.hf_io import checkpoint_config
        from desmoe.models.hf_moe import check_tokenizer, load_hf_moe
        from desmoe.models.upcycle import moe_config, upcycle

        cfg, rank, world = self.cfg, trainer.rank, trainer.world
        trainer.check_ep(cfg.model.ep_size)
        self.data = data = open_data(cfg.data)
        self.heldout = heldout_batches(data.heldout_stream(cfg.train.eval_tokens + 1), cfg.train.seq_len,
                                       cfg.train.micro_batch, rank, world)
        init_dir = trainer.run_dir / "init"
        if cfg.init.kind == "checkpoint":
            init_dir = Path(cfg.init.path)
        elif not (init_dir / "config.json").is_file():
            # validate on every rank: a bad input must fail everywhere, not on rank 0 while the rest wait at the barrier
            if cfg.init.kind == "upcycle":
                moe_config(checkpoint_config(cfg.init.path), cfg.init.num_experts, cfg.init.top_k, cfg.init.mode)
            else:
                init_cfg = hf_config(cfg.model, data.vocab_size, **data.special)
            if is_rank0() and cfg.init.kind == "upcycle":
                upcycle(cfg.init.path, init_dir, cfg.init.num_experts, cfg.init.top_k, cfg.init.mode, seed=cfg.model.seed)
            elif is_rank0():
                write_initial_checkpoint(init_cfg, init_dir, cfg.model.seed)
        dist.barrier()
        model = load_hf_moe(init_dir, ep_size=cfg.model.ep_size)
        if data.tokenizer is not None:
            check_tokenizer(data.tokenizer, model.config, f"{cfg.data.root} tokenizer")
        return Setup(model, cfg.train.micro_batch, lr=cfg.train.lr)

    def attach(self, trainer, state):
        t = self.cfg.train
        self.batches = self.data.train_batches(t.micro_batch, t.seq_len, t.seed, trainer.rank, trainer.world,
                                               trainer.start)

    def lr(self, stage, step):
        return lr_at(step, self.cfg.train)

    def batch(self, step):
        return next(self.batches)

    def evaluate(self, done):
        return {"val/loss": heldout_loss(self.trainer.engine.module, self.heldout, self.trainer.engine.device)}

    def finish(self, trainer):
        import deepspeed.comm as dist

        from desmoe.distributed import is_rank0
        from desmoe.models.hf_moe import export_hf

        cfg, data, engine, world = self.cfg, self.data, trainer.engine, trainer.world
        heldout_nll = heldout_loss(engine.module, self.heldout, engine.device)
        counts = data.train_counts()
        unigram = unigram_nll(counts, self.heldout)
        in_domain = heldout_batches(data.test_stream(cfg.train.eval_tokens + 1), cfg.train.seq_len,
                                    cfg.train.micro_batch, trainer.rank, world)
        test_nll, test_unigram = heldout_loss(engine.module, in_domain, engine.device), unigram_nll(counts, in_domain)
        tok_path = getattr(data.tokenizer, "path", None)
        ship = {"tokenizer.model": tok_path} if tok_path is not None and Path(tok_path).is_file() else None
        export_hf(engine.module, cfg.output.dir, extra_files=ship)  # the sentencepiece model ships with the weights
        report = {"heldout_ppl": math.exp(heldout_nll), "unigram_ppl": math.exp(unigram), "heldout_nll": heldout_nll,
                  "unigram_nll": unigram, "test_ppl": math.exp(test_nll), "test_unigram_ppl": math.exp(test_unigram),
                  "heldout_tokens": sum(b[:, 1:].numel() for b in self.heldout) * world,
                  "steps": cfg.train.steps, "vocab_size": data.vocab_size,
                  "parameters": _count_parameters(engine.module),
                  "train_tokens": cfg.train.steps * cfg.train.micro_batch * cfg.train.seq_len * world,
                  "train_s_this_run": trainer.train_seconds - trainer.seconds_at_start, "world_size": world, "run_dir": str(trainer.run_dir),
                  "config": {k: to_dict(cfg)[k] for k in ("model", "init", "data", "train")}}
        if is_rank0():
            text = json.dumps(report, indent=2)
            checkpoint.write_text_atomic(trainer.run_dir / "report.json", text)
            checkpoint.write_text_atomic(Path(cfg.output.dir) / "report.json", text)  # last: marks the export complete
            _summarize(trainer.run_dir, report, cfg.output.dir)
        dist.barrier()
        self.report = report

    def summary(self, trainer):
        return self.report


def pretrain(cfg: PretrainExperiment, ds_config_path: str) -> dict:
    cached = _cached(cfg)
    if cached is not None:
        print(f"embedded base already built: {cfg.output.dir} (held-out perplexity {cached['heldout_ppl']:.2f}); "
              f"set output.reuse=false to retrain", flush=True)
        return cached
    return Trainer(PretrainRecipe(cfg), ds_config_path).run()


def _count_parameters(model) -> int:
    """All parameters of the full model (routed experts of other EP ranks included)."""
    from desmoe.moe import moe_blocks

    total = sum(p.numel() for p in model.parameters())
    for block in moe_blocks(model):
        per_expert = sum(p.numel() for p in block.local_experts.parameters()) // len(block.local_experts)
        total += per_expert * (block.num_experts - len(block.local_experts))
    return total


def _summarize(run_dir: Path, report: dict, out_dir: str) -> None:
    rows = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if train:
        plot_curves(run_dir / "loss.png", {"train": train, "held-out general": val}, ylabel="cross-entropy (nats/token)")
        print(ascii_curve(train, label="train loss, nats/token"), flush=True)
    print(f"training domains' test split: perplexity {report['test_ppl']:.2f} vs unigram "
          f"{report['test_unigram_ppl']:.2f}", flush=True)
    print(f"held-out general perplexity {report['heldout_ppl']:.2f} vs unigram {report['unigram_ppl']:.2f} "
          f"({report['parameters'] / 1e6:.1f}M parameters, {report['train_tokens'] / 1e6:.2f}M training tokens, "
          f"{report['train_s_this_run']:.0f} s of training)", flush=True)
    print(f"base model: {out_dir}  (tensorboard --logdir {run_dir / 'tensorboard'})", flush=True)
