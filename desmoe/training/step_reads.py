"""What a training step reads back to the host: its losses, the recipe's shown numbers and the gradient check,
in one transfer (on a GPU each read waits for the device; one per step is the floor for a non-finite check
that stops the run at the step it happens)."""
from __future__ import annotations

from typing import Optional

import torch


def grads_finite(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """A device bool (None: no gradients), read back with the step's losses."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else None


def read_step(losses: list, values: list, grads_ok: Optional[torch.Tensor]) -> tuple[list, list, bool]:
    """The step's losses, shown numbers (floats or tensors) and gradient check on the host in ONE read-back (on a
    GPU the floor for a non-finite check that stops the run at its step); float64 holds float32/bf16 exactly."""
    shown = [j for j, v in enumerate(values) if isinstance(v, torch.Tensor)]
    parts = losses + [values[j] for j in shown] + ([] if grads_ok is None else [grads_ok])
    host = torch.stack([t.detach().reshape(()).to(parts[0].device, torch.float64) for t in parts]).tolist()
    values = [host[len(losses) + shown.index(j)] if j in shown else v for j, v in enumerate(values)]
    return host[:len(losses)], values, grads_ok is None or host[-1] > 0
