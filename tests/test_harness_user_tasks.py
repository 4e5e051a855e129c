"""Users' own lm-evaluation-harness task YAMLs through ``desmoe.evaluation.harness.run``: features whose
numbers the adapter or ``run`` could report wrongly (several filters on one metric, the harness's aliases
of ``max_gen_toks``, sampling) and inputs refused in one line.  Real harness, a real tokenizer, offline;
the model is the known-output ``Successor`` of tests/test_harness_inputs.py."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from instructfix import docstrings, hf_tokenizer
from test_harness_inputs import Successor

from desmoe.errors import UserError

ROWS = [{"q": f"What is {q}?", "a": q} for q, _ in docstrings()[:6]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm

    tmp = tmp_path_factory.mktemp("user_tasks")
    tok = HFTokenizer(hf_tokenizer(tmp / "tok", [a for _, a in docstrings()]))
    return make_lm(Successor(tok.vocab_size), tok)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _task(tmp: Path, name: str, body: str, rows=ROWS) -> Path:
    """A folder of its own with one task ``name`` over a JSONL of ``rows`` (a list of dicts, or the file's text)."""
    data = tmp / f"{name}.jsonl"
    data.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp / f"{name}_tasks"
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: "
                                         f"{{test: '{data}'}}}}\ntest_split: test\n" + body)
    return folder


def test_two_filters_on_one_metric_are_both_reported(lm, tmp_path):
    """A GSM8K-style task scores exact_match after two filters; run() cut every key at its comma, so the
    second filter's number overwrote the first's under one bare 'exact_match'."""
    from desmoe.evaluation.harness import run

    # target "": the strict filter (nothing matches, fallback "") scores 1, the raw generation scores 0
    folder = _task(tmp_path, "two_filters", """output_type: generate_until
doc_to_text: '{{q}}'
doc_to_target: "{{''}}"
generation_kwargs: {until: [], max_gen_toks: 3, do_sample: false}
filter_list:
  - name: strict
    filter: [{function: regex, regex_pattern: "(zzzz)", fallback: ""}, {function: take_first}]
  - name: raw
    filter: [{function: take_first}]
metric_list: [{metric: exact_match}]
""")
    samples: dict = {}
    got = run(lm, ["two_filters"], folder, limit=4, samples=samples)["two_filters"]
    for name in ("strict", "raw"):  # the harness's own per-document scores
        own = [s["exact_match"] for s in samples["two_filters"] if s["filter"] == name]
        assert len(own) == 4 and got[f"exact_match,{name}"] == sum(own) / 4
    assert (got["exact_match,strict"], got["exact_match,raw"]) == (1.0, 0.0) and "exact_match" not in got


@pytest.mark.parametrize("key", ["max_new_tokens", "max_tokens", "max_completion_tokens"])
def test_the_harness_aliases_of_max_gen_toks_set_the_budget(lm, tmp_path, key):
    """lm-eval's HFLM reads max_new_tokens (and max_tokens, max_completion_tokens) as max_gen_toks; the
    adapter read max_gen_toks alone and generated its default 256 tokens for such a task."""
    from desmoe.evaluation.harness import run

    samples: dict = {}
    folder = _task(tmp_path, "alias", "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
                                      f"generation_kwargs: {{until: [], {key}: 3}}\n")
    run(lm, ["alias"], folder, limit=2, samples=samples)
    for s in samples["alias"]:  # the successor model never stops early: the text is the budget's
        want = lm.generate_until([SimpleNamespace(args=(s["arguments"][0][0], {"until": [], "max_gen_toks": 3}))])
        assert s["resps"][0] == want and want != lm.generate_until(
            [SimpleNamespace(args=(s["arguments"][0][0], {"until": [], "max_gen_toks": 4}))])


@pytest.mark.parametrize("kwargs, line", [
    ("do_sample: true", "task samples: generation_kwargs.do_sample: True with temperature 0.0: expected greedy "
                        "decoding (do_sample: false), the only decoding desmoe's harness model does"),
    ("temperature: 0.7", "task samples: generation_kwargs.do_sample: None with temperature 0.7: expected greedy "
                         "decoding (do_sample: false), the only decoding desmoe's harness model does"),
    ("do_sample: false, num_beams: 4", "task samples: generation_kwargs.num_beams: 4, expected none of it: "
                                       "desmoe's harness model decodes greedily with "),
])
def test_sampling_and_other_decoding_options_are_refused_in_one_line(lm, tmp_path, kwargs, line):
    """HFLM samples for do_sample: true (or a temperature without do_sample) and passes num_beams and the
    like to generate(); the adapter decoded greedily whatever the task asked, under the task's name."""
    from desmoe.evaluation.harness import run

    folder = _task(tmp_path, "samples", "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
                                        f"generation_kwargs: {{until: [], max_gen_toks: 3, {kwargs}}}\n")
    with pytest.raises(UserError) as err:
        run(lm, ["samples"], folder, limit=2)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)
    # greedy with a temperature HFLM drops (do_sample: false) and sampling-only top_p / top_k still run
    folder = _task(tmp_path, "greedy", "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
                                       "generation_kwargs: {until: [], max_gen_toks: 3, do_sample: false, "
                                       "temperature: 0.7, top_p: 0.9, top_k: 5}\n")
    assert run(lm, ["greedy"], folder, limit=2)["greedy"]["exact_match"] == 0.0


@pytest.mark.parametrize("text, why", [
    (json.dumps(ROWS[0]) + "\n{oops\n" + json.dumps(ROWS[1]) + "\n", "line 2 is not JSON (Expecting property name "
                                                                     "enclosed in double quotes)"),
    (json.dumps(ROWS[0]) + "\n[1, 2]\n", "line 2 is not a JSON object"),
])
def test_a_malformed_json_lines_file_is_one_line(lm, tmp_path, text, why):
    """datasets stopped with a traceback ending in "An error occurred while generating the dataset", naming
    neither the file nor the line."""
    from desmoe.evaluation.harness import run

    folder = _task(tmp_path, "broken", "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n", text)
    with pytest.raises(UserError) as err:
        run(lm, ["broken"], folder, limit=2)
    assert str(err.value) == (f"{folder / 'broken.yaml'}: key 'dataset_kwargs.data_files.test': file "
                              f"{tmp_path / 'broken.jsonl'}: {why}")
    # a JSON document (a list of rows) and JSON lines with blank lines are read as datasets reads them
    for name, good in (("whole", json.dumps(ROWS)), ("blank", "\n".join(json.dumps(r) + "\n" for r in ROWS))):
        folder = _task(tmp_path, name, "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n", good)
        assert run(lm, [name], folder, limit=2)[name]["perplexity"] > 1


def test_a_yaml_that_is_no_mapping_is_skipped_as_the_harness_skips_it(lm, tmp_path):
    """A YAML in the include_path holding a list (a user's own notes, a vocabulary) crashed the file check
    with AttributeError: 'list' object has no attribute 'get'; the harness itself ignores it."""
    from desmoe.evaluation.harness import run, task_names

    folder = _task(tmp_path, "beside", "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n")
    (folder / "words.yaml").write_text("- alpha\n- beta\n")
    assert task_names(folder) == ["beside"]
    assert run(lm, ["beside"], folder, limit=2)["beside"]["perplexity"] > 1


def test_two_yamls_of_one_task_name_are_one_line(lm, tmp_path):
    """The harness registers the first YAML of a task name and skips the other with a warning: which
    file was evaluated under the name was not said in the results."""
    from desmoe.evaluation.harness import run, task_names

    folder = _task(tmp_path, "twice", "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "again.yaml").write_text((folder / "twice.yaml").read_text().replace("'{{q}}'", "'Q: {{q}}'"))
    line = f"{folder / 'twice.yaml'}: key 'task': twice is also the task of {folder / 'sub' / 'again.yaml'}; " \
           "expected one task of each name"
    for call in (lambda: task_names(folder), lambda: run(lm, ["twice"], folder, limit=2)):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == line


def test_a_tag_is_refused_in_one_line(lm, tmp_path):
    """A tag is among the harness's names, so run() took it, and then stopped with KeyError: the harness
    reports a tag's tasks, nothing under the tag."""
    from desmoe.evaluation.harness import run

    folder = _task(tmp_path, "tagged", "tag: my_tag\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\n"
                                       "doc_to_target: a\n")
    with pytest.raises(UserError) as err:
        run(lm, ["my_tag"], folder, limit=2)
    assert str(err.value) == f"task 'my_tag': a tag in {folder}, not a task; name its tasks"
    assert run(lm, ["tagged"], folder, limit=2)["tagged"]["perplexity"] > 1


def test_a_group_reports_its_tasks_numbers(lm, tmp_path):
    """run() kept the group's own entry alone: a group without aggregate_metric_list reported no number,
    its tasks' numbers were dropped, and samples= stopped with KeyError (the harness logs per task)."""
    from desmoe.evaluation.harness import run

    body = "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
    folder = _task(tmp_path, "part_a", body)
    (folder / "part_b.yaml").write_text((folder / "part_a.yaml").read_text().replace("task: part_a", "task: part_b")
                                        .replace("doc_to_target: a", "doc_to_target: q"))
    (folder / "plain.yaml").write_text("group: plain\ntask: [part_a, part_b]\n")
    (folder / "mean.yaml").write_text("group: mean\ntask: [part_a, part_b]\n"
                                      "aggregate_metric_list: [{metric: perplexity, weight_by_size: true}]\n")
    alone = {t: run(lm, [t], folder, limit=2)[t] for t in ("part_a", "part_b")}
    assert alone["part_a"]["perplexity"] != alone["part_b"]["perplexity"]
    samples: dict = {}
    for group in ("plain", "mean"):
        got = run(lm, [group], folder, limit=2, samples=samples)
        assert {t: got[t] for t in alone} == alone and sorted(samples) == ["part_a", "part_b"]
    want = (alone["part_a"]["perplexity"] + alone["part_b"]["perplexity"]) / 2  # two documents each
    assert got["mean"]["perplexity"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("files, splits, key, value", [
    ("{test: F}", "test_split: test\nvalidation_split: val\n", "validation_split", "val (test)"),
    ("{test: F}", "test_split: test\ntraining_split: tr\n", "training_split", "tr (test)"),
    ("{test: F}", "test_split: test\nfewshot_split: fs\nnum_fewshot: 1\n", "fewshot_split", "fs (test)"),
    ("F", "test_split: test\n", "test_split", "test (train)"),
])
def test_a_split_data_files_does_not_define_is_one_line(lm, tmp_path, files, splits, key, value):
    """datasets names the splits after data_files' keys (a bare file is 'train'); a task naming another
    split stopped the harness with a bare KeyError."""
    from desmoe.evaluation.harness import run

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    head = f"task: split\ndataset_path: json\ndataset_kwargs: {{data_files: {files.replace('F', repr(str(data)))}}}\n"
    (folder / "split.yaml").write_text(head + splits + "output_type: loglikelihood\ndoc_to_text: '{{q}}'\n"
                                                       "doc_to_target: a\n")
    with pytest.raises(UserError) as err:
        run(lm, ["split"], folder, limit=2)
    name, rest = value.split(" ", 1)
    assert str(err.value) == (f"{folder / 'split.yaml'}: key '{key}': {name}, expected a split of "
                              f"dataset_kwargs.data_files {rest}")
    (folder / "split.yaml").write_text(head.replace("{test: ", "{train: ") + "test_split: train\nfewshot_split: "
                                       "train\nnum_fewshot: 1\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\n"
                                       "doc_to_target: a\n")
    assert run(lm, ["split"], folder, limit=2)["split"]["perplexity"] > 1


def test_files_the_harness_does_not_index_are_not_checked(lm, tmp_path):
    """The duplicate-name and data-file checks read YAMLs the harness's index skips: a Jupyter checkpoint
    copy of a task (in .ipynb_checkpoints) was refused as a second task of the name, and so was an old-style
    YAML with a group key, which the harness reads as a group."""
    from desmoe.evaluation.harness import run, task_names

    folder = _task(tmp_path, "kept", "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "kept-checkpoint.yaml").write_text(
        (folder / "kept.yaml").read_text().replace("kept.jsonl", "moved.jsonl"))
    (folder / "grouped.yaml").write_text("group: kept_group\n" + (folder / "kept.yaml").read_text())
    assert task_names(folder) == ["kept"]
    assert run(lm, ["kept"], folder, limit=2)["kept"]["perplexity"] > 1
