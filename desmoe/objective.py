"""The next-token objective and the held-out evaluator, once for every language-model recipe."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.collectives import mean_over_ranks
from desmoe.moe import total_aux_loss


def next_token_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Mean next-token NLL of a [B, T+1] batch (DES-MoE's Eq. 3); desmoe and HF models alike."""
    out = model(input_ids[:, :-1])
    logits = getattr(out, "logits", out)  # HF models return an output object
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def lm_loss(model: nn.Module, input_ids: Tensor, aux_coef: float) -> tuple[Tensor, Tensor]:
    """(next-token NLL + aux_coef * load balancing, the detached NLL)."""
    lm = next_token_loss(model, input_ids)
    return lm + aux_coef * total_aux_loss(model), lm.detach()


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: Iterable[Tensor], device) -> float:
    """Mean next-token NLL over the batches, then over ranks (every rank the same number of batches:
    each forward of an expert-parallel model is a collective)."""
    was_training = model.training
    model.eval()
    loss = torch.stack([next_token_loss(model, b.to(device)) for b in batches]).mean()
    model.train(was_training)
    return mean_over_ranks(loss)
