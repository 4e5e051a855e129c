"""What a pretraining run reports: a unigram baseline on the same held-out targets, the model's size
(experts of every EP rank counted) and the console summary."""
from __future__ import annotations

from pathlib import Path

import torch

from desmoe.collectives import mean_over_ranks
from desmoe.monitor import loss_curves, tensorboard_command


def unigram_nll(counts: torch.Tensor, batches: list[torch.Tensor]) -> float:
    """Held-out NLL of an add-one unigram model of the training tokens, on the same targets."""
    logp = ((counts.double() + 1) / (counts.sum() + len(counts))).log()
    nll = torch.stack([-logp[b[:, 1:].reshape(-1)].mean() for b in batches]).mean().float()
    return mean_over_ranks(nll)


def count_parameters(model) -> int:
    """All parameters of the full model (routed experts of other EP ranks included)."""
    from desmoe.moe import moe_blocks

    total = sum(p.numel() for p in model.parameters())
    for block in moe_blocks(model):
        per_expert = sum(p.numel() for p in block.local_experts.parameters()) // len(block.local_experts)
        total += per_expert * (block.num_experts - len(block.local_experts))
    return total


def print_summary(run_dir: Path, report: dict, out_dir: str) -> None:
    loss_curves(run_dir, "held-out general", "nats/token", val_key="val/loss/general")
    print(f"training domains' test split: perplexity {report['test_ppl']:.2f} vs unigram "
          f"{report['test_unigram_ppl']:.2f}", flush=True)
    print(f"held-out general perplexity {report['heldout_ppl']:.2f} vs unigram {report['unigram_ppl']:.2f} "
          f"({report['parameters'] / 1e6:.1f}M parameters, {report['train_tokens'] / 1e6:.2f}M training tokens, "
          f"{report['train_s_this_run']:.0f} s of training)", flush=True)
    print(f"base model: {out_dir}  ({tensorboard_command(run_dir / 'tensorboard')})", flush=True)
