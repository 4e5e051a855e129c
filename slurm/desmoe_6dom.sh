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
LOG_DIR="${DESMOE_LOG_DIR:-logs}"
mkdir -p "$LOG_DIR"
PYTHON="${DESMOE_PYTHON:-.venv/bin/python}"
DS_CONFIG="${DESMOE_DS_CONFIG:-configs/zero2.json}"
if [ "${DESMOE_CPU:-0}" = "1" ]; then
    CONFIG="${DESMOE_CONFIG:-configs/desmoe_cpu.yaml}"
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    CONFIG="${DESMOE_CONFIG:-configs/desmoe_6dom.yaml}"
fi
# The trainer writes this file after saving on a preemption signal (all ranks then exit 0).
export DESMOE_REQUEUE_MARKER="${LOG_DIR}/.requeue-${SLURM_JOB_ID}"
rm -f "$DESMOE_REQUEUE_MARKER"

# Rendezvous: first host of the allocation, a port derived from the job id (jobs sharing
# nodes do not collide).  A preset MASTER_ADDR / MASTER_PORT wins.
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
RUN_NAME="${DESMOE_RUN_NAME:-desmoe-6dom-${SLURM_JOB_ID}}"   # the same name across requeues: resume
echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} ranks," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}, run runs/${RUN_NAME}" \
     "(tensorboard --logdir runs/${RUN_NAME}/tensorboard)"

# --kill-on-bad-exit: one dead rank ends the step; --wait: the others get 60 s at most.
srun --kill-on-bad-exit=1 --wait=60 --output="${LOG_DIR}/%x-%j-rank%t.out" --open-mode=append \
    "$PYTHON" launcher/desmoe.py --deepspeed "$DS_CONFIG" --config "$CONFIG" "run.name=${RUN_NAME}" "$@"
rc=$?
if [ -f "$DESMOE_REQUEUE_MARKER" ]; then
    echo "job ${SLURM_JOB_ID}: checkpoint saved on preemption at step $(cat "$DESMOE_REQUEUE_MARKER"); requeueing"
    rm -f "$DESMOE_REQUEUE_MARKER"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "job ${SLURM_JOB_ID}: finished with exit code ${rc}"
exit "$rc"
