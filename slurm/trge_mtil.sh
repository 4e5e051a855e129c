#!/bin/bash
# TRGE on MTIL under Slurm (same conventions as slurm/smoke.sh): one task per device,
# ranks from Slurm's variables (desmoe.distributed), resumable after every task, requeued
# on preemption.  Point the config at a local CLIP and the MTIL folders:
#
#   sbatch slurm/trge_mtil.sh backbone.path=/models/clip-vit-base-patch16 data.root=/datasets/mtil
#   sbatch slurm/trge_mtil.sh method=shared_pool run.name=pool ...        # a baseline, same budget
#   DESMOE_CPU=1 sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/trge_mtil.sh ...
#
# Set the GPU line to your cluster; for CPU jobs override with `--gpus-per-node=0`.
#SBATCH --job-name=desmoe-trge-mtil
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"   # submit from the repository root
if [ ! -f slurm/launch.sh ]; then  # relative paths (configs, .venv, runs) would all be wrong
    echo "desmoe: error: submitted from $PWD, which is not the repository root (no slurm/launch.sh): cd to the repository, then sbatch slurm/trge_mtil.sh"
    exit 2
fi
source slurm/launch.sh
desmoe_launch launcher/trge.py "${DESMOE_CONFIG:-configs/trge_mtil.yaml}" "${DESMOE_RUN_NAME:-trge-mtil-${SLURM_JOB_ID}}" "$@"
exit $?
