#!/usr/bin/env bash
# Stage 2 (instruction tuning: connector + LLM) on DGX SuperPOD nodes with 8 GPUs each:
#   sbatch slurm/finetune.sh [hydra overrides...]
#   sbatch slurm/finetune.sh vision.path=/models/clip-vit-large-patch14-336 llm.path=/models/vicuna-7b-v1.5 \
#     connector.path=runs/llava15-7b-stage1 'data.urls=/data/shards/mix665k/shard-{000000..000066}.tar'
# connector.path: stage 1's run dir (it holds mm_projector.bin and connector.safetensors, rewritten at
# every checkpoint), either file, LLaVA's published mm_projector.bin, or a `vlm-convert consolidate` folder.
# Every argument is a Hydra override (experiment= defaults to llava15-7b-stage2). sbatch flags on
# the command line win over the headers below; a CPU-only node: --gres=none --cpus-per-task=<n>.
# Logs: <run.dir>/logs/slurm-<jobid>.log. Environment knobs: see slurm/common.sh.
#SBATCH --job-name=vlm-finetune
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=08:00:00
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
vlm_launch llava15-7b-stage2 "$@"
