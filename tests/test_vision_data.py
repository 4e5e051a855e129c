"""The offline image task sequence: tiny profile from real pinned packages, reader, splits, cards."""
import json
import sys
from pathlib import Path

import pytest
import torch

from desmoe.errors import UserError
from desmoe.vision.tasks import load_task_sequence

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache" / "sources"  # git-ignored; shared with `python -m data_prep.images`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data_prep.images import build

    out = tmp_path_factory.mktemp("images") / "tiny"
    build("tiny", out, CACHE)
    return out


def test_tiny_sequence_contents(tiny):
    tasks = load_task_sequence(tiny)
    assert [t.name for t in tasks] == ["mnist", "animals", "letters"]
    assert [t.zero_shot_only for t in tasks] == [False, False, True]
    mnist, animals, letters = tasks
    assert mnist.classnames == [str(i) for i in range(10)] and animals.classnames[-1] == "zebra"
    assert len(letters.classnames) == 26
    for t in tasks:
        assert t.train_x.dtype == torch.uint8 and t.train_x.shape[1:] == (64, 64, 3)
        assert t.train_x.shape[0] == t.train_y.numel() and t.test_x.shape[0] == t.test_y.numel()
        assert set(t.train_y.tolist()) == set(range(t.num_classes)) == set(t.test_y.tolist())
        assert all("{}" in tpl for tpl in t.templates)
        assert (tiny / "cards" / f"{t.name}.md").read_text().count("\n| ") == t.num_classes + 1
    assert torch.bincount(mnist.train_y).tolist() == [20] * 10  # per-class counts of the profile
    # real images, not noise: digit strokes are sparse bright pixels on black
    assert 0.05 < (mnist.train_x[..., 0] > 128).float().mean() < 0.4
    # train and test images are different images
    train = {bytes(x.numpy()) for x in animals.train_x}
    assert not any(bytes(x.numpy()) in train for x in animals.test_x)
    assert load_task_sequence(tiny, include_zero_shot=False)[-1].name == "animals"


def test_build_is_deterministic_and_cached(tiny):
    from data_prep.images import PROFILES, build, build_task
    from data_prep.sources import SourceCache, load_manifest

    manifest, cache = load_manifest(ROOT / "data_prep" / "manifest.yaml"), SourceCache(CACHE)
    roots = {n: cache.unpack(manifest[n]) for n in ("images-mnist5k", "images-fonts-dejavu")}
    stored = {t.name: t for t in load_task_sequence(tiny)}
    profile = PROFILES["tiny"]
    for name, counts in (("mnist", profile.tasks[0][1]), ("letters", profile.control[1])):
        again = build_task(name, counts, profile, roots, 64, seed=0)
        assert torch.equal(again.train_x, stored[name].train_x) and torch.equal(again.test_y, stored[name].test_y)
    other = build_task("mnist", profile.tasks[0][1], profile, roots, 64, seed=1)
    assert not torch.equal(other.train_x, stored["mnist"].train_x)
    stamp = (tiny / "mnist.npz").stat().st_mtime_ns
    build("tiny", tiny, CACHE)  # up to date: nothing rewritten
    assert (tiny / "mnist.npz").stat().st_mtime_ns == stamp
    # a folder built by other rendering code (stamped with its digest) is rebuilt, not reused
    index = json.loads((tiny / "tasks.json").read_text())
    (tiny / "tasks.json").write_text(json.dumps({**index, "code": "0" * 16}))
    build("tiny", tiny, CACHE)
    assert (tiny / "mnist.npz").stat().st_mtime_ns != stamp
    assert json.loads((tiny / "tasks.json").read_text())["code"] == index["code"]
    assert torch.equal(load_task_sequence(tiny)[0].train_x, stored["mnist"].train_x)


def test_bad_inputs_one_line(tmp_path, tiny, monkeypatch, capsys):
    from data_prep.images import main

    with pytest.raises(UserError, match="not an image task sequence") as err:
        load_task_sequence(tmp_path)
    assert str(err.value).endswith(f"--out {tmp_path}`")
    with pytest.raises(UserError, match=r"no task 'cifar' \(have: mnist, animals, letters\)"):
        load_task_sequence(tiny, names=["cifar"])
    monkeypatch.setattr(sys, "argv", ["images", "--profile", "huge", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "desmoe: error: --profile 'huge': expected one of tiny, demo"
    index = json.loads((tiny / "tasks.json").read_text())
    assert index["profile"] == "tiny" and index["size"] == 64


def test_a_named_folder_built_by_other_code_is_read_with_a_warning(tiny, tmp_path, capsys):
    """data.root naming a folder data_prep.images built with other code: read as it is, and said so."""
    import shutil

    from desmoe.integrity import seal
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    seq = tmp_path / "seq"
    shutil.copytree(tiny, seq)
    load_sequence(DataConfig(sequence="offline", root=str(seq), profile="tiny"))
    assert "built by other" not in capsys.readouterr().out
    index = json.loads((seq / "tasks.json").read_text())
    (seq / "tasks.json").write_text(json.dumps({**index, "code": "0" * 16}))
    seal(seq)  # as that code sealed it
    tasks, controls = load_sequence(DataConfig(sequence="offline", root=str(seq), profile="tiny"))
    assert [t.name for t in tasks + controls] == ["mnist", "animals", "letters"]
    assert f"{seq} was built by other data_prep.images code" in capsys.readouterr().out


def test_the_project_folder_built_by_other_code_is_rebuilt(tiny, tmp_path, monkeypatch, capsys):
    """data/images-<profile> (the project's own folder, named or not) is rebuilt when other code built it."""
    import shutil

    from desmoe.integrity import seal
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    monkeypatch.setenv("DESMOE_CACHE", str(CACHE.parent))
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "data" / "images-tiny"
    shutil.copytree(tiny, own)
    index = json.loads((own / "tasks.json").read_text())
    (own / "tasks.json").write_text(json.dumps({**index, "code": "0" * 16}))
    seal(own)
    for root in ("", "data/images-tiny"):
        load_sequence(DataConfig(sequence="offline", root=root, profile="tiny"))
        assert json.loads((own / "tasks.json").read_text())["code"] == index["code"]
        (own / "tasks.json").write_text(json.dumps({**index, "code": "0" * 16}))
        seal(own)
    assert capsys.readouterr().out.count("rebuilding (built with another code)") == 2
