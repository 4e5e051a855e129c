"""The targets of a study (issue #18), computed from its CSV rows only: DES-MoE's general drop against
FFT's with downstream against ESFT-Token's, and the N = min -> max domain scaling.  A verdict is
``met`` / ``missed`` only when the margin is at least two standard errors; ``undecided`` below that,
``undefined`` where there is no FFT drop (or no downstream signal) to compare with, ``pending`` while
runs are missing."""
from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Optional

from desmoe.recipes.des_moe.study import RealbaseStudy, select_lr


def _ok(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and all(str(r[k]) == str(v) for k, v in match.items())]


def arm_rows(rows: list[dict], cfg: RealbaseStudy, arm: str, n: Optional[int] = None) -> list[dict]:
    """Finished runs of an arm at its selected lr: every seed at all domains; or, given N = n, the scaling
    seeds' runs at n (in seed order)."""
    lr = select_lr(rows, cfg, arm)
    if lr is None:
        return []
    if n is None:
        n = len(cfg.experiment.data.domains)
        return [r for r in _ok(rows, arm=arm, N=n) if float(r["lr"]) == lr and r["phase"] in ("grid", "seeds")]
    by_seed = {int(r["seed"]): r for r in _ok(rows, arm=arm, N=n) if float(r["lr"]) == lr}
    return [by_seed[seed] for seed in cfg.study.scaling_seed_list() if seed in by_seed]


def scaling_drop(rows: list[dict], cfg: RealbaseStudy, arm: str, lo: int, hi: int) -> tuple[float, float, int]:
    """The arm's general-score drop from N = lo to hi, paired by seed (one init and data order per seed):
    mean over the seeds with both runs, its standard error (std / sqrt(k) for k >= 2 seeds, else the two
    runs' own errors), and k."""
    at_lo = {int(r["seed"]): r for r in arm_rows(rows, cfg, arm, lo)}
    pairs = [(at_lo[int(r["seed"])], r) for r in arm_rows(rows, cfg, arm, hi) if int(r["seed"]) in at_lo]
    drops = [_num(a, "general_score") - _num(b, "general_score") for a, b in pairs]
    m, sd = mean_std(drops)
    if len(drops) == 1:
        sd = math.sqrt(sum(_num(r, "general_score_se") ** 2 for r in pairs[0]))
    return m, sd / math.sqrt(max(len(drops), 1)), len(drops)


def mean_std(values: list[float]) -> tuple[float, float]:
    return (mean(values), stdev(values) if len(values) > 1 else float("nan")) if values else (float("nan"),) * 2


def _num(r: dict, key: str) -> float:
    v = r.get(key)
    return float(v) if v not in (None, "") else float("nan")


def mean_se(rs: list[dict], key: str) -> tuple[float, float]:
    """Mean over runs (seeds) and its standard error: std over seeds / sqrt(k) for k >= 2 runs, else the
    run's own binomial standard error (``<key>_se``; NaN where unknown)."""
    if not rs:
        return float("nan"), float("nan")
    m, sd = mean_std([_num(r, key) for r in rs])
    return m, (sd / math.sqrt(len(rs)) if len(rs) > 1 else _num(rs[0], f"{key}_se"))


def verdict(diff: float, se: float, passes: bool) -> str:
    """``passes``: the criterion holds at the means; decided only when |diff| >= 2 standard errors."""
    if not math.isnan(se) and abs(diff) >= 2 * se:
        return "met" if passes else "missed"
    return "undecided"


def combine(*verdicts: str) -> str:
    if "missed" in verdicts:
        return "missed"
    return "met" if all(v == "met" for v in verdicts) else "undecided (within noise: < 2 standard errors)"


def targets(rows: list[dict], cfg: RealbaseStudy) -> list[dict]:
    """#18's two targets from the CSV: met / missed / undecided (within ~2 standard errors) / undefined
    (no FFT drop to compare with, or no downstream signal) / pending (runs missing)."""
    s, out = cfg.study, []
    base = next((r for r in rows if r["phase"] == "base" and r["status"] == "ok"), None)
    g = {a: mean_se(arm_rows(rows, cfg, a), "general_score") for a in ("desmoe", "fft", "esft_token")}
    d = {a: mean_se(arm_rows(rows, cfg, a), "downstream_score") for a in ("desmoe", "fft", "esft_token")}
    seeds = min(len(arm_rows(rows, cfg, a)) for a in g)
    b, b_se = (_num(base, "general_score"), _num(base, "general_score_se")) if base else (math.nan, math.nan)
    b_se = 0.0 if math.isnan(b_se) and base else b_se
    k = s.forgetting_share
    t = {"target": f"general drop of DES-MoE <= {k:g} x FFT's, downstream >= ESFT-Token's", "seeds": seeds,
         "desmoe_drop": b - g["desmoe"][0], "fft_drop": b - g["fft"][0],
         "desmoe_downstream": d["desmoe"][0], "esft_token_downstream": d["esft_token"][0]}
    fft_se = math.sqrt(b_se ** 2 + g["fft"][1] ** 2)
    moved = [_num(r, "downstream_score") - _num(r, "downstream_score_base")
             for a in g for r in arm_rows(rows, cfg, a)]
    if seeds == 0 or base is None:
        t["status"] = "pending"
    elif t["fft_drop"] <= 0:
        t["status"] = "undefined (FFT has no general drop)"
    elif math.isnan(fft_se):
        t["status"] = "undecided (no standard error: one seed, and the score has no per-run error)"
    elif not t["fft_drop"] >= 2 * fft_se:
        t["status"] = "undecided (FFT's general drop is within 2 standard errors of 0)"
    elif max(moved) <= 0:  # no method moved the downstream score: comparing them would say nothing
        t["status"] = "undefined (no method raised the downstream score above the base's)"
    else:
        diff1 = t["desmoe_drop"] - k * t["fft_drop"]  # = (1-k) base - desmoe + k fft: the base counts (1-k) times
        se1 = math.sqrt(((1 - k) * b_se) ** 2 + g["desmoe"][1] ** 2 + (k * g["fft"][1]) ** 2)
        diff2 = d["desmoe"][0] - d["esft_token"][0]
        se2 = math.sqrt(d["desmoe"][1] ** 2 + d["esft_token"][1] ** 2)
        t.update(forgetting_margin=diff1, forgetting_se=se1, downstream_margin=diff2, downstream_se=se2)
        t["status"] = combine(verdict(diff1, se1, diff1 <= 0), verdict(diff2, se2, diff2 >= 0))
    if 0 < seeds < len(s.seeds) and t["status"] != "pending":
        t["status"] += f" ({seeds} of {len(s.seeds)} seeds)"
    out.append(t)
    lo, hi = s.scaling_sizes[0], s.scaling_sizes[-1]
    k = s.scaling_share
    if lo == hi:  # a protocol without domain scaling (a confirmation at one N): nothing to compare
        out.append({"target": f"N = 2 -> 5: general drop of DES-MoE <= {k:g} x FFT's", "seeds": 0,
                    "status": f"not measured (this protocol runs N = {lo} only)"})
        return out
    (d_drop, d_se, d_k), (f_drop, f_se, f_k) = (scaling_drop(rows, cfg, a, lo, hi) for a in ("desmoe", "fft"))
    t = {"target": f"N = {lo} -> {hi}: general drop of DES-MoE <= {k:g} x FFT's", "seeds": min(d_k, f_k),
         "desmoe_drop": d_drop, "fft_drop": f_drop}
    if not d_k or not f_k:
        t["status"] = "pending"
    elif f_drop <= 0:
        t["status"] = "undefined (FFT's general score does not drop from N = %d to %d)" % (lo, hi)
    elif math.isnan(f_se) or math.isnan(d_se):
        t["status"] = "undecided (no standard error: one run per N, and the score has no per-run error)"
    elif not f_drop >= 2 * f_se:
        t["status"] = "undecided (FFT's N = %d -> %d drop is within 2 standard errors of 0)" % (lo, hi)
    else:
        diff = d_drop - k * f_drop
        t.update(margin=diff, se=math.sqrt(d_se ** 2 + (k * f_se) ** 2))
        t["status"] = combine(verdict(diff, t["se"], diff <= 0))
    if t["status"] != "pending" and t["seeds"] < len(s.scaling_seed_list()):
        t["status"] += f" ({t['seeds']} of {len(s.scaling_seed_list())} seeds)"
    out.append(t)
    return out
