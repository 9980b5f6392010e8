"""Fault tolerance through the real CLI on 2 gloo ranks: SIGKILL anywhere (during a save too, and one
rank under `torchrun --max-restarts`) and the restarted run's losses are bit-identical; a stuck rank
ends the job within `parallel.timeout_s`; pickled objects are refused; secrets stay out of the run
dir; frozen weights are referenced, not copied, and checked on resume."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    keep_only_checkpoint,
    read_metrics,
    run_cli,
    step_losses,
    torchrun,
    toy_overrides,
    write_tar,
)
from vlm_train.errors import ConfigError

pytestmark = pytest.mark.slow

STEPS = 10
COMMON = (f"train.max_steps={STEPS}", "train.save_every=2", "train.precision=fp32", "parallel.zero_stage=2")
SECRETS = {
    "WANDB_API_KEY": "3f1c0ffee5ecre7wandbkey00000000000000000",
    "HF_TOKEN": "hf_S3cretT0kenFromTheEnvironment",
    "MY_SERVICE_TOKEN": "svc-token-7d9e2b4a11",
    "AWS_SECRET_ACCESS_KEY": "aws/S3cr3t+AccessKey+0123456789",
}


def launch(overrides: list[str], *, env: dict | None = None, max_restarts: int = 0) -> subprocess.Popen:
    """`torchrun --nproc_per_node=2 -m vlm_train.train` in the background, output to files."""
    command = torchrun(2, "-m", "vlm_train.train", *overrides, max_restarts=max_restarts)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(Path(overrides_dir(overrides)).with_suffix(f".{time.monotonic_ns()}.log"), "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def overrides_dir(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far, in order (a line being written is ignored)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and '"loss"' in line:
            steps.append(json.loads(line)["step"])
    return steps


def wait_until(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `condition`; on failure the job is killed so that no process outlives the test."""
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            kill_job(process)
            raise AssertionError(f"the run ended (rc {process.returncode}) or timed out before the fault point")
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once, as a node failure would."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def worker_of_rank(process: subprocess.Popen, rank: int) -> int:
    """The torchrun worker (a direct child; its data loader workers share its environment) of `rank`."""
    for pid in descendants(process.pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == process.pid and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker process of rank {rank}")


@pytest.fixture(scope="module")
def uninterrupted(toy_data, tmp_path_factory) -> tuple[Path, str]:
    """The reference: STEPS steps without a fault, with secrets in the environment and wandb writing offline."""
    run_dir = tmp_path_factory.mktemp("fault") / "whole"
    env = {**os.environ, **SECRETS}
    command = torchrun(2, "-m", "vlm_train.train", *toy_overrides(toy_data, run_dir, *COMMON, "wandb.mode=offline"))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout + result.stderr


def test_killed_anywhere_the_loss_curve_continues_bit_identical(uninterrupted, toy_data, tmp_path):
    """Three SIGKILLs at different points: rank 1 alone mid-run (torchrun --max-restarts=1 restarts the
    group, which resumes), the whole job while rank 0 sits between writing its shards and moving
    `latest`, and the whole job mid-run again. Every logged step, re-run ones included, has exactly
    the reference's loss (fp32 on CPU: same data, same RNG, same reductions)."""
    reference = step_losses(uninterrupted[0])
    run_dir = tmp_path / "killed"
    overrides = toy_overrides(toy_data, run_dir, *COMMON)
    checkpoints = run_dir / "checkpoints"

    # 1. rank 1 dies at step >= 3; torchrun restarts both ranks, which resume; 2. rank 0 hangs in the
    #    step-6 save after writing its shards, and the whole job is killed there.
    job = launch(overrides, env={"VLM_TRAIN_FAULT_HANG": "save:6:0"}, max_restarts=1)
    wait_until(lambda: len(logged_steps(run_dir)) >= 3, job)
    os.kill(worker_of_rank(job, 1), signal.SIGKILL)
    wait_until(lambda: (run_dir / "fault_save_6_rank0").exists(), job)
    kill_job(job)
    first_log = read_launch_log(run_dir)
    assert "resumed from" in first_log, first_log[-3000:]
    assert (checkpoints / "latest").read_text() == "step_4"  # the interrupted save was never published
    assert (checkpoints / f"step_6{'.partial'}").is_dir() and not (checkpoints / "step_6").exists()

    # 3. a plain restart resumes from step 4 (taking over the dead job's run-dir lock); killed again
    #    once it has logged step 7.
    job = launch(overrides)
    wait_until(lambda: 7 in logged_steps(run_dir)[6:], job)
    kill_job(job)
    assert f"taking over run.dir={run_dir} from an unnamed job" in read_launch_log(run_dir)

    # 4. the last restart runs to the end.
    job = launch(overrides)
    assert job.wait(timeout=300) == 0, read_launch_log(run_dir)[-3000:]
    assert (checkpoints / "latest").read_text() == f"step_{STEPS}"
    assert not list(checkpoints.glob("*.partial"))

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(records) > STEPS  # steps after a checkpoint were trained twice
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1))
    for record in records:
        assert record["loss"] == reference[record["step"]], (record, reference[record["step"]])


def read_launch_log(run_dir: Path) -> str:
    logs = sorted(run_dir.parent.glob(f"{run_dir.name}.*.log"), key=lambda p: int(p.suffixes[-2][1:]))
    return logs[-1].read_text() if logs else ""


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whoever adopted it, maybe later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def refused_start(overrides: list[str], holder_pid: int) -> str:
    """Start the same job again: it must exit 73 with one line naming the holder, and write nothing."""
    run_dir = Path(overrides_dir(overrides))
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != "run.lock")
    second = launch(overrides)
    try:
        returncode = second.wait(timeout=180)
    finally:
        kill_job(second)
    log = read_launch_log(run_dir)
    refusals = [line for line in log.splitlines() if line.startswith("vlm-train: error:")]
    assert returncode != 0 and "exitcode  : 73" in log, log[-3000:]
    assert len(refusals) == 1, log[-3000:]  # rank 1 refuses silently
    assert refusals[0].startswith(f"vlm-train: error: run.dir={run_dir} is in use by an unnamed job on host ")
    assert f", pid {holder_pid}, started 20" in refusals[0]
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != "run.lock")
    assert after == before  # the refused job wrote nothing (and the stopped one could not)
    return refusals[0]


def test_a_second_job_on_a_live_run_dir_is_refused_and_the_first_is_unaffected(uninterrupted, toy_data, tmp_path):
    """The same command started twice: the second exits with one line naming the first, which runs
    on to the reference's losses. The first job's workers are paused (SIGSTOP) while the second
    starts, so that it is still mid-run however slow the second one's start-up is."""
    run_dir = tmp_path / "twice"
    overrides = toy_overrides(toy_data, run_dir, *COMMON)
    first = launch(overrides)
    wait_until(lambda: len(logged_steps(run_dir)) >= 2, first)
    workers = descendants(first.pid)
    signal_all(workers, signal.SIGSTOP)
    try:
        refused_start(overrides, worker_of_rank(first, 0))
    finally:
        signal_all(workers, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    reference = step_losses(uninterrupted[0])
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert step_losses(run_dir) == reference


ORPHANS_EXIT_S = 60  # documented in docs/checkpointing.md: one step, one save, the exit


def test_workers_of_a_sigkilled_torchrun_save_and_exit_and_a_restart_continues_bit_identical(
    uninterrupted, toy_data, tmp_path
):
    """`kill -9` of torchrun alone: its workers get SIGTERM from the kernel (parent-death signal),
    finish the step, save and exit 75; no process of the job is left. A new job started while they
    are still alive is refused (they are paused with SIGSTOP to make that window wide); once they
    are gone, a restart resumes from their checkpoint and its losses are the reference's."""
    run_dir = tmp_path / "orphans"
    overrides = toy_overrides(toy_data, run_dir, *COMMON)
    job = launch(overrides)
    wait_until(lambda: len(logged_steps(run_dir)) >= 2, job)
    rank0, workers = worker_of_rank(job, 0), descendants(job.pid)
    signal_all(workers, signal.SIGSTOP)
    job.kill()
    job.wait(timeout=30)
    try:
        refused_start(overrides, rank0)
    finally:
        signal_all(workers, signal.SIGCONT)
    resumed = time.monotonic()
    while any(running(pid) for pid in workers) and time.monotonic() - resumed < ORPHANS_EXIT_S:
        time.sleep(0.1)
    took = time.monotonic() - resumed
    signal_all(workers, signal.SIGKILL)
    assert took < ORPHANS_EXIT_S, f"orphaned workers still running {took:.0f} s after their launcher died"
    orphan_log = sorted(run_dir.parent.glob(f"{run_dir.name}.*.log"))[0].read_text()
    # found in the whole log, not per line: the two ranks' messages may share a line (writes interleave)
    stopped = re.findall(r"stopped by SIGTERM \(its launcher, pid \d+, ended\) after step (\d+),", orphan_log)
    assert len(stopped) == 2, orphan_log[-3000:]  # both ranks
    stop_step = int(stopped[0])
    assert stop_step < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stop_step}"
    assert json.loads((run_dir / "run.lock").read_text())["released"]

    restart = launch(overrides)
    assert restart.wait(timeout=300) == 0, read_launch_log(run_dir)[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stop_step}'} at step {stop_step}" in read_launch_log(
        run_dir
    )
    reference = step_losses(uninterrupted[0])
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1))
    for record in records:
        assert record["loss"] == reference[record["step"]], (record, reference[record["step"]])


def test_the_deadline_stops_the_run_in_time_without_any_signal_and_a_restart_continues_bit_identical(
    uninterrupted, toy_data, tmp_path
):
    """`train.stop_at` 60 s ahead, torchrun forwarding no stop signal to its workers (as torchrun
    before 2.9 with SIGUSR1): the ranks agree before a step that it, a save and the margin (15 s:
    the exit takes seconds here) would not fit, save after it and exit 75 before the deadline,
    leaving <run.dir>/STOPPED for the launcher script (torchrun itself exits 1). A slow loader
    (4 s a step) makes sure the deadline falls mid-run. The restart, without a deadline,
    continues with the reference's losses."""
    run_dir = tmp_path / "deadline"
    stop_at = time.time() + 60
    overrides = toy_overrides(toy_data, run_dir, *COMMON, f"train.stop_at={stop_at:.0f}", "train.stop_margin_s=15")
    command = torchrun(2, "-m", "vlm_train.train", *overrides)
    command.insert(command.index("-m", 3), "--signals-to-handle=SIGINT")  # no SIGTERM/SIGUSR1 forwarding
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLM_TRAIN_SLOW_DATA_S": "1.0"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    log = result.stdout + result.stderr
    assert result.returncode != 0 and ended < stop_at, (result.returncode, ended - stop_at, log[-3000:])
    stopped = [line for line in log.splitlines() if f"stopped by the deadline (train.stop_at={stop_at:.0f}: " in line]
    assert len(stopped) == 2, log[-3000:]  # both ranks, each exiting 75
    assert "exitcode  : 75" in log
    stop_step = int(stopped[0].split(" after step ")[1].split(",")[0])
    assert 1 <= stop_step < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stop_step}"
    assert (run_dir / "STOPPED").read_text().startswith("stopped by the deadline (train.stop_at=")

    restart = launch(toy_overrides(toy_data, run_dir, *COMMON))
    assert restart.wait(timeout=300) == 0, read_launch_log(run_dir)[-3000:]
    reference = step_losses(uninterrupted[0])
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once: stopped after a save
    for record in records:
        assert record["loss"] == reference[record["step"]], (record, reference[record["step"]])


def test_a_rank_that_stops_responding_ends_the_job_within_the_timeout(toy_data, tmp_path):
    """Rank 1 stops in the step-2 save; rank 0 waits in the next collective until parallel.timeout_s."""
    timeout_s = 20
    run_dir = tmp_path / "stuck"
    overrides = toy_overrides(
        toy_data, run_dir, "train.max_steps=4", "train.save_every=2", f"parallel.timeout_s={timeout_s}"
    )
    job = launch(overrides, env={"VLM_TRAIN_FAULT_HANG": "save:2:1"})
    wait_until(lambda: (run_dir / "fault_save_2_rank1").exists(), job)
    stuck_at = time.monotonic()
    try:
        returncode = job.wait(timeout=timeout_s + 60)
    finally:
        kill_job(job)
    took = time.monotonic() - stuck_at
    assert returncode != 0
    assert took < timeout_s + 30, f"the job took {took:.0f} s to end after a rank stopped responding"
    assert not (run_dir / "checkpoints" / "latest").exists()  # the interrupted save was never published


class Exploit:
    """Unpickling this runs code: it creates the folder it names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_objects_are_refused_and_no_secret_reaches_the_run_dir(uninterrupted, toy_data, tmp_path):
    """DeepSpeed's own files are read with weights_only=True too: a model-states file carrying an
    object that runs code on unpickling is refused with one line, and the code never runs. The
    reference run had WANDB_API_KEY, HF_TOKEN, *_TOKEN and *_SECRET* set: no file of its run dir
    (config, metrics, wandb's offline run, checkpoints, read as bytes) nor its output holds one."""
    from vlm_train.parallel.engine_checkpoint import safe_torch_load

    whole, output = uninterrupted
    files = [p for p in whole.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any("wandb" in p.parts for p in files)
    for name, secret in SECRETS.items():
        assert secret not in output, name
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{name} found in {path}"

    run_dir = tmp_path / "tampered"
    keep_only_checkpoint(whole, run_dir, STEPS)
    marker = tmp_path / "code_ran"
    states = run_dir / "checkpoints" / f"step_{STEPS}" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": Exploit(marker)}, states)
    manifest = states.parent / "SHA256SUMS.rank00000"  # an attacker rewrites its checksum too
    digest = hashlib.sha256(states.read_bytes()).hexdigest()
    manifest.write_text(re.sub(rf"\w{{64}}(  {states.name})", rf"{digest}\1", manifest.read_text()))
    with pytest.raises(ConfigError, match="refusing to load .*posix.mkdir"):
        safe_torch_load(states)
    job = launch(toy_overrides(toy_data, run_dir, *COMMON[1:], f"train.max_steps={STEPS + 2}"))
    returncode = job.wait(timeout=300)
    log = read_launch_log(run_dir)
    assert returncode != 0 and not marker.exists()
    errors = [line for line in log.splitlines() if line.startswith("vlm-train: error: refusing to load")]
    assert errors and str(states) in errors[0], log[-3000:]


def test_stage1_checkpoint_holds_only_what_trains_and_exports_whole(toy_data, tmp_path):
    """Connector-only training (frozen tower and LLM): the checkpoint is within 2x of the trainable
    parameters x 16 bytes (fp32 weights, fp32 master copy, two Adam moments), not the frozen model's
    size; a changed frozen source (here the seed of a random tower) is refused on resume; and
    `vlm-convert consolidate` writes the whole model, frozen weights rebuilt and checksum-verified."""
    from safetensors.torch import load_file

    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.convert import main as convert
    from vlm_train.parallel.engine_checkpoint import consolidated_state_dict
    from vlm_train.training.frozen import frozen_digest

    run_dir = tmp_path / "stage1"
    overrides = toy_overrides(toy_data, run_dir, "llm.freeze=true", "train.max_steps=2", "parallel.zero_stage=1")
    result = run_cli(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "checkpoints" / "step_2"
    model = build_model(compose(overrides))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert frozen > 10 * trainable
    assert size < 2 * trainable * 16, f"{size} bytes for {trainable} trainable parameters"

    result = run_cli([*overrides[:-2], "train.max_steps=3", "parallel.zero_stage=1", "run.seed=1"])
    assert result.returncode == 2 and "frozen weights differ" in result.stderr, result.stderr[-2000:]

    out = tmp_path / "export"
    assert convert(["consolidate", str(run_dir), str(out)]) == 0
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(model.state_dict())
    trained = consolidated_state_dict(folder, zero_stage=1)
    assert trained and all(torch.equal(exported[name], tensor) for name, tensor in trained.items())
    model.load_state_dict(exported)
    assert frozen_digest(model)["sha256"] == json.loads((folder / "frozen.json").read_text())["sha256"]


def test_a_secret_interpolated_into_the_config_is_redacted_in_config_yaml(monkeypatch, tmp_path):
    """A user who writes `wandb.entity=${oc.env:HF_TOKEN}` still gets no token in config.yaml."""
    from vlm_train.config import compose, to_yaml
    from vlm_train.training.config_dump import redact_secrets

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to be a secret: left alone
    cfg = compose(["experiment=toy", f"run.dir={tmp_path}", "wandb.entity=${oc.env:HF_TOKEN}"])
    text = to_yaml(cfg)
    assert SECRETS["HF_TOKEN"] in text  # the interpolation did resolve
    redacted = redact_secrets(text)
    assert SECRETS["HF_TOKEN"] not in redacted and "entity: <redacted:HF_TOKEN>" in redacted
    assert redact_secrets("dp: 1") == "dp: 1"


def one_scene_data(source: Path, target: Path) -> Path:
    """The toy shards' layout (same shard names and counts) with every sample the first scene."""
    import shutil
    import tarfile

    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source / "train-000000.tar") as tar:
        first = {m.name.rsplit(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:2]}
    for shard, count in json.loads((source / "manifest.json").read_text())["shards"].items():
        write_tar(target / shard, [{"__key__": f"{shard[:-4]}-{index:06d}", **first} for index in range(count)])
    shutil.copy(source / "manifest.json", target / "manifest.json")
    return target


@pytest.mark.parametrize(("saved_stage", "resumed_stage"), [(2, 1), (3, 2)])
def test_resume_with_fewer_ranks_and_another_zero_stage_continues_the_loss(
    saved_stage, resumed_stage, toy_data, tmp_path
):
    """A 2-rank ZeRO-2 (ZeRO-3) checkpoint resumed on 1 rank at ZeRO-1 (ZeRO-2) (through DeepSpeed's universal
    checkpoint: whole weights and Adam moments, re-partitioned): the continued losses match the
    uninterrupted run within 1e-4 relative. Every sample is the same scene, because with 1 rank
    the global batch and the data order differ: the mean loss and gradient of identical samples
    do not depend on either, so any difference comes from the weights, moments or step count."""
    data = one_scene_data(toy_data, tmp_path / "one_scene")
    common = ("train.max_steps=6", "train.save_every=2", "train.precision=fp32", "train.warmup_steps=1")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    job = launch(toy_overrides(data, whole, *common, f"parallel.zero_stage={saved_stage}"))
    assert job.wait(timeout=300) == 0, read_launch_log(whole)[-3000:]

    keep_only_checkpoint(whole, resumed, 4)
    result = run_cli(toy_overrides(data, resumed, *common, f"parallel.zero_stage={resumed_stage}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resharded step_4: 2 ranks ZeRO {saved_stage} -> 1 ranks ZeRO {resumed_stage}" in result.stdout
    expected, got = step_losses(whole), step_losses(resumed)
    assert sorted(got) == [5, 6] and expected[6] != expected[4]
    for step in (5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got[step], expected[step])
