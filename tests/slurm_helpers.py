"""Shared by the tests that drive the local Slurm cluster (slurm/local-cluster.sh): running commands in
the repo, the environment a submitting shell exports, toy-run overrides, job state and reports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO


def run_command(
    command: list[str], timeout: int = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def job_env() -> dict[str, str]:
    """What the submitting shell exports to the job: this venv first on PATH, no stray launcher vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHON"] = sys.executable
    return env


def cpu_overrides(toy_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=toy",
        f"run.dir={run_dir}",
        f"data.synthetic_dir={toy_data}",
        "train.micro_batch_size=4",
        "train.eval=false",
        "data.num_workers=1",
        *extra,
    ]


def job_report(run_dir: Path, out_dir: Path) -> str:
    logs = [*sorted((run_dir / "logs").glob("*.log")), *sorted(out_dir.glob("*.out"))]
    return "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in logs if p.is_file())


def cancel_submitted(sbatch_stdout: bytes | str | None) -> None:
    """Cancel the job `sbatch --wait` submitted, so it cannot outlive a failed test."""
    text = sbatch_stdout.decode() if isinstance(sbatch_stdout, bytes) else sbatch_stdout or ""
    match = re.search(r"Submitted batch job (\d+)", text)
    if match:
        run_command(["scancel", match.group(1)])


def job_field(job_id: str, field: str) -> str:
    shown = run_command(["scontrol", "show", "job", job_id]).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


def batch_step_running(job_id: str) -> bool:
    # slurmd runs each job's batch script under a slurmstepd titled "slurmstepd: [<job>.batch]".
    return run_command(["pgrep", "-f", rf"slurmstepd: \[{job_id}\.batch\]"]).returncode == 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
