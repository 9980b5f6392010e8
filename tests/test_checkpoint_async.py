"""Async checkpoints (`train.async_save`) and checksums, end to end.

In this process, at ZeRO 0-3: the files an async save writes are byte for byte those a synchronous
save of the same moment writes, even when training changes weights and optimizer state in place
before the background writer gets to them (the snapshot is a copy), and a writer that fails says
so in the main thread. Through the real CLI on 2 gloo ranks (ZeRO-3): SIGKILL of the whole job
at five points of async saves, and damaged checkpoint files (a flipped byte, a truncated file),
each followed by a restart whose losses equal an uninterrupted synchronous run's, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, make_batch, read_metrics, step_losses, torchrun, toy_model, toy_overrides

STEPS = 8
COMMON = (f"train.max_steps={STEPS}", "train.save_every=2", "train.precision=fp32", "parallel.zero_stage=3")
ASYNC = (*COMMON, "train.async_save=true")


# --- in this process: what an async save writes --------------------------------------------------


def toy_engine(stage: int, run_dir: Path):
    """The toy VLM (tower trained too) behind a real engine at `stage`, after one step (Adam moments exist)."""
    from vlm_train.config import compose
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.parallel.engine import build_train_engine
    from vlm_train.parallel.layout import Layout

    cfg = compose(["experiment=toy", f"parallel.zero_stage={stage}", "train.precision=fp32", f"run.dir={run_dir}"])
    tokenizer = build_toy_tokenizer()
    model = toy_model("vision.freeze=false", tokenizer=tokenizer)
    batch = make_batch(model, tokenizer)
    engine = build_train_engine(model, cfg, Layout(1, 0, tp=1, zero_stage=stage), torch.device("cpu"))

    def train_step() -> None:
        engine.backward(engine(*batch).loss)
        engine.step()

    train_step()
    return engine, cfg, train_step


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_async_save_writes_the_state_of_its_step_byte_for_byte(one_rank, stage, tmp_path, monkeypatch):
    """The background writer is held before its first write while another step updates weights and
    Adam moments in place and the trainer state object changes: the files it then writes equal a
    synchronous save's of the same moment, manifests included."""
    from vlm_train.training import checkpoint

    engine, cfg, train_step = toy_engine(stage, tmp_path)
    release = threading.Event()
    release.set()  # held only around the async saves
    monkeypatch.setattr(checkpoint, "fault_point", lambda point, *_: point == "snapshot" and release.wait(60))
    saver = checkpoint.Checkpointer(engine, tmp_path / "async", cfg, async_save=True)
    for step in (1, 2):  # the second snapshot reuses the first one's host buffers
        trainer_state = {"step": step, "rng": torch.get_rng_state(), "data": {"batch": [1, 2]}}
        checkpoint.Checkpointer(engine, tmp_path / "sync", cfg, async_save=False).save(step, trainer_state)
        release.clear()
        saver.save(step, trainer_state)
        assert saver.writing_here() == 1.0 and not (tmp_path / "async" / "checkpoints" / f"step_{step}").exists()
        train_step()  # in place: the module's (or ZeRO's flat) weights, the optimizer's moments
        trainer_state["rng"].zero_()
        trainer_state["data"]["batch"].append(3)
        release.set()
        saver.finish()

        written = folder_bytes(tmp_path / "async" / "checkpoints" / f"step_{step}")
        assert written == folder_bytes(tmp_path / "sync" / "checkpoints" / f"step_{step}"), step
        assert any(name.endswith("optim_states.pt") for name in written) == (stage > 0)
        assert (tmp_path / "async" / "checkpoints" / "latest").read_text() == f"step_{step}"
    assert written != folder_bytes(tmp_path / "async" / "checkpoints" / "step_1")  # training did move on


def test_the_next_save_waits_for_the_previous_write_and_publishes_it_first(one_rank, tmp_path, monkeypatch):
    """At most one save in flight: a save while the previous one's writer is still busy waits for
    it, publishes it, and only then takes its own snapshot (which reuses the previous buffers)."""
    from vlm_train.training import checkpoint, checksums

    engine, cfg, train_step = toy_engine(0, tmp_path)
    release = threading.Event()
    monkeypatch.setattr(checkpoint, "fault_point", lambda point, *_: point == "snapshot" and release.wait(60))
    saver = checkpoint.Checkpointer(engine, tmp_path, cfg, async_save=True)
    saver.save(1, {"step": 1})
    train_step()
    second = threading.Thread(target=saver.save, args=(2, {"step": 2}))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive() and not (tmp_path / "checkpoints" / "latest").exists()  # waiting for step 1's write
    release.set()
    second.join(timeout=60)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_1"
    saver.finish()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2"
    for step in (1, 2):
        folder = tmp_path / "checkpoints" / f"step_{step}"
        digests = checksums.read_manifests(folder) or {}
        assert len(digests) == 4 and not checksums.problems(folder, sorted(digests), digests)


def test_a_failed_background_write_is_raised_in_the_main_thread(one_rank, tmp_path, monkeypatch):
    from vlm_train.training import checkpoint

    def fail(point: str, *_):
        if point == "write":
            raise OSError(28, "No space left on device")

    engine, cfg, _ = toy_engine(0, tmp_path)
    monkeypatch.setattr(checkpoint, "fault_point", fail)
    saver = checkpoint.Checkpointer(engine, tmp_path, cfg, async_save=True)
    saver.save(3, {"step": 3})
    with pytest.raises(RuntimeError, match=r"writing step_3\.partial in the background failed: .*No space left"):
        saver.finish()
    assert not (tmp_path / "checkpoints" / "latest").exists()


# --- the real CLI on 2 ranks ---------------------------------------------------------------------


def launch(overrides: list[str], fault: str | None = None) -> subprocess.Popen:
    """`torchrun --nproc_per_node=2 -m vlm_train.train` in the background, output to a log beside the run dir."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLM_TRAIN_FAULT_HANG", None)
    if fault:
        env["VLM_TRAIN_FAULT_HANG"] = fault
    log = open(run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log", "w")
    command = torchrun(2, "-m", "vlm_train.train", *overrides)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def last_log(run_dir: Path) -> str:
    logs = sorted(run_dir.parent.glob(f"{run_dir.name}.*.log"), key=lambda p: int(p.suffixes[-2][1:]))
    return logs[-1].read_text() if logs else ""


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far, in order (a line being written is ignored)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n") and '"loss"' in line]


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process below it at once, as a node failure would."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except OSError:
            continue
    todo, pids = [process.pid], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def kill_when(condition, process: subprocess.Popen, run_dir: Path, timeout: float = 180) -> None:
    """SIGKILL the job once `condition()` holds; fails if it ended or timed out first."""
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            kill_job(process)
            raise AssertionError(
                f"the run ended (rc {process.returncode}) before the fault point:\n{last_log(run_dir)[-3000:]}"
            )
        time.sleep(0.05)
    kill_job(process)


@pytest.fixture(scope="module")
def uninterrupted(toy_data, tmp_path_factory) -> Path:
    """The reference: STEPS steps with synchronous saves, never interrupted."""
    run_dir = tmp_path_factory.mktemp("async") / "whole"
    job = launch(toy_overrides(toy_data, run_dir, *COMMON))
    assert job.wait(timeout=300) == 0, last_log(run_dir)[-3000:]
    return run_dir


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    expected = step_losses(reference)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1))
    for record in records:
        assert record["loss"] == expected[record["step"]], (record, expected[record["step"]])


@pytest.mark.slow
def test_async_saves_killed_at_five_points_continue_the_loss_curve_bit_identical(uninterrupted, toy_data, tmp_path):
    """SIGKILL of the whole job (2 ranks, ZeRO-3, a save every 2 steps) while the background writers
    of step 4 hang (VLM_TRAIN_FAULT_HANG): 1. rank 0's after its snapshot, before any write, and
    rank 1's half-way through its first shard; 2. rank 1's after every file and its checksum list
    are durable, before that is reported, while training runs on to step 5; 3. with rank 0 between
    renaming step_4 into place and moving `latest`; 4. with nothing held, once the run has
    published step 4 itself and trains on. Each restart resumes from `latest` (never moved while a
    rank's files were not durable) and the last one runs to the end: every logged step, the re-run
    ones included, has the reference's loss."""
    run_dir = tmp_path / "killed"
    overrides = toy_overrides(toy_data, run_dir, *ASYNC)
    checkpoints, partial = run_dir / "checkpoints", run_dir / "checkpoints" / "step_4.partial"
    hung = lambda *names: all((run_dir / f"fault_{name}").exists() for name in names)  # noqa: E731
    latest = lambda: (checkpoints / "latest").read_text() if (checkpoints / "latest").exists() else None  # noqa: E731
    trained_since = lambda before: logged_steps(run_dir)[len(before) :]  # noqa: E731

    job = launch(overrides, "snapshot:4:0,write:4:1")
    kill_when(lambda: hung("snapshot_4_rank0", "write_4_rank1"), job, run_dir)
    assert latest() == "step_2"  # published in the background by the run itself
    assert sorted(p.name for p in partial.iterdir()) == ["zero_pp_rank_1_mp_rank_00_model_states.pt.tmp"]

    before = logged_steps(run_dir)
    kill_when(lambda: hung("durable_4_rank1") and 5 in trained_since(before), launch(overrides, "durable:4:1"), run_dir)
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in last_log(run_dir)
    assert latest() == "step_2"  # training went on to step 5, but rank 1 had not reported its files durable
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS.rank00001"], cwd=partial, capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr  # ... which they were

    kill_when(lambda: hung("publish_4_rank0"), launch(overrides, "publish:4:0"), run_dir)
    assert latest() == "step_2" and (checkpoints / "step_4").is_dir() and not partial.exists()

    before = logged_steps(run_dir)
    kill_when(lambda: latest() != "step_2" and 6 in trained_since(before), launch(overrides), run_dir)
    resumed_at = latest()
    assert resumed_at in ("step_4", "step_6", "step_8"), resumed_at

    job = launch(overrides)
    assert job.wait(timeout=300) == 0, last_log(run_dir)[-3000:]
    assert f"resumed from {checkpoints / resumed_at}" in last_log(run_dir)
    assert latest() == f"step_{STEPS}" and not list(checkpoints.glob("*.partial"))
    assert_same_losses(run_dir, uninterrupted)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_checkpoint_files_are_named_and_the_previous_checkpoint_resumes_exactly(
    uninterrupted, toy_data, tmp_path
):
    """The reference's step_8 with one shard truncated and its step_6 with one byte flipped: the
    restart names both in one line, resumes from step_4 (async saves from there on) and steps 5-8
    have the reference's losses."""
    run_dir = tmp_path / "damaged"
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in (4, 6, 8):
        shutil.copytree(uninterrupted / "checkpoints" / f"step_{step}", run_dir / "checkpoints" / f"step_{step}")
    (run_dir / "checkpoints" / "latest").write_text("step_8")
    shutil.copy(uninterrupted / "config.yaml", run_dir / "config.yaml")
    shard = run_dir / "checkpoints" / "step_8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    flip_byte(run_dir / "checkpoints" / "step_6" / "zero_pp_rank_0_mp_rank_00_model_states.pt")

    job = launch(toy_overrides(toy_data, run_dir, *ASYNC))
    assert job.wait(timeout=300) == 0, last_log(run_dir)[-3000:]
    log = last_log(run_dir)
    warnings = [line for line in log.splitlines() if line.startswith("vlm-train: warning: checkpoint")]
    assert warnings == [
        "vlm-train: warning: checkpoint step_8: optimizer file zero_pp_rank_1_mp_rank_00_optim_states.pt fails its "
        "checksum (flipped or truncated); checkpoint step_6: model file zero_pp_rank_0_mp_rank_00_model_states.pt "
        "fails its checksum (flipped or truncated): resuming from step_4 instead"
    ], log[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_4'} at step 4" in log
    got, expected = step_losses(run_dir), step_losses(uninterrupted)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(got[step] == expected[step] for step in got), (got, expected)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_8"  # the damaged ones were saved again
