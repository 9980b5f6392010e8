"""Containers under pyxis/enroot: the paths a run needs, the mounts derived from them, and the check
run inside the container (vlm_train/parallel/container_paths.py, slurm/container.sh).

There is no container engine here. The in-container tests run under a stand-in for pyxis' srun
(FAKE_SRUN below): a private mount namespace (`unshare --mount`) whose root is an empty directory
that sees only what an enroot container sees -- the "image" (this machine's /usr, /etc and the
checkout with its venv and interpreter, read-only, standing for /opt/vlm_train in the real image), /dev and /proc,
and each `--container-mounts` entry bind-mounted at its destination -- then `chroot`s into it, goes
to `--container-workdir` and runs the command with the job's environment plus `--export`. A host path
that is not mounted is simply absent inside, as under pyxis; the root directory itself is writable,
as with enroot's `ENROOT_ROOTFS_WRITABLE yes`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vlm_train
from tests.helpers import REPO
from vlm_train.parallel.container_paths import (
    TOKEN_FILE,
    ContainerError,
    Mount,
    Need,
    check_given,
    derive_mounts,
    needs_from_overrides,
    parse_spec,
    prepare_host,
    shard_dir,
)

PATHS = [sys.executable, "-m", "vlm_train.parallel.container_paths"]

# --- the path derivation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/data/x/{000..009}.tar", "/data/x"),
        ("/data/x/train-{000000..000557}.tar", "/data/x"),
        ("/data/x-{0..9}/a.tar", "/data"),
        ("/data/x/*.tar", "/data/x"),
        ("/data/x/shard.tar", "/data/x"),
        ("file:/data/x/{0..1}.tar", "/data/x"),
        ("data/x/{0..1}.tar", "data/x"),
        ("pipe:aws s3 cp s3://b/{0..9}.tar -", None),
        ("s3://bucket/{0..9}.tar", None),
        ("https://host/{0..9}.tar", None),
    ],
)
def test_shard_dir(url, expected):
    assert shard_dir(url) == expected


def test_needs_from_overrides_every_local_path(tmp_path):
    needs = needs_from_overrides(
        [
            "experiment=llava15-7b-stage2",
            "vision.path=/models/clip",
            "llm.path=/models/vicuna",
            "connector.path=/runs/stage1/mm_projector.bin",
            "data.urls=/data/mix665k/{000000..000099}.tar",
            "data.eval_urls=/data/eval/000000.tar",
            "run.dir=runs/stage2",  # relative: the submit directory's
        ],
        str(tmp_path),
    )
    assert {(n.key, n.path, n.writable) for n in needs} == {
        ("run.dir", str(tmp_path / "runs" / "stage2"), True),
        ("data.urls", "/data/mix665k", False),
        ("data.eval_urls", "/data/eval", False),
        ("vision.path", "/models/clip", False),
        ("llm.path", "/models/vicuna", False),
        ("connector.path", "/runs/stage1/mm_projector.bin", False),
    }


def test_needs_toy_tokenizer_and_mixture(tmp_path):
    needs = needs_from_overrides(
        ["experiment=toy", "data.synthetic_dir=/d/toy", "data.mixture=[{urls: '/d/b/{0..9}.tar', weight: 0.5}]"],
        str(tmp_path),
    )
    keys = {n.key: n.path for n in needs}
    assert keys["data.mixture[0].urls"] == "/d/b"
    assert keys["data.synthetic_dir"] == "/d/toy" and "llm.tokenizer" not in keys  # "toy" is built in


def test_derive_mounts_collapses_nested_paths():
    needs = [
        Need("run.dir", "/lustre/runs/a", True),
        Need("data.urls", "/lustre/data/x", False),
        Need("data.eval_urls", "/lustre/data/x/eval", False),
        Need("llm.path", "/models/llm", False),
        Need("workdir", "/lustre", False),
        Need("vision.path", "/models/llm-tower", False),  # a sibling by prefix, not nested
    ]
    mounts = derive_mounts(needs)
    assert [m.spec() for m in mounts] == [
        "/lustre:/lustre",
        "/models/llm:/models/llm:ro",
        "/models/llm-tower:/models/llm-tower:ro",
    ]


def test_prepare_host_creates_written_and_refuses_missing(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    prepare_host([Need("run.dir", str(run_dir), True)])
    assert run_dir.is_dir()
    with pytest.raises(ContainerError, match=r"llm\.path: .*does not exist on this host"):
        prepare_host([Need("llm.path", str(tmp_path / "missing"), False)])
    with pytest.raises(ContainerError, match="cannot carry"):
        prepare_host([Need("run.dir", str(tmp_path / "a,b"), True)])


def test_given_mounts_are_checked_not_replaced():
    needs = [Need("run.dir", "/lustre/runs/a", True), Need("data.urls", "/data/x", False)]
    check_given(needs, parse_spec("/lustre:/lustre,/data:/data:ro"))
    with pytest.raises(ContainerError, match=r"does not mount data\.urls \(/data/x\)"):
        check_given(needs, parse_spec("/lustre:/lustre"))
    with pytest.raises(ContainerError, match="mounted from /scratch at /lustre"):
        check_given(needs, parse_spec("/scratch:/lustre,/data:/data"))
    with pytest.raises(ContainerError, match="mounted read-only"):
        check_given(needs, parse_spec("/lustre:/lustre:ro,/data"))
    assert Mount.parse("/data") == Mount("/data", "/data")


def test_mounts_cli_one_line_refusal(tmp_path):
    given = f"{tmp_path}:{tmp_path}"
    argv = [
        *PATHS,
        "mounts",
        "--given",
        given,
        "experiment=toy",
        "run.dir=/elsewhere/run",
        f"data.synthetic_dir={tmp_path}/d",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "vlm-train: error: CONTAINER_MOUNTS does not mount run.dir (/elsewhere/run): add /elsewhere/run:/elsewhere/run, "
        "or unset CONTAINER_MOUNTS to have the mounts derived from the config"
    ]


# --- in a mimic of a pyxis container ----------------------------------------------------------------

FAKE_SRUN = r'''#!{python}
"""srun with pyxis' --container-* options, mimicked with a private mount namespace and chroot."""
import json, os, shlex, subprocess, sys, tempfile
IMAGE = {image!r}
opts, args = {{}}, sys.argv[1:]
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value
with open({log!r}, "a") as log:
    log.write(json.dumps({{"opts": opts, "argv": args}}) + "\n")
if "--container-image" not in opts:
    os.execvp(args[0], args)
env = dict(os.environ)
for item in opts.get("--export", "ALL").split(",")[1:]:
    key, _, value = item.partition("=")
    env[key] = value
root = tempfile.mkdtemp(prefix="rootfs-", dir={scratch!r})
lines = ["set -e", "R=" + shlex.quote(root)]
for top in ("usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
    if os.path.islink("/" + top):
        lines.append(f"ln -s {{shlex.quote(os.readlink('/' + top))}} $R/{{top}}")
    elif os.path.isdir("/" + top):
        lines.append(f"mkdir -p $R/{{top}} && mount --rbind -o ro /{{top}} $R/{{top}}")
for path in IMAGE:
    lines.append(f"mkdir -p $R{{shlex.quote(path)}} && mount --bind {{shlex.quote(path)}} $R{{shlex.quote(path)}}")
    lines.append(f"mount -o remount,bind,ro $R{{shlex.quote(path)}}")
lines += ["mkdir -p $R/dev $R/proc $R/tmp", "mount --rbind /dev $R/dev", "mount --rbind /proc $R/proc"]
for entry in filter(None, opts.get("--container-mounts", "").split(",")):
    src, _, rest = entry.partition(":")
    dst, _, flags = rest.partition(":")
    dst = dst or src
    lines.append(f"mkdir -p $R{{shlex.quote(dst)}} && mount --bind {{shlex.quote(src)}} $R{{shlex.quote(dst)}}")
    if "ro" in flags.split("+"):
        lines.append(f"mount -o remount,bind,ro $R{{shlex.quote(dst)}}")
workdir = opts.get("--container-workdir", "/")
inner = f"cd {{shlex.quote(workdir)}} && exec {{shlex.join(args)}}"
lines.append(f"exec chroot $R /bin/sh -c {{shlex.quote(inner)}}")
sys.exit(subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(lines)], env=env).returncode)
'''


@pytest.fixture
def pyxis(tmp_path):
    """A directory with the fake pyxis `srun` first on PATH, and the log of its calls."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("chroot"):
        pytest.skip("the pyxis mimic needs root, unshare and chroot (util-linux, coreutils)")
    code = {str(REPO), str(Path(vlm_train.__file__).resolve().parents[1])}
    image = sorted(code | {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)})
    bin_dir, scratch = tmp_path / "bin", tmp_path / "rootfs"
    bin_dir.mkdir()
    scratch.mkdir()
    log = tmp_path / "srun.log"
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable, image=image, log=str(log), scratch=str(scratch)))
    srun.chmod(0o755)
    return {"bin": bin_dir, "log": log}


def _host_tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """A submit directory and the overrides of a toy run whose paths all lie outside it."""
    host = tmp_path / "host"
    submit = host / "submit"
    submit.mkdir(parents=True)
    overrides = ["experiment=toy", f"data.synthetic_dir={host}/data/toy", f"run.dir={host}/lustre/runs/a"]
    return submit, overrides


def _srun(pyxis, cwd: Path, mounts: str, command: list[str], **env: str) -> subprocess.CompletedProcess:
    argv = [
        str(pyxis["bin"] / "srun"),
        "--nodes=1",
        "--container-image=vlm-train:test",
        f"--container-mounts={mounts}",
        f"--container-workdir={cwd}",
        "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()),
        *command,
    ]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLM_TRAIN_HOST_CODE")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd, env=clean)


def _derive(submit: Path, overrides: list[str]) -> str:
    needs = subprocess.run(
        [*PATHS, "needs", *overrides], capture_output=True, text=True, timeout=60, cwd=submit, check=True
    )
    result = subprocess.run(
        [*PATHS, "mounts", "--needs", "/dev/stdin"],
        input=needs.stdout + f"ro {submit} workdir\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def _verify(pyxis, submit, mounts, overrides, token="t0k3n", **env):
    command = [
        sys.executable,
        "-m",
        "vlm_train.parallel.container_paths",
        "verify",
        "--token",
        token,
        "--mounts",
        mounts,
    ]
    return _srun(pyxis, submit, mounts, [*command, *overrides], **{"PYTHONSAFEPATH": "1", **env})


def test_token_reads_back_through_the_derived_mounts(pyxis, tmp_path):
    submit, overrides = _host_tree(tmp_path)
    mounts = _derive(submit, overrides)
    run_dir = tmp_path / "host" / "lustre" / "runs" / "a"
    assert f"{run_dir}:{run_dir}" in mounts.split(",")
    (run_dir / TOKEN_FILE).write_text("t0k3n\n")
    result = _verify(pyxis, submit, mounts, overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "token read back" in result.stdout and f"vlm_train from {REPO / 'vlm_train'}" in result.stdout
    assert not list(run_dir.glob(".vlm-write-probe-*"))  # the write probe cleans up


def test_run_dir_outside_the_mounts_is_refused_in_one_line(pyxis, tmp_path):
    submit, overrides = _host_tree(tmp_path)
    mounts = _derive(submit, overrides)
    run_dir = tmp_path / "host" / "lustre" / "runs" / "a"
    (run_dir / TOKEN_FILE).write_text("t0k3n\n")
    without = ",".join(m for m in mounts.split(",") if not m.startswith(str(run_dir)))
    result = _verify(pyxis, submit, without, overrides)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"vlm-train: error: run.dir: {run_dir} is not visible inside the container (mounts: {without})"
    ]


def test_another_directory_at_the_run_dirs_path_fails_the_token(pyxis, tmp_path):
    """The same path inside, but not the host's directory (what a host-side `mkdir` plus a writable
    container root look like): only the token tells them apart."""
    submit, overrides = _host_tree(tmp_path)
    mounts = _derive(submit, overrides)
    run_dir = tmp_path / "host" / "lustre" / "runs" / "a"
    (run_dir / TOKEN_FILE).write_text("t0k3n\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / TOKEN_FILE).write_text("stale\n")
    swapped = mounts.replace(f"{run_dir}:{run_dir}", f"{elsewhere}:{run_dir}")
    result = _verify(pyxis, submit, swapped, overrides)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"vlm-train: error: run.dir: the token the host wrote to {run_dir / TOKEN_FILE} holds another value inside "
        "the container: the run dir there is not the host's directory (mount it at the same path; see CONTAINER_MOUNTS)"
    ]


def test_a_host_checkout_shadowing_the_image_is_caught(pyxis, tmp_path):
    """A checkout in the submit directory (the working directory inside) is what `python -m` imports
    unless PYTHONSAFEPATH keeps the working directory off sys.path."""
    submit, overrides = _host_tree(tmp_path)
    for part in ("vlm_train", "configs"):
        shutil.copytree(REPO / part, submit / part, ignore=shutil.ignore_patterns("__pycache__"))
    mounts = _derive(submit, overrides)
    (tmp_path / "host" / "lustre" / "runs" / "a" / TOKEN_FILE).write_text("t0k3n\n")
    shadowed = _verify(pyxis, submit, mounts, overrides, PYTHONSAFEPATH="")
    assert shadowed.returncode == 2
    assert shadowed.stderr.splitlines() == [
        f"vlm-train: error: vlm_train is imported from {submit / 'vlm_train'}, under the host path "
        f"{submit} mounted into the container, not the image's: unset PYTHON/PYTHONPATH (set VLM_TRAIN_HOST_CODE=1 "
        "to run the host checkout on purpose)"
    ]
    assert _verify(pyxis, submit, mounts, overrides).returncode == 0  # PYTHONSAFEPATH=1: the image's code
    asked = _verify(pyxis, submit, mounts, overrides, PYTHONSAFEPATH="", VLM_TRAIN_HOST_CODE="1")
    assert asked.returncode == 0 and "from the host checkout" in asked.stdout


# --- slurm/container.sh, end to end under the mimic --------------------------------------------------


def _container_sh(pyxis, submit: Path, overrides: list[str], **env: str) -> subprocess.CompletedProcess:
    script = (
        f"set -euo pipefail; source {REPO / 'slurm' / 'container.sh'}\n"
        'vlm_container_setup "$@"\n'
        'printf "ARG %s\\n" "${VLM_CONTAINER_ARGS[@]}"\n'
        'vlm_container_import_all_nodes\nvlm_container_verify "$@"\n'
    )
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CONTAINER_", "VLM_TRAIN_HOST"))},
        "PATH": f"{pyxis['bin']}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "VLM_HOST_PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "CONTAINER_IMAGE": "registry#vlm-train:test",
        **env,
    }
    return subprocess.run(
        ["bash", "-c", script, "container.sh", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=submit,
        env=full_env,
    )


def test_container_sh_derives_imports_and_verifies(pyxis, tmp_path):
    submit, overrides = _host_tree(tmp_path)
    result = _container_sh(pyxis, submit, overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    args = [line.removeprefix("ARG ") for line in result.stdout.splitlines() if line.startswith("ARG ")]
    run_dir = tmp_path / "host" / "lustre" / "runs" / "a"
    assert f"--container-workdir={submit}" in args and "--no-container-mount-home" in args
    mounts = next(a for a in args if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert f"{run_dir}:{run_dir}" in mounts and f"{submit}:{submit}:ro" in mounts
    export = next(a for a in args if a.startswith("--export="))
    assert "PYTHONSAFEPATH=1" in export and "PYTHONNOUSERSITE=1" in export and "TRITON_CACHE_DIR=/tmp/" in export
    assert "vlm-train: container check ok" in result.stdout
    calls = [line for line in pyxis["log"].read_text().splitlines()]
    assert len(calls) == 3  # needs (one node, nothing mounted), import on every node, verify on every node
    assert '"--container-workdir": "/"' in calls[0] and "--container-mounts" not in calls[0]
    assert '"--ntasks-per-node": "1"' in calls[1] and calls[1].endswith('"argv": ["true"]}')


def test_container_sh_refuses_uncovered_container_mounts_and_host_python(pyxis, tmp_path):
    submit, overrides = _host_tree(tmp_path)
    result = _container_sh(pyxis, submit, overrides, CONTAINER_MOUNTS=f"{submit}:{submit}")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("vlm-train: error: CONTAINER_MOUNTS does not mount run.dir")
    )
    venv_python = submit / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    result = _container_sh(pyxis, submit, overrides, PYTHON=str(venv_python))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"vlm-train: error: PYTHON={venv_python} is a host interpreter")
    )


def test_container_sh_without_an_image_is_a_no_op(tmp_path):
    script = f'source {REPO / "slurm" / "container.sh"}; vlm_container_setup a=b && vlm_container_import_all_nodes && vlm_container_verify && echo "n=${{#VLM_CONTAINER_ARGS[@]}}"'
    env = {k: v for k, v in os.environ.items() if k != "CONTAINER_IMAGE"}
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, env={**env, "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0 and result.stdout.strip() == "n=0", result.stderr
