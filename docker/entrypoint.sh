#!/usr/bin/env bash
# The container's entrypoint: `docker run IMAGE [overrides...]`, and the command of every pod that
# launch/k8s.py renders. Arguments are Hydra overrides for vlm_train; a first argument that is not
# an override (`bash`, `python ...`) is run as a command instead. The image runs it behind NGC's
# own entrypoint (ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "vlm-train-entrypoint"]), which
# sets up CUDA forward compatibility on older drivers first.
#
# Node layout, first match wins (one of these launchers set it, or nobody did):
#   workers on this node  NPROC_PER_NODE | PET_NPROC_PER_NODE (PyTorchJob) | GPUs visible | 1
#   nodes                 NNODES (Indexed Job) | PET_NNODES (PyTorchJob) | 1
#   this node's rank      NODE_RANK | JOB_COMPLETION_INDEX (Indexed Job) | PET_NODE_RANK | 0
#   rank 0's address      MASTER_ADDR | PET_MASTER_ADDR, and MASTER_PORT | PET_MASTER_PORT | 29500
# One worker: the trainer runs directly and vlm_train/parallel/launch_env.py reads the same
# variables. Several: torchrun starts them (static rendezvous: node ranks are known up front).
# Several nodes: every node's rank must be given (two nodes defaulting to rank 0 would both wait
# as rank 0), and the rendezvous waits RDZV_TIMEOUT seconds (default 3600, torchrun's is 600) for
# nodes whose pod or image pull is slow.
# GPUs: when the container was given GPUs (device nodes /dev/nvidia<N>, a device list in
# NVIDIA_VISIBLE_DEVICES, or VLM_REQUIRE_CUDA=1) and torch sees none, it stops in one line instead
# of training on CPU with gloo; VLM_REQUIRE_CUDA=1 is passed on so every rank checks its own device.
set -euo pipefail

PYTHON="${PYTHON:-python}"

if [[ $# -gt 0 && "$1" != *=* && "$1" != -* ]]; then
  exec "$@"
fi

die() { echo "vlm-train-entrypoint: error: $*" >&2; exit 2; }

gpu_count() {
  # torch counts what CUDA_VISIBLE_DEVICES and the container runtime leave visible.
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0
}

# The container runtime adds /dev/nvidia<N> for each GPU it was given (docker --gpus, the Kubernetes
# device plugin); NGC images set NVIDIA_VISIBLE_DEVICES=all themselves, so only a list counts.
gpus_given() {
  [[ "${VLM_REQUIRE_CUDA:-}" == 1 ]] && return 0
  compgen -G '/dev/nvidia[0-9]*' >/dev/null && return 0
  case "${NVIDIA_VISIBLE_DEVICES:-}" in
    "" | all | none | void) return 1 ;;
    *) return 0 ;;
  esac
}

if gpus_given; then
  [[ "$(gpu_count)" -gt 0 ]] || die "this container was given GPUs (NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES:-}, VLM_REQUIRE_CUDA=${VLM_REQUIRE_CUDA:-}) but torch sees none: check the driver and the NVIDIA container toolkit (nvidia-smi in this image), or run without GPUs"
  export VLM_REQUIRE_CUDA=1
fi
# torchrun passes these signals on to the workers (Slurm's USR1, Kubernetes' TERM) and gives them
# this long to save a checkpoint before it kills them (torch >= 2.12 reads the variable; older
# versions ignore it).
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}"

nproc="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}"
if [[ -z "$nproc" ]]; then
  nproc="$(gpu_count)"
  [[ "$nproc" -gt 0 ]] || nproc=1  # CPU only: one worker, gloo
fi
nnodes="${NNODES:-${PET_NNODES:-1}}"
if [[ "$nnodes" != 1 ]]; then
  node_rank="${NODE_RANK:-${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-}}}"
  [[ -n "$node_rank" ]] || die "NNODES=$nnodes but this node's rank is not set: give each node NODE_RANK=0..$((nnodes - 1)) (docker run -e NODE_RANK=...)"
  master_addr="${MASTER_ADDR:-${PET_MASTER_ADDR:-}}"
  [[ -n "$master_addr" ]] || die "NNODES=$nnodes but MASTER_ADDR (node 0's address) is not set"
fi

# One worker: the trainer itself (launch_env reads an Indexed Job's variables); several nodes given
# by NODE_RANK go through torchrun even with one worker each, which turns them into ranks.
if [[ "$nproc" == 1 && ( "$nnodes" == 1 || -n "${JOB_COMPLETION_INDEX:-}" ) ]]; then
  exec "$PYTHON" -m vlm_train.train "$@"
fi

if [[ "$nnodes" == 1 ]]; then
  # One node: a private rendezvous on a free port.
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m vlm_train.train "$@"
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$nnodes" --nproc_per_node="$nproc" \
  --node_rank="$node_rank" --master_addr="$master_addr" \
  --master_port="${MASTER_PORT:-${PET_MASTER_PORT:-29500}}" \
  --rdzv_conf="timeout=${RDZV_TIMEOUT:-3600}" \
  -m vlm_train.train "$@"
