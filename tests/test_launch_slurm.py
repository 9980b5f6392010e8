"""The Slurm scripts on a real one-node Slurm cluster (slurm/local-cluster.sh: Debian's slurm-wlm
and munge, installed with apt-get when missing). No mocks: real sbatch, srun, scontrol.

A machine where Slurm cannot be installed (no root, no network) fails these tests with the
helper's message rather than skipping them: CI relies on them.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, read_metrics
from tests.slurm_helpers import (
    batch_step_running,
    cancel_submitted,
    cpu_overrides,
    job_env,
    job_field,
    job_report,
    run_command,
    wait_for,
)
from vlm_train.parallel.launch_env import expand_nodelist

pytestmark = pytest.mark.slow
CLUSTER = REPO / "slurm" / "local-cluster.sh"


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running local cluster for this module; stopped afterwards even when a test fails."""
    up = run_command(["bash", str(CLUSTER), "up"], timeout=900)  # a first apt-get install takes a while
    if up.returncode != 0:
        run_command(["bash", str(CLUSTER), "down"])
        pytest.fail(f"could not start the local Slurm cluster:\n{up.stdout}{up.stderr}", pytrace=False)
    status = run_command(["bash", str(CLUSTER), "status"])
    assert status.returncode == 0, status.stdout + status.stderr
    yield
    down = run_command(["bash", str(CLUSTER), "down"])
    assert down.returncode == 0, down.stdout + down.stderr


def test_sbatch_pretrain_trains_the_toy_model(slurm_cluster, toy_data, tmp_path):
    """The acceptance run: slurm/pretrain.sh on a CPU-only node, overrides passed through."""
    run_dir = tmp_path / "run"
    command = [
        "sbatch",
        "--wait",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gres=none",
        "--cpus-per-task=2",
        f"--output={tmp_path}/slurm-%j.out",
        "slurm/pretrain.sh",
        *cpu_overrides(toy_data, run_dir, "train.max_steps=10", "train.global_batch_size=8"),
    ]
    try:
        result = run_command(command, timeout=300, env=job_env())
    except subprocess.TimeoutExpired as err:
        cancel_submitted(err.stdout)
        pytest.fail(f"the job did not finish in 300 s\n{job_report(run_dir, tmp_path)}")
    report = job_report(run_dir, tmp_path)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{report}"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1] == 10
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("step_10")
    job_id = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    log = (run_dir / "logs" / f"slurm-{job_id}-0.log").read_text()
    assert "1 node(s) x 1 worker(s)" in log  # no GPUs: one worker, gloo
    assert "global batch 8 = micro-batch 4 x 1 data-parallel rank(s) x 2 accumulation step(s)" in log
    assert "time limit: the job ends" in log  # the trainer was told (VLM_STOP_AT)
    assert "training finished" in log


def test_usr1_requeues_and_the_next_start_resumes(slurm_cluster, toy_data, tmp_path):
    """What Slurm does near the time limit (`--signal=B:USR1@<s>`): USR1 to the batch shell. The
    script writes <run.dir>/STOP (no signal through torchrun), the trainer saves and stops; then the
    script requeues the job, and its second start resumes from that checkpoint and finishes."""
    run_dir = tmp_path / "run"
    overrides = cpu_overrides(toy_data, run_dir, "train.max_steps=600", "train.save_every=50", "train.log_every=10")
    submit = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--gres=none",
        "--cpus-per-task=2",
        f"--output={tmp_path}/slurm-%j.out",
        "slurm/pretrain.sh",
        *overrides,
    ]
    result = run_command(submit, env=job_env())
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    try:
        latest = run_dir / "checkpoints" / "latest"
        wait_for(latest.is_file, 240, f"the first checkpoint of job {job_id}\n{job_report(run_dir, tmp_path)}")
        assert job_field(job_id, "JobState") == "RUNNING", job_report(run_dir, tmp_path)
        signal = run_command(["scancel", "--batch", "--signal=USR1", job_id])
        assert signal.returncode == 0, signal.stderr
        wait_for(lambda: job_field(job_id, "Restarts") == "1", 60, "the requeue")
        # A requeued job waits ~2 minutes (BeginTime) before it starts again, long enough for the
        # first start's batch step to report its end. We release it early, so wait for that report
        # first: the end of an old batch step arriving after the new start would end the new one.
        wait_for(lambda: job_field(job_id, "JobState") == "PENDING", 60, "the job to be pending")
        wait_for(lambda: not batch_step_running(job_id), 60, "the first batch step to end")
        time.sleep(1)
        run_command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        wait_for(lambda: job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the job")
    finally:
        run_command(["scancel", job_id])
    report = job_report(run_dir, tmp_path)
    assert job_field(job_id, "JobState") == "COMPLETED", report
    log = (run_dir / "logs" / f"slurm-{job_id}-0.log").read_text()
    assert "USR1 (time limit near): asking the trainer to save a checkpoint and stop" in log, report
    assert f"stopped by request {run_dir}/STOP (Slurm sent USR1 to job {job_id}: its time limit is near)" in log, report
    assert "requeueing job" in log, report
    assert f"job {job_id} start 2" in (run_dir / "logs" / f"slurm-{job_id}-1.log").read_text(), report
    assert not (run_dir / "STOP").exists()
    # Both starts log into the same metrics.jsonl; a second start from scratch would log step 1 again.
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps.count(1) == 1, f"the second start did not resume: {steps}"
    assert steps[-1] == 600
    assert latest.read_text().strip().endswith("step_600")


def test_the_same_job_submitted_twice_the_second_is_refused(slurm_cluster, toy_data, tmp_path):
    """The everyday mistake: one sbatch command run twice. The second job ends at once with one line
    naming the first (host, pid, Slurm job id, start time); the first runs on to its end, each step
    logged once. The first job's training step is paused (SIGSTOP through scancel) while the second
    starts, so that it is still mid-run however long the second takes to start; its loader sleeps 0.2 s
    a sample (VLM_TRAIN_SLOW_DATA_S), so its 20 steps take 16 s or more and the pause lands mid-run
    even when this test process gets little CPU (it once saw all 20 steps done before it could pause
    them). (`--exclusive=user` overrides the script's `--exclusive`, so that both jobs fit on the one
    node at once.)"""
    run_dir = tmp_path / "run"
    overrides = cpu_overrides(toy_data, run_dir, "train.max_steps=20", "train.log_every=1")
    submit = ["sbatch", "--parsable", "--nodes=1", "--gres=none", "--cpus-per-task=1", "--exclusive=user"]
    submit += [f"--output={tmp_path}/slurm-%j.out", "slurm/pretrain.sh", *overrides]
    first = run_command(submit, env=job_env() | {"VLM_TRAIN_SLOW_DATA_S": "0.2"}).stdout.strip().split(";")[0]
    second = ""
    try:
        wait_for(
            lambda: (run_dir / "metrics.jsonl").is_file(),
            240,
            f"job {first} to train\n{job_report(run_dir, tmp_path)}",
        )
        assert run_command(["scancel", "--signal=STOP", first]).returncode == 0
        second = run_command(submit, env=job_env()).stdout.strip().split(";")[0]
        wait_for(lambda: job_field(second, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 240, f"job {second}")
        assert job_field(first, "JobState") == "STOPPED"  # alive, holding the run dir
        assert run_command(["scancel", "--signal=CONT", first]).returncode == 0
        wait_for(lambda: job_field(first, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 240, f"job {first}")
    finally:
        run_command(["scancel", first, *([second] if second else [])])
    report = job_report(run_dir, tmp_path)
    assert job_field(second, "JobState") == "FAILED", report
    refused = (run_dir / "logs" / f"slurm-{second}-0.log").read_text()
    lines = [line for line in refused.splitlines() if "vlm-train: error:" in line]
    assert len(lines) == 1, refused
    assert f"run.dir={run_dir} is in use by Slurm job {first} on host {socket.gethostname()}, pid " in lines[0]
    assert ", started 20" in lines[0], lines[0]
    assert job_field(first, "JobState") == "COMPLETED", report
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 21)), report


def test_a_stop_that_cannot_be_requeued_fails_the_job_and_holds_its_dependents(slurm_cluster, toy_data, tmp_path):
    """The exit-code table's "stopped, not requeued" row: the trainer stops itself at its deadline
    (train.max_minutes) with a checkpoint, MAX_REQUEUES=0 refuses the requeue, and the job ends
    FAILED with 75, so that a stage 2 submitted with --dependency=afterok never starts."""
    run_dir = tmp_path / "run"
    overrides = cpu_overrides(
        toy_data, run_dir, "train.max_steps=600", "train.max_minutes=0.4", "train.stop_margin_s=2", "train.log_every=1"
    )
    env = {**job_env(), "MAX_REQUEUES": "0", "VLM_TRAIN_SLOW_DATA_S": "0.25"}
    submit = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--gres=none",
        "--cpus-per-task=2",
        f"--output={tmp_path}/slurm-%j.out",
    ]
    stage1 = run_command([*submit, "slurm/pretrain.sh", *overrides], env=env).stdout.strip().split(";")[0]
    stage2 = run_command(
        [*submit, f"--dependency=afterok:{stage1}", f"--wrap=touch {tmp_path}/stage2-ran"], env=env
    ).stdout.strip()
    try:
        wait_for(lambda: job_field(stage1, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 240, f"job {stage1}")
        wait_for(lambda: job_field(stage2, "Reason") == "DependencyNeverSatisfied", 60, "the dependency verdict")
    finally:
        run_command(["scancel", stage1, stage2])
    report = job_report(run_dir, tmp_path)
    assert (job_field(stage1, "JobState"), job_field(stage1, "ExitCode")) == ("FAILED", "75:0"), report
    assert job_field(stage1, "Restarts") == "0", report
    log = (run_dir / "logs" / f"slurm-{stage1}-0.log").read_text()
    assert "stopped by the deadline (train.max_minutes=0.4: " in log, report
    assert "not requeueing: this job was already requeued 0 times (MAX_REQUEUES=0)" in log, report
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert latest == f"step_{steps[-1]}" and 1 <= steps[-1] < 600, (latest, steps)  # the stop's checkpoint
    assert not (tmp_path / "stage2-ran").exists()


def test_srun_tasks_use_slurm_variables(slurm_cluster, toy_data, tmp_path):
    """One task per process without torchrun: launch_env's Slurm branch joins 2 srun tasks."""
    run_dir = tmp_path / "run"
    overrides = " ".join(cpu_overrides(toy_data, run_dir, "train.max_steps=3", "train.log_every=1"))
    show = "from vlm_train.parallel.launch_env import launch_env; print('launch', launch_env(), flush=True)"
    script = (
        f"{sys.executable} -c {shlex.quote(show)}; "  # the batch shell: not a rank of the step
        f"srun --ntasks=2 --cpus-per-task=1 {sys.executable} -c {shlex.quote(show)} && "
        f"srun --ntasks=2 --cpus-per-task=1 {sys.executable} -m vlm_train.train {overrides}"
    )
    submit = ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out"]
    result = run_command([*submit, f"--wrap={script}"], env=job_env())
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the job")
    finally:
        run_command(["scancel", job_id])
    out = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert job_field(job_id, "JobState") == "COMPLETED", out
    envs = sorted(line.removeprefix("launch ") for line in out.splitlines() if line.startswith("launch "))
    host, port = socket.gethostname().split(".")[0], 20000 + int(job_id) % 10000
    assert [e for e in envs if "source='slurm'" in e] == [
        f"LaunchEnv(rank={r}, local_rank={r}, world=2, master_addr='{host}', master_port={port}, source='slurm')"
        for r in (0, 1)
    ], out
    (single,) = [e for e in envs if "source='single'" in e]
    assert single.startswith("LaunchEnv(rank=0, local_rank=0, world=1,"), out
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3], out
    assert (run_dir / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("nodelist", ["vm", "a,b", "dgx[001-003]", "n[08-10,12]", "rack[1-2]-n[01-02],login[7]"])
def test_nodelist_parser_matches_scontrol(slurm_cluster, nodelist):
    shown = run_command(["scontrol", "show", "hostnames", nodelist])
    assert shown.returncode == 0, shown.stderr
    assert expand_nodelist(nodelist) == shown.stdout.split()


def test_bad_override_fails_fast_from_any_directory(slurm_cluster, tmp_path):
    """Submitted from outside the repository (the script finds slurm/common.sh through the job
    record); an override that does not compose ends the job with Hydra's one-line reason."""
    command = ["sbatch", "--wait", "--nodes=1", "--gres=none", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%j.out"]
    command += [str(REPO / "slurm" / "finetune.sh"), "experiment=toy", "no.such_key=1"]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        cancel_submitted(err.stdout)
        pytest.fail("the job did not end in 300 s")
    out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert result.returncode != 0, out
    assert "vlm-train: error: Could not override 'no.such_key'" in out, out
    assert "nothing started" in out
    assert not (tmp_path / "logs").exists()  # no run dir was guessed
