"""General-ability probes with signal on a real base (SmolLM2), as lm-evaluation-harness tasks.

The demo data's own sets (term -> definition MCQ, DeepMind math) are hard or near chance for a 135M
model.  These probes are built offline from a prepared data folder (its held-out English prose and
its dictionary items) plus a seeded generator, in formats a small instruct model can do, each with
its chance level:

- ``probe_prose``: held-out English prose (the folder's held-out test documents, decoded), rolling
  log-likelihood; bits per byte (chance: 8, a uniform byte) and word perplexity;
- ``probe_cloze``: the last word of a held-out sentence among 4 (3 distractors: last words of other
  sentences); acc (chance 1/4);
- ``probe_define``: dictionary definition -> the defined word among 4 (the general domain's GCIDE
  items reversed; distractors: other defined words); acc (chance 1/4);
- ``probe_arith``: a + b, a - b with a few-shot prefix, greedy exact match (chance ~1%: the answer
  is one of ~100 numbers);
- ``probe_copy``: repeat a word after two examples, greedy exact match (chance ~0).

``build_probes(data_root, out)`` writes the JSONL files, the task YAMLs and ``probes.json`` (the tasks,
their metric and chance level); ``python -m desmoe.evaluate MODEL --include_path OUT`` runs them.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import UserError

TASKS = Path(__file__).resolve().parent / "tasks"
PROBES = {  # task -> (headline metric, chance level, what chance means)
    "probe_prose": ("bits_per_byte", 8.0, "uniform over bytes"),
    "probe_cloze": ("acc", 0.25, "4 choices"),
    "probe_define": ("acc", 0.25, "4 choices"),
    "probe_arith": ("exact_match", 0.01, "one of ~100 numbers"),
    "probe_copy": ("exact_match", 0.0, "open answer"),
}
ROLLING = """task: probe_prose
dataset_path: json
dataset_kwargs:
  data_files:
    test: @DATA@
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
CHOICE = """task: @TASK@
dataset_path: json
dataset_kwargs:
  data_files:
    test: @DATA@
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: !function utils.spaced_choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
EXACT = """task: @TASK@
dataset_path: json
dataset_kwargs:
  data_files:
    test: @DATA@
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: @TOKENS@
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "\\\\A\\\\s*(\\\\S*)"
        fallback: ""
      - function: take_first
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""
WORD = re.compile(r"[A-Za-z]{4,}")
# what built a probe folder (build_settings): probes.json digests the items but not the settings, so a folder
# built with 50 items was reused by a run asked for 200 (launcher/realbase.py refuses that on this record)
BUILD_RECORD = "build.json"
# the code that turns a prepared folder into probe items: this file, the harness helpers copied beside the
# tasks, and the reader and tokenizer that decode the held-out prose (a changed decode is other prose)
PROBE_CODE = (Path(__file__), TASKS / "utils.py", Path(__file__).resolve().parents[1] / "data" / "prepared.py",
              Path(__file__).resolve().parents[1] / "data" / "tokenizer.py")


def probe_code() -> str:
    """Digest of PROBE_CODE, recorded in BUILD_RECORD: a folder built by other code holds other items."""
    return hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in PROBE_CODE)).hexdigest()[:16]


def check_probe_code(probes: str | Path) -> None:
    """Refuse, in one line, a probe folder named by the user whose BUILD_RECORD is missing or names other
    probe code (a generated folder is rebuilt instead: launcher/realbase.py ``probe_set``)."""
    record = Path(probes) / BUILD_RECORD
    have = json.loads(record.read_text()).get("code") if record.is_file() else None
    if have != probe_code():
        what = "has no build record" if not record.is_file() else f"was built by other probe code (code={have!r}, " \
                                                                  f"this code {probe_code()!r})"
        raise UserError(f"{record}: the probe folder {what}; build it again (make realbase, or remove the folder "
                        f"and run launcher/realbase.py)")


def _heldout_texts(data_root: Path, max_chars: int) -> list[str]:
    from desmoe.data.prepared import PreparedData

    data = PreparedData(data_root)
    ds = data.indexed(data.heldout_name, "test")
    texts, n = [], 0
    for i in range(len(ds)):
        ids = [int(t) for t in ds[i] if int(t) != data.tokenizer.eos_id]
        pre = data.tokenizer.prefix  # a document of a BOS tokenizer starts with it: no character of the prose
        texts.append(data.tokenizer.decode(ids[len(pre):] if ids[:len(pre)] == pre else ids))
        n += len(texts[-1])
        if n >= max_chars:
            break
    if not texts:
        raise UserError(f"{data_root}: the held-out set has no test documents")
    return texts


def cloze_items(texts: list[str], n: int, rng: random.Random) -> list[dict]:
    """Sentence-final words of prose: the sentence before it (with the previous one as context)."""
    sentences = [s.strip().replace("\n", " ") for t in texts for s in re.split(r"(?<=[.!?])\s+", t)]
    cases = []
    for prev, sent in zip(sentences, sentences[1:]):
        words = sent.rstrip(".!?\"'").split()
        if len(words) >= 8 and WORD.fullmatch(words[-1]):
            cases.append((f"{prev} {' '.join(words[:-1])}".strip(), words[-1]))
    pool = sorted({w for _, w in cases})
    if len(pool) < 4:
        raise UserError("held-out text too short for the cloze probe (fewer than 4 distinct final words)")
    items = []
    for prompt, word in rng.sample(cases, min(n, len(cases))):
        options = rng.sample([w for w in pool if w.lower() != word.lower()], 3) + [word]
        rng.shuffle(options)
        items.append({"prompt": prompt[-300:], "choices": options, "answer": options.index(word)})
    return items


def define_items(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """The general domain's dictionary MCQ reversed: the definition, then which word it defines."""
    pairs = [(r["prompt"], r["choices"][r["answer"]]) for r in rows if "gcide" in r.get("source", "")]
    words = sorted({_term(p) for p, _ in pairs} - {""})
    if len(words) < 4:
        raise UserError("fewer than 4 dictionary items (source gcide) for the definition probe")
    items = []
    for prompt, definition in rng.sample(pairs, len(pairs)):
        term = _term(prompt)
        if not term or term.lower() in definition.lower():  # the answer must not be in the question
            continue
        if len(items) == n:
            break
        options = rng.sample([w for w in words if w != term], 3) + [term]
        rng.shuffle(options)
        items.append({"prompt": f"Definition: {definition.strip()[:400]}\nThe word defined is:", "choices": options,
                      "answer": options.index(term)})
    return items


def _term(prompt: str) -> str:
    """The headword of a dictionary MCQ prompt (its first quoted or leading word)."""
    quoted = re.search(r"['\"“]([^'\"”]{2,40})['\"”]", prompt)
    head = quoted.group(1) if quoted else prompt.split(":")[0].split("\n")[0]
    return head.strip() if 0 < len(head.strip()) <= 40 else ""


def arith_items(n: int, rng: random.Random) -> list[dict]:
    shots = "2 + 3 = 5\n14 + 7 = 21\n9 - 4 = 5\n30 - 12 = 18\n"
    items = []
    for _ in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        op = rng.choice("+-")
        a, b = (a, b) if op == "+" else (max(a, b), min(a, b))
        items.append({"prompt": f"{shots}{a} {op} {b} =", "answer": str(a + b if op == "+" else a - b)})
    return items


def copy_items(words: list[str], n: int, rng: random.Random) -> list[dict]:
    shots = "Repeat the word.\nWord: window\nRepeat: window\nWord: garden\nRepeat: garden\n"
    return [{"prompt": f"{shots}Word: {w}\nRepeat:", "answer": w} for w in rng.sample(words, min(n, len(words)))]


def build_settings(data_root: str | Path, n: int = 50, prose_chars: int = 8000, seed: int = 0) -> dict:
    """The settings build_probes writes into BUILD_RECORD: its arguments and the data folder's meta.json
    (profile, seed, counts, tokenizer: a rebuilt folder with other data has another digest)."""
    meta = Path(data_root) / "meta.json"
    return {"n": n, "prose_chars": prose_chars, "seed": seed,
            "data_meta_sha256": hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else "",
            "code": probe_code()}


def build_probes(data_root: str | Path, out: str | Path, n: int = 50, prose_chars: int = 8000,
                 seed: int = 0) -> dict:
    """Write the probe tasks of the prepared folder ``data_root`` into ``out``; returns probes.json's content."""
    if n < 2:  # each probe needs an item; the copy probe takes n // 2 (an empty one failed in write_tasks)
        raise UserError(f"probes: n={n} items: expected 2 or more")
    data_root, out = Path(data_root).resolve(), Path(out)
    meta_path = data_root / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{data_root}: not a prepared data folder (no meta.json)")
    meta = json.loads(meta_path.read_text())
    mcq_general = meta["eval"]["mcq"].get("general")
    if mcq_general is None:
        raise UserError(f"{meta_path}: key 'eval.mcq.general' missing (the definition probe reads it)")
    rng = random.Random(seed)
    texts = _heldout_texts(data_root, prose_chars)
    cloze = cloze_items(_heldout_texts(data_root, 10 * prose_chars), n, rng)
    words = sorted({w.lower() for t in texts for w in WORD.findall(t)})
    dictionary = [json.loads(line) for line in open(data_root / mcq_general)]
    sets = {"probe_prose": [{"text": t} for t in texts], "probe_cloze": cloze,
            "probe_define": define_items(dictionary, n, rng), "probe_arith": arith_items(n, rng),
            "probe_copy": copy_items(words, n // 2, rng)}
    # written beside ``out`` and renamed into place: a rebuild that stops half way leaves the old folder whole,
    # not new items under the old build record
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        info = write_tasks(sets, tmp, dest=out)
        (tmp / BUILD_RECORD).write_text(json.dumps(build_settings(data_root, n, prose_chars, seed), indent=1) + "\n")
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def write_tasks(sets: dict[str, list[dict]], out: Path, dest: Path | None = None) -> dict:
    """The JSONL file and task YAML of each probe in ``sets`` (task -> rows), and probes.json; the YAMLs name
    the JSONL files in ``dest`` (default ``out``): the folder they will be read from."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS / "utils.py", out / "utils.py")
    for task, rows in sets.items():
        data_file = (Path(dest or out) / f"{task}.jsonl").resolve()
        (out / f"{task}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        template = ROLLING if task == "probe_prose" else CHOICE if "choices" in rows[0] else EXACT
        tokens = "3" if task == "probe_arith" else "5"
        (out / f"{task}.yaml").write_text(template.replace("@TASK@", task).replace("@DATA@", str(data_file))
                                          .replace("@TOKENS@", tokens))
    info = {task: {"metric": PROBES[task][0], "chance": PROBES[task][1], "chance_is": PROBES[task][2],
                   "items": len(rows), "sha256": hashlib.sha256((out / f"{task}.jsonl").read_bytes()).hexdigest()}
            for task, rows in sets.items()}  # the digests key cached evaluations to these items
    (out / "probes.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
