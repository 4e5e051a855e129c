"""Downstream and general evaluation of a causal LM on a prepared data folder.

One call, ``evaluate_lm(model, data, cfg)``, gives the numbers both the DES-MoE
comparison and the base-model report need:

- ``mcq/<domain>``: accuracy on the domain's multiple-choice items, each choice
  scored by the log-likelihood of its text after the prompt;
- ``math/exact``: exact match of the greedy answer to a generated math question;
- ``ppl/<domain>``: perplexity on the domain's test split, ``ppl/general_heldout``
  on the held-out general text that is never trained on (forgetting);
- ``exact/<domain>``: closed-book exact match on the domain's instruction facts (data folders built
  with an ``instruct`` section: ``eval/exact-<domain>.jsonl``, prompts already rendered);
- ``downstream/mean``: the mean exact match over the training domains that have exact-match tasks,
  else the mean MCQ accuracy.

``mcq/<domain>``, ``math/exact`` and ``exact/<domain>`` are lm-evaluation-harness's numbers
(``desmoe.evaluation.harness``, the data folder's task YAMLs); the scorers below compute the same numbers independently
(``tests/test_harness.py``) and serve ``mcq_norm: per_token``, which has no harness metric.

Expert parallelism makes every forward a collective, so every rank runs the
same items in the same batches; results are identical on all ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from desmoe.config import bad
from desmoe.data.tokenizer import encode_pairs, generation_prompts, prefixed
from desmoe.models.generate import greedy_generate, mean_nll, score_continuations

NORMS = ("per_char", "per_token", "sum")


@dataclass
class LMEvalConfig:
    items_per_task: int = 200        # first N items of each task (the sets are already shuffled by data_prep)
    batch_size: int = 16
    max_len: int = 512               # context is cut from the left beyond this
    ppl_tokens: int = 20000          # per domain; perplexity on the first N test tokens
    ppl_seq_len: int = 256
    math_max_new_tokens: int = 12
    exact_max_new_tokens: int = 24   # answers of the exact-match tasks are <= 40 characters
    exact_rephrased: bool = True     # also ask the exact-match facts in a wording never trained on
    # How choices of different lengths are compared. per_char follows the usual
    # "acc_norm" reading (log-likelihood per character of the choice), which does
    # not favour short choices the way a plain sum does.
    mcq_norm: str = "per_char"

    def check(self) -> None:
        for key in ("items_per_task", "batch_size", "max_len", "ppl_tokens", "ppl_seq_len", "math_max_new_tokens",
                    "exact_max_new_tokens"):
            if getattr(self, key) < 1:
                raise bad(f"eval.{key}", "a positive integer", getattr(self, key))
        if self.mcq_norm not in NORMS:
            raise bad("eval.mcq_norm", " or ".join(NORMS), self.mcq_norm)
        for key in ("math_max_new_tokens", "exact_max_new_tokens"):  # else a prompt would be cut to one token
            if getattr(self, key) >= self.max_len:
                raise bad(f"eval.{key}", f"fewer tokens than eval.max_len={self.max_len} (a prompt keeps "
                                         f"max_len - new tokens)", getattr(self, key))


def _chunks(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def mcq_accuracy(model: nn.Module, tokenizer, items, cfg: LMEvalConfig) -> float:
    """Share of items whose highest-scoring choice is the answer."""
    # prompt + " " + choice encoded whole and split as the harness adapter does (encode_pairs), so both
    # scorers score the same tokens, those the model sees for the text
    pairs = encode_pairs(tokenizer, [it.prompt for it in items for _ in it.choices],
                         [" " + c for it in items for c in it.choices])
    contexts, conts = [c for c, _ in pairs], [t for _, t in pairs]
    lengths = [len(c) + 1 for it in items for c in it.choices]
    scores = []
    for batch in _chunks(list(range(len(conts))), cfg.batch_size):
        res = score_continuations(model, [contexts[j] for j in batch], [conts[j] for j in batch],
                                  max_len=cfg.max_len, pad_id=tokenizer.pad_id)
        scores.extend(res)
    choice_index = 0
    correct = 0
    for i, it in enumerate(items):
        values = []
        for c in range(len(it.choices)):
            logp, n_tok, _ = scores[choice_index]
            norm = {"sum": 1.0, "per_token": n_tok, "per_char": lengths[choice_index]}[cfg.mcq_norm]
            values.append(logp / norm)
            choice_index += 1
        pick = max(range(len(values)), key=values.__getitem__)
        correct += int(pick == it.answer)
    return correct / max(len(items), 1)


def math_answers(model: nn.Module, tokenizer, items, cfg: LMEvalConfig) -> list[str]:
    """The model's greedy answer to each question: the first line of its continuation."""
    answers = []
    for batch in _chunks(generation_prompts(tokenizer, [math_prompt(it.question) for it in items], cfg.max_len,
                                             cfg.math_max_new_tokens)[0], cfg.batch_size):
        outs = greedy_generate(model, batch, cfg.math_max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        answers.extend(first_line(tokenizer.decode(out, skip_special=True)) for out in outs)
    return answers


def math_exact(model: nn.Module, tokenizer, items, cfg: LMEvalConfig) -> float:
    """Share of questions whose greedy answer equals the reference exactly."""
    answers = math_answers(model, tokenizer, items, cfg)
    return sum(a == it.answer.strip() for a, it in zip(answers, items)) / max(len(items), 1)


def math_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def exact_items(data, domain: str) -> list[dict]:
    """The exact-match items of ``domain`` (empty when the folder has none)."""
    import json

    path = data.meta["eval"].get("exact", {}).get(domain)
    return [json.loads(line) for line in (data.root / path).read_text().splitlines() if line.strip()] if path else []


def normalise(text: str) -> str:
    """The exact-match normalisation: the one the task YAMLs' ``utils.py`` defines (a single copy)."""
    import importlib.util

    global _UTILS
    if _UTILS is None:
        spec = importlib.util.spec_from_file_location("desmoe_task_utils", Path(__file__).parent / "tasks" / "utils.py")
        _UTILS = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_UTILS)
    return _UTILS.normalise(text)


_UTILS = None


def exact_answers(model: nn.Module, tokenizer, items: list[dict], cfg: LMEvalConfig) -> list[str]:
    """Greedy answers to the items' rendered prompts, cut at end-of-text."""
    answers = []
    for batch in _chunks(generation_prompts(tokenizer, [it["prompt"] for it in items], cfg.max_len,
                                            cfg.exact_max_new_tokens)[0], cfg.batch_size):
        outs = greedy_generate(model, batch, cfg.exact_max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        answers += [tokenizer.decode(o[:o.index(tokenizer.eos_id)] if tokenizer.eos_id in o else o, skip_special=True)
                    for o in outs]
    return answers


def exact_recall(model: nn.Module, tokenizer, items: list[dict], cfg: LMEvalConfig) -> float:
    """Share of items whose normalised greedy answer equals the normalised reference."""
    answers = exact_answers(model, tokenizer, items, cfg)
    return sum(normalise(a) == normalise(it["answer"]) for a, it in zip(answers, items)) / max(len(items), 1)


def perplexity(model: nn.Module, tokenizer, docs: list[str], cfg: LMEvalConfig) -> float:
    """exp(mean next-token NLL) over the first ``ppl_tokens`` tokens of the documents, laid out as the
    training data lays them (the tokenizer's prefix, the text, end-of-text) and cut into ``ppl_seq_len + 1``
    windows.  A prefix (BOS) is no label, as in training (``DomainSampler(prefix_len=)``) and in lm-eval's
    rolling windows: after an end-of-text it is certain, and counting it would lower the perplexity."""
    stream: list[int] = []
    label: list[bool] = []
    for ids in prefixed(tokenizer, docs):
        k = min(len(tokenizer.prefix), len(ids))  # as the sampler: a document's first prefix_len tokens
        stream.extend(list(ids) + [tokenizer.eos_id])
        label.extend([False] * k + [True] * (len(ids) - k + 1))
        if len(stream) >= cfg.ppl_tokens + 1:
            break
    stream, label = stream[:cfg.ppl_tokens + 1], label[:cfg.ppl_tokens + 1]
    width = cfg.ppl_seq_len + 1
    cut = [slice(i, i + width) for i in range(0, len(stream) - 1, cfg.ppl_seq_len) if i + width <= len(stream)]
    cut = cut or [slice(0, len(stream))]  # shorter than one window: the whole stream
    batches = [torch.tensor([stream[c] for c in chunk], dtype=torch.long) for chunk in _chunks(cut, cfg.batch_size)]
    counted = None if all(label) else [torch.tensor([label[c] for c in chunk]) for chunk in _chunks(cut, cfg.batch_size)]
    return math.exp(mean_nll(model, batches, counted))  # None: no prefix, every label counts


# mcq_norm -> the harness metric that scores the same way (tests/test_harness.py)
HARNESS_METRIC = {"per_char": "acc_norm", "sum": "acc"}


def harness_scores(model: nn.Module, data, cfg: LMEvalConfig, mcq: list[str], math_on: bool,
                   exact: Sequence[str] = ()) -> dict[str, float]:
    """``mcq/<domain>``, ``math/exact`` and ``exact/<domain>`` through lm-evaluation-harness (every rank
    takes part)."""
    import tempfile

    from desmoe.evaluation import harness

    with tempfile.TemporaryDirectory(prefix="desmoe-tasks-") as tmp:
        harness.task_dir(data.root, tmp, max_gen_toks=cfg.math_max_new_tokens, exact_gen_toks=cfg.exact_max_new_tokens)
        names = [f"desmoe_mcq_{d}" for d in mcq] + (["desmoe_math"] if math_on else [])
        names += [f"desmoe_exact_{d}" for d in exact]
        names += [f"desmoe_exact_{d}_rephrased" for d in exact] if cfg.exact_rephrased else []
        lm = harness.make_lm(model, data.tokenizer, batch_size=cfg.batch_size, max_len=cfg.max_len)
        res = harness.run(lm, names, tmp, limit=cfg.items_per_task)
    out = {f"mcq/{d}": float(res[f"desmoe_mcq_{d}"][HARNESS_METRIC[cfg.mcq_norm]]) for d in mcq}
    if math_on:
        out["math/exact"] = float(res["desmoe_math"]["exact_match"])
    out.update({f"exact/{d}": float(res[f"desmoe_exact_{d}"]["exact_match"]) for d in exact})
    if cfg.exact_rephrased:
        out.update({f"exact_rephrased/{d}": float(res[f"desmoe_exact_{d}_rephrased"]["exact_match"]) for d in exact})
    return out


def evaluate_lm(model: nn.Module, data, cfg: Optional[LMEvalConfig] = None,
                domains: Optional[list[str]] = None, progress: bool = False) -> dict[str, float]:
    """All evaluation numbers of ``model`` on the prepared data folder ``data``."""
    cfg = cfg or LMEvalConfig()
    cfg.check()
    sets = data.eval_sets()
    tok = data.tokenizer
    domains = list(domains or data.domains)
    mcq = [d for d in domains if sets.mcq.get(d)]
    math_on = bool(sets.math) and "math" in domains
    exact = [d for d in domains if d in data.meta["eval"].get("exact", {})]
    if cfg.mcq_norm in HARNESS_METRIC:  # downstream scores are lm-evaluation-harness's own numbers
        steps = [("harness", lambda: harness_scores(model, data, cfg, mcq, math_on, exact))]
    else:  # per_token has no harness metric: the in-house scorer
        steps = [(f"mcq/{d}", lambda d=d: mcq_accuracy(model, tok, sets.mcq[d][:cfg.items_per_task], cfg)) for d in mcq]
        if math_on:
            steps.append(("math/exact", lambda: math_exact(model, tok, sets.math[:cfg.items_per_task], cfg)))
        steps += [(f"exact/{d}", lambda d=d: exact_recall(model, tok, exact_items(data, d)[:cfg.items_per_task], cfg))
                  for d in exact]
    steps += [(f"ppl/{d}", lambda d=d: perplexity(model, tok, sets.heldout_text[d], cfg))
              for d in domains if sets.heldout_text.get(d)]
    steps.append(("ppl/general_heldout", lambda: perplexity(model, tok, sets.heldout_general, cfg)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(steps), desc="evaluate", leave=False)
    out: dict[str, float] = {}
    for key, run in steps:
        value = run()
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = float(value)
        if bar is not None:
            bar.set_postfix_str(key)
            bar.update()
    if bar is not None:
        bar.close()
    out.update(downstream_mean(out, domains))
    return out


def downstream_mean(scores: dict[str, float], domains: Sequence[str]) -> dict[str, float]:
    """``downstream/mean`` over ``domains``: their exact-match scores when the data has any, else their MCQ
    accuracies (``{}`` when neither)."""
    for prefix in ("exact/", "mcq/"):
        got = [scores[f"{prefix}{d}"] for d in domains if f"{prefix}{d}" in scores]
        if got:
            return {"downstream/mean": sum(got) / len(got)}
    return {}
