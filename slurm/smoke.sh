#!/bin/bash
# The MoE core's smoke job under Slurm: one task per device, ranks from Slurm's
# own variables (desmoe.distributed), requeued on preemption.
#
#   sbatch slurm/smoke.sh [key=value overrides ...]
#   DESMOE_CPU=1 sbatch --nodes=1 --ntasks-per-node=2 slurm/smoke.sh      # CPU ranks (gloo)
#
# Set the GPU line to your cluster; for CPU jobs override with `--gpus-per-node=0`.
#SBATCH --job-name=desmoe-smoke
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"   # submit from the repository root
if [ ! -f slurm/launch.sh ]; then  # relative paths (configs, .venv, runs) would all be wrong
    echo "desmoe: error: submitted from $PWD, which is not the repository root (no slurm/launch.sh): cd to the repository, then sbatch slurm/smoke.sh"
    exit 2
fi
source slurm/launch.sh
desmoe_launch launcher/smoke.py "${DESMOE_CONFIG:-configs/smoke.yaml}" "${DESMOE_RUN_NAME:-smoke-${SLURM_JOB_ID}}" "$@"
exit $?
