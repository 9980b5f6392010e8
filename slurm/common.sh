# shellcheck shell=bash
# The body shared by slurm/pretrain.sh and slurm/finetune.sh (sourced, not run).
#
# Launcher: one Slurm task per node runs torchrun, and torchrun starts one worker per GPU,
# meeting the other nodes through a c10d rendezvous hosted on the first node. We chose this over
# one Slurm task per GPU because
#   - it is the same process tree as every other way of launching vlm_train (README's torchrun
#     lines, the Docker entrypoint, Kubernetes pods), so a SuperPOD run is no special case;
#   - GPU binding is torchrun's LOCAL_RANK on a node that sees all its GPUs, independent of the
#     site's gres/cgroup settings (`--gpus-per-task=1` would hide devices and break LOCAL_RANK);
#   - the same script then runs a CPU-only node unchanged: no GPUs -> one worker -> gloo.
# (vlm_train also understands Slurm's own variables -- vlm_train/parallel/launch_env.py -- so
# `srun --ntasks-per-node=8 python -m vlm_train.train ...` works too, without torchrun.)
#
# Environment you may set before `sbatch` (sbatch exports your environment to the job):
#   PYTHON            interpreter with vlm_train installed (default: python3 on PATH)
#   NPROC_PER_NODE    workers per node (default: the node's allocated GPUs, or 1 without GPUs)
#   MASTER_PORT       rendezvous port (default: 20000 + job id % 10000, as launch_env.py derives it)
#   CONTAINER_IMAGE   run inside this image via pyxis/enroot: the image docker/Dockerfile builds
#                     (registry#vlm-train:tag) or its .sqsh; CONTAINER_MOUNTS (default: the
#                     submit dir at the same path; mount data and run dirs at their host paths)
#   MAX_REQUEUES      requeues at the time limit before giving up (default 20)
#   TORCHRUN_MAX_RESTARTS  in-job worker restarts by torchrun after a failure (default 0)
#   TORCHRUN_SHUTDOWN_TIMEOUT  seconds workers get to save after a stop signal (default 270)
#   NCCL_* / TORCH_NCCL_*  see vlm_nccl_env below; anything you export wins over our defaults.

vlm_log() { echo "[vlm-slurm $(date '+%F %T')] $*"; }

# Prepend the script's default experiment unless the overrides choose one (Hydra refuses a group
# set twice).
vlm_with_experiment() {
  local default="$1" arg; shift
  for arg in "$@"; do
    [[ "$arg" == experiment=* || "$arg" == +experiment=* ]] && { printf '%s\n' "$@"; return; }
  done
  printf '%s\n' "experiment=$default" "$@"
}

# NCCL over InfiniBand. `: "${X=default}"` keeps any value you exported, even an empty one.
vlm_nccl_env() {
  # Compute HCAs of a DGX H100/H200 (the eight OSFP ports; DGX H100 user guide, "Network
  # Modules"). The other mlx5 devices serve storage and in-band management. For DGX A100 use
  # mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9; export NCCL_IB_HCA= (empty) to let
  # NCCL use every active HCA it finds.
  : "${NCCL_IB_HCA=mlx5_0,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_9,mlx5_10,mlx5_11}"
  # Interface for NCCL's bootstrap and socket fallback: anything but loopback and docker bridges.
  : "${NCCL_SOCKET_IFNAME=^lo,docker}"
  # A failed or hung collective aborts the communicator and the process instead of hanging until
  # the job's time limit; with parallel.timeout_s this bounds how long a dead peer can stall a run.
  : "${TORCH_NCCL_ASYNC_ERROR_HANDLING=1}"
  : "${NCCL_DEBUG=WARN}"
  local var
  for var in NCCL_IB_HCA NCCL_SOCKET_IFNAME; do
    if [[ -z "${!var}" ]]; then unset "$var"; else export "${var?}"; fi
  done
  export TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG
  export PYTHONUNBUFFERED=1
}

# pyxis/enroot: the same srun flags for every step, one named container per job so the image is
# imported once. Host paths are mounted at the same path so run.dir means the same inside.
vlm_container_args() {
  VLM_CONTAINER_ARGS=()
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  VLM_CONTAINER_ARGS=(
    "--container-image=$CONTAINER_IMAGE"
    "--container-name=vlm-train-$SLURM_JOB_ID"
    "--container-mounts=${CONTAINER_MOUNTS:-$PWD:$PWD}"
    "--container-workdir=$PWD"
  )
}

# run.dir as vlm_train resolves it (experiment defaults included), absolute. A bad override fails
# here, in seconds, before any node starts training, and so does a train.global_batch_size that
# the job's VLM_WORLD ranks cannot make exactly (vlm_train/training/schedule.py).
vlm_resolve_run_dir() {
  local code='import os, sys
try:
    from vlm_train.config import compose
    from vlm_train.errors import UserError
    import hydra, torch  # imported lazily by vlm_train; missing means the wrong interpreter
except ImportError as err:
    sys.exit(f"{sys.executable} cannot import vlm_train ({err}): set PYTHON to your environment'"'"'s interpreter")
try:
    cfg = compose(sys.argv[1:])
    world = int(os.environ.get("VLM_WORLD") or 0)
    if world:
        from vlm_train.training.schedule import plan_batch
        plan_batch(cfg.train, max(world // cfg.parallel.tensor_parallel, 1))
    print(cfg.run.dir)
except UserError as err:
    sys.exit(f"vlm-train: error: {err}")'
  local dir  # (errexit does not reach into $(...): every failure below is checked by hand)
  if [[ ${#VLM_CONTAINER_ARGS[@]} -gt 0 ]]; then
    dir="$(srun --nodes=1 --ntasks=1 "${VLM_CONTAINER_ARGS[@]}" "$PYTHON" -c "$code" "$@" | tail -n 1)" || return 1
  else
    dir="$("$PYTHON" -c "$code" "$@" | tail -n 1)" || return 1
  fi
  [[ -n "$dir" ]] || return 1
  [[ "$dir" == /* ]] || dir="$PWD/$dir"
  echo "$dir"
}

vlm_nproc_per_node() {
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then echo "$NPROC_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then awk -F, '{ print NF }' <<<"$CUDA_VISIBLE_DEVICES"
  else echo 1  # CPU-only node: one worker, and vlm_train picks gloo
  fi
}

vlm_head_node() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1; }

# --- stop and requeue at the time limit -----------------------------------------------------------
# `#SBATCH --signal=B:USR1@<s>` sends USR1 to this batch shell only (B:), <s> seconds before the
# time limit. We pass it on to the training step (srun forwards it to torchrun, torchrun -- told to
# handle USR1 below -- to every worker). The trainer finishes its step, writes a checkpoint and
# exits (vlm_train/parallel/signals.py). When the step has ended we `scontrol requeue` the job:
# it returns to the queue with the same id, script and arguments, and its next start resumes from
# <run.dir>/checkpoints/latest. Requeueing only after the step ended means the checkpoint is
# never cut short by Slurm's KillWait; <s> must cover one step plus a checkpoint (300 s by
# default; `sbatch --signal=B:USR1@600 ...` for bigger models).
# The requeue is done here, on the host, not by the trainer (`train.requeue`, leave it false with
# these scripts): inside a container there is no scontrol.
# A trainer without a signal handler would simply die of USR1; the requeue still happens, and the
# next start resumes from the last periodic checkpoint (`train.save_every`).
VLM_STEP_PID=""
VLM_STOP_REQUESTED=0
VLM_TRAINING_DONE=0

vlm_on_usr1() {
  # A signal that lands after training ended must not resubmit a finished run.
  if [[ $VLM_TRAINING_DONE -eq 1 || $VLM_STOP_REQUESTED -eq 1 ]]; then return 0; fi
  VLM_STOP_REQUESTED=1
  if [[ -z "$VLM_STEP_PID" ]]; then
    vlm_log "USR1 (time limit near) before training started"
    vlm_requeue
    exit 0
  fi
  vlm_log "USR1 (time limit near): asking the trainer to save a checkpoint and stop"
  kill -USR1 "$VLM_STEP_PID" 2>/dev/null || true
}

vlm_requeue() {
  local restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_REQUEUES:-20}"
  if (( restarts >= max )); then
    vlm_log "not requeueing: this job was already requeued $restarts times (MAX_REQUEUES=$max)"
    return 0
  fi
  vlm_log "requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $max); the next start resumes from the latest checkpoint"
  scontrol requeue "$SLURM_JOB_ID" || vlm_log "scontrol requeue failed (was the job submitted with --requeue?)"
}

# Wait for a background pid while staying responsive to trapped signals: `wait` returns early
# (status > 128) when a trap runs, so wait again until the process itself has ended.
vlm_wait() {
  local pid="$1" rc
  while :; do
    rc=0
    wait "$pid" || rc=$?
    if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi
    return "$rc"
  done
}

# torchrun settings through its PET_* environment defaults (older torchrun versions ignore an
# unknown PET_ variable, where an unknown flag would be an error).
vlm_torchrun_env() {
  local signals="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  export PET_SIGNALS_TO_HANDLE="$signals" TORCHELASTIC_SIGNALS_TO_HANDLE="$signals"
  # How long torchrun lets the workers save before it kills them (its default is 30 s).
  export PET_SHUTDOWN_TIMEOUT="${TORCHRUN_SHUTDOWN_TIMEOUT:-270}"
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$PET_SHUTDOWN_TIMEOUT"
}

# After the training step: requeue when we stopped it for the time limit. Exit status 0 means
# training completed before the stop took effect: nothing left to resume.
vlm_after_training() {
  local rc="$1"
  VLM_TRAINING_DONE=1
  trap - USR1
  if [[ $VLM_STOP_REQUESTED -eq 1 && $rc -ne 0 ]]; then
    vlm_log "training stopped for the time limit (exit $rc)"
    vlm_requeue
    return 0
  fi
  vlm_log "training finished with exit code $rc"
  return "$rc"
}

vlm_launch() {
  local default_experiment="$1"; shift
  [[ -n "${SLURM_JOB_ID:-}" ]] || { echo "submit with sbatch: sbatch $0 [overrides...]" >&2; exit 2; }
  trap vlm_on_usr1 USR1
  PYTHON="${PYTHON:-python3}"
  local overrides=()
  mapfile -t overrides < <(vlm_with_experiment "$default_experiment" "$@")
  vlm_container_args

  local run_dir log nodes="${SLURM_JOB_NUM_NODES:-1}" nproc
  nproc="$(vlm_nproc_per_node)"
  run_dir="$(VLM_WORLD=$((nodes * nproc)) vlm_resolve_run_dir "${overrides[@]}")" || { vlm_log "job $SLURM_JOB_ID: the overrides do not compose or do not fit this job (above); nothing started"; exit 2; }
  mkdir -p "$run_dir/logs"
  log="$run_dir/logs/slurm-$SLURM_JOB_ID.log"
  vlm_log "job $SLURM_JOB_ID: logging to $log"
  exec >>"$log" 2>&1   # from here on, this shell and every srun step write into the run dir

  vlm_nccl_env
  local head port
  head="$(vlm_head_node)"
  port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
  vlm_log "job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)): $nodes node(s) x $nproc worker(s), rendezvous $head:$port, run.dir $run_dir"
  vlm_log "container: ${CONTAINER_IMAGE:-none}; NCCL_IB_HCA=${NCCL_IB_HCA:-<all>} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-<auto>}"
  vlm_log "overrides: ${overrides[*]}"

  vlm_torchrun_env
  local step=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
  # srun stopped inheriting sbatch's --cpus-per-task in Slurm 22.05: pass it, or the step (and
  # every data-loader worker) may be bound to a single CPU.
  [[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  "${step[@]}" "${VLM_CONTAINER_ARGS[@]}" \
    "$PYTHON" -m torch.distributed.run \
      --nnodes="$nodes" --nproc_per_node="$nproc" \
      --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" \
      --max_restarts="${TORCHRUN_MAX_RESTARTS:-0}" \
      -m vlm_train.train "${overrides[@]}" &
  VLM_STEP_PID=$!
  local rc=0
  vlm_wait "$VLM_STEP_PID" || rc=$?
  vlm_after_training "$rc"
}
