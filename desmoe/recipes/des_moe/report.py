"""Comparison of finished runs: markdown table + CSV + plots, next to the paper's numbers.

    python -m desmoe.recipes.des_moe.report runs/desmoe-demo runs/fft-mixed ... [--out runs/compare]

Each run directory holds ``results.json`` (written by the trainer).  With a run of method
``vanilla`` (the untrained base) among them, forgetting = the change relative to it of the
general-domain test perplexity (``forgetting_general_ppl_pct``, %: the base's own pretraining
distribution), of the never-trained held-out text's perplexity (``forgetting_ppl_pct``, %) and loss
(``forgetting_loss``).  Rows are runs; columns are the shared metrics (downstream task scores,
per-domain and general losses/perplexities, training seconds).  The domain-scaling study names its
runs ``<name>-N<k>-<method>``; those are also plotted against k (``scaling.png``), tabulated
(``scaling.csv``, ``scaling.md``) with each method's general-ability drop from the smallest to the
largest N.
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
         "desmoe": (51.6, 62.4), "desmoe w/o ALR": (48.9, 59.8), "desmoe w/o DGES": (47.3, 55.6)}
PAPER_SCALING = "FFT general avg 61.7 -> 55.5 (N=2->6); DES-MoE 62.5 -> 62.4"
PAPER_MINUTES = {"fft": 171.8, "esft_mixed": 67.5, "desmoe": 54.0, "lora": 49.5}


def load_results(run_dirs: list[str]) -> list[dict]:
    rows = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"{path}: no results (did the run finish?)")
        row = {"run": Path(d).name, **json.loads(path.read_text())}
        row["method"] = method_label(row["method"], Path(d) / "config.yaml")
        rows.append(row)
    return rows


def method_label(method: str, config: Path) -> str:
    """The ablations of DES-MoE by name, from the run's saved config (desmoe.alr/dges.enabled)."""
    if method != "desmoe" or not config.is_file():
        return method
    import yaml

    cfg = (yaml.safe_load(config.read_text()) or {}).get("desmoe", {})
    off = [name for key, name in (("alr", "ALR"), ("dges", "DGES")) if not cfg.get(key, {}).get("enabled", True)]
    return f"desmoe w/o {' + '.join(off)}" if off else method


def add_forgetting(rows: list[dict]) -> None:
    """Held-out general loss/perplexity of each run relative to the untrained base (a "vanilla" run)."""
    base = next((r for r in rows if r["method"] == "vanilla"), None)
    if base is None:
        return
    from desmoe.recipes.des_moe.evaluate import HELDOUT_KEY

    # the held-out loss: "general", or HELDOUT_KEY when "general" is a fine-tuning domain (its own val loss then
    # sits under "general", a trained domain's loss, no measure of forgetting)
    held = HELDOUT_KEY if HELDOUT_KEY in base else "general"
    for key, name in (("ppl/general", "forgetting_general_ppl_pct"), ("ppl/general_heldout", "forgetting_ppl_pct"),
                      (held, "forgetting_loss")):
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


# What a person reads on screen: one row per method, units and direction in the header (<= 100 columns).
HEADLINE = (("general ppl ↓", "ppl/general", "{:.1f}"),
            ("vs base % ↓", "forgetting_general_ppl_pct", "{:+.1f}"),
            ("downstream ↑", "downstream/mean", "{:.3f}"),
            ("domain loss (nats) ↓", "domain_mean", "{:.3f}"),
            ("train s ↓", "train_seconds", "{:.0f}"))
LEGEND = ("↓ lower is better, ↑ higher is better.  general ppl: perplexity on the general domain's test\n"
          "split (the base's own domain); vs base: its change against the untrained base;\n"
          "downstream: {} (lm-evaluation-harness);\ndomain loss: mean test loss, trained domains.")
DOWNSTREAM = {"exact": "mean exact match (0-1), closed-book tasks of trained domains",
              "mcq": "mean multiple-choice accuracy"}


def legend(rows: list[dict]) -> str:
    """The legend, naming what ``downstream/mean`` averages in these runs (exact-match tasks or MCQ)."""
    exact = any(k.startswith("exact/") for r in rows for k in r)
    return LEGEND.format(DOWNSTREAM["exact" if exact else "mcq"])


def headline(rows: list[dict]) -> str:
    """The headline columns as a fixed-width table; a missing value is '-'."""
    width = max([len("method")] + [len(r["method"]) for r in rows])
    head = ["method".ljust(width)] + [name for name, _, _ in HEADLINE]
    lines = ["  ".join(head)]
    for r in rows:
        cells = [r["method"].ljust(width)]
        for name, key, fmt in HEADLINE:
            value = r.get(key)
            cells.append((fmt.format(value) if isinstance(value, (int, float)) else "-").rjust(len(name)))
        lines.append("  ".join(cells))
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in ("downstream/mean", "domain_mean", "ppl/general", "ppl/general_heldout",
                           "forgetting_general_ppl_pct", "forgetting_ppl_pct", "train_seconds")
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
    pairs = [r for r in rows if "domain_mean" in r and "ppl/general" in r]
    if len(pairs) > 1:  # forgetting vs fit: lower-left is better on both
        fig, ax = plt.subplots(figsize=(5.0, 3.8))
        for r in pairs:
            ax.scatter(r["domain_mean"], r["ppl/general"])
            ax.annotate(r["run"], (r["domain_mean"], r["ppl/general"]), fontsize=6)
        ax.set_xlabel("trained domains' val loss (nats)")
        ax.set_ylabel("general-domain perplexity")
        fig.tight_layout()
        fig.savefig(out / ".tradeoff.tmp.png", dpi=100)  # same suffix: matplotlib picks the format from it
        plt.close(fig)
        os.replace(out / ".tradeoff.tmp.png", out / "tradeoff.png")
    points = scaling_points(rows)
    if points:
        keys = [k for k in SCALING_KEYS if any(k in p for pts in points.values() for p in pts)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for method, pts in sorted(points.items()):
                xy = [(p["N"], p[key]) for p in pts if key in p]
                if xy:
                    ax.plot(*zip(*xy), marker="o", label=method)
            ax.set_xticks(sorted({p["N"] for pts in points.values() for p in pts}))
            ax.set_xlabel("number of domains N")
            ax.set_title(SCALING_KEYS[key], fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / ".scaling.tmp.png", dpi=100)  # same suffix: matplotlib picks the format from it
        plt.close(fig)
        os.replace(out / ".scaling.tmp.png", out / "scaling.png")


# What the scaling study plots against N (lower is better for perplexities, higher for accuracy).
SCALING_KEYS = {"ppl/general": "general-domain ppl (base's own data)", "ppl/general_heldout": "held-out text ppl",
                "general": "held-out loss (nats)", "downstream/mean": "downstream MCQ mean (trained domains)",
                "domain_mean": "trained domains' val loss (nats)"}


def scaling_points(rows: list[dict]) -> dict[str, list[dict]]:
    """Runs named <name>-N<k>-<method>, per method, sorted by k."""
    points: dict[str, list[dict]] = {}
    for r in rows:
        m = re.search(r"-N(\d+)-", r["run"] + "-")
        if m:
            points.setdefault(r["method"], []).append({"N": int(m.group(1)), **r})
    return {k: sorted(v, key=lambda p: p["N"]) for k, v in points.items()}


def scaling_table(rows: list[dict]) -> tuple[str, str]:
    """One row per (N, method); then each method's general-ability drop from the smallest to the largest N
    (perplexity rise in %), and DES-MoE's drop as a share of FFT's (the issue's target: <= 10 %)."""
    points = scaling_points(rows)
    if not points:
        return "", ""
    keys = [k for k in SCALING_KEYS if any(k in p for pts in points.values() for p in pts)] + ["train_seconds"]
    flat = sorted((p for pts in points.values() for p in pts), key=lambda p: (p["N"], p["method"]))
    md = ["| N | method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    md += [f"| {p['N']} | {p['method']} | " + " | ".join(f"{p[k]:.4g}" if k in p else "" for k in keys) + " |"
           for p in flat]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["N", "method", "run", *keys], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat)
    drops = {}
    for method, pts in points.items():
        first, last = pts[0], pts[-1]
        for key in ("ppl/general", "ppl/general_heldout"):
            if key in first and key in last and len(pts) > 1:
                drops[(method, key)] = 100.0 * (last[key] / first[key] - 1.0)
    lines = []
    for (method, key), d in sorted(drops.items()):
        pts = points[method]
        lines.append(f"- {method}: {key} {pts[0][key]:.4g} (N={pts[0]['N']}) -> {pts[-1][key]:.4g} "
                     f"(N={pts[-1]['N']}): {d:+.1f} %")
    for key in ("ppl/general", "ppl/general_heldout"):
        if ("desmoe", key) in drops and ("fft", key) in drops and drops[("fft", key)] > 0:
            lines.append(f"- {key}: DES-MoE's rise is {100 * drops[('desmoe', key)] / drops[('fft', key)]:.0f} % "
                         f"of FFT's (target <= 10 %)")
    note = ("\nGeneral-ability drop from the smallest to the largest N (perplexity rise; lower is better):\n"
            + "\n".join(lines) + f"\nPaper: {PAPER_SCALING}.\n") if lines else ""
    return "\n".join(md) + "\n" + note, buf.getvalue()


@run_cli
def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    smd, scsv = scaling_table(rows)
    if smd:
        write_text_atomic(out / "scaling.md", smd)
        write_text_atomic(out / "scaling.csv", scsv)
    short = headline(rows)
    write_text_atomic(out / "headline.txt", short)
    print(f"\n{short}\n{legend(rows)}\n"
          f"full table ({len(csv_text.splitlines()[0].split(','))} columns): {out / 'comparison.md'}"
          + (f"\n\n{smd}" if smd else ""), flush=True)


if __name__ == "__main__":
    main()
