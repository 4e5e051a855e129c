"""The real-base report's cached evaluations (launcher/realbase.py ``cached_eval``): reused only while the
model, the probe set and the code that scores them are the same.  Before, a change of how texts become
tokens (session 17's whole-text pairs) left the older numbers in the report next to fresh ones."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launcher"))  # behind the package: a spawned rank must import desmoe/, not launcher/desmoe.py

import pytest  # noqa: E402
import realbase  # noqa: E402


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """(the models evaluated so far, a probe folder): ``realbase.evaluate`` replaced by a counter."""
    calls = []
    monkeypatch.setattr(realbase, "evaluate", lambda model, data, probes: calls.append(model) or {"heldout_ppl": 7.0})
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "probes.json").write_text(json.dumps({"probe_copy": {"metric": "acc"}}))
    return calls, probes


def test_cached_eval_is_redone_when_the_scoring_code_changes(tmp_path, monkeypatch, counted):
    calls, probes = counted
    path, model = tmp_path / "eval.json", tmp_path / "model"

    assert realbase.cached_eval(path, model, tmp_path, probes)["heldout_ppl"] == 7.0
    realbase.cached_eval(path, model, tmp_path, probes)
    assert len(calls) == 1  # same model, probes and code: reused

    digest = realbase._scoring_digest()
    monkeypatch.setattr(realbase, "_scoring_digest", lambda: "0" * 64)  # as after an edit of the scorer
    realbase.cached_eval(path, model, tmp_path, probes)
    assert len(calls) == 2 and json.loads(path.read_text())["scoring_sha256"] == "0" * 64
    assert len(digest) == 64 and digest != "0" * 64


def test_cached_eval_is_redone_when_a_probe_task_file_changes(tmp_path, monkeypatch):
    """probes.json keys the items (their sha256) but not how they are asked and scored: each task's YAML
    (generation kwargs, stop strings, metrics; written from probes.py's templates) and the metric code copied
    beside them (utils.py).  A probe set rebuilt with another template has the same probes.json, so its
    cached numbers were reported as if they were the new scoring's."""
    calls = []
    monkeypatch.setattr(realbase, "evaluate", lambda model, data, probes: calls.append(model) or {"heldout_ppl": 7.0})
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "probes.json").write_text(json.dumps({"probe_arith": {"metric": "exact_match"}}))
    (probes / "probe_arith.yaml").write_text("task: probe_arith\ngeneration_kwargs:\n  max_gen_toks: 3\n")
    (probes / "utils.py").write_text("def process_results(doc, results):\n    return {}\n")
    path, model = tmp_path / "eval.json", tmp_path / "model"

    realbase.cached_eval(path, model, tmp_path, probes)
    realbase.cached_eval(path, model, tmp_path, probes)
    assert len(calls) == 1
    (probes / "probe_arith.yaml").write_text("task: probe_arith\ngeneration_kwargs:\n  max_gen_toks: 5\n")
    realbase.cached_eval(path, model, tmp_path, probes)
    assert len(calls) == 2  # another template: redone
    (probes / "utils.py").write_text("def process_results(doc, results):\n    return {'exact_match': 1.0}\n")
    realbase.cached_eval(path, model, tmp_path, probes)
    assert len(calls) == 3  # other metric code: redone
    realbase.cached_eval(path, model, tmp_path, probes)
    assert len(calls) == 3


def test_a_healed_folder_is_reused_only_for_the_overrides_it_was_healed_with(tmp_path):
    """`--heal-override` heals another model: a finished healed-<moe>-<steps> folder of other overrides was
    reused silently and reported as this one.  Now the overrides are recorded; a folder healed before the
    record existed is reused with one line saying so."""
    import pytest

    from desmoe.errors import UserError

    moe = tmp_path / "moe-16x8"
    moe.mkdir()
    healed = tmp_path / "healed-moe-16x8-24"
    healed.mkdir()
    (healed / "report.json").write_text(json.dumps({"train_s_this_run": 5.0}))
    assert realbase.heal(moe, tmp_path, tmp_path, 24, 0)[1] == 5.0  # no record: reused
    (healed / realbase.HEAL_RECORD).write_text(json.dumps(["train.lr=1e-3"]))
    assert realbase.heal(moe, tmp_path, tmp_path, 24, 0, extra=("train.lr=1e-3",))[0] == healed
    with pytest.raises(UserError, match=r"healed-moe-16x8-24: healed with --heal-override \['train.lr=1e-3'\], "
                                        r"asked for none; remove the folder"):
        realbase.heal(moe, tmp_path, tmp_path, 24, 0)


def test_the_scoring_key_covers_the_forward_and_the_perplexity_path(tmp_path):
    """The key covers the code that makes the numbers, not only the scorer: a fixed MoE forward or kernel, or a
    changed held-out loss, gives other numbers under an unchanged model.  Code that only trains does not
    enter it (a re-score costs minutes)."""
    import shutil

    for rel in [*realbase.SCORING_CODE, "desmoe/training/trainer.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / rel).is_dir() else shutil.copy)(ROOT / rel, tmp_path / rel)
    before = realbase._scoring_digest(tmp_path)
    assert realbase._scoring_digest(tmp_path) == before
    for rel in ("desmoe/moe/layer.py", "desmoe/kernels/experts.c", "desmoe/objective.py", "desmoe/models/hf_moe.py",
                "desmoe/training/trainer.py"):
        original = (tmp_path / rel).read_bytes()
        (tmp_path / rel).write_bytes(original + b"\n")
        assert (realbase._scoring_digest(tmp_path) != before) == (rel != "desmoe/training/trainer.py"), rel
        (tmp_path / rel).write_bytes(original)
    assert realbase._scoring_digest(tmp_path) == before


def test_cached_eval_is_redone_for_other_heldout_windows_or_data(tmp_path, monkeypatch, counted):
    """The held-out perplexity is taken over EVAL_TOKENS tokens of ``data``'s general held-out split, in
    windows of EVAL_SEQ and batches of EVAL_BATCH (a mean of batch means): the key held EVAL_TOKENS only, so
    other windows, batches or another data folder reused the old number."""
    calls, probes = counted
    data, other = tmp_path / "data", tmp_path / "other"
    for d, profile in ((data, "small"), (other, "tiny")):
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"profile": profile}))
    path, model = tmp_path / "eval.json", tmp_path / "model"

    realbase.cached_eval(path, model, data, probes)
    realbase.cached_eval(path, model, data, probes)
    assert len(calls) == 1
    monkeypatch.setattr(realbase, "EVAL_SEQ", realbase.EVAL_SEQ * 2)
    realbase.cached_eval(path, model, data, probes)
    assert len(calls) == 2  # other windows: redone
    monkeypatch.setattr(realbase, "EVAL_BATCH", realbase.EVAL_BATCH + 1)
    realbase.cached_eval(path, model, data, probes)
    assert len(calls) == 3  # other batches: redone
    realbase.cached_eval(path, model, other, probes)
    assert len(calls) == 4  # another data folder: redone
    realbase.cached_eval(path, model, other, probes)
    assert len(calls) == 4
