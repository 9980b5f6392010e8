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
    installs = [
        re.search(r"pip install [^&]*", args)[0] for op, args in instructions if op == "RUN" and "pip install" in args
    ]
    assert len(installs) == 2
    for install in installs:  # the lock, resolved within the image's own pins: its torch stays
        assert "-c /etc/pip/constraint.txt -c /tmp/pins.txt" in install
    assert "python docker/pins.py /tmp" in runs and "test -f /etc/pip/constraint.txt" in runs
    copied = " ".join(args for op, args in instructions if op == "COPY")
    for path in ("vlm_train", "configs", "pyproject.toml", "constraints.txt", "docker/pins.py", "docker/entrypoint.sh"):
        assert path in copied
    entrypoint = [args for op, args in instructions if op == "ENTRYPOINT"]
    # NGC's entrypoint (CUDA forward compatibility) runs first and hands over to ours.
    assert entrypoint == ['["/opt/nvidia/nvidia_entrypoint.sh", "vlm-train-entrypoint"]']
    envs = " ".join(args for op, args in instructions if op == "ENV")
    assert "VLM_TRAIN_IMAGE_HOME=/opt/vlm_train" in envs and "WORKDIR /opt/vlm_train" in "\n".join(
        f"{op} {args}" for op, args in instructions
    )
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs/", "data/"} <= set(ignored)


def _base_tag() -> str:
    (image,) = [args.split()[0] for op, args in _instructions(DOCKERFILE) if op == "FROM"]
    return image.rsplit(":", 1)[1].removesuffix("-py3")


def test_base_image_torch_handles_usr1_and_its_pins_are_written_down():
    """The tag's NGC pins are in docker/ngc-<tag>-constraints.txt (what the dry run resolves
    against), and its torch is >= 2.9, whose torchrun passes Slurm's USR1 on instead of dying."""
    pins = (REPO / "docker" / f"ngc-{_base_tag()}-constraints.txt").read_text()
    (torch,) = re.findall(r"^torch==(\d+)\.(\d+)\.\d+\S*", pins, re.M)
    assert tuple(map(int, torch)) >= (2, 9)


@pytest.mark.slow
def test_dockerfile_install_resolves_against_the_ngc_constraints(tmp_path):
    """docker/dry_run.py: pip resolves our pins and requirements with the NGC image's pins
    (torch as NVIDIA's build), with the package index; a pin the image cannot meet fails."""
    result = subprocess.run(
        [sys.executable, "docker/dry_run.py"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = dict(line.split("==") for line in result.stdout.split())
    pins = (REPO / "docker" / f"ngc-{_base_tag()}-constraints.txt").read_text()
    assert f"torch=={resolved['torch']}" in pins and f"numpy=={resolved['numpy']}" in pins  # the image's stay
    lock = (REPO / "constraints.txt").read_text()
    for name in ("deepspeed", "megatron-core", "transformers", "hydra-core"):
        assert f"{name}=={resolved[name]}" in lock
    conflicting = tmp_path / "ngc.txt"
    conflicting.write_text(pins + "transformers==4.40.0\n")  # an image pin our lock cannot meet
    result = subprocess.run(
        [sys.executable, "docker/dry_run.py", "--ngc", str(conflicting)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "does not resolve against ngc.txt" in result.stderr


def _entrypoint(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.Popen:
    launcher_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE"}
    launcher_vars |= {"NODE_RANK", "NVIDIA_VISIBLE_DEVICES", "VLM_REQUIRE_CUDA", "RDZV_TIMEOUT"}
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


def test_entrypoint_multi_node_needs_every_nodes_rank():
    proc = _entrypoint(["experiment=toy"], {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "10.0.0.1"})
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2
    assert out.strip().splitlines() == [
        "vlm-train-entrypoint: error: NNODES=2 but this node's rank is not set: give each node NODE_RANK=0..1 "
        "(docker run -e NODE_RANK=...)"
    ]


def test_entrypoint_multi_node_torchrun_line(tmp_path):
    """NODE_RANK and a long static-rendezvous timeout reach torchrun (a stand-in python prints
    the command it was given)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PYTHON": str(fake), "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "1", "MASTER_ADDR": "10.0.0.1"}
    proc = _entrypoint(["experiment=toy"], env)
    out = proc.communicate(timeout=60)[0].split()
    assert proc.returncode == 0
    assert out[:2] == ["-m", "torch.distributed.run"] and out[-3:] == ["-m", "vlm_train.train", "experiment=toy"]
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--rdzv_conf=timeout=3600"} <= set(out)


def test_entrypoint_refuses_allocated_gpus_torch_cannot_see():
    """GPUs given to the container (here a device list) but a CPU-only torch: one line, not gloo."""
    proc = _entrypoint(["experiment=toy"], {"NVIDIA_VISIBLE_DEVICES": "0,1"})
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(
            "vlm-train-entrypoint: error: this container was given GPUs (NVIDIA_VISIBLE_DEVICES=0,1, VLM_REQUIRE_CUDA=) "
            "but torch sees none"
        )
    )
    proc = _entrypoint(["--help"], {"NVIDIA_VISIBLE_DEVICES": "all", "NPROC_PER_NODE": "1"})  # NGC's image default
    assert proc.communicate(timeout=120)[0] and proc.returncode == 0


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
