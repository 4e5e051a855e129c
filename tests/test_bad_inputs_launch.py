"""The bad-input catalogue through the real launcher: a mistake ends in one `desmoe: error:` line with no
traceback (exit 2), a corrupted checkpoint is named and left alone, a non-finite loss stops the run in one
`desmoe: failed:` line (exit 1).  The catalogue of single mistakes is tests/test_bad_inputs.py."""
import pytest

from test_bad_inputs import snapshot


def _launch(*args):
    from jobs import run_smoke

    return run_smoke(*args, timeout=300)


@pytest.mark.parametrize("args,expect", [
    (["--config", "configs/smoke.yaml", "model.num_expert=4"], "unknown key 'model.num_expert'"),
    (["--deepspeed", "configs/none.json"], "configs/none.json: DeepSpeed config not found"),
    (["--config", "configs/smoke.yaml", "model.ep_size=2", "run.dir=/nonexistent-never"], "key 'model.ep_size': expected a divisor of the world size 1"),
    (["--config", "configs/smoke.yaml", "run.dir=README.md"], "key 'run.dir': expected a directory or a path that does not exist yet, got 'README.md (a file)'"),
])
def test_launcher_reports_one_line_without_traceback(args, expect):
    proc = _launch(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_corrupted_checkpoint_is_named_and_left_alone(tmp_path):
    args = ["--config", "configs/smoke.yaml", "model.hidden_size=32", "model.ffn_size=32", "model.ep_size=1",
            "train.seq_len=32", "train.steps=2", "train.eval_batches=1", "data.max_bytes=300000",
            f"run.dir={tmp_path}", "run.name=r"]
    assert _launch(*args).returncode == 0
    ckpt = tmp_path / "r" / "checkpoints" / "step00000002"
    victim = ckpt / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:64])
    before = snapshot(tmp_path / "r")
    proc = _launch(*args[:-2], "train.steps=3", *args[-2:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    # the tag's manifest catches it before anything is read
    assert f"{victim}: checkpoint file is truncated (64 bytes, the manifest says" in errors[0]
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "r") == before, "a failed resume must not modify the run directory"
    # without a manifest (a checkpoint written before manifests), the load itself fails in one line
    (ckpt / "desmoe-manifest.json").unlink()
    proc = _launch(*args[:-2], "train.steps=3", *args[-2:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "step00000002: cannot load checkpoint" in errors[0]


def test_non_finite_loss_stops_naming_step_and_rank(tmp_path):
    import torch

    args = ["--config", "configs/smoke.yaml", "model.hidden_size=32", "model.ffn_size=32", "model.ep_size=1",
            "train.seq_len=32", "train.eval_batches=1", "data.max_bytes=300000", f"run.dir={tmp_path}", "run.name=n"]
    assert _launch(*args, "train.steps=2").returncode == 0
    states = tmp_path / "n" / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=False)
    sd["module"]["embed.weight"].fill_(float("nan"))  # what a diverged run leaves behind
    torch.save(sd, states)
    proc = _launch(*args, "train.steps=4")
    failures = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: failed:")]
    assert proc.returncode == 1 and len(failures) == 1, proc.stderr[-2000:]
    assert "non-finite loss (nan) at step 3 on rank 0" in failures[0]
    assert "Traceback" not in proc.stderr
