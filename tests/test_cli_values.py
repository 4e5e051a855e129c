"""Numeric flags of the entry points that a run cannot honour: refused in one line before any source is
read or anything is built (a traceback minutes later, after a download, before)."""
import subprocess
import sys

import pytest

from desmoe.errors import UserError
from jobs import ROOT, clean_env


def refusal(script, *argv, cwd=ROOT):
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True,
                          timeout=300, env=clean_env(DS_ACCELERATOR="cpu"), cwd=cwd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("argv,line", [
    # 0 and 1 wrote an empty probe (IndexError in write_tasks), -1 a ValueError in random.sample
    (["--probe-items", "0"], "--probe-items 0: expected 2 or more (the copy probe takes half)"),
    (["--probe-items", "1"], "--probe-items 1: expected 2 or more (the copy probe takes half)"),
    (["--probe-items", "-1"], "--probe-items -1: expected 2 or more (the copy probe takes half)"),
    (["--experts", "0"], "--experts 0: expected 1 or more"),
    (["--experts", "4", "--top-k", "8"], "--top-k 8: expected 1 to --experts 4"),
    (["--shared-ffn", "0"], "--shared-ffn 0: expected 1 or more"),
    (["--port", "70000"], "--port 70000: expected a TCP port in 1..65535"),
])
def test_realbase_flag_is_refused_before_any_source_is_read(tmp_path, argv, line):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert refusal("launcher/realbase.py", *argv, "--out", str(out), "--cache", str(cache),
                   cwd=tmp_path) == f"desmoe: error: {line}"
    assert not out.exists() and not cache.exists()  # nothing fetched, nothing written


@pytest.mark.parametrize("n", [0, 1])
def test_probes_with_fewer_than_two_items_are_refused(tmp_path, n):
    from desmoe.evaluation.probes import build_probes

    with pytest.raises(UserError, match=f"probes: n={n} items: expected 2 or more"):
        build_probes(tmp_path / "no-data", tmp_path / "probes", n=n)
    assert not (tmp_path / "probes").exists()


def test_precedence_the_readme_states(tmp_path):
    """README 'Which value wins': the last --config/--deepspeed, overrides after the YAML in order, and train.lr
    for the DeepSpeed JSON's optimizer lr "auto" (a number there and another train.lr: refused)."""
    import json

    from desmoe.cli import parse_launcher_args
    from desmoe.engine import fold_lr, read_ds_config, resolve_ds_config
    from desmoe.errors import ConfigError
    from desmoe.recipes.lm.recipe import LMExperiment

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}}}))
    cfg, args = parse_launcher_args(LMExperiment, argv=[
        "--config", str(ROOT / "configs/desmoe_cpu.yaml"), "--deepspeed", str(ROOT / "configs/zero2.json"),
        "train.lr=0.003", "--config", str(ROOT / "configs/smoke.yaml"), "--deepspeed", str(ds), "--train.lr", "0.004"])
    assert args.config == str(ROOT / "configs/smoke.yaml") and args.deepspeed == str(ds)
    assert cfg.train.lr == 0.004  # the smoke YAML says 0.002; the later of two overrides wins
    fold_lr(cfg, read_ds_config(ds))
    resolved = resolve_ds_config(read_ds_config(ds), cfg.train.micro_batch, lr=cfg.train.lr)
    assert resolved["optimizer"]["params"] == {"lr": 0.004, "weight_decay": 0.1}
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.5, "weight_decay": 0.1}}}))
    with pytest.raises(ConfigError, match=r"0.5, but train.lr=0.004 from override 'train.lr=0.004'"):
        fold_lr(cfg, read_ds_config(ds))


@pytest.mark.parametrize("argv,line", [
    # the study got max(1, budget - the base stage's time): nan or a negative budget became 1 s silently
    (["--budget-s", "nan"], "--budget-s nan: expected a number of seconds > 0"),
    (["--budget-s", "-60"], "--budget-s -60.0: expected a number of seconds > 0"),
    (["--max-runs", "-1"], "--max-runs -1: expected an integer >= 0 (0: all that fit)"),  # after the healing
    (["--heal-steps", "-2"], "--heal-steps -2: expected an integer >= 0"),
])
def test_realbase_gpu_flag_is_refused_before_any_stage(tmp_path, argv, line):
    assert refusal("launcher/realbase_gpu.py", "--cpu", *argv, cwd=tmp_path) == f"desmoe: error: {line}"


@pytest.mark.parametrize("argv,line", [
    (["--experts", "0"], "--experts 0: expected 1 or more"),
    (["--experts", "2", "--top-k", "3"], "--top-k 3: expected 1 to --experts 2"),
])
def test_upcycle_flag_is_refused_before_the_source_is_read(tmp_path, argv, line):
    src = tmp_path / "model.gguf"  # not read: the check comes first (a real one is dequantised for minutes)
    assert refusal("launcher/upcycle.py", str(src), str(tmp_path / "out"), *argv) == f"desmoe: error: {line}"
    assert not (tmp_path / "out.dense").exists()


@pytest.mark.parametrize("threads", ["0", "-1"])  # 0 was torch's default without a word, -1 a traceback
def test_align_thread_count_below_one_is_refused(tmp_path, threads):
    assert refusal("launcher/align_dual_encoder.py", "--threads", threads, "--cache", str(tmp_path / "c"),
                   "--out", str(tmp_path / "o")) == f"desmoe: error: --threads {threads}: expected a positive integer"
    assert not (tmp_path / "c").exists()


def test_device_pack_image_list_is_the_callers_path_and_must_exist(tmp_path):
    """--image was read after a chdir to the repository: a missing file ended in a FileNotFoundError traceback
    once the packing had begun, and a relative one named the repository's file, not the caller's."""
    line = refusal("launcher/device_pack.py", "--image", "packages.txt", cwd=tmp_path)
    assert line == ("desmoe: error: --image packages.txt: no such file (the device image's package list, one per "
                    "line)")
