"""TRGE under configurations and inputs a user may give it: odd but valid values run, invalid ones
are refused in one line naming the key (config check, model build, data load, the real launcher),
and a one-task sequence still reports Avg and Last."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from desmoe.errors import ConfigError, UserError
from jobs import ROOT, clean_env

DIGITS = "configs/trge_digits.yaml"


def _load(*overrides, path=DIGITS):
    from desmoe.config import load_config
    from desmoe.recipes.trge.recipe import TRGEExperiment

    return load_config(TRGEExperiment, path, list(overrides))


@pytest.mark.parametrize("overrides,expect", [
    # the image router keeps groups.max_groups groups: more inter-group weights were cut there, unrenormalised
    (["inter.max_groups=3"], "key 'inter.max_groups': expected at most groups.max_groups=2"),
    (["inter.max_groups=0"], "key 'inter.max_groups': expected an integer >= 1, got 0"),  # all-zero rows
    (["fusion.lam_max=2"], "key 'fusion.lam_max': expected a number in [0, 1], got 2.0"),  # negative "probabilities"
    (["groups.ep_size=0", "groups.num_tasks=3"], "key 'groups.ep_size': expected an integer >= 1, got 0"),
    (["groups.ep_size=0"], "key 'groups.ep_size': expected an integer >= 1, got 0"),  # ZeroDivisionError in set-up
    (["groups.pool_freeze_per_task=-1"], "key 'groups.pool_freeze_per_task': expected an integer >= 0, got -1"),
    (["groups.bottleneck=0"], "key 'groups.bottleneck': expected an integer >= 1, got 0"),
    (["placement.towers=[]"], "key 'placement.towers': expected a non-empty list"),  # empty optimizer traceback
    (["placement.layers=[0,0]"], "key 'placement.layers': expected distinct layer indices"),
    (["identifier.shrinkage=1.5"], "key 'identifier.shrinkage': expected a number in [0, 1], got 1.5"),
    (["identifier.mllm_images=0"], "key 'identifier.mllm_images': expected an integer >= 1, got 0"),
    (["train.label_smoothing=1.5"], "key 'train.label_smoothing': expected a number in [0, 1), got 1.5"),
    (["train.lr=0"], "key 'train.lr': expected a number in (0, 1), got 0.0"),  # was blamed on zero2.json
    (["train.warmup=-1"], "key 'train.warmup': expected an integer >= 0, got -1"),
    (["data.n_test=0"], "key 'data.n_test': expected an integer >= 1, got 0"),  # Avg 0.0 without a word
    (["data.n_train=0"], "key 'data.n_train': expected an integer >= 1, got 0"),
    (["data.sequence=mtil", "data.root=/x", "data.n_train=300", "data.n_test=200", "data.max_train_per_class=-1"],
     "key 'data.max_train_per_class': expected an integer >= 0 (0 = all), got -1"),
    (["data.sequence=mtil", "data.root=/x", "data.n_train=300", "data.n_test=200", "data.order=III"],
     "key 'data.order': expected 'I' or 'II' (the MTIL orders), got 'III'"),
    # a key only another sequence reads was ignored
    (["data.max_train_per_class=50"], "key 'data.max_train_per_class': expected unset with data.sequence=digits "
                                      "(it applies to mtil and folders only), got 50"),
    (["data.sequence=offline", "data.n_train=300", "data.n_test=50"],
     "key 'data.n_test': expected unset with data.sequence=offline (it applies to digits only), got 50"),
    (["eval.variants=[oracle,no_fusion,oracle]"], "key 'eval.variants': expected each variant once"),  # dropped
    (["data.sequence=offline", "data.n_train=300", "data.n_test=200", "data.profile=dmeo"],
     "key 'data.profile': expected one of tiny, demo, got 'dmeo'"),  # was named as data_prep's --profile
    # the checkpoint's own resolution was used without a word
    (["backbone.kind=hf_clip", "backbone.path=/m", "backbone.image_size=336"],
     "key 'backbone.image_size': expected unset with backbone.kind=hf_clip (it applies to towers, tiny_clip, "
     "tiny_dual only), got 336"),
    (["backbone.kind=towers", "backbone.layers=4"], "key 'backbone.layers': expected unset with backbone.kind=towers"),
    # keys the chosen identifier backend / inter reading / fusion schedule never reads changed nothing
    (["identifier.backend=description", "identifier.threshold_quantile=0.05"],
     "key 'identifier.threshold_quantile': expected unset with identifier.backend=description (it applies to "
     "prototype, gaussian only), got 0.05"),
    (["identifier.shrinkage=0"], "key 'identifier.shrinkage': expected unset with identifier.backend=prototype "
                                 "(it applies to gaussian only), got 0.0"),
    (["identifier.mllm_path=/m"], "key 'identifier.mllm_path': expected unset with identifier.backend=prototype"),
    (["identifier.threshold=0.3", "identifier.threshold_quantile=0.05"],
     "key 'identifier.threshold': expected 0 (unset) when threshold_quantile > 0 sets each task's threshold"),
    (["identifier.calibration_split=0.25"],  # held out from the prototype's fit, then used by nothing
     "key 'identifier.calibration_split': expected 0 unless threshold_quantile > 0"),
    (["inter.reading=task_anchored", "inter.beta=0.2"],
     "key 'inter.beta': expected unset with inter.reading=task_anchored (it applies to sample_anchored only)"),
    (["inter.tau=0.3"], "key 'inter.tau': expected unset with inter.reading=sample_anchored (it applies to "
                        "task_anchored only), got 0.3"),
    (["fusion.schedule=adapted", "fusion.lam_max=0.5"],  # λ was 1 whatever lam_max said
     "key 'fusion.lam_max': expected unset with fusion.schedule=adapted (it applies to progress and constant only)"),
])
def test_invalid_values_refused_in_one_line(overrides, expect):
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg and msg.startswith(DIGITS), msg


@pytest.mark.parametrize("overrides", [
    ["groups.experts_per_group=1", "groups.top_k=1"], ["groups.experts_per_group=3", "groups.top_k=3"],
    ["groups.max_groups=3", "inter.max_groups=3"], ["inter.max_groups=1"], ["fusion.lam_max=0"],
    ["fusion.lam_max=1", "fusion.schedule=constant"], ["train.warmup=0"],
    ["identifier.backend=gaussian", "identifier.shrinkage=0", "identifier.threshold_quantile=0.1",
     "identifier.calibration_split=0.2", "identifier.per_batch=true"], ["inter.reading=task_anchored", "inter.tau=0.3"],
    ["identifier.backend=description", "identifier.threshold=0.2"], ["fusion.schedule=frozen"],
    ["identifier.backend=oracle", "identifier.threshold_quantile=0.05", "identifier.calibration_split=0.25"],
    ["train.steps_per_task=1"], ["groups.num_tasks=1"], ["placement.layers=[0,-1]"], ["groups.ep_size=1"],
    ["backbone.kind=towers", "backbone.image_size=64"], ["backbone.kind=embedded", "backbone.path=/m"],
    ["data.sequence=mtil", "data.root=/x", "data.n_train=300", "data.n_test=200", "data.max_train_per_class=5",
     "data.order=II", "data.image_size=32"],
])
def test_odd_but_valid_values_are_accepted(overrides):
    _load(*overrides)


def test_mtil_config_loads_with_its_paths():
    cfg = _load("backbone.path=/models/clip", "data.root=/datasets/mtil", path="configs/trge_mtil.yaml")
    assert cfg.data.image_size == 224 and cfg.groups.num_tasks == 11
    with pytest.raises(ConfigError, match=r"key 'data.root': expected the folder holding the MTIL datasets"):
        _load("backbone.path=/models/clip", path="configs/trge_mtil.yaml")


def test_placement_layers_beyond_the_tower_one_line():
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.groups import GroupSpec
    from desmoe.recipes.trge.model import Placement, TRGEModel

    spec = GroupSpec(num_tasks=2, bottleneck=4)
    for layers, expect in (([5], "expected layer indices in 0..1 (this tower has 2 layers), got 5"),
                           ([0, -2], "expected distinct layers (this tower has 2), got [0, -2]")):
        bb = load_backbone(BackboneConfig(hidden_size=16, layers=2))
        with pytest.raises(UserError) as err:  # was IndexError / two adapters on one layer
            TRGEModel(bb.model, spec, Placement(layers=layers))
        assert f"key 'placement.layers': {expect}" in str(err.value)


def _sequence(folder, tasks):
    from desmoe.vision.tasks import ImageTask, save_index, save_task, task_entry

    out = []
    g = torch.Generator().manual_seed(0)
    for name, classes, n_train, n_test, zero_shot in tasks:
        def split(n):
            y = torch.arange(n) % len(classes)
            return (torch.rand(n, 16, 16, 3, generator=g) * 60 + 80 * y[:, None, None, None]).to(torch.uint8), y
        (tx, ty), (vx, vy) = split(n_train), split(n_test)
        out.append(ImageTask(name, classes, ["a photo of a {}."], tx, ty, vx, vy, zero_shot_only=zero_shot))
        save_task(folder, out[-1])
    save_index(folder, [task_entry(t) for t in out])
    return out


def test_unusable_splits_and_paths_one_line(tmp_path):
    from desmoe.recipes.trge.data import DataConfig, load_sequence
    from desmoe.vision.tasks import save_task

    with pytest.raises(UserError) as err:  # the digits have ~2,500 images below five: the test set was empty
        load_sequence(DataConfig(sequence="digits", n_train=5000, n_test=10))
    assert str(err.value) == ("task 'digits-low': no test images (data.n_train=5000 + data.n_test=10 exceed the "
                              "images available to it)")
    seq = tmp_path / "seq"
    tasks = _sequence(seq, [("shapes", ["dark", "light"], 8, 0, False), ("ctrl", ["a", "b"], 4, 4, True)])
    with pytest.raises(UserError, match=r"^task 'shapes': no test images \(check the dataset folder\)$"):
        load_sequence(DataConfig(sequence="offline", root=str(seq)))
    tasks[0].test_x, tasks[0].test_y = tasks[0].train_x, tasks[0].train_y.clone()
    tasks[0].test_y[3] = 2  # two class names
    save_task(seq, tasks[0])
    with pytest.raises(UserError, match=r"^task 'shapes': test label 2 outside 0..1 \(its 2 class names\)$"):
        load_sequence(DataConfig(sequence="offline", root=str(seq)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"data.root '.*file': is a file, expected an image task sequence folder"):
        load_sequence(DataConfig(sequence="offline", root=str(tmp_path / "file")))


def test_launcher_refuses_in_one_line_without_traceback(tmp_path):
    base = [sys.executable, str(ROOT / "launcher/trge.py"), "--deepspeed", "configs/zero2.json", "--config", DIGITS,
            f"run.dir={tmp_path}", "backbone.hidden_size=16", "groups.ep_size=1"]
    for extra, expect in ((["groups.num_tasks=3", "groups.ep_size=0"], "key 'groups.ep_size': expected an integer"),
                          (["placement.layers=[7]"], "key 'placement.layers': expected layer indices in 0..1")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def _one_task_run(run_dir, seq):
    from desmoe.recipes.trge.recipe import run_trge

    cfg = _load(f"run.dir={run_dir}", "run.name=one", "data.sequence=offline", f"data.root={seq}",
                "data.n_train=300", "data.n_test=200", "backbone.hidden_size=16", "groups.bottleneck=4",
                "train.steps_per_task=2", "train.micro_batch=4", "train.proto_samples=8", "eval.variants=[oracle]")
    return run_trge(cfg, "configs/zero2.json")


def test_one_task_sequence_reports_avg_and_last(ranks, tmp_path):
    """2 ranks, EP = 2 over the single task's group of 2 experts; before, results.json had no Avg/Last."""
    import json

    seq = tmp_path / "seq"
    _sequence(seq, [("shapes", ["dark", "mid", "light"], 24, 12, False), ("ctrl", ["a", "b"], 4, 6, True)])
    s = ranks.run(_one_task_run, str(tmp_path), str(seq))[0]
    A = np.array(s["accuracy_matrix"])
    assert A.shape == (1, 1) and s["avg"] == s["last"] == round(A[0, 0], 1) and s["transfer"] is None
    assert s["variants"]["oracle"]["avg"] == round(s["variants"]["oracle"]["accuracy_matrix"][0][0], 1)
    assert json.loads((tmp_path / "one" / "results.json").read_text())["avg"] == s["avg"]
    from desmoe.recipes.trge.report import rows

    assert [r["run"] for r in rows(tmp_path)] == ["one", "one [oracle]"]  # the table lists it


def test_feature_cache_written_beside_another_run_of_the_same_key(tmp_path, monkeypatch):
    """Two runs (a method and its baseline, say) finishing the same frozen-feature table together.  The
    other run's whole write is played inside this one's (real files); with one shared temporary name it
    renamed this run's file away, whose rename then failed with FileNotFoundError."""
    from desmoe.recipes.trge import features
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.data import digit_sequence
    from desmoe.recipes.trge.groups import GroupSpec
    from desmoe.recipes.trge.model import Placement, TRGEModel

    bb = load_backbone(BackboneConfig(kind="tiny_dual", hidden_size=16, image_size=32))
    model = TRGEModel(bb.model, GroupSpec(num_tasks=2, bottleneck=4), Placement(cnn_blocks=1))
    tasks = digit_sequence(n_train=16, n_test=8)[0][:1]
    cache = tmp_path / "features"
    real_save, other = torch.save, []

    def save_while_another_run_writes(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if not other:
            other.append("writing")  # the other run's own save below is a plain one
            other.append(features.frozen_cnn_table(model, bb, tasks, 8, str(cache)))

    monkeypatch.setattr(torch, "save", save_while_another_run_writes)
    table = features.frozen_cnn_table(model, bb, tasks, 8, str(cache))
    monkeypatch.undo()
    (stored,) = cache.iterdir()  # one table, no temporary file left behind
    assert torch.equal(torch.load(stored, weights_only=True)[features.key(tasks[0].name, "test")],
                       table[features.key(tasks[0].name, "test")])


def test_resume_with_another_eval_batch_only_without_the_batch_vote(tmp_path):
    """train.eval_batch only splits the evaluation, unless identifier.per_batch votes per batch: then a resumed
    run with another eval_batch would fill the later rows of the matrix by another protocol (was accepted)."""
    from desmoe import checkpoint
    from desmoe.config import dump_yaml
    from desmoe.recipes.trge.recipe import TRGERecipe

    run = tmp_path / "run"
    (run / "checkpoints" / "step00000003").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000003")
    for vote in ("false", "true"):
        (run / "config.yaml").write_text(dump_yaml(_load(f"identifier.per_batch={vote}")))
        cfg = _load(f"identifier.per_batch={vote}", "train.eval_batch=10", "eval.variants=[oracle]")
        resume = lambda: checkpoint.check_resume_config(run, run / "checkpoints", cfg,  # noqa: E731
                                                        TRGERecipe(cfg).resumable_keys)
        if vote == "false":
            resume()
        else:
            with pytest.raises(UserError, match=r"differs in train.eval_batch \(100 -> 10\)"):
                resume()


@pytest.mark.parametrize("per_task,experts_last_task", [(2, 2), (0, 6), (1, 4), (4, 0), (6, 0)])
def test_shared_pool_budget_when_the_pool_runs_out(per_task, experts_last_task):
    """3 tasks, a pool of 6 experts per block: the last task trains what the first two left unfrozen
    (with 6 per task: nothing, where the summary used to claim the whole pool)."""
    from desmoe.moe.layer import moe_blocks
    from desmoe.recipes.trge.backbones import load_backbone
    from desmoe.recipes.trge.baselines import SharedPool
    from desmoe.recipes.trge.model import TRGEModel

    cfg = _load("method=shared_pool", "groups.num_tasks=3", "groups.layout=pool", "groups.bottleneck=4",
                f"groups.pool_freeze_per_task={per_task}", "backbone.hidden_size=16")
    model = TRGEModel(load_backbone(cfg.backbone).model, cfg.groups, cfg.placement)
    pool = SharedPool(cfg, model)
    blocks = moe_blocks(model)
    frozen = [sorted(range(min(6, 3 * per_task)))] * len(blocks)  # what three tasks froze
    expert = sum(p.numel() for p in blocks[0].local_experts[0].parameters())
    gate = sum(p.numel() for p in blocks[0].router.gates[0].parameters())
    got = pool.trainable_per_task(model, {"pool_frozen": frozen, "rows": [[0.0] * 3] * 3})
    assert got == len(blocks) * (experts_last_task * expert + gate)


def test_wrong_model_path_named_before_the_data_is_decoded(tmp_path):
    """MTIL takes long to decode: a backbone.path typo used to surface only after all of it (here the data
    folder is wrong too, and it was the data that was named)."""
    proc = subprocess.run([sys.executable, str(ROOT / "launcher/trge.py"), "--deepspeed", "configs/zero2.json",
                           "--config", "configs/trge_mtil.yaml", f"data.root={tmp_path}",
                           f"backbone.path={tmp_path / 'clip'}", f"run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert f"backbone.path '{tmp_path / 'clip'}': not a folder with a config.json" in errors[0], errors
