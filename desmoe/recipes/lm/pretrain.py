"""Pretraining an HF MoE from scratch on the general corpus: the embedded CPU base.

Rank 0 writes a randomly initialised HF checkpoint of the configured
architecture; every rank loads it onto desmoe's EP blocks (its own experts
only).  Then one screen of training: batch -> forward (+ load balancing) ->
DeepSpeed step -> log / evaluate / checkpoint, resumable and preemptible like
``desmoe.recipes.lm.recipe``.  At the end the model is exported as an ordinary HF
checkpoint (experts gathered from all ranks) with the tokenizer and a report
comparing its held-out perplexity to a unigram model of the training tokens.
A finished export whose report holds the same config is reused, not retrained.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

from desmoe import checkpoint, reshard
from desmoe.config import bad, check_as, to_dict, with_defaults
from desmoe.data.pretrain_corpus import heldout_batches, open_data
from desmoe.errors import UserError
from desmoe.evaluation.pretrain_report import count_parameters, print_summary, unigram_nll
from desmoe.models.hf_build import MoEModelSpec, hf_config, spec_of, write_initial_checkpoint
from desmoe.objective import heldout_loss
from desmoe.recipes.lm.recipe import LMRecipe
from desmoe.recompute import check_mode
from desmoe.training.trainer import RunConfig, Setup, Trainer


@dataclass
class PretrainData:
    source: Literal["prepared", "stdlib_bytes"] = "prepared"  # stdlib_bytes: byte-level Python sources (tests)
    root: str = "data/demo"  # prepared data folder (python -m data_prep.build --profile demo)
    domains: Optional[list[str]] = None  # training domains; None = ["general"]

    def check(self) -> None:
        # [] silently trained on ["general"] (an empty list read as unset); a name given twice trained as one
        # domain but was read twice into the in-domain test stream
        if self.domains is not None and not self.domains:
            raise bad("domains", "at least one domain, or null for ['general']", self.domains)
        if self.domains is not None and len(set(self.domains)) != len(self.domains):
            raise bad("domains", "distinct names", self.domains)


@dataclass
class PretrainTrain:
    steps: int = 1000
    micro_batch: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees micro_batch * grad_accum samples a rank
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
    activation_checkpointing: str = "none"  # none | layers: recompute each decoder layer in backward (desmoe.recompute)

    def check(self) -> None:
        for key in ("steps", "micro_batch", "grad_accum", "seq_len", "log_every", "eval_every", "eval_tokens",
                    "save_every"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        check_mode(self.activation_checkpointing)
        if self.seed < 0:  # the data streams seed numpy's SeedSequence, which raised on it mid-run
            raise bad("seed", "an integer >= 0", self.seed)
        if not 0 < self.lr < 1:
            raise bad("lr", "a number in (0, 1)", self.lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        # unchecked, a negative aux coefficient trained towards imbalance and a negative warm-up ran as none
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0", self.warmup_steps)
        if not 0 <= self.aux_loss_coef < float("inf"):
            raise bad("aux_loss_coef", "a finite number >= 0", self.aux_loss_coef)


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
class PretrainModelSpec(MoEModelSpec):
    """``model.*``: the architecture of a scratch model; with ``init.kind=checkpoint|upcycle`` the architecture is
    the initial checkpoint's, so only ``ep_size`` and ``seed`` apply and a key set to anything but its default must
    agree with that checkpoint (:func:`check_against`).  So the architecture's checks run in
    :meth:`PretrainExperiment.check`, which knows ``init.kind``: here ``ep_size=16`` for a checkpoint of 64
    experts was refused as "a divisor of num_experts=8" (the default of a key the checkpoint does not use)."""

    def check(self) -> None:
        if self.ep_size < 1:
            raise bad("ep_size", "a positive integer", self.ep_size)


def check_against(spec: MoEModelSpec, config, kind: str, where) -> None:
    """Refuse a ``model.*`` key set (unlike its default) that the initial checkpoint ``config`` contradicts: it
    would be ignored without a word (``model.top_k=1`` trained the checkpoint's top-2)."""
    have, default = spec_of(config), MoEModelSpec()
    for f in fields(MoEModelSpec):
        mine = getattr(spec, f.name)
        if f.name in ("ep_size", "seed") or mine == getattr(default, f.name) or have.get(f.name) == mine:
            continue
        expected = (f"unset or {have[f.name]!r}, the value" if f.name in have else "unset: no counterpart") + \
            f" in the init.kind={kind} model ({where}, a {config.model_type}; its architecture applies)"
        raise bad(f"model.{f.name}", expected, mine)


@dataclass
class PretrainExperiment:
    model: PretrainModelSpec = field(default_factory=PretrainModelSpec)  # the scratch architecture; ep_size always
    init: PretrainInit = field(default_factory=PretrainInit)
    data: PretrainData = field(default_factory=PretrainData)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="pretrain_base"))
    output: PretrainOutput = field(default_factory=PretrainOutput)

    def check(self) -> None:
        if self.init.kind != "scratch":  # the checkpoint's positions bound seq_len once it loads
            return
        check_as(self.model, MoEModelSpec.check, "model")
        if self.train.seq_len + 1 > self.model.max_seq_len:
            raise bad("train.seq_len", f"below model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)


def lr_at(step: int, cfg: PretrainTrain) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _cached(cfg: PretrainExperiment) -> Optional[dict]:
    report = Path(cfg.output.dir) / "report.json"
    if not (cfg.output.reuse and report.is_file()):
        return None
    saved = json.loads(report.read_text())
    sections = ("model", "init", "data", "train")
    then = saved.get("config")
    if not isinstance(then, dict) or set(then) != set(sections):
        return None
    # a key added since the export was made (e.g. train.grad_accum) had its default then
    filled = with_defaults(then, PretrainExperiment)
    same = all(filled[k] == to_dict(cfg)[k] for k in sections)
    if same and cfg.data.source == "prepared":  # same config, but the folder may have been rebuilt since
        from desmoe.data.prepared import fingerprint, shipped_tokenizer_differs

        why = shipped_tokenizer_differs(cfg.output.dir, cfg.data.root)
        then_data = saved.get("data_fingerprint")  # None: an export made before the key, reused as before
        now_data = fingerprint(cfg.data.root) if then_data and (Path(cfg.data.root) / "meta.json").is_file() else None
        if not why and now_data is not None and then_data != now_data:
            why = (f"it was pretrained on another build of {cfg.data.root} (data fingerprint {then_data[:12]}, now "
                   f"{now_data[:12]}), and its report's figures are that data's")
        if why:  # refused, not retrained here: the run directory would resume the old model's checkpoints
            raise UserError(f"output.dir={cfg.output.dir}: {why}; expected a base pretrained on this data: retrain "
                            f"it from scratch with output.reuse=false run.resume=false")
    return saved if same else None


class PretrainRecipe(LMRecipe):
    """An HF MoE from scratch, a checkpoint or an upcycled dense model, on the general corpus;
    warm-up + cosine LR; at the end an HF export and a report against a unigram model."""

    name = "pretrain"
    # resumes at another world size (desmoe/reshard.py): the LR is a function of the step, so no state but the
    # trainer's; batches keep the saved stream layout (attach).  Tested 2 <-> 1 ranks (tests/test_elastic.py).
    inelastic = ""

    def setup(self, trainer: Trainer) -> Setup:
        import deepspeed.comm as dist

        from desmoe.models.hf_moe import check_tokenizer, load_hf_moe

        cfg, rank, world = self.cfg, trainer.rank, trainer.world
        trainer.check_ep(cfg.model.ep_size)
        self.data = data = open_data(cfg.data)
        hint = "raise train.eval_tokens if the data has more, or lower train.seq_len or train.micro_batch"
        self.heldout = heldout_batches(data.heldout_stream(cfg.train.eval_tokens + 1), cfg.train.seq_len,
                                       cfg.train.micro_batch, rank, world, hint=f"held-out split: {hint}")
        # the final report's in-domain test batches, built here so that too short a split stops the run before
        # training, not after it
        self.in_domain = heldout_batches(data.test_stream(cfg.train.eval_tokens + 1), cfg.train.seq_len,
                                         cfg.train.micro_batch, rank, world, hint=f"test split: {hint}")
        init_dir = self._initial_checkpoint(trainer.run_dir / "init")
        dist.barrier()
        model = load_hf_moe(init_dir, ep_size=cfg.model.ep_size)
        # model.max_seq_len (checked in the config) describes only a scratch model: a checkpoint or an
        # upcycled model brings its own positions, beyond which a seq_len ran on silently
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and cfg.train.seq_len + 1 > limit:
            raise bad("train.seq_len", f"below the initial model's max_position_embeddings={limit} ({init_dir})",
                      cfg.train.seq_len)
        if data.tokenizer is not None:
            check_tokenizer(data.tokenizer, model.config, f"{cfg.data.root} tokenizer")
        return self.setup_for(model)

    def _initial_checkpoint(self, init_dir: Path) -> Path:
        """The HF checkpoint training starts from: the user's (checkpoint), or one rank 0 writes into the run
        directory once (scratch, upcycle).  Every rank validates first: a bad input must fail everywhere, not on
        rank 0 while the rest wait at the barrier."""
        from desmoe.distributed import is_rank0
        from desmoe.models.hf_io import checkpoint_config
        from desmoe.models.upcycle import moe_config, upcycle

        cfg, data = self.cfg, self.data
        if cfg.init.kind == "checkpoint":
            init_dir = Path(cfg.init.path)
            check_against(cfg.model, checkpoint_config(init_dir), "checkpoint", init_dir)
        elif cfg.init.kind == "upcycle" and (init_dir / "config.json").is_file():  # upcycled at the first start
            check_against(cfg.model, checkpoint_config(init_dir), "upcycle", init_dir)
        elif cfg.init.kind == "upcycle":
            init_cfg = moe_config(checkpoint_config(cfg.init.path), cfg.init.num_experts, cfg.init.top_k,
                                  cfg.init.mode)
            check_against(cfg.model, init_cfg, "upcycle", f"{cfg.init.path} upcycled")
        if cfg.init.kind != "checkpoint" and not (init_dir / "config.json").is_file():
            if cfg.init.kind == "scratch":
                init_cfg = hf_config(cfg.model, data.vocab_size, **data.special)
            if is_rank0() and cfg.init.kind == "upcycle":
                upcycle(cfg.init.path, init_dir, cfg.init.num_experts, cfg.init.top_k, cfg.init.mode, seed=cfg.model.seed)
            elif is_rank0():
                write_initial_checkpoint(init_cfg, init_dir, cfg.model.seed)
        return init_dir

    def export_dir(self):
        return Path(self.cfg.output.dir)

    def attach(self, trainer, state):
        t = self.cfg.train

        def open_at(index, rank, world):  # a rank's stream positioned at a micro-batch
            return self.data.train_batches(t.micro_batch, t.seq_len, t.seed, rank, world, index)

        # counted in micro-batches; after a change of world size each comes from its slot in the saved layout
        self.batches = reshard.stream(trainer, open_at, trainer.start * t.grad_accum)

    def lr(self, stage, step):
        return lr_at(step, self.cfg.train)

    def batch(self, index):  # the stream was positioned at the start; it yields index after index
        return next(self.batches)

    def evaluate(self, done):
        return {"val/loss/general": heldout_loss(self.trainer.engine.module, self.heldout, self.trainer.engine.device)}

    def finish(self, trainer):
        import deepspeed.comm as dist

        from desmoe.distributed import is_rank0

        cfg, data, engine, world = self.cfg, self.data, trainer.engine, trainer.world
        heldout_nll = heldout_loss(engine.module, self.heldout, engine.device)
        counts = data.train_counts()
        unigram = unigram_nll(counts, self.heldout)
        in_domain = self.in_domain
        test_nll, test_unigram = heldout_loss(engine.module, in_domain, engine.device), unigram_nll(counts, in_domain)
        tok_path = getattr(data.tokenizer, "path", None)
        ship = {"tokenizer.model": tok_path} if tok_path is not None and Path(tok_path).is_file() else None
        trainer.export(cfg.output.dir, extra_files=ship)  # from the final checkpoint; the sentencepiece model ships too
        report = {"heldout_ppl": math.exp(heldout_nll), "unigram_ppl": math.exp(unigram), "heldout_nll": heldout_nll,
                  "unigram_nll": unigram, "test_ppl": math.exp(test_nll), "test_unigram_ppl": math.exp(test_unigram),
                  "heldout_tokens": sum(b[:, 1:].numel() for b in self.heldout) * world,
                  "steps": cfg.train.steps, "vocab_size": data.vocab_size,
                  "parameters": count_parameters(engine.module),
                  "train_tokens": cfg.train.steps * self.tokens_per_step(),
                  "train_s_this_run": trainer.train_seconds - trainer.seconds_at_start, "world_size": world, "run_dir": str(trainer.run_dir),
                  "config": {k: to_dict(cfg)[k] for k in ("model", "init", "data", "train")}}
        if cfg.data.source == "prepared":  # what _cached compares a later run's folder with
            from desmoe.data.prepared import fingerprint

            report["data_fingerprint"] = fingerprint(cfg.data.root)
        if is_rank0():
            text = json.dumps(report, indent=2)
            checkpoint.write_text_atomic(trainer.run_dir / "report.json", text)
            checkpoint.write_text_atomic(Path(cfg.output.dir) / "report.json", text)  # last: marks the export complete
            print_summary(trainer.run_dir, report, cfg.output.dir)
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


