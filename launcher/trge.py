"""TRGE: continual learning of a CLIP-style dual encoder with one expert group per task.

    deepspeed --num_gpus 2 launcher/trge.py --deepspeed configs/zero2.json [--config configs/trge_offline.yaml] [key=value ...]
    python launcher/trge.py --config configs/trge_digits.yaml groups.ep_size=1 method=continual_ft run.name=cft   # one process

Writes runs/<run.name>/: accuracy_matrix.{csv,png}, results.json, metrics.jsonl, tensorboard/, checkpoints/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from desmoe.training.preemption import arm_early  # noqa: E402  (before the slow imports: a SIGUSR1 saves, never kills)

arm_early()

from desmoe.cli import parse_launcher_args  # noqa: E402
from desmoe.distributed import is_rank0  # noqa: E402
from desmoe.errors import run_cli  # noqa: E402
from desmoe.recipes.trge.recipe import TRGEExperiment, run_trge  # noqa: E402


# Without --config: the embedded default (offline task sequence, aligned CLIP stand-in).
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "trge_offline.yaml")


@run_cli
def main() -> None:
    cfg, args = parse_launcher_args(TRGEExperiment, __doc__, default_config=DEFAULT_CONFIG)
    summary = run_trge(cfg, args.deepspeed)
    if is_rank0() and "avg" in summary:
        transfer = "n/a (one task)" if summary["transfer"] is None else summary["transfer"]  # nothing unseen after
        print(f"{summary['method']}: Transfer {transfer}  Avg {summary['avg']}  Last {summary['last']}  "
              f"(trainable/task {summary['trainable_params_per_task']:,})", flush=True)


if __name__ == "__main__":
    main()
