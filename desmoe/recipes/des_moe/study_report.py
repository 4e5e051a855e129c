"""The real-base study's tables, forgetting-vs-fit plot and targets, rendered from its CSV only.

``render(cfg, protocol, base, scored)`` rewrites the section between the markers below in ``study.doc``
(inserted before the first ``## `` section when missing; the rest of the file is kept), writes the plot beside
the CSV, and returns the text it printed (targets: met / missed / undefined / pending).  Each study
(``study.name``) has its own section, so the CPU and GPU versions sit side by side."""
from __future__ import annotations

import math
from pathlib import Path

from desmoe.recipes.des_moe.study import phase1, read_rows, select_lr
from desmoe.recipes.des_moe.study_targets import arm_rows, mean_se, mean_std, targets



def _pm(values: list[float], fmt: str = "{:.3f}") -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    return fmt.format(m) + ("" if math.isnan(s) else " ± " + fmt.replace("+", "").format(s))  # a std has no sign


def _as_heldout(rows: list[dict]) -> list[dict]:
    """The rows with the held-out log-perplexity (negated: higher is better) as the general score."""
    out = []
    for r in rows:
        if r["status"] == "ok":
            # no item noise is counted for the perplexity (the same tokens for every run): its noise is the
            # seeds' spread, which one run does not measure (unknown, not 0: a one-seed margin decides nothing)
            r = {**r, "general_score": -math.log(float(r["heldout_ppl"])),
                 "general_score_base": -math.log(float(r["heldout_ppl_base"])),
                 "general_score_se": "0" if r["phase"] == "base" else ""}
        out.append(r)
    return out


def target_lines(rows: list[dict], cfg) -> list[str]:
    lines = []
    for label, rs in (("general score (probe mean)", rows), ("held-out log-perplexity", _as_heldout(rows))):
        for t in targets(rs, cfg):
            nums = ", ".join(f"{k} {v:.4g}" for k, v in t.items()
                             if k not in ("target", "status", "seeds") and isinstance(v, float) and not math.isnan(v))
            lines.append(f"- [{label}] {t['target']}: **{t['status']}**" + (f" ({nums})" if nums else ""))
    return lines


def _f(r: dict, key: str, fmt: str) -> str:
    v = r.get(key) or ""
    return fmt.format(float(v)) if v else ""


def _with_se(r: dict, key: str) -> str:
    se = r.get(f"{key}_se") or ""
    return f"{float(r[key]):.3f}" + (f" ± {float(se):.3f}" if se else "")


def grid_table(rows: list[dict], cfg) -> str:
    lines = ["| arm | method | lr | status | val loss (trained domains) | general score | downstream | "
             "held-out ppl | train s | selected |", "|---" * 10 + "|"]
    by_run = {r["run"]: r for r in rows}
    for cell in phase1(cfg)[1:]:
        r = by_run.get(cell.run)
        sel = select_lr(rows, cfg, cell.arm)
        if r is None:
            lines.append(f"| {cell.arm} | {cfg.study.arms[cell.arm].method} | {cell.lr:g} | not run | | | | | | |")
            continue
        ok = r["status"] == "ok"
        cells = [f"{float(r['val_loss_domains']):.3f}" if ok else ""] + \
            [_with_se(r, k) if ok else "" for k in ("general_score", "downstream_score")]
        ppl = _f(r, "heldout_ppl", "{:.1f}") if ok else ""
        secs = _f(r, "train_seconds", "{:.0f}") if ok else ""
        lines.append(f"| {cell.arm} | {r['method']} | {cell.lr:g} | {r['status']} | {' | '.join(cells)} | {ppl} | "
                     f"{secs} | {'yes' if sel == cell.lr else ''} |")
    return "\n".join(lines)


def headline_table(rows: list[dict], cfg) -> str:
    base = next((r for r in rows if r["phase"] == "base" and r["status"] == "ok"), None)
    lines = ["| arm | lr | seeds | general score ± s.e. (Δ vs base) | downstream ± s.e. | held-out ppl (Δ %) | "
             "val loss (trained) | train s |", "|---" * 8 + "|"]
    if base:
        lines.append(f"| base (vanilla) | – | – | {_with_se(base, 'general_score')} | "
                     f"{_with_se(base, 'downstream_score')} | {float(base['heldout_ppl']):.1f} | "
                     f"{float(base['val_loss_domains']):.3f} | 0 |")
    for arm in cfg.study.arms:
        rs = arm_rows(rows, cfg, arm)
        if not rs:
            continue
        gen, down = mean_se(rs, "general_score"), mean_se(rs, "downstream_score")
        drop = [float(r["general_score"]) - float(r["general_score_base"]) for r in rs]
        ppl = [100 * (float(r["heldout_ppl"]) / float(r["heldout_ppl_base"]) - 1) for r in rs]
        lines.append(f"| {arm} | {select_lr(rows, cfg, arm):g} | {len(rs)} | {gen[0]:.3f} ± {gen[1]:.3f} "
                     f"({_pm(drop, '{:+.3f}')}) | {down[0]:.3f} ± {down[1]:.3f} | "
                     f"{_pm([float(r['heldout_ppl']) for r in rs], '{:.1f}')} ({_pm(ppl, '{:+.1f}')}) | "
                     f"{_pm([float(r['val_loss_domains']) for r in rs])} | "
                     f"{_pm([float(r['train_seconds'] or 'nan') for r in rs], '{:.0f}')} |")
    return "\n".join(lines)


def scaling_table(rows: list[dict], cfg) -> str:
    """Every scaling size and arm: mean ± std over the scaling seeds that finished (the seeds listed)."""
    lines = ["| N | domains | arm | seeds | general score | held-out ppl | downstream | train s |", "|---" * 8 + "|"]
    for n in cfg.study.scaling_sizes:
        for arm in cfg.study.scaling:
            rs = arm_rows(rows, cfg, arm, n)
            if rs:
                col = lambda key, fmt="{:.3f}": _pm([float(r[key] or "nan") for r in rs], fmt)  # noqa: E731
                lines.append(f"| {n} | {rs[0]['domains']} | {arm} | {','.join(r['seed'] for r in rs)} | "
                             f"{col('general_score')} | {col('heldout_ppl', '{:.1f}')} | {col('downstream_score')} | "
                             f"{col('train_seconds', '{:.0f}')} |")
    return "\n".join(lines)


def detail_table(rows: list[dict]) -> str:
    """Every finished run's probes and downstream tasks (what the two scores average)."""
    import json

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return ""
    probes = sorted({k for r in ok for k in json.loads(r["probes"])})
    down = list(dict.fromkeys(k for r in ok for k in json.loads(r["downstream"])))
    lines = ["| run | " + " | ".join(probes + [f"exact {d}" for d in down]) + " | eval s |",
             "|---" * (len(probes) + len(down) + 2) + "|"]
    for r in ok:
        p, d = json.loads(r["probes"]), json.loads(r["downstream"])
        cells = [f"{p[k]:.3g}" if k in p else "" for k in probes] + [f"{d[k]:.3g}" if k in d else "" for k in down]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + f" | {_f(r, 'eval_seconds', '{:.0f}')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """General drop vs downstream, and held-out ppl change vs the trained domains' validation loss:
    every finished run at all domains (every arm, lr and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["status"] == "ok" and r["phase"] in ("grid", "seeds")]
    if not pts:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    arms = list(dict.fromkeys(r["arm"] for r in pts))
    colours = plt.get_cmap("tab10")
    for i, arm in enumerate(arms):
        rs = [r for r in pts if r["arm"] == arm]
        drop = lambda r: float(r["general_score_base"]) - float(r["general_score"])  # noqa: E731
        ppl = lambda r: 100 * (float(r["heldout_ppl"]) / float(r["heldout_ppl_base"]) - 1)  # noqa: E731
        for ax, x, y in ((axes[0], "downstream_score", drop), (axes[1], "val_loss_domains", ppl)):
            err = {}
            if x == "downstream_score":  # binomial standard errors where the rows carry them
                se = lambda r, k: float(r.get(f"{k}_se") or "nan")  # noqa: E731
                err = {"xerr": [se(r, "downstream_score") for r in rs], "yerr": [se(r, "general_score") for r in rs]}
            ax.errorbar([float(r[x]) for r in rs], [y(r) for r in rs], color=colours(i % 10), label=arm,
                        fmt="o", alpha=0.8, capsize=2, **err)
            for r in rs:
                ax.annotate(f"lr {float(r['lr']):g} s{r['seed']}", (float(r[x]), y(r)), fontsize=6)
    base = next((r for r in rows if r["phase"] == "base" and r["status"] == "ok"), None)
    if base:  # the untrained base: no drop, its own fit
        axes[0].scatter([float(base["downstream_score"])], [0.0], marker="*", s=120, color="black", label="base")
        axes[1].scatter([float(base["val_loss_domains"])], [0.0], marker="*", s=120, color="black", label="base")
    axes[0].set(xlabel="downstream score (mean over trained domains, higher = better fit)",
                ylabel="general-score drop vs base (higher = more forgetting)")
    axes[1].set(xlabel="validation loss of the trained domains (nats, lower = better fit)",
                ylabel="held-out general perplexity change vs base (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Real base (upcycled SmolLM2): forgetting vs fit, every run at all domains")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_path(cfg) -> Path:
    """One plot per study: studies sharing the CSV (a diagnostic beside its main protocol) each link their own."""
    csv_path = Path(cfg.study.csv)
    return csv_path.with_name(f"{csv_path.stem}-{cfg.study.name}.png")


def render(cfg, protocol, base: str, scored: dict) -> str:
    """``protocol``: this protocol's digests (study.protocol_ids), the current one first; ``base``: the
    base's digest (study.base_digest); ``scored``: the scoring's (study.SCORED_BY): only rows of all count."""
    csv_path = Path(cfg.study.csv)
    rows = read_rows(csv_path, protocol, base, scored)
    every = read_rows(csv_path)
    png = plot_path(cfg)
    has_plot = plot(rows, png)
    ok = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    text = "\n".join([
        f"Study `{cfg.study.name}`, protocol digest `{protocol[0]}` (the committed config"
        + (f"; rows also under its earlier digests {', '.join(protocol[1:])}" if len(protocol) > 1 else "")
        + f"), base `{cfg.experiment.base.hf}` with weights digest `{base}`, "
        + ("scored before rows recorded their probe set, data and scoring code (unknown: these rows may mix "
           "probe sets; a new launch runs every cell again)" if not any(scored.values()) else
           "scored with " + ", ".join(f"{k} `{v}`" for k, v in scored.items())) + f"; CSV `{csv_path}` "
        f"({len(every)} runs in the file, {ok} finished and {failed} failed under this protocol, base and scoring; "
        "rows of other bases, protocols, probe sets, data or scoring code"
        + (", and rows from before the scoring was recorded," if any(scored.values()) else "")
        + " stay in the file and count for nothing here).",
        "", "**Targets (computed from the CSV by `launcher/realbase_study.py --report`):**", "",
        *target_lines(rows, cfg), "",
        "LR grid (one seed; selected: lowest validation loss of the trained domains):", "", grid_table(rows, cfg), "",
        "All domains at the selected lr (s.e.: std over seeds / sqrt(seeds), or one run's binomial standard "
        "error; Δ: mean ± std over seeds):", "", headline_table(rows, cfg), "",
        "Domain scaling (selected lr; mean ± std over the scaling seeds listed):", "", scaling_table(rows, cfg), "",
        "Each run's probes (probe_prose: bits per byte, lower is better; the others: accuracy / exact match) "
        "and downstream tasks:", "", detail_table(rows), "",
        f"![forgetting vs fit]({Path('results') / png.name})" if has_plot else "(no finished run to plot yet)"])
    doc = Path(cfg.study.doc)
    begin, end = f"<!-- {cfg.study.name}:begin -->", f"<!-- {cfg.study.name}:end -->"  # one section per study
    old = doc.read_text() if doc.is_file() else "# DES-MoE results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    elif ":end -->" in old:  # another study's section: this one follows it (a diagnostic after its main study)
        at = old.index("\n", old.rindex(":end -->")) + 1
        new = f"{old[:at]}\n### `{cfg.study.name}`\n\n{block}\n{old[at:]}"
    else:
        at = old.find("\n## ")
        head, tail = (old, "") if at < 0 else (old[:at + 1], old[at + 1:])
        new = f"{head}\n## The real base: upcycled SmolLM2 (issue #18), `{cfg.study.name}`\n\n{block}\n\n{tail}"
    from desmoe import checkpoint

    checkpoint.write_text_atomic(doc, new)
    return text
