"""Rank-0 monitoring: TensorBoard scalars/images, a tqdm bar, and a metrics log.

Every rank may call these methods; only rank 0 writes.  Metrics also go to
``metrics.jsonl`` in the run directory (one JSON object per logged step), which
is what the loss-curve printout and run inspection read.
"""
from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from desmoe.distributed import is_rank0
from desmoe.errors import UserError


def tensorboard_command(logdir: str | Path, *extra: str) -> str:
    """The command a user pastes to watch ``logdir``, quoted for the shell (a run.dir may hold a space)."""
    return " ".join(["tensorboard", "--logdir", shlex.quote(str(logdir)), *extra])


class Monitor:
    def __init__(self, run_dir: str | Path, total_steps: int, initial_step: int = 0, desc: str = "train") -> None:
        self.enabled = is_rank0()
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard drops what earlier event files hold from this step on (a killed run's steps
        # after its checkpoint, a run started over), or a resumed run's curves show both runs' points per step;
        # a start at step 0 has no checkpoint: it redoes step 0 too (the config text, a vanilla evaluation)
        purge = initial_step + 1 if initial_step > 0 else 0
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "",
                labels: Optional[Mapping[str, Mapping[int, str]]] = None) -> None:
        """One metrics row; in TensorBoard a scalar each, except categorical keys (``labels``: key ->
        {value: name}, e.g. the step's domain), which are text: a smoothed line of categories reads wrong."""
        if not self.enabled:
            return
        for key, value in values.items():
            if labels and key in labels:
                self.writer.add_text(f"{prefix}{key}", labels[key].get(int(value), str(value)), step)
            else:
                self.writer.add_scalar(f"{prefix}{key}", float(value), step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **{f"{prefix}{k}": float(v) for k, v in values.items()}}) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def heatmap(self, step: int, tag: str, matrix: np.ndarray, xlabel: str = "", ylabel: str = "",
                xticks: Optional[list[str]] = None, yticks: Optional[list[str]] = None, title: str = "",
                vmin: Optional[float] = None, vmax: Optional[float] = None) -> None:
        """An image of ``matrix`` with named rows/columns and a title; pass ``vmin``/``vmax`` so the
        colour scale stays the same at every step (images of one tag are then comparable)."""
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        fig = heatmap_figure(step, tag, matrix, xlabel, ylabel, xticks, yticks, title, vmin, vmax)
        self.writer.add_image(tag, _figure_to_chw(fig), step)
        plt.close(fig)

    def progress(self, n: int = 1, **postfix: float) -> None:
        if self.enabled:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.enabled and self.writer is not None:
            self.bar.close()
            self.writer.flush()
            self.writer.close()
            self.writer = None


def heatmap_figure(step: int, tag: str, matrix: np.ndarray, xlabel: str = "", ylabel: str = "",
                   xticks: Optional[list[str]] = None, yticks: Optional[list[str]] = None, title: str = "",
                   vmin: Optional[float] = None, vmax: Optional[float] = None):
    """The figure ``Monitor.heatmap`` writes (see there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * matrix.shape[1] + 1.5), max(2.0, 0.35 * matrix.shape[0] + 1)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # unnamed rows/columns are indices (an expert, a layer): matplotlib's own ticks read 0.5 or -1 for few of them
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, rotation=60 if max(map(len, xticks), default=0) > 3 else 0,
                      ha="right" if max(map(len, xticks), default=0) > 3 else "center", fontsize=7)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    ax.set_title(f"{title or tag} (step {step})", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def _figure_to_chw(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    buf.seek(0)
    import matplotlib.image as mpimg

    rgba = mpimg.imread(buf)
    return np.transpose(rgba[..., :3], (2, 0, 1))


def _parse_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) pairs; an undecodable LAST line is a write torn by a kill and is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON (expected one metrics row per line)") from None
    return rows


def _logged(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("step"), int)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The logged rows: objects with an integer step.  A line added by hand (a note, a list) is not one; the
    curves, the summary and the inspection skip it instead of failing on it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for _, row in _parse_rows(path) if _logged(row)]


def truncate_metrics(run_dir: str | Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (work lost since the last checkpoint).  ``after_step`` 0 is a
    start without a checkpoint (none is ever at step 0): it redoes step 0 too, so every logged row goes."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    rows = [line for line, row in _parse_rows(path)
            if not _logged(row) or (after_step > 0 and row["step"] <= after_step)]  # notes stay
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in rows))
    tmp.replace(path)


def ascii_curve(points: list[tuple[int, float]], width: int = 60, height: int = 10, label: str = "loss") -> str:
    """A terminal plot of (step, value) points, for people watching a console."""
    if not points:
        return "(no points)"
    steps, values = zip(*points)
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for s, v in points:
        x = int((s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 1))
        y = height - 1 - int((v - lo) / span * (height - 1))
        grid[y][x] = "*"
    rows = [f"{hi:8.3f} |" + "".join(grid[0])]
    rows += ["         |" + "".join(r) for r in grid[1:-1]]
    rows += [f"{lo:8.3f} |" + "".join(grid[-1]), "         +" + "-" * width,
             f"          step {steps[0]} .. {steps[-1]}   ({label})"]
    return "\n".join(rows)


def plot_curves(path: str | Path, series: Mapping[str, list[tuple[int, float]]], ylabel: str = "loss",
                title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in series.items():
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def loss_curves(run_dir: str | Path, val_label: str, unit: str, val_key: str = "val/loss") -> tuple[list, list]:
    """(step, loss) of ``train/loss`` and ``val_key`` from the run's metrics; writes loss.png and prints
    the training curve (what an LM run shows at its end)."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r[val_key]) for r in rows if val_key in r]
    if train:
        plot_curves(Path(run_dir) / "loss.png", {"train": train, val_label: val}, ylabel=f"cross-entropy ({unit})")
        print(ascii_curve(train, label=f"train loss, {unit}"), flush=True)
    return train, val
