"""Comparison of finished runs: markdown table + CSV + plots, next to the paper's numbers.

    python -m desmoe.methods.desmoe.report runs/desmoe-demo runs/fft-mixed ... [--out runs/compare]

Each run directory holds ``results.json`` (written by the trainer).  With a run of method
``vanilla`` (the untrained base) among them, forgetting = the change of the held-out general
perplexity (``forgetting_ppl_pct``, %) and loss (``forgetting_loss``) relative to it.  Rows are runs;
columns are the shared metrics (downstream task scores, per-domain and held-out
general losses/perplexities, training seconds).  The domain-scaling study names
its runs ``<name>-N<k>-<method>``; those are also plotted against k.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
from pathlib import Path

from desmoe.checkpoint import write_text_atomic
from desmoe.errors import UserError, run_cli

# DES-MoE paper, Table 1 (downstream avg) and Table 2 (general avg), mixed-domain rows.
PAPER = {"fft": (46.6, 55.5), "lora": (43.9, 56.7), "esft_token": (46.8, 58.4), "esft_gate": (47.7, 59.0),
         "desmoe": (51.6, 62.4)}
PAPER_SCALING = "FFT general avg 61.7 -> 55.5 (N=2->6); DES-MoE 62.5 -> 62.4"
PAPER_MINUTES = {"fft": 171.8, "esft_mixed": 67.5, "desmoe": 54.0, "lora": 49.5}


def load_results(run_dirs: list[str]) -> list[dict]:
    rows = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"{path}: no results (did the run finish?)")
        rows.append({"run": Path(d).name, **json.loads(path.read_text())})
    return rows


def add_forgetting(rows: list[dict]) -> None:
    """Held-out general loss/perplexity of each run relative to the untrained base (a "vanilla" run)."""
    base = next((r for r in rows if r["method"] == "vanilla"), None)
    if base is None:
        return
    for key, name in (("ppl/general_heldout", "forgetting_ppl_pct"), ("general", "forgetting_loss")):
        if key in base:
            for r in rows:
                if key in r:
                    r[name] = (100.0 * (r[key] / base[key] - 1.0)) if name.endswith("pct") else r[key] - base[key]


def table(rows: list[dict]) -> tuple[str, str]:
    keys = [k for k in rows[0] if k not in ("run", "method")]
    keys += sorted({k for r in rows for k in r} - set(keys) - {"run", "method"})
    md = ["| run | method | " + " | ".join(keys) + " | paper down./gen. (mixed) |", "|---" * (len(keys) + 3) + "|"]
    for r in rows:
        paper = PAPER.get(r["method"])
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "" for k in keys]
        md.append(f"| {r['run']} | {r['method']} | " + " | ".join(cells) + f" | {'%s / %s' % paper if paper else ''} |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run", "method", *keys], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in ("downstream/mean", "domain_mean", "general", "ppl/general_heldout", "forgetting_ppl_pct",
                           "train_seconds")
               if all(k in r for r in rows)]
    if metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
        for ax, key in zip(axes[0], metrics):
            ax.bar(range(len(rows)), [r[key] for r in rows])
            ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=45, ha="right", fontsize=7)
            ax.set_title(key, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / ".comparison.tmp.png", dpi=100)  # same suffix: matplotlib picks the format from it
        plt.close(fig)
        os.replace(out / ".comparison.tmp.png", out / "comparison.png")
    scaling: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        m = re.search(r"-N(\d+)-", r["run"] + "-")
        key = "ppl/general_heldout" if "ppl/general_heldout" in r else "general"
        if m and key in r:
            scaling.setdefault(r["method"], []).append((int(m.group(1)), r[key]))
    if scaling:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for method, pts in sorted(scaling.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", label=method)
        ax.set_xlabel("number of domains N")
        ax.set_ylabel("held-out general (lower is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / ".scaling.tmp.png", dpi=100)  # same suffix: matplotlib picks the format from it
        plt.close(fig)
        os.replace(out / ".scaling.tmp.png", out / "scaling.png")


@run_cli
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args()
    rows = load_results(args.runs)
    add_forgetting(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = table(rows)
    note = (f"\nPaper (mixed regime): downstream avg / general avg per method in the last column; "
            f"scaling: {PAPER_SCALING}; minutes to absorb six domains: {PAPER_MINUTES}.\n")
    write_text_atomic(out / "comparison.md", md + note)
    write_text_atomic(out / "comparison.csv", csv_text)
    plots(rows, out)
    print(md + note, flush=True)


if __name__ == "__main__":
    main()
