"""Instruction form of the source domains (issue #16 item 2): question/short-answer records built from
the sources' structure, masked sample by sample; the exact-match tasks through lm-evaluation-harness
equal a direct computation on the same items; bad ``instruct`` values are one-line refusals."""
import json

import numpy as np
import pytest

from datafix import CACHE
from desmoe.errors import ConfigError

OVERRIDES = ["instruct.domains.law=records", "instruct.domains.math=mixed", "instruct.max_records=30",
             "instruct.exact_per_domain=8"]


@pytest.fixture(scope="module")
def instr(tmp_path_factory):
    from data_prep.build import build

    out = tmp_path_factory.mktemp("instr") / "tiny"
    build("tiny", out, cache=CACHE, overrides=OVERRIDES, quiet=True)
    return out


def test_records_masked_sample_by_sample(instr):
    from data_prep.instruct import facts  # noqa: F401  (the module the records come from)
    from desmoe.data import PreparedData

    data = PreparedData(instr)
    tok = data.tokenizer
    assert data.masked == ["law", "math"] and data.meta["instruct"]["template"] == "question_answer"
    for name in ("law", "math"):
        raw, ds, ms = data.raw("train", name), data.indexed(name, "train"), data.indexed(name, "train", mask=True)
        n_rec = 0
        for j, row in enumerate(raw):
            ids, mask = ds[j].tolist(), ms[j].astype(bool)
            if "~" not in row["doc_id"]:  # a plain document (mixed): every label counts
                assert name == "math" and mask.all()
                continue
            n_rec += 1
            body, keep = ids[:-1], mask[:-1]
            text = tok.decode(body)
            q, a = text.split("\nAnswer:", 1)
            assert q.startswith("Question: ") and mask[-1] and ids[-1] == tok.eos_id  # the eos is trained on
            # prompt tokens masked, response tokens not: the kept tokens are exactly the answer
            assert not keep[: keep.argmax()].any() and keep[keep.argmax():].all()
            assert tok.decode([t for t, k in zip(body, keep) if k]).strip() == a.strip()
            assert tok.decode([t for t, k in zip(body, keep) if not k]) == q + "\nAnswer:"
        # records-only: nothing but records; mixed: the records first, then the documents
        assert n_rec == 30 if name == "law" else 0 < n_rec == sum(1 for r in raw if "~" in r["doc_id"])
        if name == "math":
            kinds = ["~" in r for r in raw["doc_id"]]
            assert kinds == sorted(kinds, reverse=True)
    # through packing and blending: every run of counted labels in a batch is an answer + eos or plain text
    answers = {t.split("\nAnswer:", 1)[1].strip() for t in data.raw("train", "law")["text"]}
    batch = next(data.batches("train", 8, 64, seed=1, rank=0, world=1, domains=["law", "general"], homogeneous=False))
    seen = 0
    for ids, mask, dom in zip(batch.input_ids.tolist(), batch.loss_mask.tolist(), batch.token_domain.tolist()):
        for t, (i, m, d) in enumerate(zip(ids, mask, dom)):
            assert m or d == data.domain_id("law")  # general text is all ones
        law = data.domain_id("law")
        runs, cur = [], []
        for i, m, d in zip(ids, mask, dom):
            if d == law and m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        for r in runs:
            if r[-1] == tok.eos_id:
                seen += tok.decode(r[:-1]).strip() in answers
    assert seen > 0


def test_exact_tasks_harness_equals_direct(instr, tmp_path):
    import importlib.util

    from hf_tiny import tiny_config

    from desmoe.data.prepared import PreparedData
    from desmoe.evaluation.harness import TASKS, make_lm, run, task_dir
    from desmoe.evaluation.lm_tasks import LMEvalConfig, exact_answers, exact_items, normalise
    from desmoe.models.hf_build import write_initial_checkpoint
    from desmoe.models.hf_moe import load_hf_moe

    spec = importlib.util.spec_from_file_location("task_utils", TASKS / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.exact_match({"answer": "Art 21."}, [" art  21\nmore"]) == {"exact_match": 1.0}
    assert utils.exact_match({"answer": "A00-A09"}, ["A00-A0"]) == {"exact_match": 0.0}

    data = PreparedData(instr)
    cfg = tiny_config("olmoe")
    cfg.vocab_size = data.tokenizer.vocab_size
    model = load_hf_moe(write_initial_checkpoint(cfg, tmp_path / "m", seed=5)).eval()
    names = task_dir(data.root, tmp_path / "tasks")
    assert {"desmoe_exact_law", "desmoe_exact_math"} <= set(names)
    items = exact_items(data, "law")
    assert len(items) == 8
    answers = exact_answers(model, data.tokenizer, items, LMEvalConfig(batch_size=4))
    # three items get the model's own answer as reference (case and a final period changed): the
    # harness must count exactly those whose answer survives normalisation, and no other
    for it, a in zip(items[:3], answers):
        it["answer"] = a.strip().upper() + "."
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    text = (tmp_path / "tasks" / "desmoe_exact_law.yaml").read_text()
    (tmp_path / "tasks" / "desmoe_exact_law.yaml").write_text(
        text.replace(str((instr / "eval" / "exact-law.jsonl").resolve()), str(tmp_path / "items.jsonl")))
    samples: dict = {}
    got = run(make_lm(model, data.tokenizer, batch_size=4), ["desmoe_exact_law"], tmp_path / "tasks", samples=samples)
    harness = [s["resps"][0][0] for s in sorted(samples["desmoe_exact_law"], key=lambda s: s["doc_id"])]
    assert harness == answers
    want = sum(normalise(a) == normalise(it["answer"]) for a, it in zip(answers, items)) / len(items)
    assert want >= sum(bool(normalise(a)) for a in answers[:3]) / 8
    assert got["desmoe_exact_law"]["exact_match"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("override,expected", [
    ("instruct.domains.law=all", "key 'instruct.domains.law': expected 'records' or 'mixed', got 'all'"),
    ("instruct.domains.poetry=records", "key 'instruct.domains.poetry': expected a configured domain"),
    ("instruct.max_records=0", "key 'instruct.max_records': expected at least 1, got 0"),
])
def test_bad_instruct_values_are_one_line(override, expected):
    from data_prep.config import load_profile

    with pytest.raises(ConfigError) as err:
        load_profile("tiny", [override])
    assert expected in str(err.value) and "\n" not in str(err.value)
