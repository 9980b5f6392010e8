"""Stopping in time by itself: the trainer knows when its job ends and saves before that.

A time-limited job (Slurm's `--time`, a reservation, `train.max_minutes` as Megatron's
`--exit-duration-in-mins`) must not depend on a launcher forwarding a signal to the workers in
time: torchrun before 2.9 dies of SIGUSR1, and before 2.12 kills its workers 30 s after any
stop signal. So every rank checks, before each step, whether one more step and a checkpoint still
fit before the deadline; when they do not on any rank, the step's all-reduce tells every rank,
which finish that step, save, and exit with EXIT_PREEMPTED (75) so that the job is started again.

The time a step and a save take is measured, not guessed: the longest of the recent steps, the
longest save of the run (carried in the checkpoint, so a requeued job knows it from its first
step), plus `train.stop_margin_s` for what is not measured (the exit, the first save of a run).

After the stop's checkpoint rank 0 writes `<run.dir>/STOPPED` (the message): torchrun exits 1 for
a worker's 75, so that file is how slurm/common.sh tells a stop from a failure.

A request file is the launcher-independent relay for a signal that reaches only the batch shell:
slurm/common.sh writes `<run.dir>/STOP` when Slurm's `--signal=B:USR1@<s>` arrives, rank 0 sees
it before the next step, and the run stops the same way.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from vlm_train.errors import ConfigError

STOP_FILE = "STOP"  # <run.dir>/STOP: stop after the current step (written by slurm/common.sh on USR1)
STOPPED_FILE = "STOPPED"  # <run.dir>/STOPPED: this start stopped early with a checkpoint (exit 75)
LAUNCHER_STOP_AT = "VLM_STOP_AT"  # epoch seconds, exported by slurm/common.sh (the job's end time)
SLURM_END = "SLURM_JOB_END_TIME"  # epoch seconds, set by newer Slurm releases in the job's environment
RECENT_STEPS = 20  # the step-time estimate is the longest of these
PROCESS_START = time.time()  # imported by the entry point first thing: train.max_minutes counts from here


@dataclass(frozen=True)
class StopAt:
    """An absolute deadline (epoch seconds) and where it came from, for the stop message."""

    epoch: float
    source: str

    def clock(self) -> str:
        return datetime.fromtimestamp(self.epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_time(text: str, setting: str) -> float:
    """Epoch seconds from `1767225600`, `@1767225600` or ISO 8601 (`2026-12-03T04:00:00`,
    local time unless it carries an offset); a one-line error otherwise."""
    value = text.strip().removeprefix("@")
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ConfigError(
            f"{setting}={text!r} is not a time: give epoch seconds or ISO 8601 such as 2026-12-03T04:00:00"
        ) from None


def stop_at(stop_at_setting: str, max_minutes: float | None, started: float, environ=os.environ) -> StopAt | None:
    """The earliest of `train.stop_at` (auto: the launcher's or Slurm's job end) and
    `train.max_minutes` after `started`; None when neither applies."""
    candidates: list[StopAt] = []
    setting = str(stop_at_setting).strip()
    if setting.lower() == "auto":
        for name in (LAUNCHER_STOP_AT, SLURM_END):
            if environ.get(name, "").strip():
                candidates.append(StopAt(parse_time(environ[name], name), "the job's time limit"))
                break
    elif setting.lower() not in ("none", "null", ""):
        at = parse_time(setting, "train.stop_at")
        if at <= started:
            raise ConfigError(f"train.stop_at={setting} has passed: give a later time, auto or none")
        candidates.append(StopAt(at, f"train.stop_at={setting}"))
    if max_minutes is not None:
        if max_minutes <= 0:
            raise ConfigError(f"train.max_minutes={max_minutes:g} must be positive (or null for no limit)")
        candidates.append(StopAt(started + 60 * max_minutes, f"train.max_minutes={max_minutes:g}"))
    return min(candidates, key=lambda c: c.epoch) if candidates else None


class Deadline:
    """Whether the next step and a checkpoint still fit before the deadline (per rank; the
    trainer's all-reduce makes one rank's answer everyone's)."""

    def __init__(self, at: StopAt | None, margin_s: float, clock=time.time):
        self.at, self.margin_s, self.clock = at, margin_s, clock
        self.recent_steps_s: deque[float] = deque(maxlen=RECENT_STEPS)
        self.save_s = 0.0  # the longest save measured in this run (or carried over from the checkpoint)

    def record_step(self, seconds: float) -> None:
        self.recent_steps_s.append(seconds)

    def record_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def needed_s(self) -> float:
        """What stopping takes from the start of a step: the step, a save, the margin."""
        step_s = max(self.recent_steps_s, default=0.0)
        return step_s + self.save_s + self.margin_s

    def due(self) -> bool:
        return self.at is not None and self.clock() + self.needed_s() >= self.at.epoch

    def left_s(self) -> float:
        return math.inf if self.at is None else self.at.epoch - self.clock()

    def reason(self) -> str:
        assert self.at is not None
        step_s = max(self.recent_steps_s, default=0.0)
        return (
            f"the deadline ({self.at.source}: {self.at.clock()}, {max(self.left_s(), 0):.0f} s left; "
            f"a step {step_s:.1f} s + a save {self.save_s:.1f} s + train.stop_margin_s={self.margin_s:g} would not fit)"
        )


def stop_file(run_dir: Path) -> Path:
    return run_dir / STOP_FILE


def stop_requested_by_file(run_dir: Path) -> str | None:
    """The request's text (or a default) when <run.dir>/STOP exists."""
    path = stop_file(run_dir)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        text = f"unreadable: {err.strerror}"
    return f"{path} ({text or 'no reason given'})"


def clear_stop_file(run_dir: Path) -> None:
    stop_file(run_dir).unlink(missing_ok=True)


def write_stopped(run_dir: Path, message: str) -> None:
    """Rank 0, after the stop's checkpoint is published: the launcher script's evidence that the
    run stopped early on purpose (torchrun turns a worker's exit 75 into its own exit 1)."""
    (run_dir / STOPPED_FILE).write_text(message + "\n")
