"""End-to-end runs through the real CLI: DeepSpeed ZeRO 0-3 on 2 gloo ranks agree, a resumed run
continues the loss curve exactly, and user mistakes end in one line, not a traceback."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics, run_cli, step_losses, toy_overrides

pytestmark = pytest.mark.slow


def test_zero_stages_match_on_two_ranks(toy_data, tmp_path):
    """fp32, same seed and data: per-step losses of ZeRO 1, 2, 3 equal ZeRO 0 within 1e-3 relative."""
    losses = {}
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path / f"zero{stage}"
        # ZeRO-3 also evaluates: greedy decoding on 2 ranks must keep their parameter gathers in step
        evaluation = ("train.eval=true", "data.eval_samples=8", "data.max_new_tokens=4") if stage == 3 else ()
        result = run_cli(
            toy_overrides(
                toy_data,
                run_dir,
                f"parallel.zero_stage={stage}",
                "train.max_steps=4",
                "train.grad_accum=2",
                "train.precision=fp32",
                "vision.freeze=false",
                *evaluation,
            ),
            nproc=2,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        losses[stage] = step_losses(run_dir)
        assert sorted(losses[stage]) == [1, 2, 3, 4]
    assert "eval_accuracy" in read_metrics(tmp_path / "zero3")[-1]
    for stage in (1, 2, 3):
        for step, reference in losses[0].items():
            assert losses[stage][step] == pytest.approx(reference, rel=1e-3), (stage, step)
    assert losses[0][4] < losses[0][1]


def test_loss_is_token_weighted_across_micro_batches(toy_data, tmp_path):
    """8 samples as one micro-batch or as 2 accumulated micro-batches of 4: the same loss and the
    same update (a mean of per-micro-batch means would differ when answer lengths differ)."""
    runs = {}
    for micro, accum in ((8, 1), (4, 2)):
        run_dir = tmp_path / f"mb{micro}"
        overrides = toy_overrides(
            toy_data,
            run_dir,
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            "train.max_steps=3",
            "train.precision=fp32",
        )
        result = run_cli(overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[micro] = step_losses(run_dir)
    for step in (1, 2, 3):
        assert runs[4][step] == pytest.approx(runs[8][step], rel=1e-5), step


def test_resume_continues_the_loss_curve_exactly(toy_data, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ("train.max_steps=6", "train.save_every=3", "train.precision=fp32", "data.num_workers=2")
    result = run_cli(toy_overrides(toy_data, whole, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (whole / "checkpoints" / "latest").read_text() == "step_6"

    # The same run, stopped after its step-3 checkpoint: only what existed then is kept.
    resumed.mkdir()
    shutil.copytree(whole / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    shutil.copy(whole / "config.yaml", resumed / "config.yaml")
    result = run_cli(toy_overrides(toy_data, resumed, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    expected, got = step_losses(whole), step_losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_non_finite_loss_skips_the_step_then_stops(toy_data, tmp_path, monkeypatch):
    """A NaN loss on one rank skips the step on both: weights unchanged, schedule advanced, counted.
    ZeRO-2 takes DeepSpeed's own overflow path (non-finite gradient norm), ZeRO-3 ours (the optimizer
    update is cancelled). Past train.max_bad_steps the run stops (exit 3), the last checkpoint kept."""
    from vlm_train.training.checkpoint import consolidated_state_dict

    common = ("train.save_every=1", "train.keep_last=0", "train.precision=fp32", "train.max_bad_steps=1")
    runs = {2: ("3", "train.max_steps=4"), 3: ("3,5", "train.max_steps=6")}
    for stage, (nan_steps, max_steps) in runs.items():
        monkeypatch.setenv("VLM_TRAIN_NAN_STEPS", nan_steps)
        run_dir = tmp_path / f"zero{stage}"
        result = run_cli(toy_overrides(toy_data, run_dir, f"parallel.zero_stage={stage}", max_steps, *common), nproc=2)
        records = {r["step"]: r for r in read_metrics(run_dir)}
        assert records[3]["loss"] is None and records[3]["bad_steps"] == 1
        assert records[4]["loss"] > 0 and records[4]["bad_steps"] == 1
        checkpoints = run_dir / "checkpoints"
        before, after = (consolidated_state_dict(checkpoints / f"step_{s}", stage) for s in (2, 3))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        if stage == 2:
            assert result.returncode == 0, result.stderr[-3000:]
    assert result.returncode != 0  # each rank exits 3; torchrun reports a failed child as 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("vlm-train: error:")]
    assert len(set(errors)) == 1 and "2 steps had a non-finite loss" in errors[0]  # the same line on each rank
    assert (tmp_path / "zero3" / "checkpoints" / "latest").read_text() == "step_4"
    lr = {stage: [r["lr"] for r in read_metrics(tmp_path / f"zero{stage}")[:4]] for stage in runs}
    assert lr[2] == lr[3]  # both paths keep the LR schedule in step with the trainer


def _shard_with_broken_images(source: Path, target: Path, every: int) -> Path:
    """A copy of a toy shard whose every `every`-th image is bytes no decoder accepts."""
    import tarfile

    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for index, member in enumerate(m for m in src.getmembers() if m.isfile()):
            data = src.extractfile(member).read()
            if member.name.endswith(".png") and (index // 2) % every == 0:
                data = b"not an image"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return target


def test_bad_samples_are_counted_by_reason_and_too_many_abort(toy_data, tmp_path):
    shard = _shard_with_broken_images(toy_data / "train-000000.tar", tmp_path / "broken-000000.tar", every=2)
    common = (f"data.urls={shard}", "train.micro_batch_size=8", "train.max_steps=8")  # one epoch
    tolerant = tmp_path / "tolerant"
    result = run_cli(toy_overrides(toy_data, tolerant, *common, "data.max_skip_fraction=0.6"))
    assert result.returncode == 0, result.stderr[-3000:]
    last = read_metrics(tolerant)[-1]
    assert last["data_skipped"] == last["data_skipped_bad_image"] == 32  # all 64 read once, every 2nd broken
    assert "skipping sample" in result.stderr  # each key is logged at warning level

    strict = run_cli(toy_overrides(toy_data, tmp_path / "strict", *common, "data.max_skip_fraction=0.1"))
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    errors = [line for line in strict.stderr.splitlines() if line.startswith("vlm-train: error:")]
    assert len(errors) == 1 and "bad_image" in errors[0] and "data.max_skip_fraction=0.1" in errors[0], strict.stderr


def test_toy_run_writes_the_run_dir_and_evaluates(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        toy_overrides(
            toy_data, run_dir, "train.max_steps=3", "train.eval=true", "data.eval_samples=8", "data.max_new_tokens=4"
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    train_records = [r for r in records if "loss" in r]
    assert {"step", "loss", "lr", "samples_per_s", "tokens_per_s"} <= set(train_records[0])
    phases = ("data_wait_s", "forward_s", "backward_s", "optimizer_s")
    for record in train_records:
        assert 0 < sum(record[p] for p in phases) <= record["step_s"] * 1.001
        assert 0 < record["mfu"] < 1  # model FLOPs over the measured matmul peak of this CPU
    assert "eval_accuracy" in records[-1] and "eval_loss" in records[-1]
    assert (run_dir / "config.yaml").read_text().startswith("vision:")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_3"


def test_bf16_run_with_offline_wandb(toy_data, tmp_path):
    """bf16 through DeepSpeed's bf16 path on CPU, ZeRO-2, wandb writing locally without network."""
    run_dir = tmp_path / "bf16"
    result = run_cli(
        toy_overrides(
            toy_data,
            run_dir,
            "train.precision=bf16",
            "parallel.zero_stage=2",
            "train.max_steps=2",
            "wandb.mode=offline",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(0 < loss < 10 for loss in losses.values())
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_incompatible_config_in_run_dir_is_refused(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(toy_overrides(toy_data, run_dir, "train.max_steps=1")).returncode == 0
    result = run_cli(toy_overrides(toy_data, run_dir, "train.max_steps=2", "llm.num_layers=3"))
    assert result.returncode != 0
    assert "incompatible config" in result.stderr and "llm" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.no_such_key=1"], "no_such_key"),
        (["parallel.zero_stage=5"], "parallel.zero_stage=5 is out of range"),
        (["experiment=no_such_experiment"], "no_such_experiment"),
        (["parallel.tensor_parallel=2"], "does not divide the world size"),
        (["data.urls=/nonexistent/shard-{000..003}.tar"], "matches no shard"),
    ],
)
def test_user_mistakes_exit_with_one_line(overrides, message, tmp_path):
    result = run_cli(["experiment=toy", f"run.dir={tmp_path}", *overrides], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("vlm-train: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_and_exits_with_the_documented_code(signal_name, toy_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from vlm_train.training.signals import EXIT_PREEMPTED

    run_dir = tmp_path / "run"
    overrides = toy_overrides(toy_data, run_dir, "train.max_steps=100000", "train.keep_last=2", "train.save_every=2")
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm_train.train", *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 7):
        time.sleep(0.2)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert f"stopped by {signal_name}" in stderr and "Traceback" not in stderr
    last_step = max(step_losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last_step}"
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(kept) == 2 and f"step_{last_step}" in kept  # train.keep_last=2 pruned the older ones

    resumed = run_cli(toy_overrides(toy_data, run_dir, f"train.max_steps={last_step + 2}", "train.keep_last=2"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{last_step}'}" in resumed.stdout
    assert max(step_losses(run_dir)) == last_step + 2
    assert os.path.exists(run_dir / "checkpoints" / f"step_{last_step + 2}")
