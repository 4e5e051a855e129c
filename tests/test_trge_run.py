"""The whole TRGE run on 2 real ranks (EP=2, ZeRO-2) on the small real digit
sequence: accuracy matrix after every task, ZSCL metrics, reports, and resume."""
import json

import numpy as np
import pytest


@pytest.fixture(scope="module", autouse=True)
def digits_cached():
    from desmoe.recipes.trge.data import load_mnist_5k

    load_mnist_5k()


def case_config(run_dir, method, extra=()):
    from desmoe.config import load_config
    from desmoe.recipes.trge.recipe import TRGEExperiment

    overrides = [f"method={method}", f"run.dir={run_dir}", f"run.name={method}", "backbone.hidden_size=32",
                 "groups.bottleneck=8", "train.steps_per_task=3", "train.micro_batch=8", "train.eval_batch=64",
                 "train.proto_samples=48", "data.n_train=64", "data.n_test=32", "eval.variants=[oracle]", *extra]
    return load_config(TRGEExperiment, "configs/trge_digits.yaml", overrides)


def run_case(run_dir, method, extra=(), ds="configs/zero2.json"):
    from desmoe.recipes.trge.recipe import run_trge

    return run_trge(case_config(run_dir, method, extra), ds)


def resume_error(run_dir, method):
    from desmoe.errors import UserError

    try:
        run_case(run_dir, method)
    except UserError as err:
        return str(err)
    return None


def test_trge_run_two_ranks_and_resume(ranks, tmp_path):
    first = ranks.run(run_case, str(tmp_path), "trge", ("train.save_every=2",))
    s = first[0]
    A = np.array(s["accuracy_matrix"])
    assert A.shape == (3, 3) and ((A >= 0) & (A <= 100)).all()
    assert first[1]["accuracy_matrix"] == s["accuracy_matrix"]  # counts are all-reduced
    from desmoe.recipes.trge.metrics import mtil_metrics

    assert {k: s[k] for k in ("transfer", "avg", "last")} == mtil_metrics(A)
    assert len(s["control_rows"]) == 3 and len(s["id_rows"][0]) == 4
    # label sets here are disjoint, so a test set whose task is not learned yet (and the control) is an
    # entirely new label set: served by the frozen model (inter.group_filter novel_set), the same at every
    # stage.  A consistency check only: 3 steps barely move the adapters, so it also holds without the
    # filter; test_trge_core::test_new_label_set_is_served_by_the_frozen_model is the one that fails then.
    assert A[0, 2] == A[1, 2] and len({r[0] for r in s["control_rows"]}) == 1
    oracle = np.array(s["variants"]["oracle"]["accuracy_matrix"])  # ablation on the same groups
    assert oracle.shape == (3, 3) and s["variants"]["oracle"]["last"] == mtil_metrics(oracle)["last"]
    # the prototype identifier tells the learned domains apart (chance would be ~1/2 .. 1/3)
    assert s["id_rows"][2][0] > 60 and s["id_rows"][2][1] > 60
    run = tmp_path / "trge"
    for name in ("accuracy_matrix.csv", "accuracy_matrix.png", "results.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((run / "results.json").read_text())["accuracy_matrix"] == s["accuracy_matrix"]
    assert list((run / "tensorboard").iterdir())
    # resume inside a task: back to the checkpoint at step 2 of the last task (as after a preemption
    # there), the run trains only that task's last step and ends with the very same results; rows logged
    # after that checkpoint (here a fake one) are dropped, and a variant new to this run does not break it
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000009" and (ckpts / "step00000008").is_dir()
    (ckpts / "latest").write_text("step00000008")
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["train/loss"] for r in rows if r["step"] == 9 and "train/loss" in r]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10**6, "train/loss": 1.0}) + "\n")
    again = ranks.run(run_case, str(tmp_path), "trge", ("train.save_every=2", "eval.variants=[oracle,no_fusion]"))
    assert again[0]["accuracy_matrix"] == s["accuracy_matrix"]
    # the variant new to the resumed run covers the last task only: reported as such (it vanished before)
    assert again[0]["variants"]["no_fusion"]["after_tasks"] == [3] and "avg" not in again[0]["variants"]["no_fusion"]
    assert len(again[0]["variants"]["no_fusion"]["accuracy_matrix"]) == 1
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 9 and all(r["step"] != 10**6 for r in rows)
    # the redone last step computed the very same loss: it continued from step 2, not from the task's start
    assert [r["train/loss"] for r in rows if r["step"] == 9 and "train/loss" in r] == last_loss and last_loss

    # Checkpoints hold no frozen backbone weight (the run rebuilds it), every trainable one (the resume
    # above loads them and refuses a missing one, see below), and only the newest run.keep_checkpoints=2.
    import torch

    from desmoe.recipes.trge.backbones import load_backbone

    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step")) == ["step00000008", "step00000009"]
    states = torch.load(ckpts / "step00000009" / "mp_rank_00_model_states.pt", weights_only=False)
    backbone = load_backbone(case_config(str(tmp_path), "trge").backbone).model
    frozen = {f"base.{n}" for n, _ in backbone.named_parameters()}
    assert states["module"] and not frozen & set(states["module"]) and states["frozen_param_fragments"] is None
    sites = {k.split(".router.")[0] for k in states["module"]}  # the dense trainable part: every site's gates
    assert len(states["module"]) == len(sites) * 3 * 2  # 3 tasks x (w_gate, w_noise)
    expert_files = {p.name for p in (ckpts / "step00000009").glob("layer_*_expert_*_model_states.pt")}
    assert expert_files == {f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt"
                            for i in range(len(sites)) for e in range(6)}
    # a checkpoint that lacks a trainable weight is refused in one line, never loaded non-strictly
    dropped = sorted(states["module"])[0]
    del states["module"][dropped]
    torch.save(states, ckpts / "step00000009" / "mp_rank_00_model_states.pt")
    errors = ranks.run(resume_error, str(tmp_path), "trge")  # the tag's manifest sees the rewritten file
    assert errors[0] and "mp_rank_00_model_states.pt: checkpoint file is" in errors[0], errors
    from desmoe.integrity import seal
    seal(ckpts / "step00000009")  # as if written so: the load itself must refuse the missing key
    errors = ranks.run(resume_error, str(tmp_path), "trge")
    assert errors[0] and f"lacks trainable key '{dropped}'" in errors[0] and "\n" not in errors[0], errors


def test_trge_resumes_exactly_in_bf16(ranks, tmp_path):
    """DeepSpeed's bf16 engine (the GPU's path; on a CPU the config's "auto" is fp32): the frozen CLIP in bf16,
    the adapters' fp32 master copies in ZeRO-2.  A resume at step 8 of 9 redoes the last step with the same
    loss and ends with the same accuracy matrix as the uninterrupted run."""
    from pathlib import Path

    cfg = json.loads((Path(__file__).resolve().parents[1] / "configs/zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    ds = tmp_path / "zero2_bf16.json"
    ds.write_text(json.dumps(cfg))
    first = ranks.run(run_case, str(tmp_path), "trge", ("train.save_every=2",), str(ds))[0]
    run = tmp_path / "trge"
    assert json.loads((run / "deepspeed.json").read_text())["bf16"]["enabled"] is True
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["train/loss"] for r in rows if r["step"] == 9 and "train/loss" in r]
    import shutil

    import torch

    def weights(tag):  # every trained tensor of a checkpoint: the dense gates and each expert's file
        out = {}
        for f in sorted(tag.glob("*model_states.pt")):
            state = torch.load(f, weights_only=False)
            for k, v in state.get("module", state).items():  # an expert's file is its state dict itself
                if isinstance(v, torch.Tensor):
                    out[f"{f.name}:{k}"] = v
        return out

    shutil.copytree(run / "checkpoints" / "step00000009", tmp_path / "uninterrupted")
    (run / "checkpoints" / "latest").write_text("step00000008")
    again = ranks.run(run_case, str(tmp_path), "trge", ("train.save_every=2",), str(ds))[0]
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in rows if r["step"] == 9 and "train/loss" in r] == last_loss and last_loss
    # the redone step's update needs AdamW's moments and the fp32 master copies as they were at step 8
    want, got = weights(tmp_path / "uninterrupted"), weights(run / "checkpoints" / "step00000009")
    assert want.keys() == got.keys() and len(want) > 0
    assert all(got[k].dtype == torch.bfloat16 for k in got), {k: v.dtype for k, v in got.items()}
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, differ[:3]


def test_trge_dual_encoder_in_bf16_with_a_feature_cache(ranks, tmp_path):
    """The CNN tower (EfficientNet-Lite with BatchNorm) under DeepSpeed's bf16 engine, its frozen features cached
    on disk: fp32 pixels against bf16 weights, then BatchNorm's bf16 weights against its fp32 statistics, stopped
    the first bf16 run, and numpy could not hash a bf16 tower to name the cache.  A bf16 and an fp32 run of the
    same tower never share a table (their features differ by bf16 roundings)."""
    from pathlib import Path

    cfg = json.loads((Path(__file__).resolve().parents[1] / "configs/zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    ds = tmp_path / "zero2_bf16.json"
    ds.write_text(json.dumps(cfg))
    cache = tmp_path / "features"
    extra = ("backbone.kind=tiny_dual", "backbone.hidden_size=16", "train.cache_image_features=true",
             f"train.feature_cache={cache}", "eval.variants=[]")
    s = ranks.run(run_case, str(tmp_path / "bf16"), "trge", extra, str(ds))[0]
    A = np.array(s["accuracy_matrix"])
    assert A.shape == (3, 3) and ((A >= 0) & (A <= 100)).all()
    assert len(list(cache.glob("*.pt"))) == 1
    ranks.run(run_case, str(tmp_path / "fp32"), "trge", extra)
    assert len(list(cache.glob("*.pt"))) == 2
