"""The comparison report of finished runs: forgetting columns, the domain-scaling table and its drop summary."""
import csv
import io
import json

from desmoe.recipes.des_moe import report


def _run(tmp_path, name, **result):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(result))
    return str(d)


def test_forgetting_and_scaling_summary(tmp_path, monkeypatch, capsys):
    runs = [
        _run(tmp_path, "s-vanilla", method="vanilla", train_seconds=0, **{"ppl/general": 80.0,
                                                                          "ppl/general_heldout": 400.0}),
        _run(tmp_path, "s-N2-fft", method="fft", train_seconds=10, **{"ppl/general": 100.0,
                                                                      "ppl/general_heldout": 300.0}),
        _run(tmp_path, "s-N4-fft", method="fft", train_seconds=20, **{"ppl/general": 150.0,
                                                                      "ppl/general_heldout": 330.0}),
        _run(tmp_path, "s-N2-desmoe", method="desmoe", train_seconds=9, **{"ppl/general": 90.0,
                                                                           "ppl/general_heldout": 350.0}),
        _run(tmp_path, "s-N4-desmoe", method="desmoe", train_seconds=18, **{"ppl/general": 94.5,
                                                                            "ppl/general_heldout": 340.0}),
    ]
    out = tmp_path / "cmp"
    monkeypatch.setattr("sys.argv", ["report", *runs, "--out", str(out)])
    report.main()
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO((out / "comparison.csv").read_text()))}
    assert float(rows["s-N4-fft"]["forgetting_general_ppl_pct"]) == 87.5  # 150 / 80 - 1
    assert float(rows["s-N2-desmoe"]["forgetting_ppl_pct"]) == -12.5  # 350 / 400 - 1
    scaling = list(csv.DictReader(io.StringIO((out / "scaling.csv").read_text())))
    assert [(r["N"], r["method"]) for r in scaling] == [("2", "desmoe"), ("2", "fft"), ("4", "desmoe"), ("4", "fft")]
    md = (out / "scaling.md").read_text()
    assert "fft: ppl/general 100 (N=2) -> 150 (N=4): +50.0 %" in md
    assert "desmoe: ppl/general 90 (N=2) -> 94.5 (N=4): +5.0 %" in md
    assert "ppl/general: DES-MoE's rise is 10 % of FFT's" in md
    assert (out / "scaling.png").stat().st_size > 0 and (out / "comparison.png").stat().st_size > 0


def test_ablations_are_labelled_from_the_run_config(tmp_path):
    run = _run(tmp_path, "s-nodges-desmoe", method="desmoe", train_seconds=1)
    (tmp_path / "s-nodges-desmoe" / "config.yaml").write_text("desmoe:\n  alr:\n    enabled: true\n"
                                                               "  dges:\n    enabled: false\n")
    plain = _run(tmp_path, "s-desmoe", method="desmoe", train_seconds=1)
    rows = report.load_results([run, plain])
    assert [r["method"] for r in rows] == ["desmoe w/o DGES", "desmoe"]
    assert "47.3 / 55.6" in report.table(rows)[0]


def test_headline_fits_a_terminal_with_units_and_directions():
    from desmoe.recipes.des_moe.report import HEADLINE, LEGEND, headline

    rows = [{"method": "vanilla", "ppl/general": 80.0, "forgetting_general_ppl_pct": 0.0, "downstream/mean": 0.25,
             "domain_mean": 6.3, "train_seconds": 0},
            {"method": "desmoe w/o ALR + DGES", "ppl/general": 112.8, "forgetting_general_ppl_pct": 41.04,
             "downstream/mean": 0.278, "domain_mean": 5.11, "train_seconds": 239.3},
            {"method": "fft", "ppl/general": 111.6}]  # a run without some metrics
    lines = headline(rows).splitlines()
    assert len(lines) == 1 + len(rows)
    assert all(len(line) <= 100 for line in lines + LEGEND.splitlines())
    assert all(("↓" in name) != ("↑" in name) for name, _, _ in HEADLINE)  # every column says its direction
    assert lines[2].split()[-5:] == ["112.8", "+41.0", "0.278", "5.110", "239"]
    assert lines[3].split()[1:] == ["111.6", "-", "-", "-", "-"]
