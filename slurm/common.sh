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
#   LAUNCHER          torchrun (default): one Slurm task per node runs torchrun, which starts a
#                     worker per GPU; srun: one Slurm task per GPU (`--ntasks-per-node=<GPUs>`, as
#                     NVIDIA's Megatron references launch), vlm_train reads Slurm's variables
#   NPROC_PER_NODE    workers per node (default: the node's allocated GPUs, or 1 without GPUs)
#   MASTER_PORT       rendezvous port (default: 20000 + job id % 10000, as launch_env.py derives it)
#   CONTAINER_IMAGE   run inside this image via pyxis/enroot; see slurm/container.sh
#   MAX_REQUEUES      requeues after a time-limit stop before giving up (default 20)
#   TORCHRUN_MAX_RESTARTS  in-job worker restarts by torchrun after a failure (default 0)
#   NCCL_PRESET       dgx-h100 | dgx-h200 | dgx-a100: that system's compute HCAs, matched exactly;
#                     unset (default): NCCL picks the GPU-local NICs itself
#   NUMA_BINDING      torchrun's --numa-binding mode per worker (default: node on GPU nodes whose
#                     torchrun has the flag; none to switch it off)
#   NCCL_* / TORCH_NCCL_*  anything you export reaches the workers unchanged
#
# Exit status of the batch script (what sacct shows, what `--dependency=afterok` waits for):
#   0   training finished
#   75  stopped before the end (the deadline, USR1, preemption) with a checkpoint saved: the job
#       was requeued when possible (it then runs again; a requeued job never satisfies afterok)
#       and otherwise (MAX_REQUEUES reached, `scontrol requeue` refused) stays FAILED, so that a
#       dependent stage 2 does not start from an unfinished stage 1
#   2   the overrides do not compose or do not fit the job; nothing started
#   other  the trainer's own status (docs/clusters.md lists them)

vlm_log() { echo "[vlm-slurm $(date '+%F %T')] $*"; }

# shellcheck source=slurm/container.sh
source "$(dirname "${BASH_SOURCE[0]}")/container.sh"  # CONTAINER_IMAGE: pyxis/enroot steps

# Prepend the script's default experiment unless the overrides choose one (Hydra refuses a group
# set twice).
vlm_with_experiment() {
  local default="$1" arg; shift
  for arg in "$@"; do
    [[ "$arg" == experiment=* || "$arg" == +experiment=* ]] && { printf '%s\n' "$@"; return; }
  done
  printf '%s\n' "experiment=$default" "$@"
}

# NCCL (argument: the run dir): defaults only where they are right. NCCL's own topology search picks the NICs next to each
# GPU, and its default socket interface choice already prefers ib* and skips lo and docker; a
# preset pins the compute HCAs of a known system, with `=` so that mlx5_1 cannot also match mlx5_10.
vlm_nccl_env() {
  local hcas=""
  case "${NCCL_PRESET:-}" in
    "") ;;
    # the eight OSFP compute ports (DGX H100/H200 user guide, "Network Modules"); the other
    # mlx5 devices serve storage and in-band management
    dgx-h100|dgx-h200) hcas="=mlx5_0,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_9,mlx5_10,mlx5_11" ;;
    dgx-a100) hcas="=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9" ;;
    *) vlm_log "error: NCCL_PRESET=$NCCL_PRESET is not one of dgx-h100, dgx-h200, dgx-a100 (or unset)"; return 2 ;;
  esac
  if [[ -n "$hcas" && -z "${NCCL_IB_HCA+set}" ]]; then export NCCL_IB_HCA="$hcas"; fi
  : "${NCCL_DEBUG=WARN}"
  # A hang leaves evidence: torch's flight recorder keeps each rank's last collectives and dumps
  # them into <run.dir>/logs when a collective times out (TORCH_FR_* from torch 2.7; older
  # releases read TORCH_NCCL_TRACE_BUFFER_SIZE, which we leave to you).
  if [[ -z "${TORCH_NCCL_TRACE_BUFFER_SIZE+set}" ]]; then : "${TORCH_FR_BUFFER_SIZE=2000}"; export TORCH_FR_BUFFER_SIZE; fi
  : "${TORCH_NCCL_DUMP_ON_TIMEOUT=1}" "${TORCH_FR_DUMP_TEMP_FILE=$1/logs/nccl_trace_rank_}"
  export NCCL_DEBUG TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_FR_DUMP_TEMP_FILE
  export PYTHONUNBUFFERED=1
}

# run.dir as vlm_train resolves it (experiment defaults included), absolute, into VLM_RUN_DIR; and
# whether this torchrun has --numa-binding (torch >= 2.9), into VLM_TORCHRUN_NUMA. A bad override fails
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
    import torch.distributed.run as torchrun
    flags = open(torchrun.__file__).read()
    print("numa_binding=" + str(int("--numa-binding" in flags)))
    print(f"run_dir={cfg.run.dir}")
except UserError as err:
    sys.exit(f"vlm-train: error: {err}")'
  local out dir  # (errexit does not reach into $(...): every failure below is checked by hand)
  if [[ ${#VLM_CONTAINER_ARGS[@]} -gt 0 ]]; then
    out="$(srun --nodes=1 --ntasks=1 "${VLM_CONTAINER_ARGS[@]}" "$PYTHON" -c "$code" "$@")" || return 1
  else
    out="$("$PYTHON" -c "$code" "$@")" || return 1
  fi
  dir="$(sed -n 's/^run_dir=//p' <<<"$out" | tail -n 1)"
  [[ -n "$dir" ]] || return 1
  [[ "$dir" == /* ]] || dir="$PWD/$dir"
  VLM_TORCHRUN_NUMA="$(sed -n 's/^numa_binding=//p' <<<"$out" | tail -n 1)"
  VLM_RUN_DIR="$dir"
}

vlm_nproc_per_node() {
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then echo "$NPROC_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then awk -F, '{ print NF }' <<<"$CUDA_VISIBLE_DEVICES"
  else echo 1  # CPU-only node: one worker, and vlm_train picks gloo
  fi
}

vlm_head_node() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1; }

# --- stop at the time limit, requeue -------------------------------------------------------------
# The trainer stops itself in time: we export the job's end time (VLM_STOP_AT, from squeue) and
# before every step it checks that one more step and a checkpoint still fit; when they do not, it
# saves and exits 75 (vlm_train/training/deadline.py). No signal has to travel through torchrun,
# which before torch 2.9 dies of SIGUSR1 and before 2.12 kills its workers 30 s after a stop signal.
# `#SBATCH --signal=B:USR1@<s>` is the second path, for a limit the trainer cannot know (changed
# with `scontrol update` after the start): USR1 reaches this batch shell only (B:), which writes
# <run.dir>/STOP; rank 0 sees it before the next step and the run stops the same way.
# When the step has ended with 75 we `scontrol requeue` the job: it returns to the queue with the
# same id, script and arguments, and its next start resumes from <run.dir>/checkpoints/latest.
# Requeueing only after the step ended means the checkpoint is never cut short by KillWait. The
# requeue is done here, on the host (inside a container there is no scontrol): leave the trainer's
# `train.requeue` false with these scripts.
VLM_STEP_PID=""
VLM_STOP_REQUESTED=0
VLM_TRAINING_DONE=0
VLM_RUN_DIR=""

vlm_on_usr1() {
  # A signal that lands after training ended must not resubmit a finished run.
  if [[ $VLM_TRAINING_DONE -eq 1 || $VLM_STOP_REQUESTED -eq 1 ]]; then return 0; fi
  VLM_STOP_REQUESTED=1
  if [[ -z "$VLM_STEP_PID" ]]; then
    vlm_log "USR1 (time limit near) before training started"
    vlm_requeue || true
    exit 75
  fi
  vlm_log "USR1 (time limit near): asking the trainer to save a checkpoint and stop ($VLM_RUN_DIR/STOP)"
  echo "Slurm sent USR1 to job $SLURM_JOB_ID: its time limit is near" >"$VLM_RUN_DIR/STOP" \
    || vlm_log "could not write $VLM_RUN_DIR/STOP; the trainer's own deadline still stops it"
}

# The job's end as epoch seconds, when it has a time limit (squeue prints the controller's local
# time, as date(1) reads it here; "N/A" or "Unknown" without one).
vlm_job_end_epoch() {
  local end
  end="$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null | head -n 1)" || return 0
  [[ "$end" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]] || return 0
  date -d "$end" +%s 2>/dev/null || true
}

# Succeeds only when the job was requeued.
vlm_requeue() {
  local restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_REQUEUES:-20}"
  if (( restarts >= max )); then
    vlm_log "not requeueing: this job was already requeued $restarts times (MAX_REQUEUES=$max); exit 75 so that the job counts as failed (resubmit to continue from the checkpoint)"
    return 1
  fi
  vlm_log "requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $max); the next start resumes from the latest checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    vlm_log "scontrol requeue failed (was the job submitted with --requeue? does the site allow requeues?); exit 75 so that the job counts as failed"
    return 1
  fi
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

# After the training step, the batch script's exit status: see the table at the top.
vlm_after_training() {
  local rc="$1"
  VLM_TRAINING_DONE=1
  trap - USR1
  rm -f "$VLM_RUN_DIR/STOP"  # honoured or too late: the next start must not stop at once
  if (( rc == 0 )); then
    vlm_log "training finished"
    return 0
  fi
  # torchrun exits 1 whatever its workers' status, so the trainer leaves <run.dir>/STOPPED (its
  # message) when it stopped early on purpose, after the stop's checkpoint.
  if (( rc == 75 )) || [[ -f "$VLM_RUN_DIR/STOPPED" ]]; then
    vlm_log "training stopped before the end with a checkpoint (exit $rc): $(cat "$VLM_RUN_DIR/STOPPED" 2>/dev/null)"
    vlm_requeue || true
    return 75
  fi
  vlm_log "training failed with exit code $rc"
  return "$rc"
}

# The training step: one task per node running torchrun, or one task per worker (LAUNCHER=srun).
# Every task gets its node's share of the CPUs: srun's -c implies --exact, so a fixed count (or
# none) can leave half a hyperthreaded node idle.
vlm_training_step() {
  local nodes="$1" nproc="$2" head="$3" port="$4"; shift 4
  local cpus="${SLURM_CPUS_ON_NODE:-1}" step
  step=(srun --nodes="$nodes" --kill-on-bad-exit=1 --label)
  case "${LAUNCHER:-torchrun}" in
    srun)
      step+=(--ntasks=$((nodes * nproc)) --ntasks-per-node="$nproc" --cpus-per-task=$((cpus / nproc > 0 ? cpus / nproc : 1)) --cpu-bind=cores)
      MASTER_ADDR="$head" MASTER_PORT="$port" "${step[@]}" "${VLM_CONTAINER_ARGS[@]}" \
        "$PYTHON" -m vlm_train.train "$@" &
      ;;
    torchrun)
      step+=(--ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="$cpus")
      local extra=()
      local numa="${NUMA_BINDING:-}"
      if [[ -z "$numa" && "${VLM_TORCHRUN_NUMA:-0}" == 1 && "${SLURM_GPUS_ON_NODE:-0}" != 0 ]]; then numa=node; fi
      [[ -z "$numa" || "$numa" == none ]] || extra+=(--numa-binding="$numa")
      "${step[@]}" "${VLM_CONTAINER_ARGS[@]}" \
        "$PYTHON" -m torch.distributed.run \
          --nnodes="$nodes" --nproc_per_node="$nproc" \
          --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" \
          --rdzv_conf=join_timeout="${RDZV_JOIN_TIMEOUT:-1800}" \
          --max_restarts="${TORCHRUN_MAX_RESTARTS:-0}" "${extra[@]}" \
          -m vlm_train.train "$@" &
      ;;
    *) vlm_log "error: LAUNCHER=$LAUNCHER is not torchrun or srun"; return 2 ;;
  esac
  VLM_STEP_PID=$!
}

# The head node's address as Slurm itself reaches it (NodeAddr), which every node can resolve;
# its name when the controller does not say.
vlm_head_addr() {
  local head="$1" addr
  addr="$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
  echo "${addr:-$head}"
}

vlm_launch() {
  local default_experiment="$1"; shift
  [[ -n "${SLURM_JOB_ID:-}" ]] || { echo "submit with sbatch: sbatch $0 [overrides...]" >&2; exit 2; }
  trap vlm_on_usr1 USR1
  PYTHON="${PYTHON:-python3}"
  local overrides=()
  mapfile -t overrides < <(vlm_with_experiment "$default_experiment" "$@")
  vlm_container_setup "${overrides[@]}" || exit 2  # mounts from the run's own paths (slurm/container.sh)

  local log nodes="${SLURM_JOB_NUM_NODES:-1}" nproc
  nproc="$(vlm_nproc_per_node)"
  VLM_WORLD=$((nodes * nproc)) vlm_resolve_run_dir "${overrides[@]}" || { vlm_log "job $SLURM_JOB_ID: the overrides do not compose or do not fit this job (above); nothing started"; exit 2; }
  local run_dir="$VLM_RUN_DIR"
  mkdir -p "$run_dir/logs"
  rm -f "$run_dir/STOP" "$run_dir/STOPPED"  # an earlier job's request and report are not this one's
  log="$run_dir/logs/slurm-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}.log"
  vlm_log "job $SLURM_JOB_ID: logging to $log"
  exec >>"$log" 2>&1   # from here on, this shell and every srun step write into the run dir

  vlm_nccl_env "$run_dir" || exit 2
  local head port end
  head="$(vlm_head_addr "$(vlm_head_node)")"
  port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
  end="$(vlm_job_end_epoch)"
  if [[ -n "$end" ]]; then export VLM_STOP_AT="$end"; fi
  vlm_log "job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)): $nodes node(s) x $nproc worker(s) (${LAUNCHER:-torchrun}), rendezvous $head:$port, run.dir $run_dir"
  if [[ -n "$end" ]]; then
    vlm_log "time limit: the job ends $(date -d "@$end" '+%F %T %Z'); the trainer saves and stops before that"
  else
    vlm_log "time limit: none known to the trainer (USR1 or a preemption signal stops it)"
  fi
  vlm_log "container: ${CONTAINER_IMAGE:-none}; NCCL_IB_HCA=${NCCL_IB_HCA:-<NCCL chooses>}"
  vlm_log "overrides: ${overrides[*]}"

  vlm_container_import_all_nodes || exit 2  # every node has the image before the rendezvous waits
  vlm_container_verify "${overrides[@]}" || exit 2  # a token from the host reads back inside, on every node
  vlm_training_step "$nodes" "$nproc" "$head" "$port" "${overrides[@]}" || exit $?
  local rc=0
  vlm_wait "$VLM_STEP_PID" || rc=$?
  vlm_after_training "$rc" || exit $?
}
