"""One job per run dir (training/run_lock.py) and workers that end with their launcher
(parallel/signals.py `end_with_launcher`), with real processes, real fcntl locks and real
signals. The end-to-end runs (torchrun killed, two jobs on one run dir, Slurm) are in
test_fault.py and test_launch_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from vlm_train.config import compose
from vlm_train.errors import ConfigError
from vlm_train.training.run_lock import LOCK_NAME, Holder, RunDirInUse, RunLock, hold_run_dir, job_name

HOLD = """
import sys, time
from pathlib import Path
from vlm_train.training.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def start(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A python process running `code`; returns once it printed its first line."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip(), "the helper process died before it was ready"
    return process


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


def write_record(run_dir: Path, **fields) -> Holder:
    """A lock file as another job left it (no process holds it)."""
    holder = Holder(**{**vars(Holder.of_this_process({})), **fields})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_bytes(holder.encode())
    return holder


def test_a_live_holder_refuses_a_second_job_in_one_line(tmp_path):
    holder = start(HOLD, str(tmp_path), "fcntl", "300")
    try:
        with pytest.raises(RunDirInUse) as refused:
            RunLock(tmp_path, "fcntl", 300).acquire()
    finally:
        stop(holder)
    message = str(refused.value)
    assert "\n" not in message
    assert f"run.dir={tmp_path} is in use by an unnamed job on host {socket.gethostname()}, pid {holder.pid}" in message
    assert "started 20" in message and "last heartbeat 0 s ago" in message


def test_a_sigkilled_holder_is_taken_over_and_a_clean_release_is_not_a_takeover(tmp_path):
    stop(start(HOLD, str(tmp_path), "fcntl", "300"))  # SIGKILL: the kernel drops its lock
    lock = RunLock(tmp_path, "fcntl", 300)
    taken = lock.acquire()
    assert taken is not None and taken.startswith(f"taking over run.dir={tmp_path} from an unnamed job")
    assert taken.endswith("that process is gone")
    lock.release()
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["released"] and record["pid"] == os.getpid()
    again = RunLock(tmp_path, "fcntl", 300)
    assert again.acquire() is None
    again.release()


def test_the_holder_heartbeat_advances_and_its_identity_is_recorded(tmp_path):
    env = {"SLURM_JOB_ID": "4242"}
    holder = start(HOLD, str(tmp_path), "fcntl", "0.8", env=env)  # heartbeat every 0.2 s
    try:
        first = json.loads((tmp_path / LOCK_NAME).read_text())
        time.sleep(0.6)
        later = json.loads((tmp_path / LOCK_NAME).read_text())
    finally:
        stop(holder)
    assert first["job"] == "slurm:4242" and first["pid"] == holder.pid and not first["released"]
    assert later["heartbeat"] > first["heartbeat"]
    assert job_name({"TORCHELASTIC_RUN_ID": "none"}) == ""  # torchrun's default id names nothing
    assert job_name({"TORCHELASTIC_RUN_ID": "abc"}) == "torchrun:abc"


def test_a_process_of_the_previous_job_still_holding_its_rank_lock_refuses(tmp_path):
    """Rank 0 of the old job released, but its rank 1 is still alive (saving): the new job waits."""
    write_record(tmp_path, released=True)
    code = """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1)
    print("held", flush=True)
    time.sleep(600)
    """
    rank1 = start(code, str(tmp_path / LOCK_NAME))
    try:
        with pytest.raises(RunDirInUse) as refused:
            RunLock(tmp_path, "fcntl", 300).acquire()
    finally:
        stop(rank1)
    assert f"pid {rank1.pid} holds the lock" in str(refused.value)
    assert "released by its rank 0" in str(refused.value)


def test_a_restart_of_the_same_job_takes_over_a_fresh_lock_from_another_host(tmp_path, monkeypatch):
    write_record(tmp_path, host="node-b", job="slurm:77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = RunLock(tmp_path, "fcntl", 300)
    taken = lock.acquire() or ""
    lock.release()
    assert taken.startswith(f"taking over run.dir={tmp_path} from Slurm job 77 on host node-b, pid {os.getpid()}")
    assert taken.endswith("last heartbeat 0 s ago: an earlier start of this job")


def test_heartbeat_mode_a_stale_holder_on_another_host_is_taken_over(tmp_path):
    write_record(tmp_path, host="node-b", heartbeat=time.time() - 10)
    lock = RunLock(tmp_path, "heartbeat", 5)
    taken = lock.acquire()
    lock.release()
    assert taken is not None and "no heartbeat for 10 s (run.lock_stale_s=5)" in taken


def test_heartbeat_mode_a_live_holder_on_another_host_is_refused_once_its_heartbeat_moves(tmp_path):
    write_record(tmp_path, host="node-b", pid=1)
    beating = """
    import json, sys, time
    path = sys.argv[1]
    print("beating", flush=True)
    while True:
        record = json.loads(open(path).read())
        record["heartbeat"] = time.time()
        with open(path, "r+") as f:
            f.write(json.dumps(record).ljust(1023) + "\\n")
        time.sleep(0.3)
    """
    other_host = start(beating, str(tmp_path / LOCK_NAME))
    try:
        started = time.monotonic()
        with pytest.raises(RunDirInUse) as refused:
            RunLock(tmp_path, "heartbeat", 20).acquire()
        waited = time.monotonic() - started
    finally:
        stop(other_host)
    assert "on host node-b, pid 1" in str(refused.value)
    assert waited < 10  # refused as soon as the heartbeat moved, not after run.lock_stale_s


def test_heartbeat_mode_two_jobs_starting_together_the_later_writer_wins(tmp_path, monkeypatch):
    """Without a lock, two jobs that read an empty record at the same moment both write theirs;
    each reads back after a pause, and the one whose record was overwritten gives way. The
    rival's write is made to land inside that pause."""
    from vlm_train.training import run_lock

    real_sleep = time.sleep

    def rival_writes_during_the_pause(seconds: float) -> None:
        write_record(tmp_path, host="node-b", pid=4321, job="slurm:99")
        real_sleep(seconds)

    monkeypatch.setattr(run_lock.time, "sleep", rival_writes_during_the_pause)
    lock = RunLock(tmp_path, "heartbeat", 4)
    with pytest.raises(RunDirInUse, match="in use by Slurm job 99 on host node-b, pid 4321"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 4321  # the winner's record stands


def test_heartbeat_mode_same_host_uses_the_pid(tmp_path):
    holder = start(HOLD, str(tmp_path), "heartbeat", "300")
    try:
        with pytest.raises(RunDirInUse):
            RunLock(tmp_path, "heartbeat", 300).acquire()
    finally:
        stop(holder)
    lock = RunLock(tmp_path, "heartbeat", 300)
    assert "that process is gone" in (lock.acquire() or "")
    lock.release()


def test_a_run_dir_that_cannot_be_created_fails_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunDirInUse) as refused, hold_run_dir(tmp_path / "file" / "run", "fcntl", 300, rank=0, world=1):
        pass
    assert str(refused.value) == (
        f"cannot hold run.dir={tmp_path / 'file' / 'run'}: Not a directory: {tmp_path / 'file' / 'run'}"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.lock=flock", "run.lock='flock' is not one of fcntl, heartbeat, off"),
        ("run.lock_stale_s=0", "run.lock_stale_s=0.0 must be positive (seconds)"),
    ],
)
def test_bad_lock_settings_fail_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose(["experiment=toy", override])


CHILD = """
import os, signal, sys, time
from vlm_train.parallel import signals
flag = signals.StopFlag(deadline_s=None).install()
print("ready", flush=True)
time.sleep(float(sys.argv[1]))  # the parent may die here, before the request
armed = signals.end_with_launcher()
print(f"armed={armed}", flush=True)
deadline = time.monotonic() + 60  # a test that fails must not leave this process behind
while not flag.raised and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"stopped by {flag.signal_name}", flush=True)
"""

PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=open(sys.argv[3], "w"))
print(child.pid, flush=True)
child.wait()
"""


def launched_child(tmp_path: Path, delay: float, launcher_env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "child.out"
    parent = start(PARENT, CHILD, str(delay), str(out), env=launcher_env)
    return parent, out


def wait_for_line(path: Path, prefix: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text().splitlines() if line.startswith(prefix)] if path.exists() else []
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no line {prefix!r} in {path}: {path.read_text() if path.exists() else 'missing'}")


@pytest.mark.parametrize("delay", [0.0, 2.0], ids=["parent-dies-after-the-request", "parent-dies-before-it"])
def test_a_launched_worker_is_stopped_when_its_launcher_is_sigkilled(tmp_path, delay):
    parent, out = launched_child(tmp_path, delay, {"TORCHELASTIC_RUN_ID": "none"})
    wait_for_line(out, "ready" if delay else "armed=True")
    stop(parent)  # SIGKILL, as the OOM killer would
    assert wait_for_line(out, "stopped by") == f"stopped by SIGTERM (its launcher, pid {parent.pid}, ended)"


def test_a_process_started_by_hand_outlives_its_shell(tmp_path):
    """nohup vlm-train ... &: no launcher variables, no parent-death signal."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID")}
    out = tmp_path / "child.out"
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT), CHILD, "0", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    child_pid = int(parent.stdout.readline())
    assert wait_for_line(out, "armed=") == "armed=False"
    stop(parent)
    time.sleep(1)
    try:
        assert "stopped by" not in out.read_text()
        os.kill(child_pid, 0)  # still running
    finally:
        os.kill(child_pid, signal.SIGKILL)
