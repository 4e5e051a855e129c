"""What desmoe writes carries a manifest; what it reads back is checked against it (desmoe/integrity.py)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from desmoe.errors import UserError
from desmoe.integrity import MANIFEST, seal, verify

ROOT = Path(__file__).resolve().parents[1]


def test_prepared_data_is_sealed_and_checked(tiny_data, tmp_path):
    from desmoe.data.prepared import PreparedData

    listed = json.loads((tiny_data / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(tiny_data).as_posix() for p in tiny_data.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(listed) == on_disk and "meta.json" in listed
    PreparedData(tiny_data, verify_hashes=True)
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_data, copy)
    victim = max((p for p in copy.rglob("*.bin")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(UserError, match=rf"^{victim}: prepared data folder file is truncated"):
        PreparedData(copy)


def test_exported_model_is_sealed_and_a_truncated_weight_file_is_refused(tmp_path):
    from hf_tiny import tiny_config

    from desmoe.models.hf_build import write_initial_checkpoint
    from desmoe.models.hf_moe import load_hf_moe

    out = write_initial_checkpoint(tiny_config("olmoe"), tmp_path / "olmoe", seed=0)
    assert verify(out, "model folder", hashes=True)
    load_hf_moe(out)
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"^{weights}: model folder file is truncated"):
        load_hf_moe(out)


def test_inspect_run_hashes_every_kept_checkpoint(tmp_path):
    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"\x01" * 4096)
    seal(tag)
    (tag.parent / "latest").write_text("step00000004")
    cmd = [sys.executable, "-m", "desmoe.inspect_run", str(tmp_path / "run")]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "step00000004  ok (1 files, sha256 verified)" in ok.stdout, ok.stdout + ok.stderr
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"\x02" * 4096)  # same size: only the hash can tell
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "was altered" in bad.stdout, bad.stdout
