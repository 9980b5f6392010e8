# shellcheck shell=bash
# Running the training steps in a container under pyxis/enroot (sourced by slurm/common.sh, not run).
#
# How common.sh calls it, in vlm_launch, after PYTHON is set and `overrides` are composed, in this
# order (each function logs one line and returns non-zero with one `vlm-train: error: ...` line):
#
#   source "$(dirname "${BASH_SOURCE[0]}")/container.sh"        # once, at the top of common.sh
#   vlm_container_setup "${overrides[@]}" || exit 2              # instead of vlm_container_args
#   ... vlm_resolve_run_dir, mkdir, exec >>"$log" as today (they use VLM_CONTAINER_ARGS) ...
#   vlm_container_import_all_nodes || exit 2                     # before the training srun
#   vlm_container_verify "${overrides[@]}" || exit 2             # idem, after import_all_nodes
#   "${step[@]}" "${VLM_CONTAINER_ARGS[@]}" "$PYTHON" -m torch.distributed.run ...   # unchanged
#
# With CONTAINER_IMAGE unset every function returns 0 at once and VLM_CONTAINER_ARGS is empty.
#
# What they do:
#   vlm_container_setup     the run's paths (run.dir, shards, model folders: `needs` of
#                           vlm_train/parallel/container_paths.py) are listed by the IMAGE's vlm_train
#                           in a one-node step with nothing mounted -- its configs are the ones that
#                           will train, and the host need not have vlm_train's dependencies. The host
#                           then creates the writable ones, refuses missing ones, and derives the
#                           mounts (every path at its own path, nested ones collapsed) -- or checks
#                           that CONTAINER_MOUNTS, if you set it, covers them. The working directory
#                           inside is the submit directory, so relative paths mean the same there;
#                           PYTHONSAFEPATH=1 keeps it off sys.path, so the image's vlm_train runs,
#                           not a checkout in it (VLM_TRAIN_HOST_CODE=1 runs this checkout instead,
#                           through PYTHONPATH). No home mount, no user site-packages, and Triton,
#                           torch-extension and Hugging Face caches under the node's /tmp unless
#                           you exported them. A PYTHON that is a host path is refused.
#   vlm_container_import_all_nodes
#                           one `srun --ntasks-per-node=1 <container> true` over every node, so each
#                           has the image (one named container per job and node) before torchrun's
#                           rendezvous starts waiting; skipped when CONTAINER_IMAGE is a .sqsh file
#                           (import once with `enroot import -o /shared/vlm.sqsh docker://...`).
#   vlm_container_verify    writes a random token into run.dir on the host; a step on every node
#                           runs `container_paths verify` inside the container: every path is there,
#                           the written ones take a file, the token reads back, vlm_train is the
#                           image's.
# Environment: CONTAINER_IMAGE, CONTAINER_MOUNTS (checked, not replaced), VLM_TRAIN_HOST_CODE=1,
# VLM_HOST_PYTHON (a Python >= 3.10 on the batch node for the stdlib-only mount derivation;
# default python3). The named container stays on each node after the job when pyxis'
# container_scope is global (its default): ask your admins for container_scope=job, or use a .sqsh.

VLM_CONTAINER_ARGS=()
VLM_CONTAINER_MOUNTS=""
_VLM_CONTAINER_RUN_DIR=""
_VLM_CONTAINER_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_VLM_CONTAINER_PATHS=(-m vlm_train.parallel.container_paths)

_vlm_container_error() { echo "vlm-train: error: $*" >&2; return 2; }

# The flags every step shares: image, per-job container, no home, the environment for Python.
_vlm_container_base_args() {
  local cache="/tmp/vlm-train-${SLURM_JOB_ID:-0}" env="ALL,PYTHONSAFEPATH=1,PYTHONNOUSERSITE=1"
  [[ -n "${TRITON_CACHE_DIR:-}" ]] || env+=",TRITON_CACHE_DIR=$cache/triton"
  [[ -n "${TORCH_EXTENSIONS_DIR:-}" ]] || env+=",TORCH_EXTENSIONS_DIR=$cache/torch_extensions"
  [[ -n "${HF_HOME:-}" ]] || env+=",HF_HOME=$cache/huggingface"
  [[ "${VLM_TRAIN_HOST_CODE:-}" != 1 ]] || env+=",PYTHONPATH=$_VLM_CONTAINER_REPO"
  printf '%s\n' "--container-image=$CONTAINER_IMAGE" "--container-name=vlm-train-${SLURM_JOB_ID:-0}" \
    --no-container-mount-home "--export=$env"
}

# A PYTHON given as a path must be the image's: one under $HOME or a mounted host directory is the
# host's (a venv with CPU torch, say), which would bypass the image.
_vlm_container_check_python() {
  local src
  [[ "${PYTHON:-}" == */* && "${VLM_TRAIN_HOST_CODE:-}" != 1 ]] || return 0
  for src in "$@"; do
    if [[ -n "$src" && "$PYTHON/" == "${src%/}/"* ]]; then
      _vlm_container_error "PYTHON=$PYTHON is a host interpreter (under $src); in CONTAINER_IMAGE the image's python runs: unset PYTHON, or set VLM_TRAIN_HOST_CODE=1 to run the host's code on purpose"
      return 2
    fi
  done
}

vlm_container_setup() {
  VLM_CONTAINER_ARGS=()
  VLM_CONTAINER_MOUNTS=""
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  local base=() entries=() needs mounts
  mapfile -t base < <(_vlm_container_base_args)
  IFS=, read -ra entries <<<"${CONTAINER_MOUNTS:-}"
  _vlm_container_check_python "$HOME" "$PWD" "${entries[@]%%:*}" || return 2
  needs="$(srun --nodes=1 --ntasks=1 "${base[@]}" --container-workdir=/ \
    "${PYTHON:-python3}" "${_VLM_CONTAINER_PATHS[@]}" needs --cwd "$PWD" "$@")" || {
    _vlm_container_error "the image could not list the run's paths (above): is $CONTAINER_IMAGE built from this repository's docker/Dockerfile?"
    return 2
  }
  # The submit directory is the working directory inside; with VLM_TRAIN_HOST_CODE=1 the checkout runs.
  needs+=$'\n'"ro $PWD workdir"
  [[ "${VLM_TRAIN_HOST_CODE:-}" != 1 ]] || needs+=$'\n'"ro $_VLM_CONTAINER_REPO VLM_TRAIN_HOST_CODE"
  mounts="$(PYTHONPATH="$_VLM_CONTAINER_REPO" "${VLM_HOST_PYTHON:-python3}" -s "${_VLM_CONTAINER_PATHS[@]}" \
    mounts --needs /dev/stdin --given "${CONTAINER_MOUNTS:-}" <<<"$needs")" || return 2
  IFS=, read -ra entries <<<"$mounts"
  _vlm_container_check_python "${entries[@]%%:*}" || return 2
  VLM_CONTAINER_MOUNTS="$mounts"
  _VLM_CONTAINER_RUN_DIR="$(awk '$3 == "run.dir" { print $2 }' <<<"$needs")"
  VLM_CONTAINER_ARGS=("${base[@]}" "--container-mounts=$mounts" "--container-workdir=$PWD")
  echo "[vlm-container] $CONTAINER_IMAGE, mounts $mounts"
}

vlm_container_import_all_nodes() {
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  if [[ -f "$CONTAINER_IMAGE" ]]; then
    echo "[vlm-container] $CONTAINER_IMAGE is a squashfs file: each node reads it directly, nothing to import"
    return 0
  fi
  local nodes="${SLURM_JOB_NUM_NODES:-1}"
  echo "[vlm-container] importing $CONTAINER_IMAGE on $nodes node(s) before the rendezvous"
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${VLM_CONTAINER_ARGS[@]}" true || {
    _vlm_container_error "importing $CONTAINER_IMAGE failed on some node (above)"
    return 2
  }
}

vlm_container_verify() {
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  local nodes="${SLURM_JOB_NUM_NODES:-1}" token run_dir="$_VLM_CONTAINER_RUN_DIR"
  token="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  printf '%s\n' "$token" >"$run_dir/.vlm-container-token"
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${VLM_CONTAINER_ARGS[@]}" \
    "${PYTHON:-python3}" "${_VLM_CONTAINER_PATHS[@]}" verify --token "$token" --mounts "$VLM_CONTAINER_MOUNTS" "$@" \
    || { _vlm_container_error "the container check failed on some node (above); nothing started"; return 2; }
}
