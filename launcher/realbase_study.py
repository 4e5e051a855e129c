"""The real-base study of issue #18: every cell of the fixed protocol, resumably, one CSV row per run.

    deepspeed --num_gpus 2 launcher/realbase_study.py --config configs/realbase_study.yaml     # make realbase-study
    python launcher/realbase_study.py --config configs/realbase_study.yaml --report            # CSV -> doc, no runs

The protocol (arms, lr grids, seeds, scaling, budget, scores) is the YAML, committed before the runs;
desmoe/recipes/des_moe/study.py expands it into cells.  Each cell is a DES-MoE-recipe run
(launcher/desmoe_study.py's machinery: one Trainer per run, all in this launch) evaluated at its end,
in process on the expert-parallel model, through lm-evaluation-harness: the general probes
(cache/realbase/probes), the held-out general perplexity and the trained domains' downstream tasks.
Rank 0 appends the row to ``study.csv`` (a finished cell of this protocol is skipped next time; a failed
one is recorded as failed and retried by the next launch), drops the run's checkpoints, and at the end
renders docs/results-desmoe.md's real-base section and prints the targets (computed from the CSV).
A row counts (is skipped next time, is reported) only under this protocol, this base and this scoring: the
probe set, the data and the scoring code (``scored_key``); rows of others stay in the file.
"""
import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from desmoe.errors import UserError, run_cli  # noqa: E402
from desmoe.recipes.des_moe.recipe import DESMoERecipe  # noqa: E402
from desmoe.recipes.des_moe.study import (SCORED_BY, Cell, RealbaseStudy, append_row, base_digest,  # noqa: E402
                                          cell_config, data_digest, later_cells, phase1, probe_set_digest,
                                          protocol_ids, read_rows, stale_notice)




class StudyRecipe(DESMoERecipe):
    """The DES-MoE recipe plus the study's end-of-run scores (every rank takes part: EP forwards)."""

    def __init__(self, cfg, scores, task_root: Path) -> None:
        super().__init__(cfg)
        self.scores, self.task_root = scores, task_root

    def finish(self, trainer) -> None:
        super().finish(trainer)
        t0 = time.perf_counter()
        out = study_scores(trainer.engine.module, self.cfg, self.scores, self.task_root, trainer.engine.device)
        out["eval_seconds"] = time.perf_counter() - t0
        trainer.monitor.scalars(self.cfg.train.steps if self.method.trains else 0,
                                {f"eval/{k}": v for k, v in out.items()})


def study_scores(model, cfg, scores, task_root: Path, device) -> dict:
    """Probes (general), held-out general perplexity, the trained domains' downstream tasks."""
    import torch

    from desmoe.data.pretrain_corpus import GeneralCorpus, heldout_batches
    from desmoe.data.prepared import PreparedData
    from desmoe.evaluation.harness import make_lm, run, task_dir
    from desmoe.objective import next_token_loss
    from desmoe.recipes.lm.pretrain import PretrainData

    was_training = model.training
    model.eval()
    probes = Path(scores.probes)
    info = json.loads((probes / "probes.json").read_text())
    tok = PreparedData(cfg.data.source).tokenizer  # the base's own (data/realbase: SmolLM2's)
    lm = make_lm(model, tok, batch_size=16)
    out, t0 = {}, time.perf_counter()
    samples: dict = {}  # per task, its documents: the item counts of the standard errors
    res = run(lm, sorted(info), probes, limit=scores.probe_limit or None, samples=samples)
    out.update({f"probe/{t}": float(res[t][info[t]["metric"]]) for t in info})
    out.update({f"items/{t}": float(len(samples[t])) for t in info})
    out["probe_seconds"] = time.perf_counter() - t0
    stream = GeneralCorpus(PretrainData(root=cfg.data.source)).heldout_stream(scores.heldout_tokens + 1)
    batch = max(1, min(8, scores.heldout_tokens // scores.heldout_seq))
    with torch.no_grad():  # the same windows on every rank (each forward is a collective)
        nll = torch.stack([next_token_loss(model, b.to(device)) for b in
                           heldout_batches(stream, scores.heldout_seq, batch, 0, 1)]).mean().item()
    out["heldout_ppl"] = math.exp(nll)
    out["heldout_seconds"] = time.perf_counter() - t0 - out["probe_seconds"]
    tasks = task_root / f"rank{int(os.environ.get('RANK', '0'))}"  # each rank its own copy: no write race
    task_dir(cfg.data.source, tasks)
    names = {d: scores.downstream_task.format(domain=d) for d in cfg.data.domains}
    res = run(lm, list(names.values()), tasks, limit=scores.downstream_limit or None, samples=samples)
    out.update({f"downstream/{d}": float(res[t][scores.downstream_metric]) for d, t in names.items()})
    out.update({f"items/downstream/{d}": float(len(samples[t])) for d, t in names.items()})
    out["downstream_seconds"] = time.perf_counter() - t0 - out["probe_seconds"] - out["heldout_seconds"]
    if int(os.environ.get("RANK", "0")) == 0:
        print("[study] scores: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    model.train(was_training)
    return out


def scoring_code_digest() -> str:
    """The code and libraries that turn a trained model into the row's numbers (first 12 hex digits):
    launcher/realbase.py's SCORING_CODE (tokenisation, harness, held-out windows and loss, the forward),
    the downstream task templates, study_scores itself, and the torch / transformers / lm_eval versions."""
    from launcher.realbase import SCORING_CODE, code_hash, library_versions

    exts = (".py", ".c", ".h", ".yaml")
    h = code_hash((*SCORING_CODE, "desmoe/evaluation/tasks"), exts, (study_scores,), Path(__file__).resolve().parents[1])
    h.update(library_versions())
    return h.hexdigest()[:12]


def scored_key(cfg: RealbaseStudy) -> dict:
    """What scores this launch's rows (SCORED_BY): the probe set, the data, the scoring code."""
    return {"probes_sha256": probe_set_digest(cfg.study.scores.probes),
            "data_sha256": data_digest(cfg.experiment.data.source), "scoring_sha256": scoring_code_digest()}


def row_of(cell: Cell, exp, result: dict, base: dict, key: tuple, general_probes: list[str]) -> dict:
    """The CSV row of a finished run (``base``: the base's row, for the *_base columns; ``key``: the
    protocol's digests, the base's and the scoring's)."""
    probes = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("probe/")}
    down = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("downstream/")}
    base_down = json.loads(base["downstream"]) if base else down
    general = sum(probes[t] for t in general_probes) / len(general_probes)
    items = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("items/")}
    # binomial standard error of a mean of accuracies: sqrt(sum p(1-p)/n) / number of tasks
    general_se = math.sqrt(sum(probes[t] * (1 - probes[t]) / items[t] for t in general_probes)) / len(general_probes)
    down_se = math.sqrt(sum(down[d] * (1 - down[d]) / items[f"downstream/{d}"] for d in down)) / len(down)
    return {"run": cell.run, "phase": cell.phase, "arm": cell.arm, "method": exp.desmoe.method, "seed": cell.seed,
            "lr": cell.lr, "N": cell.n, "domains": "+".join(exp.data.domains), "steps": exp.train.steps,
            "status": "ok", "general_score": general,
            "general_score_base": float(base["general_score"]) if base else general,
            "downstream_score": sum(down.values()) / len(down),
            "downstream_score_base": sum(base_down[d] for d in down) / len(down),
            "heldout_ppl": result["heldout_ppl"],
            "heldout_ppl_base": float(base["heldout_ppl"]) if base else result["heldout_ppl"],
            "val_loss_domains": result.get("domain_mean", float("nan")),
            "val_loss_general": result.get("general", float("nan")),
            "probes": json.dumps(probes, sort_keys=True), "downstream": json.dumps(down, sort_keys=True),
            "train_seconds": result.get("train_seconds", 0.0), "eval_seconds": result.get("eval_seconds", 0.0),
            "general_score_se": general_se, "downstream_score_se": down_se,
            "general_score_base_se": float(base["general_score_se"] or "nan") if base else general_se,
            "protocol": key[0][0], "base_sha256": key[1], **key[2],
            "note": "eval s: probes %.0f, held-out %.0f, downstream %.0f" % tuple(
                result.get(f"{k}_seconds", float("nan")) for k in ("probe", "heldout", "downstream"))}


def stamp(row: dict) -> dict:
    return {**row, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_avg": "%.1f" % os.getloadavg()[0]}


def run_cell(cfg: RealbaseStudy, cell: Cell, rows: list[dict], key: tuple, ds_config: str) -> None:
    from desmoe.distributed import is_rank0
    from desmoe.training.trainer import Trainer

    run_dir = Path(cfg.experiment.run.dir) / cfg.study.name
    exp = cell_config(cfg, cell, str(run_dir)) if is_rank0() else None
    exp = _broadcast(exp)
    base = next((r for r in rows if r["phase"] == "base" and r["status"] == "ok"), None)
    try:
        result = Trainer(StudyRecipe(exp, cfg.study.scores, run_dir / "tasks"), ds_config).run()
        row = row_of(cell, exp, result, base, key, cfg.study.scores.general) if is_rank0() else None
    except Exception as err:  # noqa: BLE001 - recorded as a failed run (rank 0), the study goes on
        row = {"run": cell.run, "phase": cell.phase, "arm": cell.arm, "method": exp.desmoe.method,
               "seed": cell.seed, "lr": cell.lr, "N": cell.n, "domains": "+".join(exp.data.domains),
               "steps": exp.train.steps, "status": "failed", "protocol": key[0][0], "base_sha256": key[1],
               **key[2],
               "note": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
    if is_rank0():
        append_row(Path(cfg.study.csv), stamp(row))
        shutil.rmtree(Path(exp.run.dir) / exp.run.name / "checkpoints", ignore_errors=True)  # GBs per run
        print(f"[study] {cell.run}: {row['status']}", flush=True)
    _barrier()
    # the run's engine, model and kept heap are garbage now: hand them back before the next run
    from desmoe.kernels import release_freed_heap

    gc.collect()
    release_freed_heap()


def _broadcast(obj):
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def pending(cfg: RealbaseStudy, key: tuple, tried: set, first_arms: tuple = ()) -> tuple[list[Cell], list[str]]:
    rows = read_rows(Path(cfg.study.csv), *key)
    done = {r["run"] for r in rows if r["status"] == "ok"}
    base, *grid = phase1(cfg)
    later, waiting = later_cells(cfg, rows)
    # One order, no cell changed: the cells the targets read first (the base, then the grids of the arms
    # they compare, lr-major, then those arms' seeds and N), the other arms' grids after, lr-major (a launch
    # cut short covers every arm at its first lr), ``first_arms`` (--first) leading among those at each lr.
    need = {"desmoe", "fft", "esft_token", *cfg.study.headline, *cfg.study.scaling}
    rank = {a: i for i, a in enumerate(first_arms)}
    grid = sorted(grid, key=lambda c: (c.arm not in need, cfg.study.arms[c.arm].lr.index(c.lr),
                                       rank.get(c.arm, len(rank))))
    n_need = sum(c.arm in need for c in grid)
    ordered = [base, *grid[:n_need], *later, *grid[n_need:]]
    todo = [c for c in ordered if c.run not in done and c.run not in tried]
    return todo, waiting


def run_study(cfg: RealbaseStudy, ds_config: str, max_runs: int = 0, budget_s: float = 0.0,
              first_arms: tuple = ()) -> int:
    """Every pending cell of the protocol in order (phase 1, then the cells it unlocks); returns the
    number of runs made.  Every rank calls it (each run is a collective).  ``budget_s`` > 0: no run starts
    after that many seconds (rank 0's clock decides, so every rank stops at the same cell)."""
    from desmoe.distributed import is_rank0

    # rows are keyed to the protocol, the base's weights and what scores them (rank 0 hashes them once)
    base, scored = _broadcast((base_digest(cfg.experiment.base.hf), scored_key(cfg)) if is_rank0() else None)
    key = (protocol_ids(cfg), base, scored)
    notice = stale_notice(Path(cfg.study.csv), *key) if is_rank0() else ""
    if notice:
        print(notice, flush=True)
    tried, t0 = set(), time.time()
    while not max_runs or len(tried) < max_runs:
        todo, waiting = pending(cfg, key, tried, first_arms)
        if not todo or _broadcast(bool(budget_s) and time.time() - t0 > budget_s):
            break
        cell = todo[0]
        tried.add(cell.run)
        if is_rank0():
            print(f"[study] run {len(tried)}: {cell.run} ({len(todo) - 1} more ready; waiting for the grid: "
                  f"{', '.join(waiting) or 'none'})", flush=True)
        run_cell(cfg, cell, read_rows(Path(cfg.study.csv), *key), key, ds_config)
    return len(tried)


@run_cli
def main() -> None:
    from desmoe.cli import parse_launcher_args

    opts = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    opts.add_argument("--report", action="store_true", help="render the doc section and targets from the CSV only")
    opts.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: all pending)")
    opts.add_argument("--budget-s", type=float, default=0.0, help="start no run after this many seconds (0: no limit)")
    opts.add_argument("--desmoe-arm", default="", help="with --report: print the targets with this arm in "
                      "DES-MoE's place (e.g. a warm-up reading), without rewriting the doc")
    opts.add_argument("--first", default="", help="comma-separated arms whose grid cells run before the other "
                      "arms' (after the cells the targets read); the order of runs only, never a cell")
    flags, rest = opts.parse_known_args()
    cfg, args = parse_launcher_args(RealbaseStudy, __doc__, argv=rest, default_config="configs/realbase_study.yaml")
    if flags.max_runs < 0:
        raise UserError(f"--max-runs {flags.max_runs}: expected an integer >= 0")
    if not flags.budget_s >= 0:  # a negative budget started no run, nan never stopped (elapsed > nan is false)
        raise UserError(f"--budget-s {flags.budget_s}: expected a number of seconds >= 0 (0: no limit)")
    if not flags.report:
        probes = Path(cfg.study.scores.probes) / "probes.json"
        for need, what in ((probes, "the probes (make realbase)"), (Path(cfg.experiment.base.hf or "") / "config.json",
                                                                    "the base (study.experiment.base.hf)")):
            if not need.is_file():
                raise UserError(f"{need}: not found; {what} must exist before the study")
        from desmoe.evaluation.probes import check_probe_code

        check_probe_code(probes.parent)  # a folder of other probe code holds other items than the rows compare
        from desmoe.distributed import init_distributed, is_rank0

        init_distributed()
        first_arms = tuple(_arm(cfg, "--first", a) for a in flags.first.split(",") if a)
        run_study(cfg, args.deepspeed, flags.max_runs, flags.budget_s, first_arms)
        if not is_rank0():
            return
    from desmoe.recipes.des_moe.study_report import render

    if flags.desmoe_arm:
        print("\n".join(targets_as_desmoe(cfg, flags.desmoe_arm)), flush=True)
        return
    base, scored = report_key(cfg)
    notice = stale_notice(Path(cfg.study.csv), protocol_ids(cfg), base, scored)
    if notice:
        print(notice, flush=True)
    print(render(cfg, protocol_ids(cfg), base, scored), flush=True)


def targets_as_desmoe(cfg: RealbaseStudy, arm: str) -> list[str]:
    """The targets with another arm in DES-MoE's place (a variant's reading; the doc is not rewritten)."""
    from desmoe.recipes.des_moe.study_report import target_lines

    _arm(cfg, "--desmoe-arm", arm)
    rows = read_rows(Path(cfg.study.csv), protocol_ids(cfg), *report_key(cfg))
    swapped = [{**r, "arm": "desmoe", "run": "desmoe" + r["run"][len(arm):]} for r in rows if r["arm"] == arm]
    rows = [r for r in rows if r["arm"] not in ("desmoe", arm)] + swapped
    cfg.study.arms["desmoe"] = cfg.study.arms[arm]
    return [f"(targets with `{arm}` as DES-MoE)"] + target_lines(rows, cfg)


def _arm(cfg: RealbaseStudy, flag: str, arm: str) -> str:
    if arm not in cfg.study.arms:
        raise UserError(f"{flag} {arm}: not an arm of the protocol ({', '.join(cfg.study.arms)})")
    return arm


def report_base(cfg: RealbaseStudy) -> str:
    """The base the report is about: the built one while the protocol has rows on it (or none at all), else
    the base of the protocol's latest row.  A machine whose build is another base (docs/real-base-study.md, "The
    base's identity") then re-renders a finished study's section from its own rows instead of emptying it."""
    rows = [r for r in read_rows(Path(cfg.study.csv), protocol_ids(cfg)) if r.get("base_sha256")]
    built = base_digest(cfg.experiment.base.hf) if (Path(cfg.experiment.base.hf or "") / "config.json").is_file() else ""
    if built and (not rows or any(r["base_sha256"] == built for r in rows)):
        return built
    return max(rows, key=lambda r: r["finished_utc"])["base_sha256"] if rows else built


def report_key(cfg: RealbaseStudy) -> tuple[str, dict]:
    """The base (report_base) and the scoring the report is about: this machine's while rows of the base have
    it (or none has any), else the latest such row's; one scoring always, never rows of two mixed.  Where the
    probes or the data are not here (a report from the CSV alone), the latest row's.  Where no row of the base
    recorded its scoring, the rows from before that was recorded (all ''), as report_base does for a finished
    study of another base: a finished study's section is re-rendered from its rows, not emptied."""
    base = report_base(cfg)
    every = read_rows(Path(cfg.study.csv), protocol_ids(cfg), base)
    rows = [r for r in every if all(r.get(k) for k in SCORED_BY)]
    if every and not rows:
        return base, {k: "" for k in SCORED_BY}
    probes, data = Path(cfg.study.scores.probes), Path(cfg.experiment.data.source)
    here = scored_key(cfg) if all(f.is_file() for f in (probes / "probes.json", probes / "build.json",
                                                        data / "meta.json")) else None
    if here and (not rows or any(all(r[k] == here[k] for k in SCORED_BY) for r in rows)):
        return base, here
    if rows:
        latest = max(rows, key=lambda r: r["finished_utc"])
        return base, {k: latest[k] for k in SCORED_BY}
    return base, here or {k: "" for k in SCORED_BY}  # no row has a scoring: none counts (read_rows)


if __name__ == "__main__":
    main()
