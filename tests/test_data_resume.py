"""Exact resume: a real run killed with SIGKILL at three points and restarted takes the same
sample keys, in the same order, as an uninterrupted run; seeking deep into a slot costs what
seeking near its start does."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    TOKENIZER,
    TRANSFORM,
    image_sample,
    read_metrics,
    run_cli,
    text_sample,
    toy_overrides,
    write_tar,
)
from vlm_train import compose
from vlm_train.data.pipeline import build_train_batches
from vlm_train.data.reader import tar_samples


def run_overrides(toy_data: Path, run_dir: Path, *extra: str) -> list[str]:
    # one shard of 64 samples: 2 workers x 8 batches of 4 per epoch, so 20 steps cross an epoch
    return toy_overrides(
        toy_data,
        run_dir,
        f"data.urls={toy_data}/train-000000.tar",
        "data.num_workers=2",
        "data.shuffle_block=8",
        *extra,
        f"data.log_keys={run_dir}/keys",
        "train.max_steps=20",
        "train.save_every=4",
    )


def taken_keys(run_dir: Path) -> tuple[list[str], int]:
    """Keys in the order training consumed them: a restart rewinds to its checkpoint's position,
    so the lines it re-takes replace those the killed run took after its last save."""
    sequence: list[tuple[tuple[int, int], str]] = []
    rewinds = 0
    for line in (run_dir / "keys" / "keys-rank0.txt").read_text().splitlines():
        epoch, batch, *keys = line.split()
        position = (int(epoch), int(batch))
        if sequence and position <= sequence[-1][0]:
            rewinds += 1
            sequence = [entry for entry in sequence if entry[0] < position]
        sequence.append((position, " ".join(keys)))
    return [keys for _, keys in sequence], rewinds


def run_until_step(overrides: list[str], run_dir: Path, step: int) -> None:
    """Start `vlm-train`, and SIGKILL it (workers included) once it has logged `step`."""
    command = [sys.executable, "-m", "vlm_train.train", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics(run_dir) if "loss" in r):
                break
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before step {step}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "modality_grouped"])
def test_killed_and_resumed_run_takes_the_same_samples(toy_data, tmp_path, grouped):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    extra, kills = [], (5, 10, 17)  # kills between saves (4, 8, 16), one in the second epoch
    if grouped:  # a shard of image and text-only samples; windows of 3 batches, so saves fall mid-window
        write_mixed_shard(tmp_path / "mixed.tar", 64)
        extra = [f"data.urls={tmp_path}/mixed.tar", "data.shuffle_block=12", "data.group_by_modality_length=true"]
        kills = (10,)  # resumes from step 8: each worker 4 batches in, in its second window
    result = run_cli(run_overrides(toy_data, reference_dir, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    expected, rewinds = taken_keys(reference_dir)
    assert len(expected) == 20 and rewinds == 0
    assert len(set(expected[:16])) == 16  # the first epoch: 16 batches, no sample twice
    if grouped:
        assert sum(is_mixed(keys.split()) for keys in expected[:16]) <= 6  # one per window: 2 workers x 3

    for step in kills:
        run_until_step(run_overrides(toy_data, killed_dir, *extra), killed_dir, step)
    result = run_cli(run_overrides(toy_data, killed_dir, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    taken, rewinds = taken_keys(killed_dir)
    assert rewinds == len(kills)  # every restart went back to a checkpoint, not to the start
    assert taken == expected


def write_long_shard(path: Path, count: int) -> None:
    sample = image_sample(random.Random(0), "")
    write_tar(path, [{**sample, "__key__": f"k{index:06d}"} for index in range(count)])


def resume_seconds(data, states: list[dict], rounds: int = 7) -> list[float]:
    """Time from restoring each state to holding the next batch, best of `rounds`. The states are
    measured in turn within each round, so a burst of load on the shared CPU slows them alike."""
    best = [float("inf")] * len(states)
    for _ in range(rounds):
        for index, state in enumerate(states):
            batches = build_train_batches(data, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=2, seed=0)
            started = time.perf_counter()
            batches.load_state_dict(state)
            next(batches)
            best[index] = min(best[index], time.perf_counter() - started)
    return best


def test_resume_deep_in_a_slot_costs_no_more_than_near_its_start(tmp_path):
    write_long_shard(tmp_path / "long-0.tar", 4096)  # one shard, one slot: batch 1000 sits at sample 2000
    pattern = str(tmp_path / "long-{0..0}.tar")
    data = compose(["experiment=toy", f"data.urls={pattern}", "data.num_workers=0", "data.shuffle_block=64"]).data
    batches = build_train_batches(data, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=2, seed=0)
    states = {}
    for taken in range(1, 1001):
        next(batches)
        if taken in (10, 1000):
            states[taken] = batches.state_dict()
    resume_seconds(data, [states[10], states[1000]], rounds=1)  # warm the page cache
    near, deep = resume_seconds(data, [states[10], states[1000]])
    # reading up to the position (before block starts were checkpointed) took 0.3 s against 0.015 s
    assert deep <= 1.2 * near + 0.005, f"resume at batch 1000 took {deep:.4f} s, at batch 10 {near:.4f} s"


def test_a_hint_seeks_and_a_stale_hint_falls_back_to_the_scan(tmp_path):
    write_long_shard(tmp_path / "s.tar", 50)
    scanned = list(tar_samples(str(tmp_path / "s.tar"), 30))
    url, index, offset, key = scanned[0]["__where__"]  # sample 30
    assert (index, key) == (30, "k000030") and offset > 0
    assert [s["__key__"] for s in tar_samples(url, 32, (index, offset, key))] == [s["__key__"] for s in scanned[2:]]
    stale = (index, offset + 512, key)  # points into the middle of a sample: rejected, scanned instead
    assert [s["__key__"] for s in tar_samples(url, 32, stale)] == [s["__key__"] for s in scanned[2:]]


def write_mixed_shard(path: Path, count: int, text_every: int = 3) -> None:
    """Image samples `i*` and, every `text_every`-th one, text-only samples `t*` (no image, no
    <image>), with answers of varied length."""
    rng, samples = random.Random(1), []
    for index in range(count):
        sample = image_sample(rng, f"i{index:05d}")  # drawn for text-only slots too: the same rng sequence
        if not index % text_every:
            sample = text_sample(f"t{index:05d}", " ".join(["red"] * rng.randint(1, 6)))
        samples.append(sample)
    write_tar(path, samples)


def grouped_batches(pattern: str, rank: int, world: int, workers: int = 2, grouped: bool = True):
    data = compose(
        [
            "experiment=toy",
            f"data.urls={pattern}",
            f"data.num_workers={workers}",
            "data.shuffle_block=14",  # grouping windows of 4 batches of 4 (the block rounded up)
            f"data.group_by_modality_length={str(grouped).lower()}",
        ]
    ).data
    return build_train_batches(data, TOKENIZER, TRANSFORM, 9, dp_rank=rank, dp_size=world, batch_size=4, seed=3)


def is_mixed(keys: list[str]) -> bool:
    return len({key.replace("skipped:", "")[0] for key in keys}) > 1


def test_modality_grouping_keeps_every_sample_once_in_batches_of_one_modality(tmp_path):
    write_mixed_shard(tmp_path / "mixed-0.tar", 160)  # 4 slots x 40: 10 batches each, windows of 4, 4, 2
    pattern = str(tmp_path / "mixed-{0..0}.tar")
    per_rank = []
    for rank in (0, 1):
        batches = grouped_batches(pattern, rank, world=2)
        per_rank.append([next(batches)["keys"] for _ in range(batches.batches_per_epoch)])
        batches.close()
    assert [len(epoch) for epoch in per_rank] == [20, 20]  # every rank runs the same number of steps
    seen = [key for epoch in per_rank for keys in epoch for key in keys]
    assert sorted(seen) == sorted({*seen}) and len(seen) == 160  # each sample once: no leftover dropped
    mixed = sum(is_mixed(keys) for epoch in per_rank for keys in epoch)
    assert mixed <= 4 * 3  # at most one mixed batch per window: 4 slots x 3 windows
    ungrouped = grouped_batches(pattern, 0, world=2, grouped=False)
    assert sum(is_mixed(next(ungrouped)["keys"]) for _ in range(20)) >= 15  # the data is mixed: 18 of 20
    ungrouped.close()


def test_modality_grouping_resumes_exactly_anywhere(tmp_path):
    write_mixed_shard(tmp_path / "mixed-0.tar", 80)  # 1 rank x 2 workers x 10 batches per epoch
    pattern = str(tmp_path / "mixed-{0..0}.tar")
    reference = grouped_batches(pattern, 0, world=1)
    expected = [next(reference)["keys"] for _ in range(30)]  # one and a half epochs
    reference.close()
    assert sum(not is_mixed(keys) for keys in expected) >= 20  # at most one mixed batch per window
    for stop in (6, 9, 20, 23):  # per worker: mid-window; one mid-window, one at its end; epoch end; epoch 2
        first = grouped_batches(pattern, 0, world=1)
        taken = [next(first)["keys"] for _ in range(stop)]
        state = first.state_dict()
        first.close()
        resumed = grouped_batches(pattern, 0, world=1)
        resumed.load_state_dict(state)
        taken += [next(resumed)["keys"] for _ in range(30 - stop)]
        resumed.close()
        assert taken == expected, f"resumed after batch {stop}"
