"""Several fine-tuning runs under one launch, then their comparison table (same data, same budget).

    deepspeed --num_gpus 2 launcher/desmoe_study.py --config configs/desmoe_demo.yaml --methods desmoe,fft
    deepspeed --num_gpus 2 launcher/desmoe_study.py --config configs/desmoe_demo.yaml --methods desmoe,fft \
        --scaling 2,3,4,5 --steps-per-domain 30

A run whose directory already holds results.json for the same config, the same data and the same base is
reused (``inputs.sha256`` in the run directory: the prepared folder's fingerprint and the base's files'
digest when the run finished; a folder rebuilt with other data, e.g. its instruction records re-encoded, or
a base retrained into the same path, runs again).
Runs are named <run.name>-<method> (or <run.name>-N<k>-<method> in the domain-scaling study, whose
domains are math and code first, then the others in the order of data.domains).  With
--steps-per-domain K every run trains K x (its number of domains) steps, so each domain gets the same
budget at every N (the paper's "same per-domain budget"); otherwise train.steps is used as given.
The table, CSV and plots go to runs/<run.name>-compare/.
"""
import argparse
import copy
import gc
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from desmoe.training.preemption import arm_early  # noqa: E402  (before the slow imports: a SIGUSR1 saves, never kills)

arm_early()

from desmoe.cli import parse_launcher_args  # noqa: E402
from desmoe.config import dump_yaml  # noqa: E402
from desmoe.errors import UserError, run_cli  # noqa: E402
from desmoe.recipes.des_moe.config import Method  # noqa: E402
from desmoe.recipes.des_moe.recipe import DESMoEExperiment, train_desmoe  # noqa: E402


def data_stamp(source: str) -> str:
    """What a finished run trained on: the prepared folder's fingerprint, or the built-in source's name."""
    from desmoe.data.prepared import fingerprint

    return source if source == "stdlib" else fingerprint(source)


BASE_DESCRIPTIONS = ("report.json", "desmoe-manifest.json")


def inputs_stamp(run: DESMoEExperiment) -> str:
    """What a run starts from: its data and its base (an HF folder or a desmoe checkpoint).  The base is in it
    because the config names the base by path: a base retrained into the same path (launcher/pretrain.py with
    other overrides) left every finished run of the old base to be reused as if it were the new one's."""
    from desmoe.integrity import tree_digest

    lines = [f"data {data_stamp(run.data.source)}"]
    for key, path in (("base.hf", run.base.hf), ("base.checkpoint", run.base.checkpoint)):
        if path:  # an export's report (its timings) and the manifest that hashes it are not the base
            lines.append(f"{key} {tree_digest(path, exclude=BASE_DESCRIPTIONS) if Path(path).is_dir() else 'missing'}")
    return "\n".join(lines) + "\n"


def reusable(run: DESMoEExperiment, run_dir: Path, inputs: str) -> bool:
    """Whether ``run_dir`` holds a finished run of this config and these inputs (``inputs_stamp``)."""
    stamp, config = run_dir / "inputs.sha256", run_dir / "config.yaml"
    return (run_dir / "results.json").is_file() and config.is_file() and config.read_text() == dump_yaml(run) \
        and stamp.is_file() and stamp.read_text() == inputs


def scaling_order(domains: list[str]) -> list[str]:
    first = [d for d in ("math", "code") if d in domains]
    return first + [d for d in domains if d not in first]


@run_cli
def main() -> None:
    study = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    study.add_argument("--methods", default="desmoe,fft", help="comma-separated desmoe.method values to run")
    study.add_argument("--scaling", default="", help="comma-separated numbers of domains, e.g. 2,3,4,5,6")
    study.add_argument("--steps-per-domain", type=int, default=0,
                       help="train.steps = this x the run's number of domains (0: train.steps as configured)")
    cfg, opts = parse_launcher_args(DESMoEExperiment, __doc__, parents=[study])  # its --help lists them too
    try:
        sizes = [int(n) for n in opts.scaling.split(",") if n] or [None]
    except ValueError:
        raise UserError(f"--scaling {opts.scaling}: expected comma-separated integers, e.g. 2,3,4") from None
    methods, known = opts.methods.split(","), get_args(Method)
    if any(m not in known for m in methods):
        raise UserError(f"--methods {opts.methods}: expected a comma-separated list of {', '.join(known)}")
    if opts.steps_per_domain < 0:
        raise UserError(f"--steps-per-domain {opts.steps_per_domain}: expected an integer >= 0")
    from desmoe.distributed import init_distributed, is_rank0
    from desmoe.recipes.des_moe.domains import open_domains

    init_distributed()
    domains = scaling_order(list(open_domains(cfg.data).domains))
    if any(n is not None and not 1 <= n <= len(domains) for n in sizes):
        raise UserError(f"--scaling {opts.scaling}: expected numbers in 1..{len(domains)} (domains: {domains})")
    runs = []
    for n in sizes:
        for method in methods:
            run = copy.deepcopy(cfg)
            run.desmoe.method = method
            run.run.name = f"{cfg.run.name}-{method}" if n is None else f"{cfg.run.name}-N{n}-{method}"
            if n is not None:
                run.data.domains = domains[:n]
            if opts.steps_per_domain:
                run.train.steps = opts.steps_per_domain * len(run.data.domains or domains)
            run.check()
            run_dir = Path(run.run.dir) / run.run.name
            inputs = inputs_stamp(run)  # before training: what it starts from (the base hashed once)
            if reusable(run, run_dir, inputs):
                if is_rank0():
                    print(f"{run_dir}: finished with this config, data and base, reused", flush=True)
            else:
                train_desmoe(run, opts.deepspeed)
                if is_rank0():
                    from desmoe.checkpoint import write_text_atomic

                    write_text_atomic(run_dir / "inputs.sha256", inputs)
            runs.append(str(run_dir))
            gc.collect()
    if is_rank0():
        from desmoe.recipes.des_moe.report import main as report

        sys.argv = ["report", *runs, "--out", str(Path(cfg.run.dir) / f"{cfg.run.name}-compare")]
        report()


if __name__ == "__main__":
    main()
