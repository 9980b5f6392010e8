"""Is training waiting on its data, and are the ranks' image loads even?

`data_stall`: the fraction of a logged step the slowest rank spent waiting for its next batch
(PhaseTimer's data_wait; synchronised on GPU). Every rank waits for the slowest in the step's
collectives, so the slowest rank's wait is the whole job's. `visual_tokens_imbalance`: the
largest rank's visual tokens over the mean over data-parallel ranks (1.0 = even).

Above `STALL_WARNING` (5%) over the logged steps after the first (whose wait includes the
loader's start-up), rank 0 warns once with the number of loader workers that would remove the wait:
while a stalled step waits, the workers are busy the whole step, so n workers make a step's
batches in n x step seconds of worker time; keeping up with the compute alone (step - wait)
takes ceil(n x step / (step - wait)) workers. With no workers (data.num_workers=0) the batches
are made during the wait itself, so ceil(wait / (step - wait)) workers overlap them.
"""

from __future__ import annotations

import math
import os

STALL_WARNING = 0.05  # the share of step time waiting on data above which rank 0 warns


def data_stall(slowest_wait_s: float, step_s: float) -> float:
    return min(slowest_wait_s / step_s, 1.0) if step_s > 0 else 0.0


def workers_to_remove_stall(workers: int, wait_s: float, step_s: float) -> int:
    """Loader workers per rank that would make the batches as fast as the step computes them."""
    compute_s = max(step_s - wait_s, 1e-6)
    worker_seconds = workers * step_s if workers > 0 else wait_s
    return max(math.ceil(worker_seconds / compute_s), workers + 1)


class StallWarning:
    """Rank 0's one warning per run when the data loader holds training back, judged on the logged
    steps after the first (whose wait includes the loader's start-up) once `JUDGED_STEPS` of them
    add up, so that one slow batch does not warn."""

    JUDGED_STEPS = 3

    def __init__(self, workers: int, ranks_per_node: int):
        self.workers = workers
        self.ranks_per_node = max(ranks_per_node, 1)
        self.warned = False
        self.steps, self.wait_s, self.step_s = 0, 0.0, 0.0

    def message(self, step: int, wait_s: float, step_s: float) -> str | None:
        if self.warned or step <= 1:
            return None
        self.steps, self.wait_s, self.step_s = self.steps + 1, self.wait_s + wait_s, self.step_s + step_s
        stall = data_stall(self.wait_s, self.step_s)
        if self.steps < self.JUDGED_STEPS or stall <= STALL_WARNING:
            return None
        self.warned = True
        needed = workers_to_remove_stall(self.workers, self.wait_s, self.step_s)
        cores = (os.cpu_count() or 1) // self.ranks_per_node
        fits = "" if needed <= cores else f" (more than the {cores} cores per rank here: decode cheaper or add nodes)"
        return (
            f"warning: logged steps up to {step} waited on data for {stall:.0%} of their time with "
            f"data.num_workers={self.workers}: about data.num_workers={needed} per rank would remove the wait{fits}"
        )
