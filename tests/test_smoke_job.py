"""The core's smoke job end to end: launcher, 2 ranks, EP=2, metrics, TensorBoard, resume."""
import json

from jobs import ROOT, run_smoke


def launch(run_dir, steps, port):
    return run_smoke("--deepspeed", str(ROOT / "configs/zero2.json"), "--config", str(ROOT / "configs/smoke.yaml"),
                     f"train.steps={steps}", "train.log_every=2", "train.eval_every=4", "train.save_every=4",
                     "train.eval_batches=1", "data.max_bytes=300000", "model.hidden_size=32", "model.ffn_size=32",
                     "train.seq_len=32", f"run.dir={run_dir}", "run.name=t", nproc=2, port=port)


def test_smoke_job_trains_logs_and_resumes(tmp_path):
    from rankpool import _free_port

    first = launch(tmp_path, 4, _free_port())
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "t"
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").stat().st_size > 0
    second = launch(tmp_path, 6, _free_port())
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [2, 4, 6], "the resumed run must continue at step 5, not start over"
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"
    assert "validation loss" in second.stdout
