#!/usr/bin/env bash
# The container's entrypoint: `docker run IMAGE [overrides...]`, and the command of every pod that
# launch/k8s.py renders. Arguments are Hydra overrides for vlm_train; a first argument that is not
# an override (`bash`, `python ...`) is run as a command instead.
#
# Node layout, first match wins (one of these launchers set it, or nobody did):
#   workers on this node  NPROC_PER_NODE | PET_NPROC_PER_NODE (PyTorchJob) | GPUs visible | 1
#   nodes                 NNODES (Indexed Job) | PET_NNODES (PyTorchJob) | 1
#   this node's rank      NODE_RANK | JOB_COMPLETION_INDEX (Indexed Job) | PET_NODE_RANK | 0
#   rank 0's address      MASTER_ADDR | PET_MASTER_ADDR, and MASTER_PORT | PET_MASTER_PORT | 29500
# One worker: the trainer runs directly and vlm_train/parallel/launch_env.py reads the same
# variables. Several: torchrun starts them (static rendezvous: node ranks are known up front).
set -euo pipefail

PYTHON="${PYTHON:-python}"

if [[ $# -gt 0 && "$1" != *=* && "$1" != -* ]]; then
  exec "$@"
fi

gpu_count() {
  # torch counts what CUDA_VISIBLE_DEVICES and the container runtime leave visible.
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0
}

nproc="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}"
if [[ -z "$nproc" ]]; then
  nproc="$(gpu_count)"
  [[ "$nproc" -gt 0 ]] || nproc=1  # CPU only: one worker, gloo
fi
nnodes="${NNODES:-${PET_NNODES:-1}}"

if [[ "$nproc" == 1 ]]; then
  exec "$PYTHON" -m vlm_train.train "$@"
fi

if [[ "$nnodes" == 1 ]]; then
  # One node: a private rendezvous on a free port.
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m vlm_train.train "$@"
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$nnodes" --nproc_per_node="$nproc" \
  --node_rank="${NODE_RANK:-${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-0}}}" \
  --master_addr="${MASTER_ADDR:-${PET_MASTER_ADDR:?MASTER_ADDR is not set for a multi-node run}}" \
  --master_port="${MASTER_PORT:-${PET_MASTER_PORT:-29500}}" \
  -m vlm_train.train "$@"
