"""A two-node rehearsal: the sbatch scripts on a real Slurm cluster of two nodes on this machine.

`slurm/local-cluster.sh up --nodes 2` runs one slurmd per node in its own network namespace
(n1 at 10.77.0.2, n2 at 10.77.0.3, own hostname and /etc/hosts); the filesystem is shared, as
Lustre would be. So the script's own launch line runs as on a cluster: one srun task per node,
torchrun's c10d rendezvous hosted on the head node and reached over the network, Slurm's node
ranks, the job's time limit, `scontrol requeue`.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import REPO, read_metrics, step_losses, torchrun
from tests.slurm_helpers import (
    batch_step_running,
    cpu_overrides,
    job_env,
    job_field,
    job_report,
    run_command,
    wait_for,
)

pytestmark = pytest.mark.slow
CLUSTER = REPO / "slurm" / "local-cluster.sh"
STEPS = 60
TRAINING = (f"train.max_steps={STEPS}", "train.precision=fp32", "train.log_every=1", "parallel.zero_stage=2")


@pytest.fixture(scope="module")
def two_nodes():
    run_command(["bash", str(CLUSTER), "down"])  # a one-node cluster of another module, if any
    up = run_command(["bash", str(CLUSTER), "up", "--nodes", "2"], timeout=900)
    if up.returncode != 0:
        run_command(["bash", str(CLUSTER), "down"])
        pytest.fail(f"could not start the two-node Slurm cluster:\n{up.stdout}{up.stderr}", pytrace=False)
    yield
    down = run_command(["bash", str(CLUSTER), "down"])
    assert down.returncode == 0, down.stdout + down.stderr


def _overrides(toy_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return cpu_overrides(toy_data, run_dir, *TRAINING, *extra)


def _finished(job_id: str) -> bool:
    return job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def test_two_nodes_stop_at_the_time_limit_requeue_and_resume_bit_identical(two_nodes, toy_data, tmp_path):
    """sbatch --nodes=2 --time=2 slurm/pretrain.sh: the trainer learns the job's end (VLM_STOP_AT),
    stops itself well before it (no signal involved: USR1 could come at the earliest a minute
    before the end), saves, exits 75; the script requeues; the second start on both nodes resumes
    and trains on (to the end, or to its own deadline). Every step is logged once and its loss
    equals that of a run without a stop (2 ranks, fp32)."""
    reference_dir = tmp_path / "reference"
    reference = subprocess.run(
        torchrun(2, "-m", "vlm_train.train", *_overrides(toy_data, reference_dir)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    run_dir = tmp_path / "run"
    # Each start stops itself once a step, a save and 75 s no longer fit in its 120 s, about 45 s
    # after it began; a slow loader (1 s a step) makes sure that is mid-run.
    overrides = _overrides(toy_data, run_dir, "train.stop_margin_s=75")
    env = {**job_env(), "VLM_TRAIN_SLOW_DATA_S": "0.25"}
    submit = ["sbatch", "--parsable", "--nodes=2", "--gres=none", "--cpus-per-task=2", "--time=2"]
    submit += ["--signal=B:USR1@1", f"--output={tmp_path}/slurm-%j.out", "slurm/pretrain.sh", *overrides]
    result = run_command(submit, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: job_field(job_id, "Restarts") == "1" or _finished(job_id), 240, "the deadline stop")
        # A requeued job waits ~2 minutes (BeginTime): once the first batch step has ended, start it now.
        wait_for(lambda: job_field(job_id, "JobState") == "PENDING", 60, "the job to be pending")
        wait_for(lambda: not batch_step_running(job_id), 60, "the first batch step to end")
        time.sleep(1)
        run_command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        second_log = run_dir / "logs" / f"slurm-{job_id}-1.log"
        wait_for(lambda: _second_start_ended(second_log), 240, "the second start")
    finally:
        run_command(["scancel", job_id])
    report = job_report(run_dir, tmp_path)
    first = (run_dir / "logs" / f"slurm-{job_id}-0.log").read_text()
    second = second_log.read_text()
    assert f"job {job_id} start 1: 2 node(s) x 1 worker(s) (torchrun), rendezvous 10.77.0.2:" in first, report
    assert "stopped by the deadline (the job's time limit: " in first, report
    assert "USR1" not in first, report
    assert f"requeueing job {job_id} (requeue 1 of at most 20)" in first, report
    job_end = _logged_time(first, "time limit: the job ends ", "; the trainer")
    saved_and_ended = _logged_time(first, "[vlm-slurm ", "] training stopped before the end")
    assert saved_and_ended < job_end, (saved_and_ended, job_end)  # the stop's step, save and exit fit
    stopped_at = int(first.split("stopped by the deadline")[1].split("after step ")[1].split(",")[0])
    assert 1 <= stopped_at < STEPS, stopped_at
    assert f"job {job_id} start 2: 2 node(s)" in second, report
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at} at step {stopped_at}" in second, report

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > stopped_at, report  # each step once
    expected = step_losses(reference_dir)
    assert {r["step"]: r["loss"] for r in records} == {s: expected[s] for s in steps}


def _logged_time(log: str, before: str, after: str) -> datetime:
    """The time in the log line holding `before`<time>`after` (both in the batch node's local time)."""
    line = next(line for line in log.splitlines() if before in line and after in line)
    stamp = line.split(before, 1)[1].split(after, 1)[0].strip()
    return datetime.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")


def _second_start_ended(log: Path) -> bool:
    text = log.read_text() if log.is_file() else ""
    return "training finished" in text or "training stopped before the end" in text or "training failed" in text


def test_one_slurm_task_per_worker_across_two_nodes(two_nodes, toy_data, tmp_path):
    """LAUNCHER=srun: Slurm starts every rank itself (NVIDIA's references' layout); vlm_train reads
    the step's variables, and the ranks on n1 and n2 meet at the head node's address."""
    run_dir = tmp_path / "run"
    submit = ["sbatch", "--wait", "--nodes=2", "--gres=none", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%j.out"]
    submit += ["slurm/pretrain.sh", *_overrides(toy_data, run_dir, "train.max_steps=3")]
    result = run_command(submit, timeout=300, env={**job_env(), "LAUNCHER": "srun"})
    report = job_report(run_dir, tmp_path)
    assert result.returncode == 0, report
    (log,) = (run_dir / "logs").glob("slurm-*-0.log")
    assert "2 node(s) x 1 worker(s) (srun), rendezvous 10.77.0.2:" in log.read_text(), report
    assert "global batch 8 = micro-batch 4 x 2 data-parallel rank(s)" in log.read_text(), report
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3], report
