"""The Docker image definition and its entrypoint (no Docker engine here: the Dockerfile is read,
the entrypoint script runs on the host as the image would run it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.k8s import JobSpec, render_indexed_job
from tests.helpers import REPO, free_port, read_metrics, toy_overrides

# --- Docker -------------------------------------------------------------------------------------

DOCKERFILE = REPO / "docker" / "Dockerfile"
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET", "CREDENTIAL")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical, parts = [], []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        parts.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            logical.append(" ".join(parts))
            parts = []
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_dockerfile_base_image_pinned_by_tag():
    froms = [args for op, args in _instructions(DOCKERFILE) if op == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        ref = image.split()[0]
        assert ref.startswith("nvcr.io/nvidia/pytorch:"), ref
        tag = ref.rsplit(":", 1)[1]
        assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"base image not pinned to a release tag: {ref}"


def test_dockerfile_runs_as_non_root_user():
    users = [args.split()[0] for op, args in _instructions(DOCKERFILE) if op == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))


def test_dockerfile_has_no_secrets():
    for op, args in _instructions(DOCKERFILE):
        if op in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", args) or [args.split()[0]]:
                assert not any(word in name.upper() for word in SECRET_WORDS), (
                    f"{op} {name}: secrets do not belong in images"
                )


def test_dockerfile_installs_the_project_and_entrypoint():
    instructions = _instructions(DOCKERFILE)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"pip install [^&]*-e \.", runs), "the project is not pip-installed"
    assert "-c /tmp/pins.txt" in runs  # the container's torch stays
    copied = " ".join(args for op, args in instructions if op == "COPY")
    for path in ("vlm_train", "configs", "pyproject.toml", "docker/entrypoint.sh"):
        assert path in copied
    entrypoint = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ['["vlm-train-entrypoint"]']
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs/", "data/"} <= set(ignored)


def _entrypoint(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.Popen:
    launcher_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE"}
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in launcher_vars and not k.startswith(("SLURM_", "PET_", "JOB_COMPLETION_INDEX"))
    }
    venv_bin = str(Path(sys.executable).parent)
    full_env = {
        **clean,
        "PATH": f"{venv_bin}:{clean['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    return subprocess.Popen(
        [str(REPO / "docker" / "entrypoint.sh"), *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_entrypoint_runs_commands_and_help():
    proc = _entrypoint(["echo", "hello"], {})
    assert proc.communicate(timeout=60)[0].strip() == "hello"
    proc = _entrypoint(["--help"], {"NPROC_PER_NODE": "1"})
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "usage: vlm-train" in out


@pytest.mark.slow
def test_entrypoint_as_two_indexed_job_pods(toy_data, tmp_path):
    """Two one-worker "pods" of an Indexed Job: the env launch/k8s.py renders, the entrypoint the
    image runs, and launch_env's Kubernetes branch joining them into one gloo world."""
    run_dir = tmp_path / "run"
    (job,) = [d for d in render_indexed_job(JobSpec("vlm", "img:1", 2, 0)) if d["kind"] == "Job"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # no cluster DNS here
    overrides = toy_overrides(toy_data, run_dir, "train.max_steps=3")
    pods = [_entrypoint(overrides, {**env, "JOB_COMPLETION_INDEX": str(i)}) for i in range(2)]
    outputs = [pod.communicate(timeout=300)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").is_file()
