"""MTIL metrics exactly as ZSCL defines them (``mtil/results.ipynb::statistics``).

``A[i, j]`` = top-1 accuracy (%) on test set j after training task i; rows are
training stages, columns datasets, both in training order.

* Transfer: per column j >= 2, the mean of the strict upper triangle entries
  A[0..j-1, j] (zero-shot ability on tasks not yet learned), then the mean over
  those T-1 columns; the first dataset drops out.
* Avg: per column the mean over all T rows, then the mean over columns (= the
  mean of all T x T entries).
* Last: the mean of the last row.
"""
from __future__ import annotations

import numpy as np


def _check(acc) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 2, got shape {a.shape}")
    return a


def transfer_per_dataset(acc) -> np.ndarray:
    a = _check(acc)
    return np.array([a[:j, j].mean() for j in range(1, a.shape[0])])


def transfer(acc) -> float:
    return float(transfer_per_dataset(acc).mean())


def avg(acc) -> float:
    return float(_check(acc).mean(axis=0).mean())


def last(acc) -> float:
    return float(_check(acc)[-1].mean())


def mtil_metrics(acc, decimals: int = 1) -> dict[str, float | None]:
    """Transfer / Avg / Last; a one-task sequence (1 x 1) has Avg = Last = its one entry and no Transfer
    (no task is ever seen before it is learned)."""
    a = np.asarray(acc, dtype=np.float64)
    if a.shape == (1, 1):
        return {"transfer": None, "avg": round(float(a[0, 0]), decimals), "last": round(float(a[0, 0]), decimals)}
    return {"transfer": round(transfer(acc), decimals), "avg": round(avg(acc), decimals),
            "last": round(last(acc), decimals)}
