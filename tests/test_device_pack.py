"""What travels to a lent GPU machine (launcher/device_pack.py) and what unpacks it there
(launcher/on_device.sh): the dependency closure less the image, the two-part split of a file too large
for one call, and the join with its checksum.  No network: the fetch itself is exercised by packing."""
import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "launcher"))  # behind the package: a spawned rank must import desmoe/, not launcher/desmoe.py

import device_pack  # noqa: E402

from desmoe.errors import UserError  # noqa: E402


def installed() -> dict:
    return {canonicalize_name(d.metadata["Name"]): None for d in md.distributions()}


def test_closure_is_what_the_image_lacks_at_the_installed_versions():
    lacking = lambda *names: {k: v for k, v in installed().items() if k not in names}  # noqa: E731
    need = device_pack.closure(("deepspeed",), lacking("deepspeed", "hjson", "pydantic", "pydantic-core"))
    assert need == {n: md.version(n) for n in ("deepspeed", "hjson", "pydantic", "pydantic-core")}
    assert device_pack.closure(("deepspeed",), installed()) == {}  # the image has it all
    # a package the image has is not walked: its own dependencies came with it
    need = device_pack.closure(("deepspeed",), lacking("deepspeed", "hjson", "pydantic-core"))
    assert need == {n: md.version(n) for n in ("deepspeed", "hjson")}


def test_closure_refuses_an_image_version_a_carried_package_cannot_use():
    image = {k: v for k, v in installed().items() if k != "deepspeed"}
    image["hjson"] = "0.0.1"  # deepspeed asks for any hjson: fine
    assert device_pack.closure(("deepspeed",), image) == {"deepspeed": md.version("deepspeed")}
    image["pydantic"] = "1.0"  # deepspeed 0.19 needs pydantic >= 2
    with pytest.raises(UserError, match=r"deepspeed==[\d.]+ needs pydantic.*, but the device image has pydantic==1\.0"):
        device_pack.closure(("deepspeed",), image)


def test_closure_refuses_what_is_not_installed_here():
    with pytest.raises(UserError, match="'no-such-package-xyz' is needed on the device but not installed here"):
        device_pack.closure(("no-such-package-xyz",), {})


def test_image_list_reads_names_and_versions_and_refuses_an_empty_file(tmp_path):
    f = tmp_path / "image.txt"
    f.write_text("# comment\nTorch==2.11.0\nsentence_transformers  # trailing\n\n")
    assert device_pack.image_packages(f) == {"torch": "2.11.0", "sentence-transformers": None}
    f.write_text("# nothing\n")
    with pytest.raises(UserError, match=f"{f}: no package names"):
        device_pack.image_packages(f)
    shipped = device_pack.image_packages(ROOT / "configs/device/image-packages.txt")
    assert {"torch", "transformers", "accelerate"} <= set(shipped) and "deepspeed" not in shipped
    assert shipped["transformers"] == "5.17.0"


def test_wheel_tags_for_the_device():
    from packaging.utils import parse_wheel_filename

    ok = ["deepspeed-0.19.8-py3-none-any.whl", "multiprocess-0.70.19-py312-none-any.whl",
          "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"]
    bad = ["x-1-cp311-cp311-manylinux_2_17_x86_64.whl", "x-1-cp312-cp312-manylinux_2_17_aarch64.whl",
           "x-1-cp312-cp312-win_amd64.whl"]
    tags = device_pack.device_tags()
    assert all(tags & set(parse_wheel_filename(n)[3]) for n in ok)
    assert not any(tags & set(parse_wheel_filename(n)[3]) for n in bad)


def split_and_join(tmp_path, monkeypatch, payload: bytes, limit: int):
    """Pack two calls with no packages to fetch, then unpack them one call at a time as the device would."""
    repo = tmp_path / "repo"
    (repo / device_pack.MNIST).mkdir(parents=True)
    (repo / "data/realbase").mkdir(parents=True)
    (repo / "cache/realbase/probes").mkdir(parents=True)
    (repo / device_pack.MNIST / "digits.whl").write_bytes(b"d" * 1000)
    smol = repo / device_pack.SMOL
    smol.parent.mkdir(parents=True)
    smol.write_bytes(payload)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(device_pack, "LIMIT", limit)
    monkeypatch.setattr(device_pack, "MARGIN", 0)
    monkeypatch.setattr(device_pack, "tree_bytes", lambda: 0)
    calls = {k: {**v, "roots": ()} for k, v in device_pack.CALLS.items()}
    (repo / ".device").mkdir()
    device_pack.pack(repo / ".device", calls, {})
    return repo


def test_the_two_parts_fill_call1_and_join_on_the_device(tmp_path, monkeypatch):
    payload = os.urandom(4000)
    repo = split_and_join(tmp_path, monkeypatch, payload, limit=3000)
    a = (repo / ".device/call1/smol/part-call1").read_bytes()
    b = (repo / ".device/call2/smol/part-call2").read_bytes()
    line = (repo / ".device/call1/smol/wheel.sha256").read_bytes()
    assert a + b == payload and len(a) == 3000 - 1000 - len(line)  # call 1 full: limit - sources - the sum
    for call in ("call1", "call2"):  # each call within the limit with what it carries
        carried = [repo / ".device" / call, *(repo / c for c in device_pack.CALLS[call]["carry"])]
        assert device_pack.du(carried) <= 3000
    shutil.copy(ROOT / "launcher/on_device.sh", repo / "on_device.sh")
    (repo / device_pack.SMOL).unlink()  # the device has neither the wheel nor the call2 folder at first
    call2 = repo / ".device/call2"
    shutil.move(call2, tmp_path / "call2")
    env = {**os.environ, "DESMOE_STASH": str(tmp_path / "stash")}
    run = lambda: subprocess.run(["bash", "on_device.sh", "true"], cwd=repo, env=env, capture_output=True,  # noqa: E731
                                 text=True)
    assert run().returncode == 0 and not (repo / device_pack.SMOL).exists()  # one part: nothing to join yet
    shutil.rmtree(repo / ".device/call1")  # the next call replaces .device
    shutil.move(tmp_path / "call2", call2)
    r = run()
    assert r.returncode == 0, r.stderr
    assert (repo / device_pack.SMOL).read_bytes() == payload
    # a corrupted part is refused in one line, and nothing is left at the wheel's path
    (repo / device_pack.SMOL).unlink()
    (tmp_path / "stash/part-call1").write_bytes(a[:-1] + bytes([a[-1] ^ 1]))
    shutil.rmtree(repo / ".device")
    r = run()
    assert r.returncode == 1 and not (repo / device_pack.SMOL).exists()
    assert r.stderr.strip().count("\n") == 0 and "sha256" in r.stderr and str(device_pack.SMOL) in r.stderr
    assert hashlib.sha256(payload).hexdigest() in r.stderr


def test_a_payload_that_two_calls_cannot_carry_is_refused(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not fit beside what the two calls carry"):
        split_and_join(tmp_path, monkeypatch, os.urandom(5000), limit=2000)


def test_call2_carries_what_the_gpu_study_reads():
    """The GPU study once read data/realbase-instruct, which no call carried: every cell would have failed
    on the device.  What it reads and what launcher/realbase.py heals on must travel in call 2."""
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy

    cfg = load_config(RealbaseStudy, ROOT / "configs" / "realbase_study_gpu.yaml")
    carry = device_pack.CALLS["call2"]["carry"]
    assert cfg.experiment.data.source in carry and "data/realbase" in carry
    assert cfg.study.scores.probes in carry


def test_call2_on_a_fresh_machine_says_call1_must_be_redone(tmp_path):
    """The stash lives only while the machine is warm: call 2 on a machine given back after call 1 has
    part 2 alone; it says so in one line instead of leaving the study to fail on a missing file."""
    (tmp_path / ".device/call2/smol").mkdir(parents=True)
    (tmp_path / ".device/call2/smol/part-call2").write_bytes(b"b")
    (tmp_path / ".device/call2/smol/wheel.sha256").write_text(f"{'0' * 64}  {device_pack.SMOL}\n")
    shutil.copy(ROOT / "launcher/on_device.sh", tmp_path / "on_device.sh")
    r = subprocess.run(["bash", "on_device.sh", "true"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "DESMOE_STASH": str(tmp_path / "stash")})
    assert r.returncode == 0 and not (tmp_path / device_pack.SMOL).exists()
    assert r.stderr.count("\n") == 1 and "the machine was given back after call 1" in r.stderr, r.stderr


def test_call1_carries_the_archive_the_trge_stage_unpacks(tmp_path):
    """Only the MNIST archive travels (not the whole source cache, which the tests fill with other data)."""
    from data_prep.sources import SourceCache, load_manifest

    src = load_manifest(ROOT / "data_prep" / "manifest.yaml")["images-mnist5k"]
    assert SourceCache(tmp_path / "cache/sources")._archive_dir(src) == tmp_path / device_pack.MNIST
    assert device_pack.CALLS["call1"]["carry"] == [device_pack.MNIST]
