"""lm-evaluation-harness on desmoe models: the harness's numbers equal the in-house evaluator's."""
from pathlib import Path

import pytest

from desmoe.errors import UserError


@pytest.fixture(scope="module")
def model_and_data(tiny_data, tmp_path_factory):
    from hf_tiny import tiny_config

    from desmoe.data.prepared import PreparedData
    from desmoe.models.hf_build import write_initial_checkpoint
    from desmoe.models.hf_moe import load_hf_moe

    data = PreparedData(tiny_data)
    cfg = tiny_config("olmoe")
    cfg.vocab_size = data.tokenizer.vocab_size  # the data folder's own tokenizer
    path = write_initial_checkpoint(cfg, tmp_path_factory.mktemp("m") / "olmoe", seed=3)
    return load_hf_moe(path).eval(), data, path


def test_harness_equals_in_house_evaluator(model_and_data, tmp_path):
    from desmoe.evaluation.harness import make_lm, run, task_dir
    from desmoe.evaluation.lm_tasks import LMEvalConfig, math_answers, mcq_accuracy

    model, data, _ = model_and_data
    n, cfg = 12, LMEvalConfig(batch_size=8)
    sets, tok = data.eval_sets(), data.tokenizer
    names = task_dir(data.root, tmp_path / "tasks")
    assert "desmoe_math" in names and {f"desmoe_mcq_{d}" for d in sets.mcq} <= set(names)
    samples: dict = {}
    got = run(make_lm(model, tok, batch_size=8, max_len=cfg.max_len), names, tmp_path / "tasks", limit=n,
              samples=samples)
    for d in sets.mcq:
        want = mcq_accuracy(model, tok, sets.mcq[d][:n], cfg)
        assert got[f"desmoe_mcq_{d}"]["acc_norm"] == pytest.approx(want, abs=1e-12), d
    # math: the same greedy answer per question, and the same exact-match score
    answers = math_answers(model, tok, sets.math[:n], cfg)
    harness = [s["filtered_resps"][0] for s in sorted(samples["desmoe_math"], key=lambda s: s["doc_id"])]
    assert harness == answers
    exact = sum(a == it.answer.strip() for a, it in zip(answers, sets.math[:n])) / n
    assert got["desmoe_math"]["exact_match"] == pytest.approx(exact, abs=1e-12)


def test_task_yaml_pointing_at_a_missing_file_is_one_line(tmp_path):
    from desmoe.evaluation.harness import check_task_files

    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {tmp_path / 'none.jsonl'}\ndoc_to_choice: !function utils.f\n")
    with pytest.raises(UserError, match=r"t\.yaml: key 'dataset_kwargs\.data_files\.test': file .*none\.jsonl not found"):
        check_task_files(tmp_path)


def test_evaluate_cli_on_a_model_folder(model_and_data, tmp_path):
    import json
    import subprocess
    import sys

    from desmoe.evaluation.harness import make_lm, run, task_dir

    model, data, folder = model_and_data
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "desmoe.evaluate", str(folder), "--data", str(data.root),
                           "--tasks", "desmoe_mcq_law", "--limit", "6", "--out", str(tmp_path / "r.json")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "r.json").read_text())
    task_dir(data.root, tmp_path / "t")
    want = run(make_lm(model, data.tokenizer), ["desmoe_mcq_law"], tmp_path / "t", limit=6)
    assert got["desmoe_mcq_law"]["acc_norm"] == want["desmoe_mcq_law"]["acc_norm"]


def ep2_case(model_dir: str, data_root: str) -> dict:
    """Both ranks hold half the experts; the harness runs on both (every forward is a collective)."""
    from desmoe.data.prepared import PreparedData
    from desmoe.evaluation.lm_tasks import LMEvalConfig, evaluate_lm, mcq_accuracy
    from desmoe.models.hf_moe import load_hf_moe

    data = PreparedData(data_root)
    model = load_hf_moe(model_dir, ep_size=2).eval()
    cfg = LMEvalConfig(items_per_task=6, batch_size=4, ppl_tokens=200)
    out = evaluate_lm(model, data, cfg, domains=["law", "math"])
    sets = data.eval_sets()
    out["in_house/law"] = mcq_accuracy(model, data.tokenizer, sets.mcq["law"][:6], cfg)
    return out


def test_harness_in_process_on_two_ep_ranks(ranks, model_and_data):
    _, data, folder = model_and_data
    a, b = ranks.run(ep2_case, str(folder), str(data.root))
    assert a == b, "every rank must get the same numbers"
    assert {"mcq/law", "mcq/math", "math/exact", "ppl/law", "ppl/general_heldout"} <= set(a)
    assert a["mcq/law"] == a["in_house/law"]


def test_generation_room_not_below_max_len_is_one_line():
    """A prompt keeps max_len - new tokens: new tokens >= max_len would have cut every prompt to one token."""
    from desmoe.errors import ConfigError
    from desmoe.evaluation.lm_tasks import LMEvalConfig

    LMEvalConfig(max_len=32, exact_max_new_tokens=24).check()
    with pytest.raises(ConfigError, match=r"^key 'eval.exact_max_new_tokens': expected fewer tokens than "
                                          r"eval.max_len=16 .*got 24$"):
        LMEvalConfig(max_len=16, math_max_new_tokens=12, exact_max_new_tokens=24).check()
