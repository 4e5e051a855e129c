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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from desmoe import checkpoint
from desmoe.config import bad, dump_yaml, to_dict
from desmoe.errors import TrainingFailure, UserError
from desmoe.models.hf_build import MoEModelSpec, hf_config, write_initial_checkpoint
from desmoe.monitor import Monitor, ascii_curve, plot_curves, read_metrics, truncate_metrics
from desmoe.moe import total_aux_loss
from desmoe.training.lm import RunConfig, _log_train, _mean_over_ranks
from desmoe.training.preemption import Preempted, Preemption, announce


@dataclass
class PretrainData:
    source: Literal["prepared", "stdlib_bytes"] = "prepared"  # stdlib_bytes: byte-level Python sources (tests)
    root: str = "data/prepared"  # PreparedData root written by data_prep
    domains: Optional[list[str]] = None  # None = the data's general corpus


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
    eval_batches: int = 8
    save_every: int = 100
    unigram_batches: int = 200  # training batches per rank counted for the unigram baseline
    seed: int = 0

    def check(self) -> None:
        for key in ("steps", "micro_batch", "seq_len", "log_every", "eval_every", "eval_batches", "save_every",
                    "unigram_batches"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        if not 0 < self.lr < 1:
            raise bad("lr", "a number in (0, 1)", self.lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)


@dataclass
class PretrainOutput:
    dir: str = "cache/base/embedded_moe"  # the exported HF checkpoint (+ tokenizer, report.json)
    reuse: bool = True  # skip training when dir holds an export of the same config


@dataclass
class PretrainExperiment:
    model: MoEModelSpec = field(default_factory=MoEModelSpec)
    data: PretrainData = field(default_factory=PretrainData)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="pretrain_base"))
    output: PretrainOutput = field(default_factory=PretrainOutput)

    def check(self) -> None:
        if self.train.seq_len + 1 > self.model.max_seq_len:
            raise bad("train.seq_len", f"below model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)


class StdlibBytes:
    """The PreparedData interface over Python's own sources, byte-level (no tokenizer)."""

    tokenizer = None
    vocab_size = 256
    heldout_name = "validation"

    def __init__(self) -> None:
        from desmoe.data.text_corpus import TextCorpusConfig, load_byte_corpus

        self.splits = dict(zip(("train", "validation"), load_byte_corpus(TextCorpusConfig(max_bytes=2_000_000))))

    def batches(self, split, micro_batch, seq_len, seed, rank, world, step=0, domains=None, homogeneous=False):
        from desmoe.data.text_corpus import sample_windows

        while True:
            yield {"input_ids": sample_windows(self.splits[split], micro_batch, seq_len, seed, step, rank)}
            step += 1


def open_data(cfg: PretrainData):
    if cfg.source == "stdlib_bytes":
        return StdlibBytes()
    try:
        from desmoe.data import PreparedData
    except ImportError:
        raise UserError("data.source=prepared needs desmoe.data.PreparedData, which this checkout lacks "
                        "(use data.source=stdlib_bytes)") from None
    return PreparedData(cfg.root)


def vocab_of(data) -> tuple[int, dict]:
    tok = data.tokenizer
    if tok is None:
        return data.vocab_size, {}
    size = len(tok) if hasattr(tok, "__len__") else tok.get_piece_size()
    ids = {f"{k}_id": getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return size, ids


def lr_at(step: int, cfg: PretrainTrain) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model, ids: torch.Tensor, aux_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(ids[:, :-1]).logits.float()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return lm + aux_coef * total_aux_loss(model), lm.detach()


def _eval_batches(data, cfg: PretrainExperiment, rank: int, world: int) -> list[torch.Tensor]:
    it = data.batches(data.heldout_name, cfg.train.micro_batch, cfg.train.seq_len + 1, cfg.train.seed + 7, rank,
                      world, 0, cfg.data.domains, False)
    return [next(it)["input_ids"] for _ in range(cfg.train.eval_batches)]


@torch.no_grad()
def evaluate(model, batches, device) -> float:
    model.eval()
    loss = torch.stack([lm_loss(model, b.to(device), 0.0)[1] for b in batches]).mean()
    model.train()
    return _mean_over_ranks(loss)


def unigram_nll(data, cfg: PretrainExperiment, vocab: int, heldout: list[torch.Tensor], rank: int, world: int) -> float:
    """Held-out NLL of an add-one unigram model of the training tokens (all ranks' counts)."""
    import deepspeed.comm as dist

    counts = torch.ones(vocab, dtype=torch.float64)
    it = data.batches("train", cfg.train.micro_batch, cfg.train.seq_len + 1, cfg.train.seed, rank, world, 0,
                      cfg.data.domains, False)
    for _ in range(cfg.train.unigram_batches):
        counts += torch.bincount(next(it)["input_ids"].reshape(-1), minlength=vocab)[:vocab].double()
    if dist.is_initialized():
        dist.all_reduce(counts)
        counts -= world - 1  # the add-one prior was summed once per rank
    logp = (counts / counts.sum()).log()
    nll = torch.stack([-logp[b[:, 1:].reshape(-1)].mean() for b in heldout]).mean().float()
    return _mean_over_ranks(nll)


def _cached(cfg: PretrainExperiment) -> Optional[dict]:
    report = Path(cfg.output.dir) / "report.json"
    if not (cfg.output.reuse and report.is_file()):
        return None
    saved = json.loads(report.read_text())
    same = saved.get("config") == {k: to_dict(cfg)[k] for k in ("model", "data", "train")}
    return saved if same else None


def pretrain(cfg: PretrainExperiment, ds_config_path: str) -> dict:
    import deepspeed.comm as dist

    from desmoe.distributed import init_distributed, is_rank0
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.models.hf_moe import export_hf, load_hf_moe

    cached = _cached(cfg)
    if cached is not None:
        print(f"embedded base already built: {cfg.output.dir} (held-out perplexity {cached['heldout_ppl']:.2f}); "
              f"set output.reuse=false to retrain", flush=True)
        return cached
    ds_raw = read_ds_config(ds_config_path)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % cfg.model.ep_size:
        raise bad("model.ep_size", f"a divisor of the world size {world}", cfg.model.ep_size)
    data = open_data(cfg.data)
    vocab, special = vocab_of(data)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    init_dir, ckpt_dir = run_dir / "init", run_dir / "checkpoints"
    if is_rank0() and not (init_dir / "config.json").is_file():
        write_initial_checkpoint(hf_config(cfg.model, vocab, **special), init_dir, cfg.model.seed)
    dist.barrier()
    model = load_hf_moe(init_dir, ep_size=cfg.model.ep_size)
    engine, _ = build_engine(model, resolve_ds_config(ds_raw, cfg.train.micro_batch, lr=cfg.train.lr))
    state = checkpoint.load(engine, ckpt_dir) if cfg.run.resume else None
    start = state["step"] if state else 0
    if is_rank0():
        checkpoint.write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
        truncate_metrics(run_dir, after_step=start)
    heldout = _eval_batches(data, cfg, rank, world)
    batches = data.batches("train", cfg.train.micro_batch, cfg.train.seq_len + 1, cfg.train.seed, rank, world, start,
                           cfg.data.domains, False)
    preemption = Preemption()
    monitor = Monitor(run_dir, cfg.train.steps, initial_step=start, desc=f"pretrain {cfg.run.name}")
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.train.steps):
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.train)
            loss, lm = lm_loss(engine.module, next(batches)["input_ids"].to(engine.device), cfg.train.aux_loss_coef)
            if not torch.isfinite(loss):
                raise TrainingFailure(f"non-finite loss ({loss.item()}) at step {step + 1} on rank {rank}; "
                                      f"resume from {ckpt_dir} with a lower train.lr")
            engine.backward(loss)
            engine.step()
            done = step + 1
            monitor.progress(1, loss=lm.item())
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                tokens = cfg.train.micro_batch * cfg.train.seq_len * world * (done - start)
                _log_train(monitor, engine, done, loss, lm, cfg.train.aux_loss_coef, tokens / (time.perf_counter() - t0))
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                monitor.scalars(done, {"val/loss": evaluate(engine.module, heldout, engine.device)})
            if done % cfg.train.save_every == 0 or done == cfg.train.steps:
                checkpoint.save(engine, ckpt_dir, done)
            elif preemption.requested():
                checkpoint.save(engine, ckpt_dir, done)
                monitor.close()
                announce(done, is_rank0())
                raise Preempted(done)
    finally:
        monitor.close()
    heldout_nll = evaluate(engine.module, heldout, engine.device)
    unigram = unigram_nll(data, cfg, vocab, heldout, rank, world)
    export_hf(engine.module, cfg.output.dir, tokenizer=_hf_tokenizer(data.tokenizer))
    report = {"heldout_ppl": math.exp(heldout_nll), "unigram_ppl": math.exp(unigram), "heldout_nll": heldout_nll,
              "unigram_nll": unigram, "steps": cfg.train.steps, "vocab_size": vocab,
              "parameters": _count_parameters(engine.module),
              "train_tokens": cfg.train.steps * cfg.train.micro_batch * cfg.train.seq_len * world,
              "wall_s_this_run": time.perf_counter() - t0, "run_dir": str(run_dir),
              "config": {k: to_dict(cfg)[k] for k in ("model", "data", "train")}}
    if is_rank0():
        text = json.dumps(report, indent=2)
        checkpoint.write_text_atomic(run_dir / "report.json", text)
        checkpoint.write_text_atomic(Path(cfg.output.dir) / "report.json", text)  # last: marks the export complete
        _summarize(run_dir, report, cfg.output.dir)
    dist.barrier()
    return report


def _hf_tokenizer(tok):
    return tok if tok is not None and hasattr(tok, "save_pretrained") else None


def _count_parameters(model) -> int:
    """All parameters of the full model (routed experts counted on every EP rank once)."""
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
        plot_curves(run_dir / "loss.png", {"train": train, "held-out": val}, ylabel="cross-entropy (nats/token)")
        print(ascii_curve(train, label="train loss, nats/token"), flush=True)
    print(f"held-out perplexity {report['heldout_ppl']:.2f} vs unigram {report['unigram_ppl']:.2f} "
          f"({report['parameters'] / 1e6:.1f}M parameters, {report['train_tokens'] / 1e6:.2f}M training tokens)",
          flush=True)
    print(f"base model: {out_dir}  (tensorboard --logdir {run_dir / 'tensorboard'})", flush=True)
