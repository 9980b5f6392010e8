"""Throughput honesty: data_stall and visual-token imbalance in metrics.jsonl, the stall warning with
the loader workers that remove the stall (real CLI, a deliberately slow loader), and MFU's FLOP
count against torch's FlopCounterMode on the toy model."""

from __future__ import annotations

import random
import re
import statistics

import pytest
import torch

from tests.helpers import image_sample, read_metrics, run_cli, text_sample, toy_model, toy_overrides, write_tar
from vlm_train.data.pipeline import SLOW_DATA_ENV
from vlm_train.models.vlm import IGNORE_INDEX
from vlm_train.training.flops import TrainingFlops
from vlm_train.training.stall import StallWarning, data_stall, workers_to_remove_stall

STALL_LINE = re.compile(
    r"warning: logged steps up to (\d+) waited on data for (\d+)% .* about data\.num_workers=(\d+) per rank"
)


def steady_stall(run_dir) -> float:
    """Median data_stall after the loader's start-up steps."""
    return statistics.median(r["data_stall"] for r in read_metrics(run_dir) if "loss" in r and r["step"] > 3)


def test_a_slow_loader_shows_as_data_stall_and_the_suggested_workers_remove_it(toy_data, tmp_path, monkeypatch):
    """0.06 s per sample (a sleep: more workers overlap it even on 2 cores) with one worker stalls
    most of each step; the warning names a worker count, and a run with that many stalls far less."""
    monkeypatch.setenv(SLOW_DATA_ENV, "0.06")  # 0.03 gave a 33% stall once under the full suite's load
    slow = run_cli(toy_overrides(toy_data, tmp_path / "slow", "train.max_steps=8"))
    assert slow.returncode == 0, slow.stderr[-3000:]
    warnings = STALL_LINE.findall(slow.stdout)
    assert len(warnings) == 1, slow.stdout[-3000:]  # once per run
    step, percent, workers = (int(x) for x in warnings[0])
    assert step == 4 and percent > 50  # judged on logged steps 2-4
    slow_stall = steady_stall(tmp_path / "slow")
    assert slow_stall > 0.5
    assert 2 <= workers <= 32

    enough = run_cli(toy_overrides(toy_data, tmp_path / "enough", "train.max_steps=14", f"data.num_workers={workers}"))
    assert enough.returncode == 0, enough.stderr[-3000:]
    assert steady_stall(tmp_path / "enough") < slow_stall / 2


def test_a_single_rank_run_records_no_imbalance_and_a_stall_fraction(toy_data, tmp_path):
    result = run_cli(toy_overrides(toy_data, tmp_path / "run", "train.max_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(r["visual_tokens_imbalance"] == 1.0 for r in records)
    assert all(0.0 <= r["data_stall"] <= 1.0 for r in records)


def test_visual_token_imbalance_on_two_ranks_with_different_image_counts(tmp_path):
    """Two shards, one of image samples and one alternating image and text-only samples: with two
    data-parallel ranks each reads one shard, so a step's micro-batches of 2 hold 2 and k images
    (k = 0, 1, 2): max/mean = 2 / ((2 + k) / 2), i.e. 2, 4/3 or 1."""
    rng = random.Random(0)
    write_tar(tmp_path / "part-000.tar", [image_sample(rng, f"i{n:03d}") for n in range(16)])
    mixed = [image_sample(rng, f"m{n:03d}") if n % 2 else text_sample(f"t{n:03d}") for n in range(16)]
    write_tar(tmp_path / "part-001.tar", mixed)
    overrides = [
        "experiment=toy",
        f"data.urls={tmp_path}/part-{{000..001}}.tar",
        f"run.dir={tmp_path / 'run'}",
        "data.num_workers=1",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
        "train.max_steps=6",
    ]
    result = run_cli(overrides, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    imbalance = [round(r["visual_tokens_imbalance"], 6) for r in records]
    assert len(imbalance) == 6 and set(imbalance) <= {2.0, 1.333333, 1.0} and len(set(imbalance)) > 1, imbalance


def test_stall_arithmetic():
    assert data_stall(0.3, 1.0) == pytest.approx(0.3)
    # one busy worker, a 1 s step of which 0.75 s waiting: the compute (0.25 s) needs 4 workers' pace
    assert workers_to_remove_stall(1, 0.75, 1.0) == 4
    # no workers: 0.6 s of loading in the main process over 0.2 s of compute -> 3 overlapping workers
    assert workers_to_remove_stall(0, 0.6, 0.8) == 3
    warning = StallWarning(workers=2, ranks_per_node=1)
    assert warning.message(1, 0.9, 1.0) is None  # the first step includes the loader's start-up
    assert warning.message(2, 0.1, 1.0) is None  # one slow batch is not judged alone ...
    assert warning.message(3, 0.0, 1.0) is None
    assert warning.message(4, 0.0, 1.0) is None  # ... and over three steps it is 3%
    quiet = StallWarning(workers=2, ranks_per_node=1)
    assert all(quiet.message(step, 0.04, 1.0) is None for step in range(1, 10))  # under 5%
    slow = StallWarning(workers=2, ranks_per_node=1)
    messages = [slow.message(step, 0.5, 1.0) for step in range(1, 7)]
    assert messages[:3] == [None] * 3 and "data.num_workers=4 per rank" in (messages[3] or "")
    assert messages[4:] == [None, None]  # once per run


def test_training_flops_agree_with_torchs_flop_counter_on_the_toy_model():
    """The convention's count (flops.py) against torch's own FlopCounterMode over a real forward and
    backward of the toy VLM (tower frozen: forward only; connector and decoder train), per component,
    on unpadded rows so that every token attends the full causal square it is charged for (the math
    SDPA backend: attention counted as its matmuls). The convention charges biases and norm scales
    as matmul weights, which FlopCounterMode does not count: 5% on the 64-wide toy tower, where they
    are a large share of its weights; 1% on the decoder."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = toy_model()
    torch.manual_seed(0)
    ids = torch.randint(5, model.llm.vocab_size - 1, (2, 64))
    ids[:, 1 : 1 + model.num_image_tokens] = model.image_token_id
    labels = ids.clone()
    labels[:, : 1 + model.num_image_tokens] = IGNORE_INDEX
    pixels = torch.rand(2, 3, model.vision.image_size, model.vision.image_size)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(**batch).loss_sum.backward()
    measured = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    flops = TrainingFlops.of(model)
    forward = flops.forward_flops(images=2, tokens=128.0, tokens_squared=2 * 64.0**2)
    tower, connector, llm = (f * m for f, m in zip(forward, flops.multipliers))
    assert tower == pytest.approx(measured["VisionLanguageModel.vision"], rel=0.05)
    # 3x forward by the convention (as Megatron counts 6N per token); autograd skips one matmul of
    # that: the first projector layer's input gradient, as the frozen tower's features need none
    skipped = 2 * model.connector[0].weight.numel() * model.vision.num_features * 2  # 2 images
    assert connector == measured["VisionLanguageModel.connector"] + skipped
    assert llm == pytest.approx(measured["VisionLanguageModel.llm"], rel=0.01)
    assert flops(batch) == pytest.approx(measured["Global"] + skipped, rel=0.01)
