"""Held-out evaluation of a multi-domain run: next-token loss per domain during training, and the
downstream tasks (exact answers, MCQ, perplexities) of the prepared data at the end."""
from __future__ import annotations

import torch

from desmoe.collectives import mean_over_ranks
from desmoe.objective import next_token_loss

HELDOUT_KEY = "general_heldout"  # val/loss/<this>: the held-out set when a fine-tuning domain is named "general"


@torch.no_grad()
def evaluate(model, data, cfg, rank: int, world: int, device) -> dict[str, float]:
    """Held-out next-token loss per domain, their mean, and on the general (untrained) set."""
    model.eval()
    out = {}
    # the held-out set is "general" unless a fine-tuning domain is named so (configs/desmoe_6dom.yaml's): then that
    # domain was evaluated on the held-out text and its key overwritten, so domain_mean held the held-out loss;
    # the held-out set is then HELDOUT_KEY (the report's forgetting reads it: desmoe/recipes/des_moe/report.py)
    general = list(getattr(data, "general", None) or [])
    held = "general" if "general" not in data.domains else HELDOUT_KEY
    sets = [(name, [name]) for name in data.domains] + ([(held, general)] if general else [])
    for name, pick in sets:
        stream = data.batches("val", cfg.train.micro_batch, cfg.train.seq_len, cfg.train.seed + 7, rank, world, 0,
                              domains=pick, homogeneous=False)
        batches = [next(stream) for _ in range(cfg.train.eval_batches)]  # instruction data: responses only
        losses = [next_token_loss(model, b.input_ids.to(device), b.mask_for_loss(device)) for b in batches]
        out[f"val/loss/{name}"] = mean_over_ranks(torch.stack(losses).mean())
    model.train()
    out["val/loss/domain_mean"] = sum(out[f"val/loss/{d}"] for d in data.domains) / len(data.domains)
    return out


def downstream_eval(model, data, cfg) -> dict[str, float]:
    """Exact-answer / MCQ tasks and perplexities of the prepared data (every rank must call it).

    The data's "general" domain (what the embedded base was pretrained on) is always evaluated, also
    when it is not a fine-tuning domain: its test perplexity and MCQ accuracy are the general-ability
    probe in-distribution for the base (``ppl/general``, ``mcq/general``), next to the never-trained
    held-out text (``ppl/general_heldout``).  ``downstream/mean`` averages the fine-tuning domains only:
    their exact-match tasks when the data has them (instruction form), else their MCQ accuracies."""
    if not cfg.evaluation.downstream or not hasattr(data, "data"):
        return {}
    from desmoe.distributed import is_rank0
    from desmoe.evaluation.lm_tasks import LMEvalConfig, downstream_mean, evaluate_lm

    ev = LMEvalConfig(items_per_task=cfg.evaluation.items_per_task, ppl_tokens=cfg.evaluation.ppl_tokens,
                      max_len=cfg.evaluation.max_len, ppl_seq_len=cfg.evaluation.ppl_seq_len)
    probe = [d for d in ("general",) if d in data.data.domains and d not in data.domains]
    was_training = model.training
    model.eval()
    out = evaluate_lm(model, data.data, ev, domains=[*data.domains, *probe], progress=is_rank0())
    model.train(was_training)
    out.pop("downstream/mean", None)
    out.update(downstream_mean(out, data.domains))  # the fine-tuning domains only
    return {f"eval/{k}": v for k, v in out.items()}
