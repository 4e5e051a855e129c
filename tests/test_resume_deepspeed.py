"""Resuming with other DeepSpeed settings or another number of ranks, through the real launcher.

The experiment YAML was always compared on resume, the DeepSpeed JSON and the world size were not:
a changed clipping or weight decay resumed silently, a changed world size died in a ZeRO traceback.
Now the run directory keeps the resolved settings (deepspeed.json) and a resume must match them,
except in the learning rate and speed-only keys.
"""
import json
import re

import pytest

from jobs import ROOT, run_smoke

ARGS = ["--config", str(ROOT / "configs/smoke.yaml"), "model.hidden_size=32", "model.ffn_size=32", "model.ep_size=1",
        "train.seq_len=32", "train.eval_batches=1", "train.log_every=1", "data.max_bytes=300000", "run.name=r"]


def launch(tmp_path, ds: dict, steps: int, nproc: int, *extra: str):
    from rankpool import _free_port

    path = tmp_path / f"ds{abs(hash(json.dumps(ds, sort_keys=True)))}.json"
    path.write_text(json.dumps(ds))
    return run_smoke("--deepspeed", str(path), *ARGS, f"train.steps={steps}", f"run.dir={tmp_path}", *extra,
                     nproc=nproc, port=_free_port(), timeout=300)


def refused(proc, expect: str) -> None:
    errors = {line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")}
    # exit 2 from each rank (torchrun itself reports a failed rank as 1); every rank says the same line
    assert proc.returncode in (1, 2) and len(errors) == 1, proc.stderr[-3000:]
    # no frame of desmoe or DeepSpeed (torchrun prints its own traceback for a failed rank)
    ours = re.escape(str(ROOT / "desmoe")) + "|" + re.escape(str(ROOT / "launcher")) + "|site-packages/deepspeed/"
    assert expect in errors.pop() and not re.search(f'File "({ours})', proc.stderr), proc.stderr[-3000:]


def test_resume_refuses_other_deepspeed_settings_and_world(tmp_path):
    base = json.loads((ROOT / "configs/zero2.json").read_text())
    assert launch(tmp_path, base, 2, 2).returncode == 0
    assert json.loads((tmp_path / "r" / "deepspeed.json").read_text())["world_size"] == 2
    # one rank fewer: the smoke job converts ZeRO's shards only when the global batch stays (tests/test_elastic.py;
    # the other recipes' "DeepSpeed settings differ in world_size (2 -> 1)" is checked there too)
    refused(launch(tmp_path, base, 4, 1), "resuming with 1 ranks would change the global batch from 16 to 8 samples")
    # a recipe that does not convert (all but the smoke job) is refused by the saved record, before DeepSpeed loads
    from desmoe.checkpoint import check_resume_deepspeed
    from desmoe.errors import UserError

    saved = json.loads((tmp_path / "r" / "deepspeed.json").read_text())
    with pytest.raises(UserError, match=re.escape("DeepSpeed settings differ in world_size (2 -> 1)")):
        check_resume_deepspeed(tmp_path / "r", tmp_path / "r" / "checkpoints", {k: v for k, v in saved.items()
                                                                                if k != "world_size"}, 1)
    refused(launch(tmp_path, {**base, "gradient_clipping": 0.5}, 4, 2), "gradient_clipping (1.0 -> 0.5)")
    # accumulation would make DeepSpeed skip optimizer steps the trainer counts: refused even for a fresh run
    refused(launch(tmp_path, {**base, "gradient_accumulation_steps": 2}, 4, 2, "run.resume=false"),
            "key 'gradient_accumulation_steps': expected \"auto\" or 1")
    # the learning rate and speed-only settings may change
    faster = {**base, "zero_optimization": {**base["zero_optimization"], "overlap_comm": True}}
    proc = launch(tmp_path, faster, 4, 2, "train.lr=0.001")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4]
