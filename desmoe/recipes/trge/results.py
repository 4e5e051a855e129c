"""TRGE's results: the stage's TensorBoard rows and images, the run summary (ZSCL metrics) and the
reports in the run directory (accuracy matrix CSV + PNG, results.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from desmoe import checkpoint
from desmoe.recipes.trge import metrics
from desmoe.recipes.trge.baselines import METHODS_BY_NAME


def log_stage(monitor, cfg, tasks, controls, progress, t, step) -> None:
    names = [x.name for x in tasks + controls]
    row = progress["rows"][-1] + progress["control_rows"][-1]
    monitor.scalars(step, {f"acc/{n}": a for n, a in zip(names, row)})
    if METHODS_BY_NAME[cfg.method].identifies:
        monitor.scalars(step, {f"id_acc/{n}": a for n, a in zip(names, progress["id_rows"][-1])})
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    for i, r in enumerate(progress["rows"]):
        matrix[i] = r
    task_names = [x.name for x in tasks]
    # the rows of tasks not learned yet stay NaN: drawn blank, where 0 would show them as 0 % accuracy
    monitor.heatmap(step, "accuracy_matrix", matrix, xlabel="test set", ylabel="after task",
                    xticks=task_names, yticks=task_names, vmin=0.0, vmax=100.0,
                    title="top-1 accuracy (%) on each test set after each task")
    gw = np.array(progress["gw_rows"][-1])
    monitor.heatmap(step, "group_weights", gw, xlabel="expert group (task)", ylabel="test set",
                    xticks=[str(g + 1) for g in range(gw.shape[1])], yticks=names, vmin=0.0, vmax=1.0,
                    title="mean inter-group routing weight per test set")


# the identifier.* and inter.* keys each method's evaluation does not read (evaluate.evaluate_task and
# baselines.*.predict): the shipped configs set them for trge and the baselines run on the same config
# (method=<baseline>), so a results.json naming an identifier and a reading it never used misled its reader
NOT_READ = {"trge": [], "zero_shot": ["identifier.*", "inter.*"],
            "continual_ft": ["identifier.*", "inter.* but inter.text_routing"],
            "shared_pool": ["inter.* but inter.text_routing and inter.unknown_names"]}


def summarize(cfg, tasks, controls, progress, model, method) -> dict:
    """``method``: the run's baselines.Method."""
    A = np.array(progress["rows"], dtype=np.float64)
    out = {"method": cfg.method, "tasks": [t.name for t in tasks], "controls": [c.name for c in controls],
           "accuracy_matrix": progress["rows"], "control_rows": progress["control_rows"],
           "id_rows": progress["id_rows"], "seconds_per_task": progress["seconds"],
           "timing": progress.get("timing", {}),
           "trainable_params_per_task": method.trainable_per_task(model, progress),
           "identifier": cfg.identifier.backend + ("+batch-vote" if cfg.identifier.per_batch else ""),
           "reading": cfg.inter.reading, "fusion": cfg.fusion.schedule,
           "config_not_used": NOT_READ[cfg.method],
           # images that failed to decode while loading (skipped, not fatal)
           "skipped_images": {t.name: int(t.meta.get("skipped", 0)) for t in tasks + controls}}
    if A.ndim == 2 and A.shape[0] == A.shape[1] >= 1:
        out.update(metrics.mtil_metrics(A))
        # a variant first asked for by a resumed run has rows for the later tasks only, one a resumed run no longer
        # asks for the earlier ones: reported with the tasks they follow, without metrics (they need every row),
        # instead of vanishing from the results.  The tasks are recorded (evaluate_stage); a checkpoint from before
        # that holds rows of an added variant only: the last tasks
        after = {v: progress.get("variant_after", {}).get(v, []) for v in progress.get("variants", {})}
        after = {v: a if len(a) == len(progress["variants"][v]) else
                 list(range(A.shape[0] - len(progress["variants"][v]) + 1, A.shape[0] + 1)) for v, a in after.items()}
        out["variants"] = {v: {"accuracy_matrix": rows, **metrics.mtil_metrics(np.array(rows))}
                           if after[v] == list(range(1, A.shape[0] + 1)) else
                           {"accuracy_matrix": rows, "after_tasks": after[v]}
                           for v, rows in progress.get("variants", {}).items()}
    return out


def write_reports(run_dir: Path, summary: dict, tasks, controls, progress) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in tasks]
    A = np.array(progress["rows"])
    lines = ["after_task," + ",".join(names + [c.name for c in controls])]
    for i, r in enumerate(progress["rows"]):
        lines.append(names[i] + "," + ",".join(f"{v:.2f}" for v in r + progress["control_rows"][i]))
    checkpoint.write_text_atomic(run_dir / "accuracy_matrix.csv", "\n".join(lines) + "\n")
    checkpoint.write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=1))
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(A, vmin=0, vmax=100, cmap="viridis")
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(A.shape[0]), names[:A.shape[0]], fontsize=7)
    ax.set_title(f"{summary['method']}: accuracy after each task")
    fig.tight_layout()
    tmp = run_dir / ".accuracy_matrix.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(run_dir / "accuracy_matrix.png")
