"""The real-base study's protocol and report (#18): the committed protocol loads; a bad study config is
refused in one line; the CSV is append-only, the lr selection, the later phases, the targets and the
rendered section come from it.  What a row is keyed to, and the driver on 2 real ranks:
tests/test_realbase_study_driver.py."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

from desmoe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "configs" / "realbase_study.yaml"
GENERAL = ["probe_cloze", "probe_arith"]
SCORED = {"probes_sha256": "a1" * 6, "data_sha256": "b2" * 6, "scoring_sha256": "c3" * 6}  # a row's scoring


def _load(overrides=()):
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy

    return load_config(RealbaseStudy, PROTOCOL, list(overrides))


@pytest.mark.parametrize("override, match", [
    ("study.arms.fft.lr=[]", r"key 'study\.arms\.fft\.lr': expected a non-empty list"),
    ("study.arms.fft.lr=[0.1, 0.1]", r"key 'study\.arms\.fft\.lr': expected a non-empty list of distinct"),
    ("study.arms.lora.method=adapter", r"key 'study\.arms\.lora\.method': expected one of"),
    ("study.arms.lora.overrides=[train.lr=0.1]",
     r"key 'study\.arms\.lora\.overrides': expected key=value items not setting"),
    ("study.headline=[desmoe, moe2]", r"key 'study\.headline': expected names of arms .*got 'moe2'"),
    ("study.seeds=[1, 2]", r"key 'study\.seeds': expected distinct seeds including grid_seed=0"),
    ("study.scaling_sizes=[2, 3]", r"key 'study\.scaling_sizes': expected sizes ending at all 5 domains"),
    ("study.scaling_sizes=[3, 2, 5]", r"key 'study\.scaling_sizes': expected increasing numbers"),
    ("study.scores.downstream_task=desmoe_math",
     r"key 'study\.scores\.downstream_task': expected a task name containing"),
    ("study.steps_per_domain=0", r"key 'study\.steps_per_domain': expected a positive integer"),
    ("study.scaling_seeds=[1, 0]", r"key 'study\.scaling_seeds': expected distinct seeds starting with grid_seed=0"),
    ("study.scaling_seeds=[0, 1, 1]", r"key 'study\.scaling_seeds': expected distinct seeds"),
])
def test_bad_study_config_is_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        _load([override])
    assert "\n" not in str(err.value) and str(err.value).startswith(str(PROTOCOL))


def test_an_arm_the_targets_need_is_required(tmp_path):
    import yaml

    data = yaml.safe_load(PROTOCOL.read_text())
    del data["study"]["arms"]["esft_token"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy

    with pytest.raises(ConfigError, match=r"key 'study\.arms': expected an arm named 'esft_token'"):
        load_config(RealbaseStudy, tmp_path / "s.yaml")


def test_protocol_digest_is_what_the_file_sets():
    from desmoe.recipes.des_moe.study import protocol_digest, protocol_ids

    same = protocol_digest(_load())
    assert protocol_digest(_load(["experiment.desmoe.alr.tau=0.7"])) == same  # a default, spelled out
    assert protocol_digest(_load(["study.protocol_aliases=[abc]"])) == same  # aliases are not the protocol
    assert protocol_digest(_load(["experiment.desmoe.alr.tau=0.5"])) != same
    assert protocol_digest(_load(["study.arms.fft.lr=[0.0001]"])) != same
    assert protocol_ids(_load(["study.protocol_aliases=[abc]"])) == (same, "abc")


def _row(run, phase, arm, lr, seed, n, general, down, val=3.0, ppl=50.0, status="ok"):
    return {"run": run, "phase": phase, "arm": arm, "method": arm, "seed": seed, "lr": lr, "N": n,
            "status": status, "general_score": general, "general_score_base": 0.5, "downstream_score": down,
            "downstream_score_base": 0.3, "heldout_ppl": ppl, "heldout_ppl_base": 50.0, "val_loss_domains": val,
            "general_score_se": 0.02, "downstream_score_se": 0.02, "protocol": "p1"}


def test_csv_selection_phases_and_targets(tmp_path):
    from desmoe.recipes.des_moe.study import append_row, later_cells, phase1, read_rows, select_lr
    from desmoe.recipes.des_moe.study_targets import targets

    cfg = _load([f"study.csv={tmp_path / 'r.csv'}"])
    path = Path(cfg.study.csv)
    grid = phase1(cfg)
    assert grid[0].run == "base" and len(grid) == 1 + sum(len(a.lr) for a in cfg.study.arms.values())
    append_row(path, _row("base", "base", "vanilla", 0.0, 0, 5, 0.5, 0.3))
    # fft: the lower validation loss wins (the second lr); a failed first try of a run is kept in the file
    fft = [c for c in grid if c.arm == "fft"]
    append_row(path, _row(fft[0].run, "grid", "fft", fft[0].lr, 0, 5, 0.0, 0.0, status="failed"))
    assert select_lr(read_rows(path, "p1"), cfg, "fft") is None  # a grid cell not yet finished
    append_row(path, _row(fft[1].run, "grid", "fft", fft[1].lr, 0, 5, 0.30, 0.40, val=2.0))
    assert select_lr(read_rows(path, "p1"), cfg, "fft") == fft[1].lr  # failed counts as worst once run
    append_row(path, _row(fft[0].run, "grid", "fft", fft[0].lr, 0, 5, 0.35, 0.40, val=2.5))
    text = path.read_text()
    assert text.count(fft[0].run) == 2 and len(list(csv.DictReader(io.StringIO(text)))) == 4  # nothing rewritten
    rows = read_rows(path, "p1")
    assert select_lr(rows, cfg, "fft") == fft[1].lr and read_rows(path, "another") == []
    assert read_rows(path, ("another", "p1")) == rows  # a protocol's earlier digests count
    later, waiting = later_cells(cfg, rows)
    assert {c.run for c in later} == {f"fft-lr{fft[1].lr:g}-s{s}-N5" for s in (1, 2)} | \
        {f"fft-lr{fft[1].lr:g}-s0-N{n}" for n in (2, 3, 4)}
    assert waiting == ["desmoe", "esft_token"]
    assert [t["status"] for t in targets(rows, cfg)] == ["pending", "pending"]
    # DES-MoE drops 0.05 (FFT 0.2), downstream 0.40 vs ESFT-Token's 0.30 (standard errors 0.02 each): met
    for arm, general, down in (("desmoe", 0.45, 0.40), ("esft_token", 0.48, 0.30)):
        for i, c in enumerate(x for x in grid if x.arm == arm):
            append_row(path, _row(c.run, "grid", arm, c.lr, 0, 5, general, down, val=2.0 + i))
    rows = read_rows(path, "p1")
    # N = 2 -> 5: FFT drops 0.10, DES-MoE 0.15: missed by more than 2 standard errors
    for arm, general in (("fft", 0.40), ("desmoe", 0.60)):
        lr = select_lr(rows, cfg, arm)
        append_row(path, _row(f"{arm}-lr{lr:g}-s0-N2", "scaling", arm, lr, 0, 2, general, 0.3))
    t1, t2 = targets(read_rows(path, "p1"), cfg)
    assert t1["status"] == "met (1 of 3 seeds)" and t1["fft_drop"] == pytest.approx(0.2)
    assert t2["status"] == "missed" and t2["desmoe_drop"] == pytest.approx(0.15)
    # the later try of a run counts: a drop of 0.005 against FFT's 0.10 is within noise of 0.1 x 0.10
    append_row(path, _row("desmoe-lr0.0003-s0-N2", "scaling", "desmoe", 3e-4, 0, 2, 0.455, 0.3))
    assert targets(read_rows(path, "p1"), cfg)[1]["status"].startswith("undecided (within noise")
    # ESFT-Token's downstream 0.37 vs DES-MoE's 0.40: inside 2 standard errors
    c = next(x for x in grid if x.arm == "esft_token")
    append_row(path, _row(c.run, "grid", "esft_token", c.lr, 0, 5, 0.48, 0.37, val=2.0))
    assert targets(read_rows(path, "p1"), cfg)[0]["status"].startswith("undecided (within noise")
    # no method above the base's downstream score: the downstream comparison is undefined
    for arm in ("desmoe", "esft_token", "fft"):
        for i, c in enumerate(x for x in grid if x.arm == arm):
            append_row(path, _row(c.run, "grid", arm, c.lr, 0, 5, 0.3 if arm == "fft" else 0.45, 0.3, val=2.0 + i))
    assert targets(read_rows(path, "p1"), cfg)[0]["status"].startswith("undefined (no method raised")


def _driver():
    spec = importlib.util.spec_from_file_location("realbase_study", ROOT / "launcher" / "realbase_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_diagnostic_protocol_shares_the_main_experiment():
    """configs/realbase_diag.yaml reads the main protocol's rows as its own (protocol_aliases): legitimate
    only while its experiment section is the main protocol's, value for value."""
    from desmoe.config import load_config, to_dict
    from desmoe.recipes.des_moe.study import RealbaseStudy, protocol_ids

    main = load_config(RealbaseStudy, ROOT / "configs" / "realbase_study.yaml", [])
    for name in ("diag", "fig1_seeds", "fig1_lr"):
        diag = load_config(RealbaseStudy, ROOT / "configs" / f"realbase_{name}.yaml", [])
        assert to_dict(diag.experiment) == to_dict(main.experiment)
        assert protocol_ids(main)[0] in protocol_ids(diag)[1:] and protocol_ids(diag)[0] != protocol_ids(main)[0]
    # realbase_scaling20.yaml changes the per-domain budget: same experiment, its own rows only (its run names
    # are the main protocol's, at another number of steps)
    s20 = load_config(RealbaseStudy, ROOT / "configs" / "realbase_scaling20.yaml", [])
    assert to_dict(s20.experiment) == to_dict(main.experiment) and protocol_ids(s20) == (protocol_ids(s20)[0],)
    assert s20.study.steps_per_domain != main.study.steps_per_domain and protocol_ids(s20)[0] not in protocol_ids(main)
    f1 = load_config(RealbaseStudy, ROOT / "configs" / "realbase_scaling20_fig1.yaml", [])  # beside scaling20
    assert to_dict(f1.experiment) == to_dict(main.experiment) and protocol_ids(f1)[1:] == (protocol_ids(s20)[0],)
    assert f1.study.steps_per_domain == s20.study.steps_per_domain
    assert {k: v for k, v in f1.study.arms.items() if k != "desmoe_fig1"} == s20.study.arms
    # realbase_scaling20_seeds.yaml: seeds 1 and 2 of both at N = 2 and 5; the seed-0 rows of both count
    sd = load_config(RealbaseStudy, ROOT / "configs" / "realbase_scaling20_seeds.yaml", [])
    assert to_dict(sd.experiment) == to_dict(main.experiment) and sd.study.arms == f1.study.arms
    assert set(protocol_ids(sd)[1:]) == {protocol_ids(s20)[0], protocol_ids(f1)[0]}
    assert sd.study.steps_per_domain == s20.study.steps_per_domain and sd.study.scaling_seeds[0] == 0
    assert {sd.study.scaling_sizes[0], sd.study.scaling_sizes[-1]} == {s20.study.scaling_sizes[0], 5}
    # realbase_scaling20_esft.yaml: ESFT-Token's seeds 1 and 2 at N = 5; every earlier 20-step config's rows count
    es = load_config(RealbaseStudy, ROOT / "configs" / "realbase_scaling20_esft.yaml", [])
    assert to_dict(es.experiment) == to_dict(main.experiment) and es.study.arms == sd.study.arms
    assert set(protocol_ids(es)[1:]) == {protocol_ids(sd)[0], *protocol_ids(sd)[1:]}
    assert es.study.headline == ["esft_token"] and es.study.steps_per_domain == sd.study.steps_per_domain
    # realbase_replicate.yaml: the headline arms at the main protocol's selected lrs on today's base; no
    # aliases (rows of another base never count, and this protocol's rows are its own)
    rp = load_config(RealbaseStudy, ROOT / "configs" / "realbase_replicate.yaml", [])
    assert to_dict(rp.experiment) == to_dict(main.experiment) and protocol_ids(rp) == (protocol_ids(rp)[0],)
    assert {a: v.lr for a, v in rp.study.arms.items()} == {a: v.lr for a, v in sd.study.arms.items()}
    assert rp.study.steps_per_domain == main.study.steps_per_domain and rp.study.seeds == main.study.seeds
    from desmoe.recipes.des_moe.study_targets import targets
    assert targets([], rp)[1]["status"] == "not measured (this protocol runs N = 5 only)"  # one N: no scaling target


def test_targets_with_a_variant_in_desmoes_place(tmp_path):
    """--report --desmoe-arm: the variant's rows stand in for DES-MoE's; nothing else changes."""
    from desmoe.recipes.des_moe.study import append_row, phase1, protocol_ids

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "base" / "model.safetensors").write_bytes(b"w")
    cfg = _load([f"study.csv={tmp_path / 'r.csv'}", f"experiment.base.hf={tmp_path / 'base'}"])
    from desmoe.recipes.des_moe.study import base_digest

    key = {"protocol": protocol_ids(cfg)[0], "base_sha256": base_digest(tmp_path / "base"), **SCORED}
    append_row(tmp_path / "r.csv", {**_row("base", "base", "vanilla", 0.0, 0, 5, 0.5, 0.3), **key})
    for c in phase1(cfg)[1:]:
        general = {"fft": 0.3, "desmoe": 0.2, "desmoe_fig1": 0.49}.get(c.arm, 0.45)  # fig1 keeps it
        append_row(tmp_path / "r.csv", {**_row(c.run, "grid", c.arm, c.lr, 0, 5, general, 0.4), **key})
    plain = _driver().targets_as_desmoe(_load([f"study.csv={tmp_path / 'r.csv'}",
                                               f"experiment.base.hf={tmp_path / 'base'}"]), "desmoe")
    fig1 = _driver().targets_as_desmoe(cfg, "desmoe_fig1")
    assert "**missed (1 of 3 seeds)**" in plain[1] and "desmoe_drop 0.3," in plain[1]
    assert "desmoe_drop 0.01," in fig1[1] and "missed" not in fig1[1]
    with pytest.raises(Exception, match="--desmoe-arm nope: not an arm"):
        _driver().targets_as_desmoe(cfg, "nope")


def test_studies_sharing_a_csv_keep_their_own_plot(tmp_path):
    """Every study renders its own section and its own plot: studies sharing one CSV (a diagnostic beside
    the main protocol) once overwrote one PNG, so every section showed the last study rendered."""
    from desmoe.recipes.des_moe.study import append_row
    from desmoe.recipes.des_moe.study_report import render

    csv_path, doc = tmp_path / "results" / "r.csv", tmp_path / "doc.md"
    cfgs = {p: _load([f"study.csv={csv_path}", f"study.doc={doc}", f"study.name=study-{p}"]) for p in ("p1", "p2")}
    for p, general in (("p1", 0.45), ("p2", 0.30)):
        append_row(csv_path, {**_row(f"fft-{p}", "grid", "fft", 1e-4, 0, 5, general, 0.4), "protocol": p, **SCORED,
                              "probes": json.dumps({"probe_cloze": general}), "downstream": json.dumps({"law": 0.4})})
    render(cfgs["p1"], ("p1",), "", SCORED)
    first = {f.name: f.read_bytes() for f in csv_path.parent.glob("*.png")}
    render(cfgs["p2"], ("p2",), "", SCORED)
    pngs = {f.name: f.read_bytes() for f in csv_path.parent.glob("*.png")}
    assert len(first) == 1 and len(pngs) == 2 and all(pngs[n] == b for n, b in first.items())
    text = doc.read_text()
    for p in ("p1", "p2"):
        section = text[text.index(f"<!-- study-{p}:begin -->"):text.index(f"<!-- study-{p}:end -->")]
        assert f"(results/r-study-{p}.png)" in section and (csv_path.parent / f"r-study-{p}.png").is_file()


def test_the_gpu_script_returns_what_the_report_writes(tmp_path):
    """launcher/realbase_gpu.py copies the CSV, the plot and the doc to $OUT: the files render writes (the
    plot's name once changed in the report and not in the copy list, so the device would not return it)."""
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy, append_row
    from desmoe.recipes.des_moe.study_report import render

    spec = importlib.util.spec_from_file_location("realbase_gpu", ROOT / "launcher" / "realbase_gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    sets = [f"study.csv={tmp_path / 'results' / 'gpu.csv'}", f"study.doc={tmp_path / 'doc.md'}"]
    cfg = load_config(RealbaseStudy, ROOT / "configs" / "realbase_study_gpu.yaml", sets)
    append_row(Path(cfg.study.csv), {**_row("fft-lr0.0001-s0-N5", "grid", "fft", 1e-4, 0, 5, 0.4, 0.4), **SCORED,
                                     "probes": json.dumps({"probe_cloze": 0.4}), "downstream": json.dumps({"law": 0.4})})
    render(cfg, ("p1",), "", SCORED)
    files = gpu.result_files(sets)
    assert len(files) == 3 and all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]


def test_one_seed_heldout_targets_are_undecided(tmp_path):
    """The held-out perplexity has no per-run error (the same tokens for every run): its noise is the seeds'
    spread, so a one-seed margin, however large, is not called met or missed; the probes' binomial errors
    still decide."""
    from desmoe.recipes.des_moe.study import read_rows
    from desmoe.recipes.des_moe.study_report import target_lines

    sets = [f"study.csv={tmp_path / 'r.csv'}"] + [f"study.arms.{a}.lr=[{lr}]" for a, lr in
                                                 (("fft", 1e-4), ("desmoe", 3e-4), ("esft_token", 1e-3))]
    cfg = _load(sets)
    from desmoe.recipes.des_moe.study import append_row

    append_row(Path(cfg.study.csv), _row("base", "base", "vanilla", 0.0, 0, 5, 0.5, 0.3))
    for arm, lr, n, general, ppl in (("fft", 1e-4, 5, 0.2, 80.0), ("fft", 1e-4, 2, 0.4, 60.0),
                                     ("desmoe", 3e-4, 5, 0.45, 52.0), ("desmoe", 3e-4, 2, 0.35, 52.0),
                                     ("esft_token", 1e-3, 5, 0.48, 51.0)):
        phase = "grid" if n == 5 else "scaling"
        down = 0.5 if arm == "desmoe" else 0.4
        append_row(Path(cfg.study.csv), _row(f"{arm}-lr{lr:g}-s0-N{n}", phase, arm, lr, 0, n, general, down, ppl=ppl))
    lines = target_lines(read_rows(Path(cfg.study.csv), "p1"), cfg)
    probe, heldout = [x for x in lines if "probe mean" in x], [x for x in lines if "held-out" in x]
    assert "**met" in probe[0] and "**met" in probe[1]  # binomial errors 0.02: decided
    assert all("**undecided (no standard error" in x for x in heldout), heldout


def test_scaling_seeds_run_seed_major_and_pair_by_seed(tmp_path):
    """study.scaling_seeds: every scaling size again at each other seed, seed-major, an arm's run at N = all
    made once; target 2 pairs N-min and N-max by seed and takes the standard error from the seeds' spread."""
    from desmoe.recipes.des_moe.study import append_row, later_cells, read_rows
    from desmoe.recipes.des_moe.study_targets import scaling_drop, targets

    sets = [f"study.csv={tmp_path / 'r.csv'}", "study.scaling_sizes=[2, 5]", "study.scaling_seeds=[0, 2, 1]",
            "study.headline=[fft]"] + [f"study.arms.{a}.lr=[{lr}]" for a, lr in
                                       (("fft", 1e-4), ("desmoe", 3e-4), ("esft_token", 1e-3))]
    cfg = _load(sets)
    path = Path(cfg.study.csv)
    append_row(path, _row("base", "base", "vanilla", 0.0, 0, 5, 0.5, 0.3))
    for arm, lr in (("fft", 1e-4), ("desmoe", 3e-4), ("esft_token", 1e-3)):
        append_row(path, _row(f"{arm}-lr{lr:g}-s0-N5", "grid", arm, lr, 0, 5, 0.4, 0.4))
    later, _ = later_cells(cfg, read_rows(path, "p1"))
    runs = [c.run for c in later]
    assert len(runs) == len(set(runs))  # fft's N = 5 at seeds 1 and 2 is its headline seed run, made once
    extra = [c for c in later if c.seed != 0 and c.arm == "desmoe"]
    assert [(c.seed, c.n, c.phase) for c in extra] == [(2, 2, "scaling"), (2, 5, "seeds"), (1, 2, "scaling"),
                                                       (1, 5, "seeds")]
    assert runs.index("desmoe-lr0.0003-s2-N5") < runs.index("fft-lr0.0001-s1-N2")  # seed-major
    # FFT drops 0.10, 0.14, 0.12 from N = 2 to 5 (seeds 0, 2, 1); DES-MoE 0.000, 0.002, -0.002
    for arm, lr, drops in (("fft", 1e-4, (0.10, 0.14, 0.12)), ("desmoe", 3e-4, (0.0, 0.002, -0.002))):
        for seed, d in zip((0, 2, 1), drops):
            phase = "grid" if seed == 0 else "seeds"
            append_row(path, _row(f"{arm}-lr{lr:g}-s{seed}-N5", phase, arm, lr, seed, 5, 0.4, 0.4))
            append_row(path, _row(f"{arm}-lr{lr:g}-s{seed}-N2", "scaling", arm, lr, seed, 2, 0.4 + d, 0.4))
    rows = read_rows(path, "p1")
    drop, se, k = scaling_drop(rows, cfg, "fft", 2, 5)
    assert (drop, k) == (pytest.approx(0.12), 3) and se == pytest.approx(0.02 / 3 ** 0.5)
    t2 = targets(rows, cfg)[1]
    assert t2["status"] == "met" and t2["seeds"] == 3, t2
    two = [r for r in rows if not (r["arm"] == "fft" and r["seed"] == "1" and r["N"] == "2")]  # a pair short
    assert scaling_drop(two, cfg, "fft", 2, 5)[2] == 2 and targets(two, cfg)[1]["status"].endswith("(2 of 3 seeds)")
    # a seed's N = 5 run alone pairs with nothing: one seed left, decided on its runs' binomial errors
    one = [r for r in two if not (r["arm"] == "fft" and r["seed"] == "2" and r["N"] == "2")]
    assert scaling_drop(one, cfg, "fft", 2, 5) == (pytest.approx(0.10), pytest.approx(0.02 * 2 ** 0.5), 1)


def test_mean_std_cells_sign_the_mean_only():
    from desmoe.recipes.des_moe.study_report import _pm

    assert _pm([0.1, 0.3], "{:+.3f}") == "+0.200 ± 0.141" and _pm([2.0]) == "2.000" and _pm([]) == "–"
