"""A finished multi-domain run's results: results.json / .csv / .md and loss plots in its run directory."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from desmoe import checkpoint
from desmoe.monitor import ascii_curve, plot_curves, read_metrics, tensorboard_command

VAL = "val/loss/"  # held-out next-token loss per domain (nats): val/loss/<domain>


def write_results(run_dir: Path, method: str, domains: list[str], seconds: float) -> dict:
    """results.json / results.csv / results.md and loss plots in the run directory."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "val/loss/domain_mean" in r]
    final = evals[-1] if evals else {}
    downstream = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}  # the last value of each
    result = {"method": method, "train_seconds": round(seconds, 2),
              **{k[len(VAL):]: round(v, 4) for k, v in final.items() if k.startswith(VAL)},
              **{k.split("/", 1)[1]: round(v, 4) for k, v in downstream.items()}}
    checkpoint.write_text_atomic(run_dir / "results.json", json.dumps(result, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result))
    writer.writeheader()
    writer.writerow(result)
    checkpoint.write_text_atomic(run_dir / "results.csv", buf.getvalue())
    checkpoint.write_text_atomic(run_dir / "results.md", results_table([result]))
    train = [(r["step"], r["train/task_loss"]) for r in rows if "train/task_loss" in r]
    if train:
        val = {k[len(VAL):]: [(r["step"], r[k]) for r in evals] for k in final if k.startswith(VAL)}
        plot_curves(run_dir / "loss.png", {"train (task)": train, **val}, ylabel="next-byte NLL (nats)")
        print(ascii_curve(train, label=f"{method} task loss"), flush=True)
    print(results_table([result]), flush=True)
    print(f"run directory: {run_dir}  ({tensorboard_command(run_dir / 'tensorboard')})", flush=True)
    return result


def results_table(results: list[dict]) -> str:
    """Markdown table: one row per method, held-out loss per domain (lower is better)."""
    keys = [k for k in results[0] if k not in ("method",)]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + r["method"] + " | " + " | ".join(f"{r.get(k, float('nan')):.4g}" for k in keys) + " |"
              for r in results]
    return "\n".join(lines) + "\n"
