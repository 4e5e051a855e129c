#!/bin/bash
# DES-MoE on six domains under Slurm: one task per GPU, ranks from Slurm's own variables
# (desmoe.distributed), expert parallelism over the job, requeued on preemption.
#
#   sbatch slurm/desmoe_6dom.sh [key=value overrides ...]
#   DESMOE_CPU=1 sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/desmoe_6dom.sh   # small CPU run
#   sbatch slurm/desmoe_6dom.sh desmoe.method=fft            # a baseline under the same budget
#
# Set the GPU line to your cluster.  Run directory (checkpoints, TensorBoard, results):
# runs/<run name>/, one per job: desmoe-6dom-<job id> unless DESMOE_RUN_NAME is set.
#SBATCH --job-name=desmoe-6dom
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"   # submit from the repository root
if [ ! -f slurm/launch.sh ]; then  # relative paths (configs, .venv, runs) would all be wrong
    echo "desmoe: error: submitted from $PWD, which is not the repository root (no slurm/launch.sh): cd to the repository, then sbatch slurm/desmoe_6dom.sh"
    exit 2
fi
source slurm/launch.sh
if [ "${DESMOE_CPU:-0}" = "1" ]; then
    CONFIG="${DESMOE_CONFIG:-configs/desmoe_cpu.yaml}"
else
    CONFIG="${DESMOE_CONFIG:-configs/desmoe_6dom.yaml}"
fi
# The same run name across requeues: the requeued job resumes.
desmoe_launch launcher/desmoe.py "$CONFIG" "${DESMOE_RUN_NAME:-desmoe-6dom-${SLURM_JOB_ID}}" "$@"
exit $?
