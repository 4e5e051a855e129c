"""Batched greedy generation and log-likelihood scoring for the evaluations.

Works for any causal LM that maps ``input_ids [B, T]`` to logits (a transformers
model, one converted by ``load_hf_moe``, or desmoe's ``MoELM``).  Sequences are
right-padded: with causal attention a position never sees the padding after
it, so no attention mask is needed and models without one work too.  HF models
generate with their KV cache (left-padded, with attention mask and position
ids); other models recompute the whole prefix each step.

Expert parallelism: every forward of an EP model is a collective, so all ranks
must make the same number of calls.  ``greedy_generate`` keeps going until
every rank's sequences are finished, and callers must give every rank the same
number of batches.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from desmoe.collectives import any_rank


def _logits(model: nn.Module, ids: Tensor, **kwargs) -> Tensor:
    out = model(ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "prepare_inputs_for_generation")


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` and drops the old name in 5.40, after which
    it would land in ``**kwargs`` and be ignored: every step would then see one token and no past.  Older
    releases (the GPU machines' 5.17) know only the old name."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes it on
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _device(model: nn.Module):
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_id: Optional[int] = None, pad_id: int = 0, use_cache: Optional[bool] = None) -> list[list[int]]:
    """Greedy continuations (without the prompts), cut after ``eos_id`` when given."""
    was_training = model.training
    model.eval()
    use_cache = _is_hf(model) if use_cache is None else use_cache
    step = _cached_steps if use_cache else _recompute_steps
    out = step(model, [list(p) for p in prompts], max_new_tokens, eos_id, pad_id)
    model.train(was_training)
    return out


def _finished(new: list[list[int]], eos_id: Optional[int]) -> list[bool]:
    return [eos_id is not None and len(seq) > 0 and seq[-1] == eos_id for seq in new]


def _recompute_steps(model, prompts, max_new, eos_id, pad_id) -> list[list[int]]:
    device = _device(model)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    buf = torch.full((len(prompts), int(lengths.max()) + max_new), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    new: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)
    for t in range(max_new):
        done = _finished(new, eos_id)
        if not any_rank(not all(done)):  # EP: every rank forwards until all ranks are done
            break
        end = int(lengths.max()) + t if prompts else 0
        nxt = _logits(model, buf[:, :max(end, 1)])[rows, lengths + t - 1].argmax(-1)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                new[i].append(tok)
                buf[i, lengths[i] + t] = tok
    return new


def _cached_steps(model, prompts, max_new, eos_id, pad_id) -> list[list[int]]:
    device = _device(model)
    width = max((len(p) for p in prompts), default=1)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding keeps every last token in the same column
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    new: list[list[int]] = [[] for _ in prompts]
    past, kwarg = None, _cache_kwarg(model)
    step_ids = ids
    for _ in range(max_new):
        done = _finished(new, eos_id)
        if not any_rank(not all(done)):  # EP: every rank forwards until all ranks are done
            break
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
        out = model(step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kwarg: past})
        past = getattr(out, kwarg)
        nxt = out.logits[:, -1].argmax(-1)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                new[i].append(tok)
        step_ids = nxt.unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return new


@torch.no_grad()
def score_continuations(model: nn.Module, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        max_len: Optional[int] = None, pad_id: int = 0) -> list[tuple[float, int, bool]]:
    """Per pair: (sum of log p(continuation | context), continuation length, whether
    greedy decoding would produce exactly the continuation).  Contexts are cut from
    the left when context + continuation exceeds ``max_len``."""
    was_training = model.training
    model.eval()
    device = _device(model)
    seqs, starts = [], []
    for ctx, cont in zip(contexts, continuations):
        if not cont:
            raise ValueError("empty continuation")
        seq = list(ctx) + list(cont)
        if max_len is not None:
            seq = seq[-(max_len + 1):]  # +1: the first token is only ever an input
        seqs.append(seq)
        starts.append(len(seq) - len(cont))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    logprobs = F.log_softmax(_logits(model, ids[:, :-1]).float(), dim=-1)
    results = []
    for i, s in enumerate(seqs):
        pos = torch.arange(max(starts[i] - 1, 0), len(s) - 1, device=device)
        target = ids[i, pos + 1]
        lp = logprobs[i, pos]
        results.append((lp.gather(1, target[:, None]).sum().item(), len(pos), bool((lp.argmax(-1) == target).all())))
    model.train(was_training)
    return results


@torch.no_grad()
def mean_nll(model: nn.Module, batches, counted=None) -> float:
    """Mean next-token negative log-likelihood (nats) over ``[B, T]`` token batches; exp() of it is the
    perplexity.  ``counted``: per batch a ``[B, T]`` bool tensor, whose positions 1.. say which labels count
    (None: all of them)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, ids in enumerate(batches):
        ids = ids.to(_device(model))
        logits = _logits(model, ids[:, :-1]).float()
        flat, labels = logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        keep = slice(None) if counted is None else counted[i][:, 1:].reshape(-1).to(labels.device)
        total += F.cross_entropy(flat[keep], labels[keep], reduction="sum").item()
        count += labels[keep].numel()
    model.train(was_training)
    return total / max(count, 1)
