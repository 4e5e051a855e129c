# Shared by the job scripts in slurm/ (sourced after `cd` to the submit directory):
# rendezvous from Slurm's allocation, CPU mode, per-rank logs, and requeue on preemption.
#
#   desmoe_launch LAUNCHER CONFIG RUN_NAME [overrides ...]
#
# Environment: DESMOE_LOG_DIR (logs), DESMOE_PYTHON (.venv/bin/python),
# DESMOE_DS_CONFIG (configs/zero2.json), DESMOE_CPU=1 (gloo + DeepSpeed's CPU accelerator).

# Started with bash instead of sbatch (no allocation): say so, rather than bash's
# "SLURM_JOB_ID: unbound variable" from the run name, or an srun that asks for one.
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "desmoe: error: SLURM_JOB_ID is not set: $0 is a Slurm batch script; submit it with sbatch $0" \
         "(or run it inside an salloc allocation); without Slurm, start the launcher with torchrun or deepspeed" >&2
    exit 2
fi

LOG_DIR="${DESMOE_LOG_DIR:-logs}"
mkdir -p "$LOG_DIR"
PYTHON="${DESMOE_PYTHON:-.venv/bin/python}"
DS_CONFIG="${DESMOE_DS_CONFIG:-configs/zero2.json}"

desmoe_launch() {
    local launcher="$1" config="$2" run_name="$3" default_name="$3"
    shift 3
    # The trainer writes this file after saving on a preemption signal (all ranks then exit 0).
    export DESMOE_REQUEUE_MARKER="${LOG_DIR}/.requeue-${SLURM_JOB_ID}"
    rm -f "$DESMOE_REQUEUE_MARKER"
    # Rendezvous: first host of the allocation, a port derived from the job id (jobs sharing
    # nodes do not collide).  A preset MASTER_ADDR / MASTER_PORT wins.
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    if [ "${DESMOE_CPU:-0}" = "1" ]; then
        export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    fi
    # run.dir as the overrides give it (key=value or --key value); else the config's (runs in the shipped ones).
    # run.name too: the user's overrides come after run.name=${run_name} below, and the last one wins.
    local run_dir="" prev=""
    for arg in "$@"; do
        case "$arg" in
            run.dir=*|--run.dir=*) run_dir="${arg#*=}" ;;
            run.name=*|--run.name=*) run_name="${arg#*=}" ;;
        esac
        [ "$prev" = "--run.dir" ] && run_dir="$arg"
        [ "$prev" = "--run.name" ] && run_name="$arg"
        prev="$arg"
    done
    local where="${run_dir:-<run.dir of ${config}>}/${run_name}"
    echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} ranks," \
         "master ${MASTER_ADDR}:${MASTER_PORT}, config ${config}, run ${where}" \
         "(tensorboard --logdir ${where}/tensorboard)"
    # --kill-on-bad-exit: one dead rank ends the step; --wait: the others get 60 s at most.
    # Per-rank logs go next to the job log.
    srun --kill-on-bad-exit=1 --wait=60 --output="${LOG_DIR}/%x-%j-rank%t.out" --open-mode=append \
        "$PYTHON" "$launcher" --deepspeed "$DS_CONFIG" --config "$config" "run.name=${default_name}" "$@"
    local rc=$?
    if [ -f "$DESMOE_REQUEUE_MARKER" ]; then
        echo "job ${SLURM_JOB_ID}: checkpoint saved on preemption at step $(cat "$DESMOE_REQUEUE_MARKER"); requeueing"
        rm -f "$DESMOE_REQUEUE_MARKER"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$rc" -ne 0 ]; then
        # The ranks' own one-line reason is in their logs; the job log says which rank and why.
        local f line rank
        for f in "${LOG_DIR}"/*-"${SLURM_JOB_ID}"-rank*.out; do
            [ -f "$f" ] || continue
            line=$(grep -a -E '^desmoe: (error|failed):' "$f" | tail -n 1)
            if [ -n "$line" ]; then
                rank="${f##*-}"
                echo "job ${SLURM_JOB_ID}: ${rank%.out}: ${line}"
                break
            fi
        done
    fi
    echo "job ${SLURM_JOB_ID}: finished with exit code ${rc}"
    return "$rc"
}
