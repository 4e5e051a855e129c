"""Multi-domain fine-tuning of an MoE LM with DES-MoE or a baseline (desmoe.method=...).

    deepspeed launcher/desmoe.py --deepspeed configs/zero2.json --config configs/desmoe_6dom.yaml [key=value ...]
    deepspeed --num_gpus 2 launcher/desmoe.py --config configs/desmoe_cpu.yaml desmoe.method=fft run.name=fft
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from desmoe.training.preemption import arm_early  # noqa: E402  (before the slow imports: a SIGUSR1 saves, never kills)

arm_early()

from desmoe.cli import parse_launcher_args  # noqa: E402
from desmoe.errors import run_cli  # noqa: E402
from desmoe.recipes.des_moe.recipe import DESMoEExperiment, train_desmoe  # noqa: E402


@run_cli
def main() -> None:
    cfg, args = parse_launcher_args(DESMoEExperiment, __doc__)
    train_desmoe(cfg, args.deepspeed)


if __name__ == "__main__":
    main()
