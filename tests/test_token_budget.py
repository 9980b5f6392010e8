"""data.max_tokens_per_batch: loaded micro-batches run as forwards of at most the budget in padded
tokens, with the same loss and gradients, every rank running the same number of forwards."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.video_helpers import model_inputs, one_rank_batches, toy_video_setup
from vlm_train.data.token_budget import groups


def test_rows_are_cut_into_consecutive_groups_within_the_budget():
    assert groups([10, 9, 5, 5, 3], 20) == [(0, 2), (2, 5)]  # 2 x 10, then 3 x 5
    assert groups([10, 9, 5, 5, 3], 10) == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert groups([30, 4], 20) == [(0, 1), (1, 2)]  # a row over the budget goes alone
    assert groups([], 20) == []


def test_a_budget_below_one_sample_is_a_one_line_config_error():
    from vlm_train.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"data.max_tokens_per_batch=32 must hold one sample .*max_length=64"):
        compose(["experiment=toy-video", "data.urls=unused", "data.max_tokens_per_batch=32"])


def mixed_media_shard(path) -> None:
    """16 samples: AnyRes scenes of five sizes, video clips, text-only conversations."""
    from tests.helpers import text_sample, write_tar
    from vlm_train.data import synthetic, synthetic_video

    rng, samples = random.Random(3), []
    for i in range(16):
        if i % 3 == 0:
            png, record = synthetic.make_sample(rng, layout="sizes")
            samples.append({"__key__": f"img{i}", "png": png, "json": json.dumps(record).encode()})
        elif i % 3 == 1:
            members, record = synthetic_video.make_sample(rng)
            samples.append({"__key__": f"vid{i}", **members, "json": json.dumps(record).encode()})
        else:
            samples.append(text_sample(f"txt{i}"))
    write_tar(path, samples)


def first_batch(cfg, tokenizer, model, batch_size: int) -> dict:
    batches = one_rank_batches(cfg, tokenizer, model, batch_size)
    batch = next(batches)
    batches.close()
    return batch


@pytest.mark.parametrize("packing", [False, True])
def test_forwards_of_a_budgeted_batch_add_up_to_the_whole_batch(tmp_path, packing):
    """16 samples of images (several tile counts), videos and text, budget 128 tokens: each forward
    holds at most 128 padded tokens, together they hold every row and media item once, and their
    summed loss and answer tokens are the unbudgeted batch's (the same samples) to 1e-5."""
    from vlm_train.data import token_budget

    mixed_media_shard(tmp_path / "part-0.tar")
    common = [f"data.urls={tmp_path}/part-0.tar", "data.num_workers=0", f"data.packing={packing}"]
    cfg, tokenizer, model = toy_video_setup(*common)
    budgeted_cfg, *_ = toy_video_setup(*common, "data.max_tokens_per_batch=128")
    whole, budgeted = first_batch(cfg, tokenizer, model, 16), first_batch(budgeted_cfg, tokenizer, model, 16)
    assert sorted(whole["keys"]) == sorted(budgeted["keys"])
    forwards = token_budget.forwards(budgeted, 128)
    assert len(forwards) >= 4
    assert all(f["input_ids"].numel() <= 128 for f in forwards)
    assert sum(f["input_ids"].shape[0] for f in forwards) == budgeted["input_ids"].shape[0]
    for name in ("pixel_values", "image_sizes", "video_frames", "pixel_values_videos"):
        assert sum(f[name].shape[0] for f in forwards) == whole[name].shape[0] > 0, name
    with torch.no_grad():
        expected = model(**model_inputs(whole)).loss_sum
        parts = [model(**model_inputs(f)).loss_sum for f in forwards]
    torch.testing.assert_close(sum(parts), expected, rtol=1e-5, atol=1e-5)
    idle = token_budget.idle_forward(forwards[-1])
    with torch.no_grad():
        assert float(model(**model_inputs(idle)).loss_sum) == 0.0


def budget_overrides(urls: str, run_dir, *extra: str) -> list[str]:
    return [
        "experiment=toy-video",
        "data.max_frames=8",  # clips of 8 frames (the toy preset reads 2)
        f"data.urls={urls}",
        f"run.dir={run_dir}",
        "parallel.zero_stage=3",
        "parallel.zero3_persistence_threshold=0",  # every parameter sharded (the toy's are all small)
        "train.precision=fp32",
        "data.num_workers=1",
        "data.shuffle_block=8",
        "train.micro_batch_size=8",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
        *extra,
    ]


@pytest.mark.slow
def test_zero3_with_a_token_budget_trains_as_without_it(tmp_path):
    """2 ranks, ZeRO-3, fp32: one rank reads only video (each batch needs several forwards under a
    128-token budget), the other only text (fewer, so it runs idle ones). No hang, and every step's
    loss is the unbudgeted run's (1e-5): the same gradient, cut into other forwards."""
    from tests.helpers import read_metrics, run_cli, step_losses, text_sample, write_tar
    from vlm_train.data.synthetic_video import make_sample

    rng = random.Random(0)
    clips = [make_sample(rng) for _ in range(48)]
    videos = [{"__key__": f"vid{i:03d}", **m, "json": json.dumps(r).encode()} for i, (m, r) in enumerate(clips)]
    write_tar(tmp_path / "part-0.tar", videos)
    write_tar(tmp_path / "part-1.tar", [text_sample(f"txt{i:03d}") for i in range(48)])
    urls = str(tmp_path / "part-{0..1}.tar")
    plain = run_cli(budget_overrides(urls, tmp_path / "plain"), nproc=2, timeout=400)
    assert plain.returncode == 0, plain.stderr[-3000:]
    budgeted = run_cli(budget_overrides(urls, tmp_path / "budget", "data.max_tokens_per_batch=128"), nproc=2)
    assert budgeted.returncode == 0, budgeted.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "budget") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["forwards"] >= 4 for r in records)  # 8 clips of 45 tokens, at most 2 per forward
    expected = step_losses(tmp_path / "plain")
    for record in records:
        assert record["loss"] == pytest.approx(expected[record["step"]], rel=1e-5, abs=1e-6), record
