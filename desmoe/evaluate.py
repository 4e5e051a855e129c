"""Standard evaluation with lm-evaluation-harness, offline, on a model folder desmoe can load.

    python -m desmoe.evaluate MODEL_DIR --data data/demo [--tasks all|t1,t2] [--limit N]
    python -m desmoe.evaluate MODEL_DIR --include_path my_tasks/ --tasks gsm8k_local [--tokenizer DIR]

``--data``: the prepared folder's own evaluation sets as harness tasks (``desmoe_math``,
``desmoe_mcq_<domain>``; YAMLs in ``desmoe/evaluation/tasks``).  ``--include_path``: the user's task
YAMLs pointing at local files (``dataset_path: json`` + ``dataset_kwargs.data_files``; docs/evaluation.md
shows GSM8K-, MMLU- and HumanEval-style ones).  The model is loaded with ``load_hf_moe`` (any family
desmoe supports, EP=1, this process), or, for a folder ``desmoe.export`` wrote with desmoe's MoE code
(``auto_map``, docs/export.md), with ``from_pretrained(trust_remote_code=True)`` as its users load it; it is
scored by ``desmoe.evaluation.harness.make_lm``.  The tokenizer
is the model folder's own when it has one, else the data folder's.  Prints one JSON object; ``--out``
also writes it (atomically).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from desmoe.errors import UserError, run_cli


def load_tokenizer_for(model_dir: Path, data_root: Path | None):
    from desmoe.data.tokenizer import HFTokenizer, SentencePieceTokenizer

    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        return HFTokenizer(model_dir)
    if data_root is not None:
        from desmoe.data.prepared import PreparedData
        return PreparedData(data_root).tokenizer
    if (model_dir / "tokenizer.model").is_file() and (model_dir / "desmoe-export.json").is_file():
        # desmoe's exports of the embedded base ship the data's sentencepiece model alone: with --include_path
        # (no --data) it is the tokenizer the model was trained with, read as training read it
        return SentencePieceTokenizer(model_dir / "tokenizer.model")
    raise UserError(f"{model_dir}: no tokenizer in the model folder; give --data or --tokenizer")


def load_model(model_dir: Path):
    """The folder as its users load it: a folder with desmoe's shipped MoE code (``model_type`` desmoe_moe and
    its ``auto_map``, see docs/export.md) through ``from_pretrained(trust_remote_code=True)``, any other HF MoE
    on desmoe's blocks (an ``auto_map`` there is not run)."""
    from desmoe import integrity
    from desmoe.models.hf_moe import load_hf_moe

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "desmoe_moe":
        # Any other folder runs on desmoe's blocks, as base.hf does, never on code the folder ships: a local
        # copy of a hub DeepSeek-V2/V3 folder carries an auto_map of its own modeling file, and was refused
        # here although training loads it; load_hf_moe refuses an architecture it does not know in one line
        return load_hf_moe(model_dir)
    from transformers import AutoModelForCausalLM

    integrity.verify(model_dir, "model folder")
    return AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, local_files_only=True)


def evaluate(model_dir: str | Path, data: str | Path | None = None, include_path: str | Path | None = None,
             tasks: str = "all", limit: int | None = None, tokenizer: str | Path | None = None,
             batch_size: int = 16, max_len: int = 512) -> dict:
    """{task: {metric: value}} from the harness for the model folder ``model_dir``."""
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm, run, task_dir, task_names

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model folder (config.json missing)")
    if (data is None) == (include_path is None):
        raise UserError("give exactly one of --data (the folder's own tasks) or --include_path (your task YAMLs)")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"{include_path}: --include_path is not a folder of task YAMLs")
    tok = HFTokenizer(tokenizer) if tokenizer else load_tokenizer_for(model_dir, Path(data) if data else None)
    with tempfile.TemporaryDirectory(prefix="desmoe-tasks-") as tmp:
        if data is not None:
            include, names = Path(tmp), task_dir(data, tmp)
        else:
            include = Path(include_path)
            names = task_names(include)  # the YAMLs' task: names (a file gsm8k.yaml may hold task: gsm8k_local)
        chosen = names if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
        where = data or include_path
        if not chosen:
            raise UserError(f"{where}: no evaluation tasks to run (" + (
                "a data folder of user domains has no MCQ or math items; give your own task YAMLs with "
                "--include_path)" if data else "no *.yaml file with a task: key)"))
        unknown = [t for t in chosen if t not in names]
        if unknown:
            raise UserError(f"--tasks: '{unknown[0]}' is not a task of {where} (tasks: {', '.join(names) or 'none'})")
        model = load_model(model_dir).eval()  # after the cheap checks: a large model loads for minutes
        check_vocab(tok, model, model_dir)
        return run(make_lm(model, tok, batch_size=batch_size, max_len=max_len), chosen, include, limit=limit)


def check_vocab(tok, model, model_dir: Path) -> None:
    """A token id the model has no embedding row for would stop the harness with an IndexError deep in torch
    (e.g. the data folder's tokenizer standing in for a model folder without one, or --tokenizer of another
    model)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tok.vocab_size > rows:
        raise UserError(f"tokenizer {tok.path}: {tok.vocab_size} tokens, but the model {model_dir} embeds only {rows} "
                        f"(not its tokenizer; give the model's own with --tokenizer)")


@run_cli
def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m desmoe.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="an HF model folder (exported by desmoe or your own)")
    parser.add_argument("--data", help="a prepared data folder: evaluate on its own evaluation sets")
    parser.add_argument("--include_path", help="a folder of lm-eval task YAMLs over local files")
    parser.add_argument("--tasks", default="all", help="comma-separated task names (default: all)")
    parser.add_argument("--limit", type=int, help="first N documents of each task")
    parser.add_argument("--tokenizer", help="an HF tokenizer folder (default: the model's, else the data's)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=512,
                        help="tokens the model sees per request; longer contexts are cut from the left (said)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected a positive integer")
    if args.batch_size < 1:  # range(0, n, 0) deep in the adapter
        raise UserError(f"--batch_size {args.batch_size}: expected a positive integer")
    if args.max_len < 1:
        raise UserError(f"--max_len {args.max_len}: expected a positive integer")
    result = evaluate(args.model_dir, args.data, args.include_path, args.tasks, args.limit, args.tokenizer,
                      args.batch_size, args.max_len)
    text = json.dumps(result, indent=1, sort_keys=True, default=float)
    print(text)
    if args.out:
        from desmoe.checkpoint import write_text_atomic
        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
