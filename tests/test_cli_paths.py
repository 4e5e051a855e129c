"""Launcher arguments as users type them: both override forms in any order, and launches from another
working directory (relative paths resolve against it; the launchers' defaults are the repository's)."""
import subprocess
import sys

import pytest

from desmoe.cli import parse_launcher_args
from desmoe.errors import ConfigError
from desmoe.recipes.lm.recipe import LMExperiment
from jobs import ROOT, clean_env

TINY = ["train.steps=1", "data.max_bytes=100000", "model.hidden_size=32", "model.ffn_size=32", "train.seq_len=32",
        "model.ep_size=1", "train.log_every=1", "train.eval_every=1", "train.eval_batches=1"]


@pytest.mark.parametrize("argv", [
    ["--train.steps", "3", "--train.lr", "0.01"],
    ["--train.lr", "0.01", "train.steps=3"],
    ["--config", str(ROOT / "configs/smoke.yaml"), "--train.lr", "0.01", "--train.steps", "3"],
    ["train.steps=3", "--local_rank=0", "--train.lr=0.01"],
])
def test_both_override_forms_in_any_order(argv):
    cfg, args = parse_launcher_args(LMExperiment, argv=argv)
    assert (cfg.train.steps, cfg.train.lr) == (3, 0.01)
    assert args.deepspeed == str(ROOT / "configs/zero2.json")  # the repository's, from any directory


def test_flag_without_value_is_still_one_line():
    with pytest.raises(ConfigError, match="override '--train.steps': expected a value after it"):
        parse_launcher_args(LMExperiment, argv=["train.lr=0.01", "--train.steps"])


def smoke_from(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "launcher/smoke.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(DS_ACCELERATOR="cpu"), cwd=cwd)


def errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]


def test_launch_from_another_directory_uses_the_repository_default_deepspeed_config(tmp_path):
    proc = smoke_from(tmp_path, "--config", str(ROOT / "configs/smoke.yaml"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs/smoke/checkpoints/latest").is_file()  # run.dir: runs, in the current directory
    assert f"relative paths resolve against the current directory {tmp_path}" in proc.stderr


def test_relative_config_only_in_the_repository_is_named(tmp_path):
    proc = smoke_from(tmp_path, "--config", "configs/smoke.yaml", *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc) == [f"desmoe: error: --config='configs/smoke.yaml': not in the current directory {tmp_path} "
                            f"(relative paths resolve against it), but the repository has it: run from {ROOT} or give "
                            f"{ROOT / 'configs/smoke.yaml'}"]


def test_input_path_only_in_the_repository_is_refused_before_anything_is_built(tmp_path):
    """TRGE builds a missing image sequence where data.root points: from another directory, a config written
    for the repository would silently build (and train on) a second copy here."""
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/trge.py"), "--deepspeed", str(ROOT / "configs/zero2.json"),
                           "data.root=desmoe/moe"],
                          capture_output=True, text=True, timeout=300, env=clean_env(DS_ACCELERATOR="cpu"),
                          cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors(proc)) == 1 and "data.root='desmoe/moe'" in errors(proc)[0], proc.stderr[-3000:]
    assert str(ROOT / "desmoe/moe") in errors(proc)[0]
    assert not (tmp_path / "desmoe").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv", [["run.dir=~/runs"], ["--run.dir=~/runs"], ["data.path=~/corpus/py"]])
def test_tilde_the_shell_left_alone_is_refused(argv):
    """bash leaves `run.dir=~/runs` as it is (not a variable assignment): the run went to ./~/runs."""
    key = argv[0].lstrip("-").split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}='~/\w+(/py)?': nothing expands '~' here .* or as --{key} ~/"):
        parse_launcher_args(LMExperiment, argv=argv)
    cfg, _ = parse_launcher_args(LMExperiment, argv=["--run.dir", "/tmp/x/runs"])  # what the shell gives for ~ there
    assert cfg.run.dir == "/tmp/x/runs"


def test_printed_tensorboard_commands_survive_a_space_in_run_dir(tmp_path):
    """`run.dir=my runs`: the printed `tensorboard --logdir my runs/...` lines, pasted into a shell, gave
    TensorBoard two arguments."""
    proc = smoke_from(tmp_path, "--config", str(ROOT / "configs/smoke.yaml"), *TINY, "run.dir=my runs", "run.name=a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(tensorboard --logdir 'my runs/a/tensorboard')" in proc.stdout, proc.stdout[-2000:]
    assert "compare runs: tensorboard --logdir 'my runs' --samples_per_plugin images=0" in proc.stdout
