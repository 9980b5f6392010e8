"""Preemption: SIGTERM or SIGUSR1 (Slurm's `--signal=USR1@<secs>`) asks the run to stop.

The handler only raises a flag; the loop sees it on every rank at the next step's collective,
finishes that step, saves a checkpoint and exits with EXIT_PREEMPTED. Under Slurm, with
`train.requeue=true`, rank 0 first requeues the job, which then resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess

from vlm_train.errors import UserError

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, checkpoint saved, start again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 in this process."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name


class Preempted(UserError):
    """Not a mistake, but it ends the run the same way: one line and a documented exit code."""

    exit_code = EXIT_PREEMPTED


def requeue_slurm_job() -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
