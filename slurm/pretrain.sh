#!/usr/bin/env bash
# Stage 1 (pretraining the connector) on DGX SuperPOD nodes with 8 GPUs each:
#   sbatch slurm/pretrain.sh [hydra overrides...]
#   sbatch --nodes=4 slurm/pretrain.sh vision.path=/models/clip-vit-large-patch14-336 \
#     llm.path=/models/vicuna-7b-v1.5 'data.urls=/data/lcs558k/{000000..000557}.tar'
# Every argument is a Hydra override (experiment= defaults to llava15-7b-stage1). sbatch flags on
# the command line win over the headers below; a CPU-only node: --gres=none --cpus-per-task=<n>.
# Logs: <run.dir>/logs/slurm-<jobid>.log. Environment knobs: see slurm/common.sh.
#SBATCH --job-name=vlm-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# One task per node (torchrun starts a worker per GPU) with all the node's CPUs; the trainer stops
# itself before the time limit and the job is requeued; USR1 2 min before the limit is the backstop.
set -euo pipefail

# sbatch runs a copy of this file from its spool directory, so the repository is found through
# VLM_TRAIN_HOME, the job record (the submitted path), or the submit directory.
repo_root() {
  local candidates=("${VLM_TRAIN_HOME:-}") cmd dir
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    cmd="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
    [[ -z "$cmd" ]] || candidates+=("$(dirname "$cmd")/..")
  fi
  candidates+=("$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}")
  for dir in "${candidates[@]}"; do
    [[ -n "$dir" && -f "$dir/slurm/common.sh" ]] && { (cd "$dir" && pwd); return; }
  done
  echo "cannot find slurm/common.sh: submit from the repository or set VLM_TRAIN_HOME" >&2
  exit 2
}

# shellcheck source=slurm/common.sh
source "$(repo_root)/slurm/common.sh"
vlm_launch llava15-7b-stage1 "$@"
