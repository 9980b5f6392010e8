"""Video: decoding and frame sampling (data/video.py), video samples through the pipeline with their
skips and token budget, the model's video inputs, and ZeRO-3 with one rank on video and one on text."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from PIL import Image

from tests.video_helpers import encoder_for, model_inputs, one_rank_batches, toy_video_setup
from vlm_train.data.video import DecodeTimeout, VideoError, VideoReader, VideoSource, sample_indices, time_instruction

SHADES = [i * 20 for i in range(10)]  # frame i is a flat grey of SHADES[i]: which frame was read shows


def grey_frames(count: int, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (shade,) * 3) for shade in SHADES[:count]]


def video_bytes(count: int, container: str = "mp4") -> bytes:
    from vlm_train.data.synthetic_video import encode_video

    return encode_video(grey_frames(count), fps=4, container=container)


def empty_video() -> bytes:
    """A well-formed mp4 with a video stream and no frames."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_frames_are_sampled_as_llava_video_samples_them():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(32, 32) == list(range(32))
    assert len(set(sample_indices(1000, 64))) == 64


@pytest.mark.parametrize("kind", ["mp4", "webm", "frames"])
def test_videos_decode_to_evenly_sampled_tower_sized_frames(kind):
    """10 frames at 4 fps, 4 read: frames 0, 3, 6, 9 (their grey levels show which), resized to
    the tower's 16 px, at 0, 0.75, 1.5 and 2.25 s of a 2.5 s video."""
    if kind == "frames":
        video = VideoSource(frames=[png(f) for f in grey_frames(10)], fps=4.0)
    else:
        video = VideoSource(file=video_bytes(10, kind))
    clip = VideoReader(16, timeout_s=30).read(video, 4)
    assert clip.frames.shape == (4, 3, 16, 16) and clip.frames.dtype == torch.uint8
    levels = clip.frames.float().mean(dim=(1, 2, 3)).tolist()
    assert levels == pytest.approx([SHADES[i] for i in (0, 3, 6, 9)], abs=4)  # codec rounding only
    assert clip.times == pytest.approx([0.0, 0.75, 1.5, 2.25]) and clip.duration == pytest.approx(2.5)
    assert time_instruction(clip) == (
        "The video lasts for 2.50 seconds, and 4 frames are uniformly sampled from it. "
        "These frames are located at 0.00s,0.75s,1.50s,2.25s.Please answer the following questions related to this video."
    )


def test_corrupt_truncated_and_empty_videos_are_video_errors_and_slow_ones_time_out():
    whole = video_bytes(10)
    reader = VideoReader(16, timeout_s=30)
    for bad in (whole[: len(whole) // 2], whole[:64], b"not a video" * 20, empty_video(), b""):
        with pytest.raises(VideoError):
            reader.read(VideoSource(file=bad), 4)
    with pytest.raises(VideoError, match="no frames"):
        reader.read(VideoSource(frames=[]), 4)
    with pytest.raises(DecodeTimeout, match="decode_timeout_s"):
        VideoReader(16, timeout_s=1e-9).read(VideoSource(file=whole), 4)


# --- video samples through the pipeline ------------------------------------------------------------


def video_record(question: str = "which way does the red circle move ?", answer: str = "up", **extra) -> bytes:
    turns = [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]
    return json.dumps({"conversations": turns, **extra}).encode()


def mixed_samples() -> list[dict]:
    """Good and bad video samples, an image sample and a text-only sample."""
    from tests.helpers import image_sample, text_sample

    good = video_bytes(10)
    frames = {f"frame.{i}.png": png(f) for i, f in enumerate(grey_frames(6))}
    return [
        {"__key__": "mp4", "mp4": good, "json": video_record()},
        {"__key__": "frames", **frames, "json": video_record(fps=2)},
        {"__key__": "truncated", "mp4": good[: len(good) // 2], "json": video_record()},
        {"__key__": "garbage", "webm": b"\x1aE\xdf\xa3 not really" * 10, "json": video_record()},
        {"__key__": "empty", "mp4": empty_video(), "json": video_record()},
        {"__key__": "two_markers", "mp4": good, "json": video_record("<video> which way ?")},
        image_sample(random.Random(0), "image"),
        text_sample("text"),
    ]


FRAMES_READ = {"mp4": 8, "frames": 6}  # the good videos' frames: data.max_frames=8 of 10, and all 6


def test_video_samples_become_video_slots_and_bad_ones_counted_skips(tmp_path):
    """Through the real pipeline (shards, loader, collate) into the model: each good video's frames
    (all up to data.max_frames=8) fill its slots; corrupt, truncated and empty videos and a second
    <video> marker are counted skips; images and text-only samples ride in the same batches."""
    from tests.helpers import write_tar
    from vlm_train.data.pipeline import REASON_INDEX

    write_tar(tmp_path / "part-0.tar", mixed_samples())
    cfg, tokenizer, model = toy_video_setup(f"data.urls={tmp_path}/part-0.tar", "data.num_workers=1")
    batches = one_rank_batches(cfg, tokenizer, model, batch_size=4)
    first, second = next(batches), next(batches)
    batches.close()
    skipped = first["skipped_by_reason"] + second["skipped_by_reason"]
    assert int(skipped[REASON_INDEX["bad_video"]]) == 3 and int(skipped[REASON_INDEX["image_token_mismatch"]]) == 1
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    seen = []
    for batch in (first, second):
        with_video = [k.removeprefix("skipped:") for k in batch["keys"] if k.removeprefix("skipped:") in FRAMES_READ]
        frames = batch["video_frames"].tolist() if with_video else []
        assert frames == [FRAMES_READ[k] for k in with_video], (batch["keys"], frames)  # in slot order
        slots = int((batch["input_ids"] == video_id).sum())
        assert slots == sum(model.anyres.video_tokens(n) for n in frames) > 0
        assert torch.isfinite(model(**model_inputs(batch)).loss)
        seen += batch["keys"]
    assert {"mp4", "frames", "image", "text"} <= set(seen)


def test_over_budget_videos_lose_frames_or_are_dropped(tmp_path):
    """data.max_visual_tokens=20 with 4 tokens a frame (+1 newline): 8 frames (33 tokens) are cut
    in 10% steps to the 4 that fit (17); with over_visual_budget=drop the sample is a counted skip."""
    cfg, tokenizer, model = toy_video_setup("data.max_visual_tokens=20")
    sample = {"__key__": "v", "mp4": video_bytes(10), "json": video_record()}
    key, _, encoded = encoder_for(cfg, tokenizer, model).encode(sample)
    assert encoded.video_frames == [4] and encoded.videos.shape[0] == 4
    assert encoded.input_ids.count(tokenizer.convert_tokens_to_ids("<video>")) == 17
    cfg, tokenizer, model = toy_video_setup("data.max_visual_tokens=20", "data.over_visual_budget=drop")
    assert encoder_for(cfg, tokenizer, model).encode(sample).reason == "visual_budget"


def test_video_samples_without_data_video_are_counted_skips(tmp_path):
    from vlm_train.data.samples import SampleEncoder
    from vlm_train.train import image_tokens, image_transform

    cfg, tokenizer, model = toy_video_setup("data.video=false")
    encoder = SampleEncoder(cfg.data, tokenizer, image_transform(model), image_tokens(model))
    skipped = encoder.encode({"__key__": "v", "mp4": video_bytes(4), "json": video_record()})
    assert skipped.reason == "bad_video"


def test_time_instruction_goes_after_the_video_marker_as_llava_video_puts_it():
    from vlm_train.data.video import Clip

    cfg, tokenizer, model = toy_video_setup("data.video_timestamps=true")
    clip = Clip(torch.zeros(2, 3, 48, 48, dtype=torch.uint8), [0.0, 1.0], 2.0)
    turns = [{"from": "human", "value": "<video>\nwhich way ?"}, {"from": "gpt", "value": "up"}]
    (ask, answer) = encoder_for(cfg, tokenizer, model).with_time_instruction(turns, [clip])
    assert ask["value"] == f"<video>\n{time_instruction(clip)}\n\nwhich way ?" and answer == turns[1]


# --- the model: one tower call per batch, the pipeline's layout is Hugging Face's ---------------------


def test_images_videos_and_text_take_one_tower_call_per_batch():
    """Whatever a micro-batch holds, the tower runs once: under ZeRO-3 every call gathers its
    parameters, so a rank making a second call (for its videos) would wait on the others forever."""
    cfg, tokenizer, model = toy_video_setup()
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    encoder = encoder_for(cfg, tokenizer, model)
    from tests.helpers import image_sample, text_sample
    from vlm_train.data.samples import collate

    video = encoder.encode({"__key__": "v", "mp4": video_bytes(6), "json": video_record()})
    image = encoder.encode(image_sample(random.Random(0), "i"))
    text = encoder.encode(text_sample("t"))
    for samples in ([video], [video, image], [text], [image, text], [video, text, image]):
        calls.clear()
        model(**model_inputs(collate(samples, tokenizer.pad_token_id)))
        assert len(calls) == 1, [key for key, _, _ in samples]


def test_frames_of_videos_of_different_lengths_are_read_as_each_video_alone():
    """The pipeline's [sum F, C, H, W] + video_frames gives each sample the logits it has alone, and
    the same as Hugging Face's [V, F, C, H, W] when the lengths agree."""
    torch.manual_seed(0)
    cfg, tokenizer, model = toy_video_setup()
    model.eval()
    video_id, grid = tokenizer.convert_tokens_to_ids("<video>"), model.anyres
    frames = {
        3: torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8),
        5: torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8),
    }
    rows = {n: [2, video_id] + [video_id] * (grid.video_tokens(n) - 1) + [7, 8] for n in frames}
    width = max(map(len, rows.values()))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows.values()])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows.values()])
    together = model(
        None, ids, mask, pixel_values_videos=torch.cat(list(frames.values())), video_frames=torch.tensor([3, 5])
    ).logits
    for row, n in enumerate(frames):
        alone = model(None, ids[row : row + 1, : len(rows[n])], pixel_values_videos=frames[n][None]).logits
        torch.testing.assert_close(together[row, : len(rows[n])], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="video_frames"):
        model(None, ids, mask, pixel_values_videos=torch.cat(list(frames.values())), video_frames=torch.tensor([3, 4]))


# --- ZeRO-3: one rank on video, the other on text ---------------------------------------------------


@pytest.fixture(scope="module")
def video_and_text_shards(tmp_path_factory) -> str:
    """Two shards of 40: one of video clips, one of text-only samples. With 2 ranks each rank
    reads one whole shard per epoch: at every step one rank has only video, the other only text."""
    from tests.helpers import text_sample, write_tar
    from vlm_train.data.synthetic_video import make_sample

    folder, rng = tmp_path_factory.mktemp("video_text"), random.Random(0)
    clips = [make_sample(rng) for _ in range(40)]
    videos = [{"__key__": f"vid{i:03d}", **m, "json": json.dumps(r).encode()} for i, (m, r) in enumerate(clips)]
    write_tar(folder / "part-0.tar", videos)
    write_tar(folder / "part-1.tar", [text_sample(f"txt{i:03d}") for i in range(40)])
    return str(folder / "part-{0..1}.tar")


@pytest.mark.slow
def test_zero3_trains_20_steps_with_one_rank_on_video_and_one_on_text(video_and_text_shards, tmp_path):
    """2 ranks, ZeRO-3, the tower trained too: no hang (the launch would time out), every step
    logged, visual tokens from the video rank only (imbalance 2.0: max over mean of 2 ranks)."""
    from tests.helpers import read_metrics, run_cli

    overrides = [
        "experiment=toy-video",
        "data.max_frames=8",  # clips of 8 frames (the toy preset reads 2)
        f"data.urls={video_and_text_shards}",
        f"run.dir={tmp_path / 'run'}",
        "parallel.zero_stage=3",
        "parallel.zero3_persistence_threshold=0",  # every parameter sharded (the toy's are all small)
        "vision.freeze=false",
        "data.num_workers=1",
        "data.shuffle_block=8",
        "train.micro_batch_size=4",
        "train.max_steps=20",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
    ]
    result = run_cli(overrides, nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 21))
    per_clip = 8 * 4 + 1  # 8 frames of 2 x 2 pooled tokens, and the newline
    assert all(r["visual_tokens"] == 4 * per_clip and r["visual_tokens_imbalance"] == 2.0 for r in records)


# --- kill -9 with variable token counts ------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_size_shards(tmp_path_factory) -> str:
    """Two shards of 24, each a mix of AnyRes scenes at five sizes (different tile and token counts),
    video clips and text-only samples: every micro-batch has its own visual-token count."""
    from tests.helpers import text_sample, write_tar
    from vlm_train.data import synthetic, synthetic_video

    folder, rng = tmp_path_factory.mktemp("mixed_sizes"), random.Random(1)
    for part in range(2):
        samples = []
        for i in range(24):
            key = f"p{part}-{i:03d}"
            if i % 3 == 0:
                png_bytes, record = synthetic.make_sample(rng, layout="sizes")
                samples.append({"__key__": key, "png": png_bytes, "json": json.dumps(record).encode()})
            elif i % 3 == 1:
                members, record = synthetic_video.make_sample(rng)
                samples.append({"__key__": key, **members, "json": json.dumps(record).encode()})
            else:
                samples.append(text_sample(key))
        write_tar(folder / f"part-{part}.tar", samples)
    return str(folder / "part-{0..1}.tar")


def mixed_run_overrides(urls: str, run_dir) -> list[str]:
    return [
        "experiment=toy-video",
        "data.max_frames=8",  # clips of 8 frames (the toy preset reads 2)
        f"data.urls={urls}",
        f"run.dir={run_dir}",
        f"data.log_keys={run_dir}/keys",
        "parallel.zero_stage=2",
        "train.precision=fp32",
        "data.num_workers=1",
        "data.shuffle_block=8",
        "train.micro_batch_size=4",
        "data.max_tokens_per_batch=200",  # 1-2 forwards a batch: token-budget batching resumes exactly too
        "train.max_steps=10",
        "train.save_every=2",
        "train.log_every=1",
        "train.eval=false",
    ]


@pytest.mark.slow
def test_kill_9_with_images_of_many_sizes_and_videos_resumes_bit_identical(mixed_size_shards, tmp_path):
    """2 ranks, a 200-token budget per forward; the whole job SIGKILLed after step 5; the restart
    resumes (step 4) and every step it logs has the uninterrupted run's loss, and each rank reads the
    same samples in the same order."""
    import os
    import signal
    import subprocess
    import time

    from tests.helpers import REPO, read_metrics, run_cli, step_losses, torchrun

    reference = tmp_path / "whole"
    result = run_cli(mixed_run_overrides(mixed_size_shards, reference), nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / "killed"
    command = torchrun(2, "-m", "vlm_train.train", *mixed_run_overrides(mixed_size_shards, killed))
    job = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while 5 not in (step_losses(killed) if (killed / "metrics.jsonl").exists() else {}):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended (or hung) before step 5"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert (killed / "checkpoints" / "latest").read_text() in ("step_4", "step_6")
    result = run_cli(mixed_run_overrides(mixed_size_shards, killed), nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    expected = step_losses(reference)
    records = [r for r in read_metrics(killed) if "loss" in r]
    assert sorted({r["step"] for r in records}) == list(range(1, 11))
    assert all(r["loss"] == expected[r["step"]] for r in records), (records, expected)
    assert len({r["visual_tokens"] for r in read_metrics(reference) if "loss" in r}) > 3  # token counts vary
    assert len({r["forwards"] for r in records}) > 1  # so do the forwards a step needs
    for rank in (0, 1):
        whole = (reference / "keys" / f"keys-rank{rank}.txt").read_text().splitlines()
        resumed = (killed / "keys" / f"keys-rank{rank}.txt").read_text().splitlines()
        assert resumed[-6:] == whole[-6:]  # steps 5-10 after the restart: the same samples in order
