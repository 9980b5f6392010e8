"""A weighted mixture of sources: proportions follow the weights, each source cycles through its own
epochs without repeats, and a mid-stream resume continues the same sequence."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import TOKENIZER, TRANSFORM, image_sample, write_tar
from vlm_train import compose
from vlm_train.data.pipeline import build_train_batches
from vlm_train.data.sources import MIX_BLOCK, MixSchedule
from vlm_train.errors import ConfigError


def write_source(folder: Path, prefix: str, sizes: list[int]) -> str:
    rng = random.Random(prefix)
    folder.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        write_tar(folder / f"{shard}.tar", [image_sample(rng, f"{prefix}{shard}-{index:03d}") for index in range(size)])
    return str(folder / f"{{0..{len(sizes) - 1}}}.tar")


def mixture_batches(tmp_path: Path, workers: int = 0):
    a = write_source(tmp_path / "a", "a", [40, 40]) if not (tmp_path / "a").exists() else str(tmp_path / "a/{0..1}.tar")
    b = write_source(tmp_path / "b", "b", [40]) if not (tmp_path / "b").exists() else str(tmp_path / "b/{0..0}.tar")
    overrides = ["experiment=toy", f"data.urls={a}", "data.weight=3", f"data.mixture=[{{urls: '{b}', weight: 1}}]"]
    data = compose([*overrides, f"data.num_workers={workers}", "data.shuffle_block=16"]).data
    return build_train_batches(data, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=4, seed=0)


def test_mixture_follows_the_weights_and_cycles_each_source(tmp_path):
    batches = mixture_batches(tmp_path)
    keys = [k for _ in range(MIX_BLOCK // 4) for k in next(batches)["keys"]]
    by_source = Counter(key[0] for key in keys)
    assert by_source == {"a": 750, "b": 250}  # exact per block of MIX_BLOCK samples
    first_half = Counter(key[0] for key in keys[:400])
    assert abs(first_half["a"] / 400 - 0.75) < 0.05  # and spread through it, not in runs
    a_keys, b_keys = [k for k in keys if k[0] == "a"], [k for k in keys if k[0] == "b"]
    for source_keys, size in ((a_keys, 80), (b_keys, 40)):
        for epoch in range(len(source_keys) // size):  # every source epoch: each sample once
            assert len(set(source_keys[epoch * size : (epoch + 1) * size])) == size


def test_mixture_resumes_mid_stream(tmp_path):
    reference = mixture_batches(tmp_path, workers=2)
    expected = [next(reference)["keys"] for _ in range(40)]
    first = mixture_batches(tmp_path, workers=2)
    head = [next(first)["keys"] for _ in range(23)]
    resumed = mixture_batches(tmp_path, workers=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [next(resumed)["keys"] for _ in range(17)] == expected


def test_schedule_counts_are_a_closed_form():
    schedule = MixSchedule([0.2, 0.5, 0.3], seed=1, slot=3)
    sources = schedule.sources_from(0)
    counts = [0, 0, 0]
    for position in range(3000):
        if position in (0, 999, 1000, 1777, 2999):
            assert schedule.consumed(position) == counts
        counts[next(sources)] += 1
    assert counts == [600, 1500, 900]  # three whole blocks


def test_bad_mixture_weights_are_config_errors():
    with pytest.raises(ConfigError, match="weight"):
        compose(["experiment=toy", "data.urls=x", "data.mixture=[{urls: y, weight: 0}]"])
    with pytest.raises(ConfigError, match="max_skip_fraction"):
        compose(["experiment=toy", "data.urls=x", "data.max_skip_fraction=1.5"])
    with pytest.raises(ConfigError, match="packing needs the Hugging Face decoder"):
        compose(["experiment=toy", "data.urls=x", "data.packing=true", "llm.backend=megatron"])
