"""A finished run leaves a model others can load (desmoe.export).

DES-MoE (ALR + DGES copies averaged at inference), FFT, ESFT-Token and LoRA each train a tiny Qwen2-MoE
(shared expert + gate) on 2 real ranks, EP=2, ZeRO-2, on the tiny prepared data; the trainer exports at
the end.  Each folder is loaded in a fresh process with ``from_pretrained`` (DES-MoE with its shipped code,
the others as the family's own class) and its logits must equal the training-time model's on the same
tokens.  ``python -m desmoe.export`` in one process writes the same tensors from the 2-rank checkpoint;
``python -m desmoe.evaluate`` on the folder gives the in-process harness numbers; damaged and missing
inputs are refused in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tolerance import bound, transformer_terms

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # method -> extra overrides
    "desmoe": ("train.steps=5", "desmoe.schedule.t1=0.4", "desmoe.dges.phi=0.1", "desmoe.dges.duplicate_shared=true",
               "desmoe.dges.spare_experts=2", "desmoe.dges.duplicate_inference=average"),
    "fft": ("train.steps=3",),
    "esft_token": ("train.steps=3",),
    "lora": ("train.steps=3",),
}
TASK, LIMIT = "desmoe_mcq_law", 6


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(7))


def train_case(root: str, base: str, data_root: str, method: str, extra: tuple) -> dict:
    """One run through the Trainer (it exports at its end); the training-time model's logits on fixed tokens."""
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.config import DESMoEExperiment
    from desmoe.recipes.des_moe.recipe import DESMoERecipe
    from desmoe.training.trainer import Trainer

    cfg = load_config(DESMoEExperiment, None, [
        f"base.hf={base}", "model.ep_size=2", f"data.source={data_root}", "data.domains=[law, math]",
        "train.micro_batch=2", "train.seq_len=32", "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
        "train.save_every=1000", "train.lr=0.02", f"desmoe.method={method}", "desmoe.dges.update_every=2",
        "desmoe.baseline.esft_profile_tokens=128", "evaluation.downstream=false", f"run.dir={root}",
        f"run.name={method}", *extra])
    trainer = Trainer(DESMoERecipe(cfg), str(ROOT / "configs/zero2.json"))
    trainer.run()
    model = trainer.engine.module.eval()
    out = {}
    with torch.no_grad():
        out["logits"] = model(_ids(model.config.vocab_size)).logits.float()
    if method == "desmoe":  # the in-process harness on the expert-parallel model (every rank answers)
        from desmoe.data.prepared import PreparedData
        from desmoe.evaluation.harness import make_lm, run, task_dir

        names = task_dir(data_root, Path(root) / "tasks")
        assert TASK in names
        out["harness"] = run(make_lm(model, PreparedData(data_root).tokenizer), [TASK], Path(root) / "tasks",
                             limit=LIMIT)
        blocks = [m for m in model.modules() if getattr(m, "slot_fanout", None) is not None]
        out["averaged_layers"] = len(blocks)
    return out


LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folders, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
out = {}
for name, (path, remote) in folders.items():
    kw = dict(trust_remote_code=True) if remote else {}
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw).eval()
    with torch.no_grad():
        out[name] = (type(model).__name__, model(ids).logits.float())
torch.save(out, sys.argv[3])
"""


def _env(tmp: Path) -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf_modules"), PYTHONPATH=str(ROOT))


_RUNS: dict = {}  # the four runs, trained once for every test of this module


@pytest.fixture
def runs(ranks, tiny_data, tmp_path_factory):
    if not _RUNS:
        from hf_tiny import tiny_config

        from desmoe.data.prepared import PreparedData
        from desmoe.models.hf_build import write_initial_checkpoint

        root = tmp_path_factory.mktemp("export")
        cfg = tiny_config("qwen2_moe")
        cfg.vocab_size = PreparedData(tiny_data).tokenizer.vocab_size
        base = write_initial_checkpoint(cfg, root / "base", seed=1)
        results = {m: ranks.run(train_case, str(root), str(base), str(tiny_data), m, extra)
                   for m, extra in METHODS.items()}
        _RUNS["r"] = (root, base, tiny_data, results)
    return _RUNS["r"]


def test_exports_load_fresh_and_match_the_training_model(runs):
    root, base, _, results = runs
    folders = {}
    for method in METHODS:
        folder = root / method / "export"
        config = json.loads((folder / "config.json").read_text())
        custom = method == "desmoe"  # the ALR router needs the shipped code; the others are Qwen2-MoE again
        assert (config["model_type"] == "desmoe_moe") == custom, (method, config["model_type"])
        assert ("auto_map" in config) == custom and (folder / "modeling_desmoe.py").is_file() == custom
        assert (folder / "desmoe-manifest.json").is_file()
        folders[method] = (str(folder), custom)
    assert results["desmoe"][0]["averaged_layers"] == 2, "no DGES copies were made: the fan-out went untested"
    assert json.loads((root / "desmoe" / "export" / "config.json").read_text())["desmoe_moe"]["fanout"]
    folders["base"] = (str(base), False)  # the untrained model: training must have moved every method's logits
    vocab = json.loads((Path(base) / "config.json").read_text())["vocab_size"]
    torch.save(_ids(vocab), root / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(folders), str(root / "ids.pt"),
                           str(root / "fresh.pt")], capture_output=True, text=True, timeout=600, env=_env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(root / "fresh.pt")
    terms = transformer_terms(hidden=32, layers=2, seq=20, ffn=40, heads=4, top_k=3 * 2)
    for method in METHODS:
        cls, got = fresh[method]
        assert cls == ("DesmoeMoEForCausalLM" if method == "desmoe" else "Qwen2MoeForCausalLM"), (method, cls)
        for r in results[method]:  # both ranks computed the same tokens
            want = r["logits"]
            err, tol = float((got - want).abs().max()), bound(terms, scale=float(want.abs().max()))
            assert err <= tol, f"{method}: exported logits differ by {err:.3g} (bound {tol:.3g})"
            assert float((fresh["base"][1] - want).abs().max()) > 100 * tol, f"{method}: training changed nothing"


def test_cli_exports_the_same_tensors_in_one_process(runs, tmp_path):
    from safetensors.torch import load_file

    root = runs[0]
    proc = subprocess.run([sys.executable, "-m", "desmoe.export", str(root / "desmoe"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "desmoe_moe" in proc.stdout
    want, got = (load_file(str(p / "model.safetensors")) for p in (root / "desmoe" / "export", tmp_path / "out"))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_a_run_without_checkpoint_is_one_line(runs, tmp_path, capsys, monkeypatch):
    from desmoe.export import main

    (tmp_path / "empty").mkdir()
    shutil.copy(runs[0] / "fft" / "config.yaml", tmp_path / "empty" / "config.yaml")
    monkeypatch.setattr(sys, "argv", ["desmoe.export", str(tmp_path / "empty"), str(tmp_path / "o2")])
    with pytest.raises(SystemExit) as code:
        main()
    err = capsys.readouterr().err
    assert code.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no checkpoint to export" in err and not (tmp_path / "o2").exists()


def _damaged(root: Path, tmp: Path, method: str) -> tuple[Path, Path]:
    run = tmp / method
    shutil.copytree(root / method, run, ignore=shutil.ignore_patterns("export", "tensorboard"))
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return run, tag


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"layer_0_expert_3_mp_rank_00_model_states\.pt: checkpoint file is truncated"),
    ("flip", r"layer_0_expert_3_mp_rank_00_model_states\.pt: checkpoint file was altered"),
    ("garbage", r"layer_0_expert_3_mp_rank_00_model_states\.pt: not a readable checkpoint file"),
    ("missing", r"layer_0_expert_3_mp_rank_00_model_states\.pt: missing"),
])
def test_damaged_expert_files_are_refused_in_one_line(runs, tmp_path, damage, message):
    from desmoe.errors import UserError
    from desmoe.export import export_run
    from desmoe.integrity import MANIFEST

    run, tag = _damaged(runs[0], tmp_path, "fft")
    victim = tag / "layer_0_expert_3_mp_rank_00_model_states.pt"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:  # without a manifest (a checkpoint written before manifests, or by hand): the reader's own checks
        (tag / MANIFEST).unlink()
        if damage == "garbage":
            victim.write_bytes(b"\x00" * len(data))
        else:
            victim.unlink()
    with pytest.raises(UserError, match=message) as err:
        export_run(run, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_evaluate_on_the_folder_equals_the_in_process_harness(runs, tmp_path):
    root, _, data_root, results = runs
    proc = subprocess.run([sys.executable, "-m", "desmoe.evaluate", str(root / "desmoe" / "export"), "--data",
                           str(data_root), "--tasks", TASK, "--limit", str(LIMIT), "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "r.json").read_text())
    for r in results["desmoe"]:
        assert got[TASK]["acc_norm"] == r["harness"][TASK]["acc_norm"]
        assert got[TASK]["acc"] == r["harness"][TASK]["acc"]
