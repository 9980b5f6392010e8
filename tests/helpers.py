"""Plain helpers the tests share (no fixtures: those live in conftest.py). Import them as
`from tests.helpers import ...`; test modules never import each other."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def toy_overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A fast toy run: small batches, one loader worker, no end-of-run evaluation."""
    return [
        "experiment=toy",
        f"data.synthetic_dir={data_dir}",
        f"run.dir={run_dir}",
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *target: str, max_restarts: int = 0) -> list[str]:
    """The torchrun command line for `target` (e.g. "-m", "vlm_train.train", overrides...) on a free port."""
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    port = f"--master_port={free_port()}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", port, *restarts, *target]


def run_cli(overrides: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`vlm-train` in a fresh process (torchrun for nproc > 1), as a user would start it."""
    if nproc == 1:
        command = [sys.executable, "-m", "vlm_train.train", *overrides]
    else:
        command = torchrun(nproc, "-m", "vlm_train.train", *overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def run_worker(worker) -> None:
    """The `__main__` of a launched test worker: `worker(plan)` with the JSON plan named by argv[1].
    A failure exits at once: loader workers and process groups left behind would keep a failed
    rank alive until the launch times out, instead of failing the test in seconds."""
    try:
        worker(json.loads(Path(sys.argv[1]).read_text()))
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def keep_only_checkpoint(whole: Path, resumed: Path, step: int) -> None:
    """`resumed` as `whole`'s run dir would be had the run stopped right after its step-`step` checkpoint."""
    resumed.mkdir(exist_ok=True)
    shutil.copytree(whole / "checkpoints" / f"step_{step}", resumed / "checkpoints" / f"step_{step}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{step}")
    shutil.copy(whole / "config.yaml", resumed / "config.yaml")
