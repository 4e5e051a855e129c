"""lm-evaluation-harness on inputs users bring: a task's ``until`` as one string, unconditional (empty
context) log-likelihoods, a task without ``max_gen_toks``, task files named otherwise than their task,
``data_files`` globs, and a tokenizer the model cannot embed.  Real harness, real tiny models, offline."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from instructfix import docstrings, hf_tokenizer
from desmoe.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class Successor(nn.Module):
    """A causal LM whose greedy next token is always (last token + 1) mod vocab, never end-of-text
    below it: generations are long, varied and known in advance."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 10 + self.w


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF tokenizer folder, a tiny OLMoE folder on that vocabulary without tokenizer files)."""
    from hf_tiny import tiny_config

    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.models.hf_build import write_initial_checkpoint

    tmp = tmp_path_factory.mktemp("harness_inputs")
    tok = hf_tokenizer(tmp / "tok", [a for _, a in docstrings()])
    cfg = tiny_config("olmoe")
    cfg.vocab_size = HFTokenizer(tok).vocab_size
    return tok, write_initial_checkpoint(cfg, tmp / "olmoe", seed=3)


def _req(*args):
    return SimpleNamespace(args=args)


def test_until_as_one_string_is_one_stop_sequence(tiny):
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm

    tok = HFTokenizer(tiny[0])
    lm = make_lm(Successor(tok.vocab_size), tok)
    prompt = "Return the value"
    free = lm.generate_until([_req(prompt, {"until": [], "max_gen_toks": 12})])[0]
    assert len(set(free)) > 3
    # a stop string whose first character occurs in the answer but which itself does not
    stop = free[len(free) // 2] + "\u2603"
    assert stop not in free
    as_list, as_string = (lm.generate_until([_req(prompt, {"until": u, "max_gen_toks": 12})])[0]
                          for u in ([stop], stop))
    assert as_list == as_string == free  # the harness passes a YAML's `until: "..."` on as one string
    cut = lm.generate_until([_req(prompt, {"until": free[4:7], "max_gen_toks": 12})])[0]
    assert cut == free[:free.index(free[4:7])]
    with pytest.raises(UserError, match=r"generation_kwargs\.until: expected a string or a list of strings, got 3"):
        lm.generate_until([_req(prompt, {"until": 3})])


def test_a_task_without_max_gen_toks_generates_as_the_harness_does(tiny):
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm

    tok = HFTokenizer(tiny[0])
    start = tok.encode(["x"])[0][-1]
    lm = make_lm(Successor(tok.vocab_size), tok)
    text = lm.generate_until([_req("x", {"until": []})])[0]
    # the successor chain from the prompt's last token: 256 tokens (lm_eval's default), not 32
    want = [(start + 1 + i) % tok.vocab_size for i in range(256)]
    assert tok.eos_id not in want[:40]
    want = want[:want.index(tok.eos_id)] if tok.eos_id in want else want
    assert text == tok.decode(want, skip_special=True) and len(want) > 32  # HFLM decodes without special tokens


def test_an_empty_context_scores_every_continuation_token(tiny):
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm
    from desmoe.models.generate import score_continuations
    from desmoe.models.hf_moe import load_hf_moe

    tok, model = HFTokenizer(tiny[0]), load_hf_moe(tiny[1]).eval()
    lm = make_lm(model, tok)
    cont = " the answer is json"
    ids = tok.encode([cont])[0]
    (got, _), = lm.loglikelihood([_req("", cont)])
    # lm-eval's prefix token: the tokenizer's bos (<s>, which it does not add to texts), else eos
    assert tok.prefix_id == tok.tok.bos_token_id != tok.eos_id
    (want, n, _), = score_continuations(model, [[tok.prefix_id]], [ids])
    assert n == len(ids) > 1 and got == pytest.approx(want, abs=1e-5)


def _env(tmp: Path) -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT),
                HF_DATASETS_CACHE=str(tmp / "hf_datasets"))


def test_a_task_named_otherwise_than_its_file_runs(tiny, tmp_path):
    tok, model = tiny
    rows = [{"question": f"What is {q}?", "choices": [q, "none"], "label": 0} for q, _ in docstrings()[:5]]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "my_tasks"
    (tasks / "more").mkdir(parents=True)
    yaml = ("task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: '{files}'}}}}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\ndoc_to_choice: choices\n"
            "doc_to_target: label\nmetric_list: [{{metric: acc}}]\n")
    (tasks / "mmlu.yaml").write_text(yaml.format(name="mmlu_local", files=tmp_path / "mmlu.jsonl"))
    (tasks / "more" / "other.yaml").write_text(yaml.format(name="mmlu_glob", files=tmp_path / "mm*.jsonl"))
    cmd = [sys.executable, "-m", "desmoe.evaluate", str(model), "--tokenizer", str(tok), "--include_path", str(tasks)]
    proc = subprocess.run(cmd + ["--tasks", "mmlu_local,mmlu_glob"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert got["mmlu_local"]["acc"] == got["mmlu_glob"]["acc"]  # the same five items, found through the glob
    proc = subprocess.run(cmd + ["--tasks", "mmlu"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=_env(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"desmoe: error: --tasks: 'mmlu' is not a task of {tasks} (tasks: mmlu_glob, mmlu_local)"), proc.stderr


def test_a_data_folder_of_user_domains_has_no_tasks_in_one_line(tiny, tmp_path):
    """A folder built from users' own domains has no MCQ and an empty math file: the harness's json loader
    raised StopIteration from deep inside datasets."""
    from instructfix import build_instruct

    data = build_instruct(tmp_path / "data")
    assert not (data / "eval" / "math.jsonl").read_text().strip()
    cmd = [sys.executable, "-m", "desmoe.evaluate", str(tiny[1]), "--data", str(data)]
    for extra, message in [([], f"{data}: no evaluation tasks to run (a data folder of user domains has no MCQ or "
                                f"math items; give your own task YAMLs with --include_path)"),
                           (["--tasks", "desmoe_math"], f"--tasks: 'desmoe_math' is not a task of {data} (tasks: none)")]:
        proc = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(tmp_path))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == "desmoe: error: " + message


def test_a_glob_matching_nothing_is_one_line(tmp_path):
    from desmoe.evaluation.harness import check_task_files

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.yaml").write_text(f"task: t\ndataset_kwargs: {{data_files: {tmp_path / 'none-*.jsonl'}}}\n")
    with pytest.raises(UserError, match=r"sub/t\.yaml: key 'dataset_kwargs\.data_files': file .*none-\*\.jsonl not found"):
        check_task_files(tmp_path)


def test_a_tokenizer_the_model_cannot_embed_is_one_line(tiny, tmp_path):
    from hf_tiny import tiny_config

    from desmoe.evaluate import evaluate
    from desmoe.models.hf_build import write_initial_checkpoint

    small = write_initial_checkpoint(tiny_config("olmoe"), tmp_path / "small", seed=3)  # 96 embedding rows
    (tmp_path / "t").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")
    (tmp_path / "t" / "t.yaml").write_text(f"task: t\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: "
                                           f"'{tmp_path / 'd.jsonl'}'}}}}\ntest_split: test\noutput_type: "
                                           f"generate_until\ndoc_to_text: q\ndoc_to_target: a\n")
    with pytest.raises(UserError) as err:
        evaluate(small, include_path=tmp_path / "t", tasks="all", tokenizer=tiny[0])
    assert str(err.value) == (f"tokenizer {tiny[0]}: 500 tokens, but the model {small} embeds only 96 (not its "
                              f"tokenizer; give the model's own with --tokenizer)")


def test_a_batch_size_of_zero_is_one_line(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "desmoe.evaluate", str(tiny[1]), "--tokenizer", str(tiny[0]),
                           "--include_path", str(tmp_path), "--batch_size", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "desmoe: error: --batch_size 0: expected a positive integer"), proc.stderr[-2000:]


def test_a_tasks_own_num_fewshot_is_kept(tiny, tmp_path):
    """run() passed num_fewshot=0 to the harness, which overrides every task's own value: a YAML's
    num_fewshot: 2 ran zero-shot without a word."""
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm, run

    rows = [{"q": f"What is {q}?", "a": q} for q, _ in docstrings()[:6]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = (f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: '{tmp_path / 'd.jsonl'}'}}}}\n"
            "test_split: test\nfewshot_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
            "doc_to_target: a\ngeneration_kwargs: {until: ['Question'], max_gen_toks: 4}\n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "shots.yaml").write_text("task: shots\nnum_fewshot: 2\n" + base)
    (tmp_path / "t" / "zero.yaml").write_text("task: zero\n" + base)
    tok = HFTokenizer(tiny[0])
    samples: dict = {}
    run(make_lm(Successor(tok.vocab_size), tok), ["shots", "zero"], tmp_path / "t", limit=3, samples=samples)
    for task, shots in (("shots", 2), ("zero", 0)):
        for s in samples[task]:
            context = s["arguments"][0][0]
            others = [r["q"] for r in rows if r["q"] != s["doc"]["q"] and r["q"] in context]
            assert context.endswith(s["doc"]["q"]) and len(others) == shots, (task, context)


def test_requests_longer_than_max_len_are_said_not_cut_silently(tiny, capsys):
    """Contexts beyond max_len lose their beginning, as in the harness's own models: now the count is printed;
    a continuation longer than max_len (only its tail would be summed) is refused."""
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm

    tok = HFTokenizer(tiny[0])
    lm = make_lm(Successor(tok.vocab_size), tok, max_len=8)
    long, short = "one two three four five six seven eight nine ten", "one"
    assert len(tok.encode([long])[0]) > 9
    lm.loglikelihood([_req(short, " two"), _req(long, " two")])
    lm.generate_until([_req(long, {"until": [], "max_gen_toks": 2})])
    err = capsys.readouterr().err
    assert "harness: 1 of 2 loglikelihood requests are longer than max_len=8 tokens" in err
    assert "harness: 1 of 1 generate_until requests are longer than max_len=8 tokens" in err
    lm.loglikelihood([_req(short, " two")])
    assert "harness:" not in capsys.readouterr().err
    with pytest.raises(UserError, match=r"harness: a continuation of \d+ tokens is longer than max_len=8"):
        lm.loglikelihood([_req(short, " " + long)])


def test_requests_of_different_max_gen_toks_never_run_past_max_len(tiny):
    """A batch decodes its largest budget: a prompt cut for a smaller one, batched with it, ran past max_len
    (a model whose positions end there would fail).  Budgets are batched apart, answers in request order,
    each the same as alone."""
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm

    class Recording(Successor):
        longest = 0

        def forward(self, ids):
            Recording.longest = max(Recording.longest, ids.shape[1])
            return super().forward(ids)

    tok = HFTokenizer(tiny[0])
    lm = make_lm(Recording(tok.vocab_size), tok, batch_size=4, max_len=16)
    long = "one two three four five six seven eight nine ten eleven twelve"
    reqs = [_req(long, {"until": [], "max_gen_toks": 2}), _req("one", {"until": [], "max_gen_toks": 10}),
            _req(long, {"until": [], "max_gen_toks": 3})]
    answers = lm.generate_until(reqs)
    assert Recording.longest <= 16
    assert answers == [lm.generate_until([r])[0] for r in reqs]


def test_a_desmoe_export_shipping_only_its_sentencepiece_model_is_evaluated_on_own_tasks(tmp_path):
    """An export of the embedded base ships the data's sentencepiece model alone (tokenizer.model). On your
    own task YAMLs (--include_path, which excludes --data) it stopped with "no tokenizer ... give --data";
    now it is read as training read it.  A folder desmoe did not export still needs --data or --tokenizer."""
    import shutil

    from tokfix import sentencepiece

    from desmoe.evaluate import load_tokenizer_for

    trained = sentencepiece(tmp_path / "spm")
    model = tmp_path / "export"
    model.mkdir()
    shutil.copy(trained.path, model / "tokenizer.model")
    with pytest.raises(UserError, match="no tokenizer in the model folder; give --data or --tokenizer"):
        load_tokenizer_for(model, None)
    (model / "desmoe-export.json").write_text('{"form": "desmoe_moe"}')
    tok = load_tokenizer_for(model, None)
    text = "def f(x):\n    return x + 1"
    assert (tok.kind, tok.prefix, tok.sp.encode(text)) == ("sentencepiece", [], trained.sp.encode(text))
