"""Checks every training loop makes on each step."""
from __future__ import annotations

import torch

from desmoe.errors import TrainingFailure


def check_finite(loss: torch.Tensor, step: int, rank: int, ckpt_dir) -> None:
    """Stop the run in one line when the loss is NaN/inf: continuing would only write a
    poisoned checkpoint. The message says where to resume from and what to change."""
    if not torch.isfinite(loss):
        raise TrainingFailure(f"non-finite loss ({loss.item()}) at step {step} on rank {rank}; "
                              f"resume from {ckpt_dir} with a lower train.lr")
