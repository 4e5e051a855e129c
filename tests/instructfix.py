"""A tiny instruction-tuning data folder built by the real pipeline (no downloads): domain 'qa'
holds the three instruction formats, domain 'prose' plain text; an HF byte-level BPE tokenizer
with a chat template.  Text: docstrings of the Python standard library (real, varied, no cache)."""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import pytest

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MODULES = ("json/__init__", "textwrap", "string", "shutil", "argparse", "pathlib/__init__", "functools",
           "random", "statistics", "calendar", "fractions", "difflib", "tempfile", "zipfile/__init__")


def docstrings(limit: int = 400) -> list[tuple[str, str]]:
    """(qualified name, first paragraph of its docstring) of stdlib functions, unique paragraphs."""
    lib, seen, out = Path(sysconfig.get_paths()["stdlib"]), set(), []
    for mod in MODULES:
        f = lib / f"{mod}.py"
        if not f.is_file():
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = (ast.get_docstring(node) or "").split("\n\n")[0].strip()
                if len(doc) > 60 and doc not in seen:
                    seen.add(doc)
                    out.append((f"{mod.split('/')[0]}.{node.name}", doc))
    return out[:limit]


def hf_tokenizer(out: Path, texts: list[str], chat: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat:
        tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


def records() -> tuple[dict[str, list[dict]], list[str]]:
    """file name -> records, by format; responses are the docstrings."""
    docs = docstrings()
    n = len(docs) // 4
    pc = [{"prompt": f"Question: what does {q} do?\nAnswer: ", "completion": a} for q, a in docs[:n]]
    io = [{"instruction": f"Describe {q}.", "input": "Be brief." if i % 2 else "", "output": a}
          for i, (q, a) in enumerate(docs[n:2 * n])]
    chat = [{"messages": [{"role": "system", "content": "You document Python."},
                          {"role": "user", "content": f"What is {q}?"}, {"role": "assistant", "content": a},
                          {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": f"See {q}."}]}
            for q, a in docs[2 * n:3 * n]]
    return {"pc.jsonl": pc, "alpaca.jsonl": io, "chat.jsonl": chat}, [a for _, a in docs[3 * n:]]


def profile(tmp: Path, folder: Path, tok: Path, **extra) -> Path:
    cfg = {"profile": "instruct", "seed": 5, "domains": {"qa": [], "prose": []}, "heldout": "heldout",
           "budget_tokens": 4000, "val_fraction": 0.15, "test_fraction": 0.15, "workers": 1, "min_chars": 20,
           "user_data": str(folder), "mathgen": {"enabled": False},
           "tokenizer": {"kind": "hf", "hf_path": str(tok)}, **extra}
    path = tmp / "instruct.yaml"
    path.write_text(json.dumps(cfg))
    return path


def user_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    for d in ("qa", "prose", "heldout"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    recs, prose = records()
    for name, rows in recs.items():
        (folder / "qa" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    half = len(prose) // 2
    (folder / "prose" / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[:half]))
    (folder / "heldout" / "h.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[half:]))
    return folder


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def instruct_data(tmp_path_factory) -> Path:
    """The folder, built once per session (a module-level cache: both test modules import this)."""
    if "out" not in _BUILT:
        _BUILT["out"] = build_instruct(tmp_path_factory.mktemp("instruct"))
    return _BUILT["out"]


def build_instruct(tmp: Path) -> Path:
    from data_prep.build import build

    folder = user_folder(tmp)
    recs, prose = records()
    tok = hf_tokenizer(tmp / "hf", [json.dumps(r) for rows in recs.values() for r in rows] + prose)
    build(str(profile(tmp, folder, tok)), tmp / "out", cache=tmp / "cache", quiet=True)
    return tmp / "out"
