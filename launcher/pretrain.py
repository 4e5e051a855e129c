"""Pretrain the embedded MoE base from scratch on the general corpus (reused once built).

    deepspeed --num_gpus 2 launcher/pretrain.py --deepspeed configs/zero2.json --config configs/pretrain_base.yaml [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from desmoe.training.preemption import arm_early  # noqa: E402  (before the slow imports: a SIGUSR1 saves, never kills)

arm_early()

from desmoe.cli import parse_launcher_args  # noqa: E402
from desmoe.errors import run_cli  # noqa: E402
from desmoe.recipes.lm.pretrain import PretrainExperiment, pretrain  # noqa: E402


@run_cli
def main() -> None:
    cfg, args = parse_launcher_args(PretrainExperiment, __doc__)
    pretrain(cfg, args.deepspeed)


if __name__ == "__main__":
    main()
