"""A fixed study protocol for multi-domain fine-tuning (issue #18): the grid, its cells, the CSV of runs
(the targets computed from it: ``study_targets``).

The protocol (``configs/realbase_study.yaml``) is a file committed before any run: the arms (a method
plus overrides, e.g. DES-MoE w/o ALR), each arm's learning-rate grid, the seed of the grid, the seeds of
the headline arms, the domain-scaling sizes, the per-domain step budget and the scores.  Cells come in
three phases, each needing only finished rows of the one before:

1. ``base`` (the untrained base, evaluated) and ``grid`` (every arm x every lr, ``grid_seed``, all domains);
2. ``seeds``: the headline arms at their selected lr (lowest ``select_by`` of the grid: the trained
   domains' validation loss), the other seeds;
3. ``scaling``: the scaling arms at their selected lr, ``grid_seed``, the first N domains for every N in
   ``scaling_sizes`` below all domains (N = all is the grid's run); then every size again at each other
   seed of ``scaling_seeds``.

Every run is one CSV row, appended, never rewritten; a failed run is a row with status ``failed`` and is
retried by the next launch (its row stays).  Rows carry the protocol's digest: only rows of the current
protocol count as finished or enter the targets, older ones stay in the file.  So do rows of another base or
of another scoring (``SCORED_BY``: the probe set, the data, the scoring code): kept, run again, never reported.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from desmoe.config import bad
from desmoe.errors import ConfigError, UserError
from desmoe.recipes.des_moe.config import DESMoEExperiment, Method

# keys the study sets for every cell: an arm may not override them
CELL_KEYS = ("desmoe.method", "train.lr", "train.seed", "model.init_seed", "train.steps", "data.domains", "run.")
COLUMNS = ["run", "phase", "arm", "method", "seed", "lr", "N", "domains", "steps", "status",
           "general_score", "general_score_base", "downstream_score", "downstream_score_base",
           "heldout_ppl", "heldout_ppl_base", "val_loss_domains", "val_loss_general",
           "probes", "downstream", "train_seconds", "eval_seconds", "protocol", "finished_utc", "load_avg", "note",
           # binomial standard errors of the scores (added after the first rows: empty there)
           "general_score_se", "general_score_base_se", "downstream_score_se",
           # the base's weights (base_digest; added after the first rows: empty there, which no base matches)
           "base_sha256",
           # what scored the row (SCORED_BY; added after the first rows: empty there, which no launch matches)
           "probes_sha256", "data_sha256", "scoring_sha256"]
# A row counts only where all three are this launch's: rows scored on another probe set (probes.json's items,
# build.json's settings and probe code), other data (the held-out text and the downstream items) or by other
# scoring code were reused after a rebuild and reported beside new ones, a silent mix of two probe sets.
SCORED_BY = ("probes_sha256", "data_sha256", "scoring_sha256")
DATA_UNSCORED = ("timing.json",)  # a data build's wall-clock timings: two builds of the same data differ in it


@dataclass
class Arm:
    method: Method = "desmoe"
    lr: list[float] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # dotted experiment overrides, e.g. desmoe.alr.enabled=false

    def check(self) -> None:
        if not self.lr or any(not 0 < lr < 1 for lr in self.lr) or len(set(self.lr)) != len(self.lr):
            raise bad("lr", "a non-empty list of distinct learning rates in (0, 1)", self.lr)
        for item in self.overrides:
            key = item.partition("=")[0]
            if "=" not in item or any(key == k or key.startswith(k) for k in CELL_KEYS):
                raise bad("overrides", f"key=value items not setting {', '.join(CELL_KEYS)} (the study sets "
                          "them per cell)", item)


@dataclass
class Scores:
    probes: str = "cache/realbase/probes"  # launcher/realbase.py builds it
    probe_limit: int = 0  # items per probe (0 = all)
    # the general score: the mean of these probes' headline metric (accuracies; probe_prose's bits per
    # byte is reported beside it, as is the held-out perplexity)
    general: list[str] = field(default_factory=lambda: ["probe_cloze", "probe_define", "probe_arith", "probe_copy"])
    heldout_tokens: int = 4096  # held-out general perplexity: the first tokens of the held-out set
    heldout_seq: int = 128
    # downstream: the task of each trained domain (harness task name, {domain} filled in) and its metric
    downstream_task: str = "desmoe_mcq_{domain}"
    downstream_metric: str = "acc"
    downstream_limit: int = 0  # items per task (0 = all)

    def check(self) -> None:
        for key in ("probe_limit", "downstream_limit"):
            if getattr(self, key) < 0:
                raise bad(key, "an integer >= 0 (0 = all items)", getattr(self, key))
        if self.heldout_tokens < 2 * self.heldout_seq:
            raise bad("heldout_tokens", f"at least 2 x heldout_seq = {2 * self.heldout_seq}", self.heldout_tokens)
        if not self.general:
            raise bad("general", "at least one probe task", self.general)
        if "{domain}" not in self.downstream_task:
            raise bad("downstream_task", "a task name containing {domain}", self.downstream_task)


@dataclass
class StudyConfig:
    name: str = "realbase"
    arms: dict[str, Arm] = field(default_factory=dict)
    select_by: Literal["val_loss_domains"] = "val_loss_domains"  # lowest wins; ties: the smaller lr
    grid_seed: int = 0
    headline: list[str] = field(default_factory=lambda: ["desmoe", "fft", "esft_token"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    scaling: list[str] = field(default_factory=lambda: ["desmoe", "fft"])
    scaling_sizes: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    # the seeds of the scaling cells (every size, N = all included), grid_seed first; [] = grid_seed only.
    # Target 2 pairs them: an arm's N-min -> N-max drop per seed, then the mean over seeds.
    scaling_seeds: list[int] = field(default_factory=list)
    steps_per_domain: int = 10
    scores: Scores = field(default_factory=Scores)
    csv: str = "docs/results/desmoe_real_base.csv"
    doc: str = "docs/results-desmoe.md"  # its real-base section is rendered from the CSV
    # digests under which rows of this same protocol were written by an earlier digest function
    protocol_aliases: list[str] = field(default_factory=list)
    forgetting_share: float = 0.5  # target: DES-MoE's general drop <= this x FFT's (downstream >= ESFT-Token's)
    scaling_share: float = 0.1  # target: DES-MoE's N-min -> N-max general drop <= this x FFT's

    def check(self) -> None:
        if not self.arms:
            raise bad("arms", "at least one arm (name: {method, lr, overrides})")
        for name, arm in self.arms.items():  # the config loader checks dataclasses, not a dict's values
            try:
                arm.check()
            except ConfigError as err:
                raise ConfigError(str(err).replace("key '", f"key 'arms.{name}.", 1)) from None
        for key in ("desmoe", "fft", "esft_token"):  # the targets compare these three
            if key not in self.arms:
                raise bad("arms", f"an arm named '{key}' (the targets use it)", sorted(self.arms))
        for key, names in (("headline", self.headline), ("scaling", self.scaling)):
            missing = [n for n in names if n not in self.arms]
            if missing:
                raise bad(key, f"names of arms ({', '.join(self.arms)})", missing[0])
        if len(set(self.seeds)) != len(self.seeds) or self.grid_seed not in self.seeds:
            raise bad("seeds", f"distinct seeds including grid_seed={self.grid_seed}", self.seeds)
        if self.scaling_seeds and (len(set(self.scaling_seeds)) != len(self.scaling_seeds)
                                   or self.scaling_seeds[0] != self.grid_seed):
            raise bad("scaling_seeds", f"distinct seeds starting with grid_seed={self.grid_seed} ([]: it alone)",
                      self.scaling_seeds)
        if sorted(set(self.scaling_sizes)) != self.scaling_sizes or not self.scaling_sizes or self.scaling_sizes[0] < 1:
            raise bad("scaling_sizes", "increasing numbers of domains >= 1", self.scaling_sizes)
        if self.steps_per_domain < 1:
            raise bad("steps_per_domain", "a positive integer", self.steps_per_domain)
        for key in ("forgetting_share", "scaling_share"):
            if not 0 < getattr(self, key) <= 1:
                raise bad(key, "a number in (0, 1]", getattr(self, key))

    def scaling_seed_list(self) -> list[int]:
        return self.scaling_seeds or [self.grid_seed]


@dataclass
class RealbaseStudy:
    experiment: DESMoEExperiment = field(default_factory=DESMoEExperiment)
    study: StudyConfig = field(default_factory=StudyConfig)

    def check(self) -> None:
        n = len(self.experiment.data.domains)
        if n == 0:
            raise bad("experiment.data.domains", "the fine-tuning domains, listed (their order is the scaling order)")
        if self.study.scaling_sizes[-1] != n:
            raise bad("study.scaling_sizes", f"sizes ending at all {n} domains (N = {n} is the grid's run)",
                      self.study.scaling_sizes)


@dataclass(frozen=True)
class Cell:
    phase: str  # base | grid | seeds | scaling
    arm: str
    lr: float
    seed: int
    n: int

    @property
    def run(self) -> str:
        return "base" if self.phase == "base" else f"{self.arm}-lr{self.lr:g}-s{self.seed}-N{self.n}"


def protocol_digest(cfg: RealbaseStudy) -> str:
    """The protocol's identity (what the CSV rows are keyed to): every value that differs from its
    dataclass default, i.e. what the protocol file says.  A field added to the code later with a default
    leaves it unchanged (the code of each row is its own git history); ``study.protocol_aliases`` is
    not part of it."""
    import json

    from desmoe.config import to_dict

    def differing(value, default):
        if isinstance(value, dict) and isinstance(default, dict):
            return {k: differing(v, default.get(k)) for k, v in value.items() if v != default.get(k)}
        return value

    mine, defaults = to_dict(cfg), to_dict(RealbaseStudy())
    mine["study"].pop("protocol_aliases", None)
    text = json.dumps(differing(mine, defaults), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def protocol_ids(cfg: RealbaseStudy) -> tuple[str, ...]:
    """This protocol's digest, then the digests its rows were written under before (the aliases)."""
    return (protocol_digest(cfg), *cfg.study.protocol_aliases)


def cell_config(cfg: RealbaseStudy, cell: Cell, run_dir: str) -> DESMoEExperiment:
    """The experiment of one cell: the arm's overrides, then the cell's method, lr, seed, domains, steps."""
    from desmoe.config import load_config, to_dict
    import yaml

    arm = cfg.study.arms.get(cell.arm, Arm(method="vanilla", lr=[cell.lr]))
    path = Path(run_dir) / f".{cell.run}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg.experiment), sort_keys=False))
    domains = cfg.experiment.data.domains[:cell.n]
    # the base does not train: no train.lr (null would refuse the JSON's "auto"; its default is never used)
    lr = [f"train.lr={cell.lr}"] if cell.phase != "base" else []
    sets = [f"desmoe.method={arm.method}", *lr, f"train.seed={cell.seed}",
            f"model.init_seed={cell.seed}", f"train.steps={cfg.study.steps_per_domain * cell.n}",
            f"data.domains=[{', '.join(domains)}]", f"run.dir={run_dir}", f"run.name={cfg.study.name}-{cell.run}"]
    try:
        exp = load_config(DESMoEExperiment, path, [*arm.overrides, *sets])
    finally:
        path.unlink()
    exp.train.eval_every = exp.train.steps  # the validation loss of the last step (select_by)
    exp.train.save_every = exp.train.steps
    if hasattr(exp, "export"):  # the study evaluates in process: no HF folder per run (540 MB each)
        exp.export.enabled = False
    return exp


def phase1(cfg: RealbaseStudy) -> list[Cell]:
    n, s = len(cfg.experiment.data.domains), cfg.study
    return [Cell("base", "vanilla", 0.0, s.grid_seed, n)] + \
        [Cell("grid", name, lr, s.grid_seed, n) for name, arm in s.arms.items() for lr in arm.lr]


def select_lr(rows: list[dict], cfg: RealbaseStudy, arm: str) -> Optional[float]:
    """The arm's lr: lowest validation loss of the trained domains over its grid; None while a grid cell
    has no finished row (a failed cell counts as worst once it has run)."""
    grid = {c.run for c in phase1(cfg) if c.arm == arm}
    done = {r["run"]: r for r in rows if r["run"] in grid}
    if set(done) != grid:
        return None
    score = lambda r: float(r[cfg.study.select_by]) if r["status"] == "ok" else math.inf  # noqa: E731
    best = min(done.values(), key=lambda r: (score(r), float(r["lr"])))
    return None if math.isinf(score(best)) else float(best["lr"])


def later_cells(cfg: RealbaseStudy, rows: list[dict]) -> tuple[list[Cell], list[str]]:
    """Phases 2 and 3 for the arms whose lr is selected; and the arms still waiting for their grid."""
    s, n = cfg.study, len(cfg.experiment.data.domains)
    cells, waiting, lrs = [], [], {}
    for arm in dict.fromkeys([*s.headline, *s.scaling]):
        lr = lrs[arm] = select_lr(rows, cfg, arm)
        if lr is None:
            waiting.append(arm)
            continue
        if arm in s.headline:
            cells += [Cell("seeds", arm, lr, seed, n) for seed in s.seeds if seed != s.grid_seed]
        if arm in s.scaling:
            cells += [Cell("scaling", arm, lr, s.grid_seed, k) for k in s.scaling_sizes if k != n]
    # the scaling arms' other seeds, seed-major (a launch cut short leaves whole seeds); at N = all such a
    # cell is an arm's run at another seed, whatever made it: a "seeds" cell, run once
    for seed in s.scaling_seed_list()[1:]:
        cells += [Cell("seeds" if k == n else "scaling", arm, lrs[arm], seed, k)
                  for arm in s.scaling if lrs[arm] is not None for k in s.scaling_sizes]
    seen: set = set()
    return [c for c in cells if not (c.run in seen or seen.add(c.run))], waiting


# ---- the CSV: one row per run, appended atomically ------------------------------------------------------

def base_digest(base_dir: str | Path) -> str:
    """The base's identity: sha256 of its config and weights (first 12 hex digits).  Rows count only
    against the base they were trained from: a base rebuilt by other code or on another machine (float
    order in the upcycling or the healing) is another base, however close its scores."""
    base = Path(base_dir)
    weights = sorted(base.glob("*.safetensors"))
    if not (base / "config.json").is_file() or not weights:
        raise UserError(f"{base}: no config.json and *.safetensors; the study's base (experiment.base.hf) "
                        "must be a built HF folder (make realbase)")
    h = hashlib.sha256((base / "config.json").read_bytes())
    for f in weights:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def probe_set_digest(probes: str | Path) -> str:
    """The probe set's identity: probes.json (every task's items, by sha256) and build.json (the settings and
    the probe code that wrote them; desmoe.evaluation.probes.BUILD_RECORD), first 12 hex digits.  Not the
    task YAMLs: they name the items' absolute path, and their text is the probe code's."""
    from desmoe.evaluation.probes import BUILD_RECORD

    probes, h = Path(probes), hashlib.sha256()
    for name in ("probes.json", BUILD_RECORD):
        if not (probes / name).is_file():
            raise UserError(f"{probes / name}: not found; the study's probes (study.scores.probes) must be a folder "
                            "built by launcher/realbase.py (make realbase)")
        h.update(name.encode() + b"\0" + (probes / name).read_bytes())
    return h.hexdigest()[:12]


def data_digest(root: str | Path) -> str:
    """The data's identity (first 12 hex digits): every file of the prepared folder (its seal's digests when
    sealed: data/realbase's stamp is one of them) but DATA_UNSCORED.  The held-out perplexity and the
    downstream items come from it, and so do the trained records."""
    from desmoe.integrity import read_manifest, sha256_file

    root = Path(root)
    if not (root / "meta.json").is_file():
        raise UserError(f"{root}: not a prepared data folder (no meta.json); experiment.data.source must be one")
    manifest = read_manifest(root, "prepared data")
    files = {rel: sha for rel, (_, sha) in manifest["files"].items()} if manifest else {
        p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    text = "".join(f"{rel}\0{sha}\n" for rel, sha in sorted(files.items()) if Path(rel).name not in DATA_UNSCORED)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stale_notice(path: Path, protocol, base: str, scored: dict) -> str:
    """One line on the rows of this protocol and base that ``scored`` leaves out ('' when none)."""
    stale = [r for r in read_rows(path, protocol, base) if any(r.get(k, "") != scored[k] for k in SCORED_BY)]
    unrecorded = sum(not r.get(SCORED_BY[0]) for r in stale)
    other = len(stale) - unrecorded
    if not unrecorded + other:
        return ""
    return (f"[study] {path}: {other + unrecorded} runs of this protocol and base count for nothing here "
            f"({other} scored on another probe set, data or scoring code, {unrecorded} before that was recorded); "
            f"they stay in the file, are not reported, and their cells run again "
            "(this scoring: " + ", ".join(f"{k} {scored[k] or 'none'}" for k in SCORED_BY) + ")")


def read_rows(path: Path, protocol=None, base: Optional[str] = None, scored: Optional[dict] = None) -> list[dict]:
    """Rows of the CSV (of one protocol when given: a digest or a collection of them, protocol_ids; of one
    base when given: base_digest; of one scoring when given: SCORED_BY -> digest, where all '' selects the
    rows from before the scoring was recorded, which a launch's digests never match); the last row of a run
    wins over its earlier tries."""
    if not path.is_file():
        return []
    rows = [{k: ("" if v is None else v) for k, v in r.items() if k is not None}  # short old rows: ''
            for r in csv.DictReader(io.StringIO(path.read_text()))]
    if protocol is not None:
        ids = {protocol} if isinstance(protocol, str) else set(protocol)
        rows = [r for r in rows if r.get("protocol") in ids]
    if base is not None:
        rows = [r for r in rows if r.get("base_sha256", "") == base]
    if scored is not None:
        rows = [r for r in rows if all(r.get(k, "") == scored[k] for k in SCORED_BY)]
    latest = {}
    for r in rows:
        latest[r["run"]] = r
    return list(latest.values())


def append_row(path: Path, row: dict) -> None:
    """Append one row: the whole file rewritten to a temporary file and renamed (never half a row)."""
    from desmoe import checkpoint

    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise ValueError(f"CSV row has unknown columns {unknown}")  # a programming error
    old = path.read_text() if path.is_file() else ""
    header = old.splitlines()[0].split(",") if old else COLUMNS
    if header != COLUMNS[:len(header)]:
        raise UserError(f"{path}: its header is not this study's columns; move it aside to start a new file")
    if len(header) < len(COLUMNS):  # columns added at the end: the header grows, earlier rows stay as written
        old = ",".join(COLUMNS) + old[old.index("\n"):]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomic(path, old + buf.getvalue())


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
