"""What a real-base study row is keyed to, and the driver (#18): only rows of this protocol, this base
(its weights' digest) and this scoring (the probe set, the data, the scoring code: study.SCORED_BY) are
reused or reported, the others stay in the CSV; the cells the targets read run first; and a tiny study on
2 real ranks (EP=2) records its runs, skips finished ones, records a failed one and runs a cell again once
the probe set it was scored on is rebuilt.  The protocol, the CSV and the targets: test_realbase_study.py."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from test_realbase_study import GENERAL, PROTOCOL, ROOT, SCORED, _driver, _load, _row


def tiny_study(root: str, data: str, max_runs: int) -> list[str]:
    import torch.distributed as dist

    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy

    if dist.get_rank() == 0 and not Path(f"{root}/probes/probes.json").is_file():
        import torch
        from hf_tiny import tiny_config
        from transformers import AutoModelForCausalLM

        from desmoe.data.prepared import PreparedData
        from desmoe.evaluation.probes import build_probes

        cfg = tiny_config("qwen2_moe")  # a shared expert + routed experts, as the real base
        cfg.vocab_size = PreparedData(data).tokenizer.vocab_size
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(f"{root}/base")
        build_probes(data, f"{root}/probes", n=3, prose_chars=400)
        info = json.loads(Path(f"{root}/probes/probes.json").read_text())  # two probes: a lean test
        Path(f"{root}/probes/probes.json").write_text(json.dumps({t: info[t] for t in GENERAL}))
    dist.barrier()
    # grid order: fft, the broken arm (its setup fails), then the two the targets need
    arms = "{fft: {method: fft, lr: [0.001]}, " \
           "broken: {method: lora, lr: [0.001], overrides: ['desmoe.baseline.lora_targets=[no_such_layer]']}, " \
           "desmoe: {method: desmoe, lr: [0.001]}, esft_token: {method: esft_token, lr: [0.001]}}"
    cfg = load_config(RealbaseStudy, PROTOCOL, [
        f"experiment.data.source={data}", "experiment.data.domains=[law, code]", f"experiment.base.hf={root}/base",
        "experiment.train.seq_len=32", "experiment.train.eval_batches=1",
        "experiment.desmoe.baseline.esft_profile_tokens=64",
        f"experiment.run.dir={root}/runs", f"study.arms={arms}", "study.seeds=[0, 1]", "study.scaling_sizes=[1, 2]",
        # the cells the targets read run first (desmoe, fft, esft_token, headline, scaling): broken is one here
        "study.headline=[fft, broken]",
        "study.steps_per_domain=5", f"study.scores.probes={root}/probes", "study.scores.probe_limit=2",
        f"study.scores.general=[{', '.join(GENERAL)}]",
        "study.scores.heldout_tokens=256", "study.scores.heldout_seq=32", "study.scores.downstream_limit=2",
        # the tiny profile has no exact-match tasks: its MCQ stand in
        "study.scores.downstream_task=desmoe_mcq_{domain}", "study.scores.downstream_metric=acc",
        f"study.csv={root}/study.csv", f"study.doc={root}/doc.md", "study.name=tiny"])
    _driver().run_study(cfg, str(ROOT / "configs" / "zero2.json"), max_runs)
    return [r["run"] + ":" + r["status"] for r in csv.DictReader(open(f"{root}/study.csv"))]


def test_tiny_study_records_skips_and_keeps_failures(ranks, tiny_data, tmp_path):  # ~40 s quiet, 3-4 min at load 15
    first = ranks.run(tiny_study, str(tmp_path), str(tiny_data), 2)[0]
    assert first == ["base:ok", "fft-lr0.001-s0-N2:ok"]
    # a second launch skips the finished cells; the broken arm is recorded as failed, the study goes on
    second = ranks.run(tiny_study, str(tmp_path), str(tiny_data), 1)[0]
    assert second == first + ["broken-lr0.001-s0-N2:failed"]
    rows = list(csv.DictReader(open(tmp_path / "study.csv")))
    for r in rows:
        if r["status"] == "ok":
            assert 0 <= float(r["general_score"]) <= 1 and float(r["heldout_ppl"]) > 1
            assert r["protocol"] == rows[0]["protocol"] and float(r["general_score_se"]) >= 0
    assert "no_such_layer" in rows[2]["note"]
    # every row names the base it ran on; rows of another base count for nothing
    from desmoe.recipes.des_moe.study import base_digest, read_rows

    assert {r["base_sha256"] for r in rows} == {base_digest(tmp_path / "base")}
    assert len(read_rows(tmp_path / "study.csv", rows[0]["protocol"], base_digest(tmp_path / "base"))) == 3
    assert read_rows(tmp_path / "study.csv", rows[0]["protocol"], "0123456789ab") == []
    assert not (tmp_path / "runs" / "tiny" / "tiny-fft-lr0.001-s0-N2" / "checkpoints").exists()  # dropped
    assert int(rows[1]["steps"]) == 10 and rows[1]["domains"] == "law+code"
    # every row names what scored it; the probe set rebuilt (here: its build record), the next launch runs the
    # base again instead of reusing it, and only that row counts under the new probe set
    from desmoe.recipes.des_moe.study import SCORED_BY, probe_set_digest

    scored = {k: rows[0][k] for k in SCORED_BY}
    assert all(len(v) == 12 for v in scored.values()) and all({k: r[k] for k in SCORED_BY} == scored for r in rows)
    record = tmp_path / "probes" / "build.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "prose_chars": 401}))
    third = ranks.run(tiny_study, str(tmp_path), str(tiny_data), 1)[0]
    assert third == second + ["base:ok"]
    now = {**scored, "probes_sha256": probe_set_digest(tmp_path / "probes")}
    assert now["probes_sha256"] != scored["probes_sha256"]
    assert [r["run"] for r in read_rows(tmp_path / "study.csv", rows[0]["protocol"], rows[0]["base_sha256"], now)] \
        == ["base"]


def test_base_digest_names_the_weights(tmp_path):
    from desmoe.errors import UserError
    from desmoe.recipes.des_moe.study import base_digest

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no config.json and"):
        base_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    first = base_digest(tmp_path)
    assert len(first) == 12 and base_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 3 + bytes([1]) + bytes(range(1, 256)))
    assert base_digest(tmp_path) != first  # one byte of the weights: another base


def test_report_is_about_the_base_the_rows_were_trained_from(tmp_path):
    """The built base while the protocol has rows on it; a machine whose build is another base re-renders a
    finished study from its rows' base (it used to render empty tables for the built one)."""
    from desmoe.recipes.des_moe.study import append_row, base_digest, protocol_ids

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(bytes(range(256)))
    cfg = _load([f"experiment.base.hf={base}", f"study.csv={tmp_path / 'runs.csv'}"])
    built, report_base = base_digest(base), _driver().report_base
    assert report_base(cfg) == built  # no rows yet
    row = {"run": "base", "phase": "base", "status": "ok", "protocol": protocol_ids(cfg)[0]}
    append_row(Path(cfg.study.csv), {**row, "base_sha256": "0123456789ab", "finished_utc": "2026-12-05T10:00:00Z"})
    append_row(Path(cfg.study.csv), {**row, "run": "fft", "base_sha256": "ba9876543210",
                                     "finished_utc": "2026-12-05T11:00:00Z"})
    assert report_base(cfg) == "ba9876543210"  # rows on other bases only: the latest row's
    append_row(Path(cfg.study.csv), {**row, "run": "esft", "base_sha256": built, "finished_utc": "2026-12-04T09:00:00Z"})
    assert report_base(cfg) == built  # the built base has rows: it is the one


def test_cells_the_targets_read_run_first(tmp_path):
    from desmoe.recipes.des_moe.study import protocol_ids

    cfg = _load([f"study.csv={tmp_path / 'r.csv'}"])
    todo, waiting = _driver().pending(cfg, (protocol_ids(cfg), "0123456789ab", SCORED), set())
    arms = [c.arm for c in todo]
    assert arms[0] == "vanilla" and set(arms[1:7]) == {"fft", "desmoe", "esft_token"}
    assert [todo[i].lr < todo[i + 3].lr for i in (1, 2, 3)] == [True] * 3  # every arm's first lr, then its second
    assert set(arms[7:]) == set(cfg.study.arms) - {"fft", "desmoe", "esft_token"}
    assert len(todo) == 1 + sum(len(a.lr) for a in cfg.study.arms.values()) and waiting
    # --first: the named arms' grid cells lead the other arms' at each lr (order only)
    todo2, _ = _driver().pending(cfg, (protocol_ids(cfg), "0123456789ab", SCORED), set(), ("desmoe_fig1", "lora"))
    assert [c.arm for c in todo2[7:9]] == ["desmoe_fig1", "lora"] and sorted(map(str, todo2)) == sorted(map(str, todo))
    assert todo2[7].lr == cfg.study.arms["desmoe_fig1"].lr[0] and todo2[-1].lr == cfg.study.arms[todo2[-1].arm].lr[-1]



def _scored_study(tmp_path: Path):
    """A protocol over a made-up probe folder, data folder and base (what the digests read, no model)."""
    probes, data, base = tmp_path / "probes", tmp_path / "data", tmp_path / "base"
    for folder, files in ((probes, {"probes.json": '{"probe_cloze": {"metric": "acc"}}', "build.json": '{"n": 3}'}),
                          (data, {"meta.json": "{}", "train.bin": "tokens", "timing.json": '{"write": 6}'}),
                          (base, {"config.json": "{}", "model.safetensors": "w"})):
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    return _load([f"study.csv={tmp_path / 'r.csv'}", f"study.doc={tmp_path / 'doc.md'}",
                  f"study.scores.probes={probes}", f"experiment.data.source={data}", f"experiment.base.hf={base}"])


def test_scoring_digests_name_the_probe_set_and_the_data(tmp_path):
    from desmoe.integrity import seal
    from desmoe.recipes.des_moe.study import data_digest, probe_set_digest

    _scored_study(tmp_path)
    probes, data = tmp_path / "probes", tmp_path / "data"
    first, unsealed = probe_set_digest(probes), data_digest(data)
    (probes / "build.json").write_text('{"n": 4}')  # the same items file, other settings or probe code
    assert probe_set_digest(probes) != first and len(first) == 12
    (data / "timing.json").write_text('{"write": 7}')  # a rebuild's timings: the same data
    assert data_digest(data) == unsealed
    seal(data)  # a sealed folder: its manifest's digests, the same identity
    assert data_digest(data) == unsealed
    (data / "train.bin").write_text("other tokens")
    seal(data)
    assert data_digest(data) != unsealed
    (probes / "build.json").unlink()
    with pytest.raises(Exception, match=r"build\.json: not found; the study's probes"):
        probe_set_digest(probes)


def test_a_row_of_another_probe_set_is_run_again_and_not_reported(tmp_path, capsys):
    """Rows scored on an earlier probe folder (other items or probe code) were reused by the next launch and
    reported beside the new ones: now they stay in the CSV, their cells run again, and the report reads
    only this scoring's rows (or, with no probes or data here, the latest row's scoring: never two)."""
    from desmoe.recipes.des_moe.study import append_row, base_digest, phase1, protocol_ids, read_rows, stale_notice
    from desmoe.recipes.des_moe.study_report import render

    cfg, drv = _scored_study(tmp_path), _driver()
    now, ids, base = drv.scored_key(cfg), protocol_ids(cfg), base_digest(tmp_path / "base")
    old = {**now, "probes_sha256": "0ld" + now["probes_sha256"][3:]}
    fft = next(c for c in phase1(cfg) if c.arm == "fft")
    for run, phase, arm, lr, general, scored, t in (("base", "base", "vanilla", 0.0, 0.5, old, "09"),
                                                    (fft.run, "grid", "fft", fft.lr, 0.25, old, "10"),
                                                    ("base", "base", "vanilla", 0.0, 0.6, now, "11")):
        append_row(tmp_path / "r.csv", {**_row(run, phase, arm, lr, 0, 5, general, 0.3), **scored, "protocol": ids[0],
                                        "base_sha256": base, "finished_utc": f"2026-12-07T{t}:00:00Z",
                                        "probes": json.dumps({"probe_cloze": general}), "downstream": "{}"})
    todo, _ = drv.pending(cfg, (ids, base, now), set())
    assert todo[0].run == fft.run and "base" not in {c.run for c in todo}  # fft's row is of the old probes
    assert fft.run not in {c.run for c in drv.pending(cfg, (ids, base, old), set())[0]}
    assert len(read_rows(tmp_path / "r.csv")) == 2 and len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 3
    notice = stale_notice(tmp_path / "r.csv", ids, base, now)
    assert "\n" not in notice
    assert "1 runs of this protocol and base count for nothing here (1 scored on another" in notice
    assert drv.report_key(cfg) == (base, now)
    text = render(cfg, ids, *drv.report_key(cfg))
    assert f"| {fft.run} |" not in text and "| base | 0.6 |" in text and "1 finished and 0 failed" in text
    # a report from the CSV alone (no probes or data here): the latest row's scoring, its rows only
    (tmp_path / "probes" / "probes.json").unlink()
    assert drv.report_key(cfg) == (base, now)
    append_row(tmp_path / "r.csv", {**_row(fft.run, "grid", "fft", fft.lr, 0, 5, 0.2, 0.3), **old, "protocol": ids[0],
                                    "base_sha256": base, "finished_utc": "2026-12-07T12:00:00Z"})
    assert drv.report_key(cfg) == (base, old)


def test_an_old_csv_without_the_scoring_columns_is_run_again_and_reported_alone(tmp_path):
    """A CSV written before rows recorded what scored them: its rows are of an unknown probe set, so none is
    reused by a launch (one line says so); while no row has a recorded scoring, the report shows them as one
    group of unknown scoring; they stay in the file, and the header grows on the next row."""
    from desmoe.recipes.des_moe.study import COLUMNS, SCORED_BY, append_row, base_digest, protocol_ids, stale_notice

    cfg, drv = _scored_study(tmp_path), _driver()
    ids, base, now = protocol_ids(cfg), base_digest(tmp_path / "base"), drv.scored_key(cfg)
    old_columns = [c for c in COLUMNS if c not in SCORED_BY]
    with open(tmp_path / "r.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, lineterminator="\n")
        writer.writeheader()
        writer.writerow({**_row("base", "base", "vanilla", 0.0, 0, 5, 0.5, 0.3), "protocol": ids[0],
                         "base_sha256": base, "finished_utc": "2026-12-05T10:00:00Z",
                         "probes": json.dumps({"probe_cloze": 0.5}), "downstream": "{}"})
    assert drv.pending(cfg, (ids, base, now), set())[0][0].run == "base"  # run again
    assert "(0 scored on another probe set, data or scoring code, 1 before that was recorded)" in \
        stale_notice(tmp_path / "r.csv", ids, base, now)
    # the report: no row recorded its scoring, so the old rows are reported as one group of unknown scoring (a
    # finished study's section is re-rendered, not emptied), whether or not the probes are here
    from desmoe.recipes.des_moe.study import read_rows
    from desmoe.recipes.des_moe.study_report import render

    legacy = {k: "" for k in SCORED_BY}
    for gone in ("", "probes.json"):
        if gone:
            (tmp_path / "probes" / gone).unlink()
        assert drv.report_key(cfg) == (base, legacy)
        assert [r["run"] for r in read_rows(tmp_path / "r.csv", ids, base, legacy)] == ["base"]
        assert stale_notice(tmp_path / "r.csv", ids, base, legacy) == ""
    text = render(cfg, ids, base, legacy)
    assert "these rows may mix probe sets" in text and "| base | 0.5 |" in text and "1 finished and 0 failed" in text
    append_row(tmp_path / "r.csv", {**_row("base", "base", "vanilla", 0.0, 0, 5, 0.6, 0.3), "protocol": ids[0],
                                    "base_sha256": base, **now})
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert list(rows[0]) == COLUMNS and rows[0]["base_sha256"] == base  # the old row, as written (short)
    assert not rows[0]["scoring_sha256"] and rows[1]["scoring_sha256"] == now["scoring_sha256"]
    assert drv.report_key(cfg) == (base, now)  # a recorded scoring now exists: the old row counts for nothing
