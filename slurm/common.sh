# Shared by the sbatch scripts: arguments, resume detection, signal forwarding, requeue.
# Sourced, not run. Expects: RUN_DIR CONFIG [overrides...] as the script's arguments.

PY=${DISTSPARSE_PYTHON:-python3}
RUN_DIR=${1:?usage: sbatch SCRIPT RUN_DIR CONFIG [key.sub=value ...]}
CONFIG=${2:?usage: sbatch SCRIPT RUN_DIR CONFIG [key.sub=value ...]}
shift 2
OVERRIDES=("$@")

# The node's address as SLURM knows it (NodeAddr), for rendezvous and the Ray head.
node_addr() { scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p'; }
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
HEAD_ADDR=$(node_addr "${NODES[0]}")

# A checkpoint to resume from: last.pt (single, DDP) or DeepSpeed's own (its `latest` names it).
has_checkpoint() { [[ -f $RUN_DIR/checkpoints/last.pt || -f $RUN_DIR/checkpoints/deepspeed/latest ]]; }

# A first attempt starts the run; a requeued one (or a rerun) resumes from its checkpoint.
if has_checkpoint; then
  TRAIN_ARGS=(--resume "$RUN_DIR" "${OVERRIDES[@]}")
  echo "[distsparse] attempt ${SLURM_RESTART_COUNT:-0}: resuming $RUN_DIR"
else
  TRAIN_ARGS=("$CONFIG" "${OVERRIDES[@]}" "run.dir=$RUN_DIR")
  echo "[distsparse] attempt ${SLURM_RESTART_COUNT:-0}: starting $RUN_DIR"
fi

# `#SBATCH --signal=B:USR1@SECONDS` (time limit) or a preemption's SIGTERM reaches this shell:
# pass SIGTERM to every job step (not this shell), whose trainers checkpoint at the next step
# and stop.
STOP_REQUESTED=0
on_stop_signal() {
  STOP_REQUESTED=1
  echo "[distsparse] stop signal: checkpointing"
  scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_stop_signal USR1 TERM
STARTED=$(mktemp)

# Wait for a background step; a trap interrupts `wait`, so wait again until it has exited.
wait_for() {
  local status=0
  while true; do
    wait "$1"; status=$?
    kill -0 "$1" 2>/dev/null || return "$status"
  done
}

# After the run: done if complete; requeue if this attempt was stopped by a signal (the trainers
# wrote stopped_by_signal, or this shell got one) and a checkpoint exists; else fail.
finish() {
  local status=$1 summary=$RUN_DIR/summary.json fresh=0
  [[ -f $summary && $summary -nt $STARTED ]] && fresh=1
  rm -f "$STARTED"
  if (( fresh )) && "$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["completed"] else 1)' "$summary"; then
    echo "[distsparse] run complete"
    exit 0
  fi
  if has_checkpoint && { (( STOP_REQUESTED )) || { (( fresh )) && grep -q '"stopped_by_signal"' "$summary"; }; }; then
    echo "[distsparse] stopped at a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "[distsparse] run failed (exit status $status)" >&2
  exit "$(( status == 0 ? 1 : status ))"
}
