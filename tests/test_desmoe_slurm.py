"""slurm/desmoe_6dom.sh on a real local Slurm (2 emulated nodes x 1 task): the small CPU configuration,
EP=2 across the two nodes, per-rank logs, a run (and TensorBoard) directory per job."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.ffn_size=32", "model.num_experts=4", "model.num_heads=2",
        "data.domains=[email, xml]", "data.general=[json]", "data.max_bytes_per_domain=40000",
        "train.steps=6", "train.micro_batch=4", "train.seq_len=32", "train.log_every=2", "train.eval_every=6",
        "train.eval_batches=1", "train.save_every=6", "desmoe.schedule.t1=0.4", "desmoe.dges.update_every=2"]


def test_desmoe_slurm_script_cpu_mode(slurm, tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1",  # the emulated nodes' names do not resolve
           "DESMOE_CPU": "1", "DESMOE_PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
           "DESMOE_LOG_DIR": str(tmp_path / "logs")}
    job = slurm.submit(ROOT / "slurm/desmoe_6dom.sh", *TINY, f"run.dir={tmp_path}",
                       sbatch_args=("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                                    "--time=00:10:00", f"--output={tmp_path}/job-%j.out"), env=env, cwd=ROOT)
    result = slurm.wait(job, timeout=300)
    assert result.state == "COMPLETED", result.output
    assert "configs/desmoe_cpu.yaml" in result.output and "2 ranks" in result.output, result.output
    run = tmp_path / f"desmoe-6dom-{job}"
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "desmoe" and {"email", "xml", "general"} <= set(results)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    logs = sorted(p.name for p in (tmp_path / "logs").glob(f"*-{job}-rank*.out"))
    assert logs == [f"desmoe-6dom-{job}-rank0.out", f"desmoe-6dom-{job}-rank1.out"], logs
