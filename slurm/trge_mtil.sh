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
LOG_DIR="${DESMOE_LOG_DIR:-logs}"
mkdir -p "$LOG_DIR"
PYTHON="${DESMOE_PYTHON:-.venv/bin/python}"
CONFIG="${DESMOE_CONFIG:-configs/trge_mtil.yaml}"
DS_CONFIG="${DESMOE_DS_CONFIG:-configs/zero2.json}"
# The trainer writes this file after saving on a preemption signal (all ranks then exit 0).
export DESMOE_REQUEUE_MARKER="${LOG_DIR}/.requeue-${SLURM_JOB_ID}"
rm -f "$DESMOE_REQUEUE_MARKER"

# Rendezvous: first host of the allocation, port from the job id (no collisions
# between jobs sharing nodes).  A preset MASTER_ADDR / MASTER_PORT wins.
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
if [ "${DESMOE_CPU:-0}" = "1" ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
RUN_NAME="${DESMOE_RUN_NAME:-trge-mtil-${SLURM_JOB_ID}}"
echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} ranks," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, run ${RUN_NAME}"

# --kill-on-bad-exit: one dead rank ends the step; --wait: the others get 60 s at most.
# Per-rank logs go next to the job log.
srun --kill-on-bad-exit=1 --wait=60 --output="${LOG_DIR}/%x-%j-rank%t.out" --open-mode=append \
    "$PYTHON" launcher/trge.py --deepspeed "$DS_CONFIG" --config "$CONFIG" \
    "run.name=${RUN_NAME}" "$@"
rc=$?
if [ -f "$DESMOE_REQUEUE_MARKER" ]; then
    echo "job ${SLURM_JOB_ID}: checkpoint saved on preemption at step $(cat "$DESMOE_REQUEUE_MARKER"); requeueing"
    rm -f "$DESMOE_REQUEUE_MARKER"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "job ${SLURM_JOB_ID}: finished with exit code ${rc}"
exit "$rc"
