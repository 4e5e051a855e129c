"""Launcher flags as users type them.  A shortened or mistyped flag is refused, never matched to another
option: argparse's default prefix matching turned `--steps 4` into desmoe_study's `--steps-per-domain 4`
and `--conf x` into `--config x`, silently.  A flag value the launcher cannot honour is refused in one line."""
import argparse
import ast
import subprocess
import sys

import pytest

from desmoe.cli import parse_launcher_args
from desmoe.errors import ConfigError
from desmoe.recipes.lm.recipe import LMExperiment
from jobs import ROOT, clean_env


def parser_calls():
    for folder in ("launcher", "desmoe", "bench", "data_prep"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node


def test_every_parser_refuses_abbreviations():
    calls = dict(parser_calls())
    assert len(calls) >= 30  # the scan found the entry points
    lax = [where for where, node in calls.items()
           if not any(k.arg == "allow_abbrev" and getattr(k.value, "value", None) is False for k in node.keywords)]
    assert lax == []


@pytest.mark.parametrize("argv,key", [
    (["--conf", str(ROOT / "configs/smoke.yaml")], "conf"),  # was --config
    (["--deep", str(ROOT / "configs/zero2.json")], "deep"),  # was --deepspeed
])
def test_shortened_launcher_flag_is_an_unknown_key(argv, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        parse_launcher_args(LMExperiment, argv=argv)


def test_shortened_option_of_a_parent_parser_is_refused():
    study = argparse.ArgumentParser(allow_abbrev=False, add_help=False)  # as launcher/desmoe_study.py builds it
    study.add_argument("--steps-per-domain", type=int, default=0)
    with pytest.raises(ConfigError, match="unknown key 'steps'"):
        parse_launcher_args(LMExperiment, argv=["--steps", "4"], parents=[study])
    _, opts = parse_launcher_args(LMExperiment, argv=["--steps-per-domain", "4"], parents=[study])
    assert opts.steps_per_domain == 4


@pytest.mark.parametrize("argv", [
    ["--deepspeed", str(ROOT / "configs/zero2.json"), "--local_rank=1", "train.steps=3"],
    ["--deepspeed_config", str(ROOT / "configs/zero2.json"), "--local-rank", "0", "--train.steps", "3"],
])
def test_deepspeed_launcher_arguments_still_pass(argv):
    cfg, args = parse_launcher_args(LMExperiment, argv=argv)
    assert cfg.train.steps == 3 and args.deepspeed == str(ROOT / "configs/zero2.json")
    assert args.local_rank in (0, 1)


def test_study_flag_parsed_by_its_own_parser_is_not_abbreviated(tmp_path):
    """launcher/realbase_study.py parses its flags first (parse_known_args): `--max 1` was --max-runs 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/realbase_study.py"), "--max", "1"],
                          capture_output=True, text=True, timeout=300, env=clean_env(DS_ACCELERATOR="cpu"), cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "unknown key 'max'" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("value", ["-60", "nan"])
def test_study_budget_that_cannot_be_honoured_is_refused(value):
    """--budget-s -60 started no run (every elapsed time exceeds it), nan never stopped one."""
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/realbase_study.py"), "--budget-s", value],
                          capture_output=True, text=True, timeout=300, env=clean_env(DS_ACCELERATOR="cpu"), cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (f"desmoe: error: --budget-s {float(value)}: expected a number of "
                                            f"seconds >= 0 (0: no limit)")
