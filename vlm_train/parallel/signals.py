"""Preemption: SIGTERM or SIGUSR1 (Slurm's `--signal=USR1@<secs>`) asks the run to stop.

The handler only raises a flag; the loop sees it on every rank at the next step's collective,
finishes that step, saves a checkpoint and exits with EXIT_PREEMPTED. Under Slurm, with
`train.requeue=true`, rank 0 first requeues the job, which then resumes from that checkpoint.

A rank that cannot honour the request within the collective timeout (`parallel.timeout_s`) is
stuck, or its peers are gone (torchrun sends SIGTERM to the survivors when a rank fails): it
exits with EXIT_STOP_TIMEOUT instead of waiting for a SIGKILL that may never come.

A worker started by a launcher (torchrun, or an srun task) also ends with it: it asks the kernel
for SIGTERM when its parent dies (`end_with_launcher`), so a launcher killed by SIGKILL (the OOM
killer, a careless `kill -9`) stops its workers the same graceful way instead of leaving orphans
that keep training and writing into run.dir.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from vlm_train.errors import UserError

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, checkpoint saved, start again to resume
EXIT_STOP_TIMEOUT = 1  # a stop request not honoured within parallel.timeout_s: the job failed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FAULT_ENV = "VLM_TRAIN_FAULT_HANG"  # "<point>:<step>:<rank>[,...]", e.g. "save:6:0" (fault-tolerance tests)
# Points: save (main thread, the rank's part of a save done), publish (rank 0 renamed step_<N>, `latest`
# not moved); in the checkpoint writer (the background thread of an async save): snapshot (nothing
# written yet), write (the first file half written), durable (all written, not yet reported).
default_deadline_s: float | None = None  # set from parallel.timeout_s when the process group starts
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_AT_START = os.getppid()  # read at import, as early as the entry point can: see end_with_launcher


def started_by_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """A torchrun worker or an srun task (not the sbatch shell, not a process started by hand)."""
    return "TORCHELASTIC_RUN_ID" in environ or "SLURM_STEP_ID" in environ


def end_with_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """Ask for SIGTERM when the launcher that started this process dies; True when armed.

    Only for launched workers: a run started by hand (`nohup vlm-train ... &`) keeps running
    when its shell goes, as Unix programs do. The kernel sends the signal when the thread that
    forked us exits (torchrun and slurmstepd fork from their main thread). A parent that died
    before the request was made is caught by comparing with the parent seen at import.
    """
    if not sys.platform.startswith("linux") or not started_by_launcher(environ):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        print(f"vlm-train: warning: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return False
    if launcher_gone():
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def launcher_gone() -> bool:
    """The process that started this one has died (we were re-parented to a reaper)."""
    return os.getppid() != PARENT_AT_START


class StopFlag:
    """Set by SIGTERM/SIGUSR1 in this process; after `deadline_s` more seconds the process exits."""

    def __init__(self, deadline_s: float | None = None) -> None:
        self.signal_name: str | None = None
        self.deadline_s = deadline_s if deadline_s is not None else default_deadline_s
        self.owner_pid = os.getpid()

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.owner_pid:
            # A forked child (a DataLoader worker) inherits this handler: it must still die on
            # SIGTERM, or the parent's exit waits on it forever.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGTERM and launcher_gone():
            self.signal_name += f" (its launcher, pid {PARENT_AT_START}, ended)"
        if first and self.deadline_s:
            watchdog = threading.Timer(self.deadline_s, self._give_up)
            watchdog.daemon = True
            watchdog.start()

    def _give_up(self) -> None:
        print(
            f"vlm-train: error: stopped by {self.signal_name} but the step did not finish within "
            f"parallel.timeout_s={self.deadline_s:g} s (a peer is dead or stuck); exiting without a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_STOP_TIMEOUT)


class Preempted(UserError):
    """Not a mistake, but it ends the run the same way: one line and a documented exit code."""

    exit_code = EXIT_PREEMPTED


def requeue_slurm_job() -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0


def fault_point(point: str, step: int, rank: int, run_dir: Path) -> None:
    """Fault injection for tests: the rank named by $VLM_TRAIN_FAULT_HANG stops responding here.

    It writes `<run_dir>/fault_<point>_<step>_rank<R>` (holding its pid) and sleeps forever, like a
    rank stuck in a driver call: its peers block in their next collective. Called from the
    checkpoint writer thread, it stops that thread only: training goes on, the save never becomes
    durable. It fires once per run dir, so a restarted (or torchrun-restarted) job with the same
    environment carries on.
    """
    if f"{point}:{step}:{rank}" not in os.environ.get(FAULT_ENV, "").split(","):
        return
    marker = run_dir / f"fault_{point}_{step}_rank{rank}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)
