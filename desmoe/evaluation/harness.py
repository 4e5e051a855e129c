"""lm-evaluation-harness on desmoe models: an in-process model adapter and the demo data's task YAMLs.

``DesmoeLM`` is an ``lm_eval`` model over any causal LM desmoe can run (an expert-parallel model in
training, or an exported HF folder loaded with ``load_hf_moe``).  Expert parallelism makes every forward
a collective, so **every rank answers every request** in the same batches: the adapter tells the harness
it is rank 0 of 1 on each process, and results are identical on all ranks.

Scoring is the in-house evaluator's (``desmoe.models.generate``) on the tokens lm-eval's own HF model
(``HFLM``, ``lm_eval --model hf`` on the exported folder) feeds for the same tokenizer, request by request
(``tests/test_harness_parity.py`` compares the two):
- ``loglikelihood(context, continuation)``: context + continuation tokenised whole, with the tokenizer's
  prefix (BOS of a Llama-style tokenizer), and split where the context's own tokens end
  (``desmoe.data.tokenizer.encode_pairs``), the sum of the continuation's log-probabilities, and whether it
  is the greedy continuation; an empty context is the prefix token (bos if defined, else eos);
- ``generate_until``: the prompt with the tokenizer's prefix, cut from the left to ``max_len - max_gen_toks``,
  greedy decoding up to ``max_gen_toks``, decoded without special tokens, cut at the first ``until`` string;
- ``loglikelihood_rolling``: the prefix token, then the document's default encoding (with its BOS, as HFLM
  encodes it), scored in disjoint windows of ``max_len``.

The task YAMLs shipped in ``desmoe/evaluation/tasks/`` describe the demo data's evaluation sets
(``eval/mcq-<domain>.jsonl``, ``eval/math.jsonl``, ``eval/exact-<domain>.jsonl`` of a prepared folder);
``task_dir`` copies them beside
a folder's files with the paths filled in, for ``--include_path``.  On the same items the harness's
``acc_norm`` equals the in-house ``mcq/<domain>`` (per-character normalisation) and its ``exact_match``
equals ``math/exact`` (``tests/test_harness.py``); ``desmoe_exact_<domain>``'s ``exact_match`` equals
``lm_tasks.exact_recall`` on the same items.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from torch import nn

from desmoe.data.tokenizer import encode_pairs, generation_prompts, prefixed
from desmoe.errors import UserError
from desmoe.models.generate import greedy_generate, score_continuations

TASKS = Path(__file__).resolve().parent / "tasks"
MAX_GEN_TOKS = 256  # a task without generation_kwargs.max_gen_toks: the harness's own models' default


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed (pip install lm_eval; `make setup` does)") from None
    return LM


def make_lm(model: nn.Module, tokenizer, batch_size: int = 16, max_len: int = 512):
    """An ``lm_eval`` LM over ``model`` with a desmoe tokenizer (encode/decode/eos_id/pad_id)."""
    LM = _lm_base()

    class DesmoeLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.batch, self.max_len = model, tokenizer, batch_size, max_len

        # every rank answers every request: EP forwards are collectives
        @property
        def rank(self) -> int:
            return 0

        @property
        def world_size(self) -> int:
            return 1

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, int, bool]]:
            out = []
            for i in range(0, len(pairs), self.batch):
                chunk = pairs[i:i + self.batch]
                out += score_continuations(self.model, [c for c, _ in chunk], [t for _, t in chunk],
                                           max_len=self.max_len, pad_id=self.tok.pad_id)
            return out

        def _report_cut(self, kind: str, cut: int, total: int) -> None:
            """Say how many requests were longer than the model sees: their contexts lose their beginning."""
            from desmoe.distributed import is_rank0

            if cut and is_rank0():  # on stderr: `python -m desmoe.evaluate` prints its JSON on stdout
                print(f"harness: {cut} of {total} {kind} requests are longer than max_len={self.max_len} "
                      f"tokens; their contexts were cut from the left (raise max_len)", file=sys.stderr, flush=True)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            # Encoded whole, then split (lm-eval's HF model does the same): encoded apart, a continuation got
            # a word-start mark the text does not have (sentencepiece's dummy prefix: a lone "\u2581" scored
            # before every choice) and lost its merges with the context.  An empty context (the harness's
            # unconditional requests, e.g. acc_mutual_info) is the prefix token, as in loglikelihood_rolling:
            # without it the continuation's first token would be left out of the sum.
            pairs = encode_pairs(self.tok, [r.args[0] for r in requests], [r.args[1] for r in requests])
            contexts, conts = [c for c, _ in pairs], [t for _, t in pairs]
            for cont in conts:  # the scorer would sum only the continuation's last max_len tokens
                if len(cont) > self.max_len:
                    raise UserError(f"harness: a continuation of {len(cont)} tokens is longer than max_len="
                                    f"{self.max_len}; raise max_len")
            self._report_cut("loglikelihood", sum(len(c) + len(t) > self.max_len + 1 for c, t in zip(contexts, conts)),
                             len(conts))
            return [(float(lp), bool(greedy)) for lp, _, greedy in self._score(list(zip(contexts, conts)))]

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for ids in prefixed(self.tok, [r.args[0] for r in requests]):
                # lm-eval's HFLM: the prefix token (bos if defined, else eos), then the document as its default
                # encoding gives it, BOS included: a BOS tokenizer's first window scores log p(<s> | <s>) too;
                # reproduced so that the number is the one `lm_eval --model hf` gives for the exported folder
                ids = [self.tok.prefix_id] + ids
                windows = [(ids[max(0, s - self.max_len):s], ids[s:s + self.max_len])
                           for s in range(1, len(ids), self.max_len)]
                out.append(float(sum(lp for lp, _, _ in self._score(windows))))
            return out

        def generate_until(self, requests) -> list[str]:
            for r in requests:
                _check_greedy(r.args[1], getattr(r, "task_name", None))
            gen = [_max_gen_toks(r.args[1]) for r in requests]
            if gen and max(gen) >= self.max_len:
                raise UserError(f"generation_kwargs.max_gen_toks: {max(gen)}, expected fewer than max_len="
                                f"{self.max_len} (the prompt gets max_len - max_gen_toks tokens); raise max_len")
            # Batches of one max_gen_toks each (HFLM groups by generation kwargs too): a batch decodes its
            # largest budget, so a prompt cut for a smaller one would run past max_len.  In request order
            # within a group, so a task whose requests share one budget is batched as before.
            answers: list[str] = [""] * len(requests)
            for budget in sorted(set(gen)):
                group = [i for i, g in enumerate(gen) if g == budget]
                for b in range(0, len(group), self.batch):
                    idx = group[b:b + self.batch]
                    for i, text in zip(idx, self._generate([requests[i] for i in idx], budget)):
                        answers[i] = text
            return answers

        def _generate(self, chunk, budget: int) -> list[str]:
            prompts, cut = generation_prompts(self.tok, [r.args[0] for r in chunk], self.max_len, budget)
            self._report_cut("generate_until", cut, len(chunk))
            answers = []
            for out, r in zip(greedy_generate(self.model, prompts, budget, eos_id=self.tok.eos_id,
                                              pad_id=self.tok.pad_id), chunk):
                out = out[:budget]
                if self.tok.eos_id in out:  # the answer ends at end-of-text (its text is no answer)
                    out = out[:out.index(self.tok.eos_id)]
                text = self.tok.decode(out, skip_special=True)  # HFLM's tok_decode skips special tokens
                for stop in _stops(r.args[1].get("until")):
                    text = text.split(stop, 1)[0]
                answers.append(text)
            return answers

    return DesmoeLM()


# generation_kwargs greedy decoding honours: top_p and top_k shape sampling only, which is refused
GREEDY_KEYS = {"until", "do_sample", "temperature", "top_p", "top_k", "max_gen_toks", "max_new_tokens", "max_tokens",
               "max_completion_tokens"}


def _check_greedy(kwargs: dict, task: Optional[str]) -> None:
    """The adapter decodes greedily: a task that samples (``do_sample: true``, or a temperature above 0 without
    ``do_sample``, as HFLM reads it) or passes other decoding options (num_beams, repetition_penalty,
    max_length, ...) would get greedy texts under its name; refused in one line."""
    where = f"task {task}: " if task else ""
    sample, temp = kwargs.get("do_sample"), float(kwargs.get("temperature") or 0.0)
    if sample or (sample is None and temp > 0):
        raise UserError(f"{where}generation_kwargs.do_sample: {sample!r} with temperature {temp}: expected greedy "
                        f"decoding (do_sample: false), the only decoding desmoe's harness model does")
    other = sorted(set(kwargs) - GREEDY_KEYS)
    if other:
        raise UserError(f"{where}generation_kwargs.{other[0]}: {kwargs[other[0]]!r}, expected none of it: desmoe's "
                        f"harness model decodes greedily with {', '.join(sorted(GREEDY_KEYS))} only")


def _max_gen_toks(kwargs: dict) -> int:
    """A request's generation budget as lm-eval's HFLM reads it: ``max_gen_toks``, else its aliases
    ``max_new_tokens``, ``max_tokens``, ``max_completion_tokens`` (in that order), else the default; reading
    ``max_gen_toks`` alone generated 256 tokens for a task's ``max_new_tokens: 32``."""
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        if kwargs.get(key) is not None:
            return int(kwargs[key])
    return MAX_GEN_TOKS


def _stops(until) -> list[str]:
    """A task's ``until``: one string (a YAML ``until: "\\n\\n"``, which the harness passes on as it is) or a
    list of them; iterating the string would cut the answer at any one of its characters."""
    if until is None:
        return []
    if isinstance(until, str):
        return [until] if until else []
    if isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        return [u for u in until if u]
    raise UserError(f"generation_kwargs.until: expected a string or a list of strings, got {until!r}")


def task_dir(data_root: str | Path, out: str | Path, max_gen_toks: int = 12, exact_gen_toks: int = 24) -> list[str]:
    """Write the demo tasks for the prepared folder ``data_root`` into ``out``; returns their names (tasks
    without items are left out)."""
    data_root, out = Path(data_root).resolve(), Path(out)
    meta_path = data_root / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{data_root}: not a prepared data folder (no meta.json)")
    ev = json.loads(meta_path.read_text())["eval"]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS / "utils.py", out / "utils.py")
    names = []
    templates = [("desmoe_math", "math.yaml", data_root / ev["math"], max_gen_toks)]
    templates += [(f"desmoe_mcq_{d}", "mcq.yaml", data_root / p, 0) for d, p in ev["mcq"].items()]
    for d, p in ev.get("exact", {}).items():  # the trained wording, and a held-out one
        templates += [(f"desmoe_exact_{d}", "exact.yaml", data_root / p, exact_gen_toks),
                      (f"desmoe_exact_{d}_rephrased", "exact.yaml", data_root / p, exact_gen_toks)]
    for name, template, data_file, gen_toks in templates:
        if not data_file.is_file():
            raise UserError(f"{data_file}: evaluation file of task {name} not found")
        if not data_file.read_text().strip():  # a folder of user domains: no math items (datasets would fail)
            continue
        text = (TASKS / template).read_text().replace("@TASK@", name).replace("@DATA_FILE@", str(data_file))
        text = text.replace("@PROMPT_FIELD@", "heldout_prompt" if name.endswith("_rephrased") else "prompt")
        text = text.replace("@MAX_GEN_TOKS@", str(int(gen_toks)))
        (out / f"{name}.yaml").write_text(text)
        names.append(name)
    return names


def task_names(include_path: str | Path) -> list[str]:
    """The tasks the harness finds in ``include_path``: each YAML's ``task:`` name, which need not be its
    file name, in sub-folders too (the harness reads ``**/*.yaml``); groups and tags are not listed."""
    from lm_eval.tasks import TaskManager

    check_task_files(include_path)
    return sorted(TaskManager(include_path=str(include_path), include_defaults=False).all_subtasks)


def check_task_files(include_path: str | Path) -> None:
    """Every ``data_files`` a task YAML names exists (the harness would fail deep inside ``datasets``); a
    glob pattern (``datasets`` accepts them) must match a file."""
    import glob

    import yaml

    seen: dict[str, Path] = {}
    for path in sorted(Path(include_path).glob("**/*.yaml")):  # the harness's own pattern
        if {"__pycache__", ".ipynb_checkpoints"} & set(path.parts):  # folders the harness's index skips
            continue
        try:
            cfg = yaml.load(path.read_text(), Loader=_FunctionLoader) or {}
        except yaml.YAMLError:
            raise UserError(f"{path}: not valid YAML") from None
        if not isinstance(cfg, dict):  # the harness skips a YAML that is no mapping (a list of anything)
            continue
        name = cfg.get("task")
        if isinstance(name, str) and "group" not in cfg:  # a task, as the harness's index reads a YAML (one
            # with a group key is a group, whatever its task key); of two, the harness keeps one, skips the other
            if name in seen:
                raise UserError(f"{path}: key 'task': {name} is also the task of {seen[name]}; expected one "
                                f"task of each name")
            seen[name] = path
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        # datasets names the splits after data_files' keys ("train" for a file or a list of them); a split
        # key naming another stopped the harness with a bare KeyError
        splits = sorted(files) if isinstance(files, dict) else ["train"]
        for key in ("test_split", "validation_split", "training_split", "fewshot_split"):
            if files and cfg.get("dataset_path") == "json" and cfg.get(key) is not None and cfg[key] not in splits:
                raise UserError(f"{path}: key '{key}': {cfg[key]}, expected a split of dataset_kwargs.data_files "
                                f"({', '.join(map(str, splits))})")
        for split, name in (files.items() if isinstance(files, dict) else [("", files)]):
            for f in [name] if isinstance(name, str) else name:
                if not (Path(f).is_file() or (glob.has_magic(str(f)) and any(map(os.path.isfile, glob.glob(str(f)))))):
                    raise UserError(f"{path}: key 'dataset_kwargs.data_files{'.' + split if split else ''}': "
                                    f"file {f} not found")
                if cfg.get("dataset_path") != "json":
                    continue
                for one in sorted(glob.glob(str(f))) if glob.has_magic(str(f)) else [f]:
                    error = _json_error(Path(one))
                    if error:  # datasets says only "An error occurred while generating the dataset"
                        raise UserError(f"{path}: key 'dataset_kwargs.data_files{'.' + split if split else ''}': "
                                        f"file {one}: {error}")


def _json_error(path: Path) -> Optional[str]:
    """Why ``datasets``' json loader cannot read ``path`` (one JSON document, or one JSON object a line), or
    None; files of other suffixes (compressed ones) are left to ``datasets``."""
    if path.suffix not in (".json", ".jsonl"):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                return f"line {n} is not JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"line {n} is not a JSON object"
    return None


class _FunctionLoader:
    """A YAML loader that accepts lm_eval's ``!function`` tags (their targets are not needed here)."""

    def __new__(cls, stream):
        import yaml

        loader = yaml.SafeLoader(stream)
        loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
        return loader


def run(lm, tasks: list[str], include_path: str | Path, limit: Optional[int] = None,
        samples: Optional[dict] = None) -> dict[str, dict[str, Any]]:
    """Run the harness offline on ``tasks``; returns {task: {metric: value}} (the harness's own numbers).
    Tasks run one at a time, so each one's requests are batched as the in-house evaluator batches them.
    ``samples``: filled with {task: [per-document record]} when given."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_task_files(include_path)
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"task '{unknown[0]}': not among the tasks in {include_path}")
    tags = [t for t in tasks if t in manager.all_tags]
    if tags:  # the harness runs a tag's tasks but reports no result under the tag: a KeyError below
        raise UserError(f"task '{tags[0]}': a tag in {include_path}, not a task; name its tasks")
    out = {}
    # The harness treats LOCAL_RANK > 0 as a tensor-parallel peer and returns nothing there; under EP every
    # rank is a whole evaluator of its own (rank 0 of 1), so each one must get the results.
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        # num_fewshot=None: a task's own num_fewshot holds (0 when it sets none; 0 here overrode a YAML's 5)
        results = [simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=None,
                                   log_samples=samples is not None, bootstrap_iters=0, verbosity="ERROR")
                   for task in tasks]
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank
    # A task's results hold it alone; a group's hold the group (its aggregate, if it defines one) and each of
    # its tasks, whose numbers were dropped (a group without aggregate_metric_list reported no number at all)
    for result in results:
        for task, entry in result["results"].items():
            metrics = {k: v for k, v in entry.items() if "_stderr" not in k and k != "alias"}
            # "metric,filter": the bare metric name unless two filters score it (a GSM8K-style strict and
            # flexible match), where it keeps the harness's own key; collapsed, one filter's number stood for both
            bare = [k.split(",")[0] for k in metrics]
            out[task] = {(b if bare.count(b) == 1 else k): v for b, (k, v) in zip(bare, metrics.items())}
        if samples is not None:  # per task: a group has no records of its own (samples[group] was a KeyError)
            samples.update(result["samples"])
    return out
