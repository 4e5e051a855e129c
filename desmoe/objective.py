"""The next-token objective and the held-out evaluator, once for every language-model recipe."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.collectives import mean_over_ranks
from desmoe.moe import total_aux_loss


def next_token_loss(model: nn.Module, input_ids: Tensor, loss_mask: Optional[Tensor] = None) -> Tensor:
    """Mean next-token NLL of a [B, T+1] batch (DES-MoE's Eq. 3); desmoe and HF models alike.

    ``loss_mask`` [B, T+1] (bool): the label at position t+1 counts iff ``loss_mask[:, t+1]``
    (instruction data: response tokens only).  The mean is per counted token over the whole
    micro-batch, not per sequence: a long response weighs more than a short one, as in the usual
    SFT recipes, and a fully counted batch gives exactly the unmasked loss.  A micro-batch with no
    counted label gives 0 (with a graph, so every rank still runs backward)."""
    out = model(input_ids[:, :-1])
    logits = getattr(out, "logits", out)  # HF models return an output object
    flat = logits.float().reshape(-1, logits.shape[-1])
    if loss_mask is None:
        return F.cross_entropy(flat, input_ids[:, 1:].reshape(-1))
    keep = loss_mask[:, 1:].reshape(-1).to(flat.device)
    nll = F.cross_entropy(flat, input_ids[:, 1:].reshape(-1), reduction="none")
    # where() rather than multiply: a masked label never enters the sum, even as 0 * nan
    return torch.where(keep, nll, torch.zeros_like(nll)).sum() / keep.sum().clamp_min(1)


def lm_loss(model: nn.Module, input_ids: Tensor, aux_coef: float,
            loss_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(next-token NLL + aux_coef * load balancing, the detached NLL)."""
    lm = next_token_loss(model, input_ids, loss_mask)
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
