"""launcher/desmoe_study.py reuses a finished run only for the same config, data and base.  The config names
the base by path (``base.hf: cache/base/embedded_moe``), and launcher/pretrain.py with other overrides
retrains into that path: every finished run of the old base was then reused, and compared, as if it had
started from the new one."""
import json
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launcher"))  # behind the package: a spawned rank must import desmoe/, not launcher/desmoe.py

_usr1 = signal.getsignal(signal.SIGUSR1)
import desmoe_study  # noqa: E402
signal.signal(signal.SIGUSR1, _usr1)  # the launcher arms SIGUSR1 when imported; the test process keeps its own
from desmoe.config import dump_yaml, load_config  # noqa: E402
from desmoe.recipes.des_moe.recipe import DESMoEExperiment  # noqa: E402


def test_a_finished_run_is_reused_only_from_the_same_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (base / "model.safetensors").write_bytes(b"weights of the first base")
    run = load_config(DESMoEExperiment, ROOT / "configs/desmoe_demo.yaml", ["data.source=stdlib", f"base.hf={base}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    (run_dir / "config.yaml").write_text(dump_yaml(run))

    def reused() -> bool:  # what the study decides for this run directory, its inputs taken now
        return desmoe_study.reusable(run, run_dir, desmoe_study.inputs_stamp(run))

    assert not reused()  # a run of the older launcher: no record of its inputs
    (run_dir / "inputs.sha256").write_text(desmoe_study.inputs_stamp(run))
    assert reused()

    (base / "model.safetensors").write_bytes(b"weights of a base retrained into the same path")
    assert not reused()
    (base / "model.safetensors").write_bytes(b"weights of the first base")
    assert reused()
    (base / "tokenizer.model").write_bytes(b"another tokenizer beside the same weights")
    assert not reused()
    # the same base rebuilt: its report (training seconds) and the manifest hashing it differ, the base not
    (run_dir / "inputs.sha256").write_text(desmoe_study.inputs_stamp(run))
    (base / "report.json").write_text(json.dumps({"train_s_this_run": 512.3}))
    (base / "desmoe-manifest.json").write_text(json.dumps({"files": {"report.json": [1, "ab"]}}))
    assert reused()
