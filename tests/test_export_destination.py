"""Where ``python -m desmoe.export RUN OUT`` may write: OUT is replaced whole once the new folder is complete,
so a folder whose loss is not an older export's is refused in one line before anything is read, and left
as it was.  Typing the run's own folder, its parent (``runs/``), ``.`` or someone's model folder as OUT
deleted it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from desmoe.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


_RUN: dict = {}


@pytest.fixture
def run(ranks, tiny_data, tmp_path_factory, tmp_path):
    """A copy of one real FFT run (tiny Qwen2-MoE, 2 ranks, EP=2, ZeRO-2, 2 steps; trained once per module)
    under ``tmp_path/runs/fft``, without its end-of-run export."""
    import shutil

    if not _RUN:
        from hf_tiny import tiny_config
        from test_export import train_case

        from desmoe.data.prepared import PreparedData
        from desmoe.models.hf_build import write_initial_checkpoint

        root = tmp_path_factory.mktemp("export_dest")
        cfg = tiny_config("qwen2_moe")
        cfg.vocab_size = PreparedData(tiny_data).tokenizer.vocab_size
        base = write_initial_checkpoint(cfg, root / "base", seed=1)
        ranks.run(train_case, str(root), str(base), str(tiny_data), "fft", ("train.steps=2", "export.enabled=false"))
        _RUN["root"] = root
    run = tmp_path / "runs" / "fft"
    shutil.copytree(_RUN["root"] / "fft", run, ignore=shutil.ignore_patterns("tensorboard"))
    return run


@pytest.mark.parametrize("target,message", [
    ("run", "is the run directory {run} or holds it; the export replaces its folder whole, which would delete "
            "the run; choose a new folder"),
    ("parent", "is the run directory {run} or holds it; the export replaces its folder whole, which would "
               "delete the run; choose a new folder"),
    ("model", "exists and is not a folder desmoe wrote (no desmoe-export.json or desmoe-manifest.json); the "
              "export would replace it whole: choose a new folder or remove it first"),
    ("file", "is a file, expected the model folder to write"),
])
def test_a_destination_export_would_destroy_is_refused(run, tmp_path, target, message):
    from desmoe.export import export_run

    model = tmp_path / "my-llama"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("notes")
    out = {"run": run, "parent": run.parent, "model": model, "file": tmp_path / "notes.txt"}[target]
    before = _tree(tmp_path)
    with pytest.raises(UserError) as err:
        export_run(run, out)
    assert str(err.value) == f"{out}: " + message.format(run=run)
    assert _tree(tmp_path) == before


def test_the_current_folder_is_refused_through_the_command(run, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "desmoe.export", str(run), "."], cwd=work, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("desmoe: error: .: is the current folder, which the export "
                                                    "would replace whole; name a new folder")
    assert work.is_dir() and run.is_dir()


def test_exporting_twice_or_into_an_empty_folder_writes_the_model(run, tmp_path):
    from safetensors.torch import load_file

    from desmoe.export import export_run

    (tmp_path / "fresh").mkdir()
    for out in (tmp_path / "fresh", tmp_path / "twice", tmp_path / "twice", run / "export"):
        info = export_run(run, out)
        assert info["tag"] == "step00000002" and (out / "desmoe-export.json").is_file()
    want, got = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "fresh", tmp_path / "twice"))
    assert sorted(want) == sorted(got) and all((want[k] == got[k]).all() for k in want)
    assert (run / "checkpoints" / "latest").is_file()
