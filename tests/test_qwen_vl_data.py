"""Qwen-VL data: images prepared as Qwen's image processor prepares them, a conversation rendered by
the Qwen tokenizer's own chat template with each image's pads, M-RoPE positions per sample as
transformers computes them, bad images counted; and a tiny Qwen2.5-VL trained on 2 ranks at ZeRO-3
on images of many sizes, resumed exactly after kill -9."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import QWEN2_VL_TOKENIZER
from vlm_train.data.native_resolution import NativeResolutionTransform
from vlm_train.models.qwen_vl import QWEN_IMAGE_STATS

SIZES = [(60, 90), (123, 45), (20, 20), (400, 300), (28, 28), (29, 3000)]  # below min_pixels, above max_pixels


def random_image(size_hw: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size_hw, 3), dtype=np.uint8))


def normalised(patches: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(stat).view(1, 3, 1) for stat in QWEN_IMAGE_STATS)
    return ((patches.float().view(len(patches), 3, -1) / 255 - mean) / std).view(len(patches), -1)


def test_patches_are_the_qwen_processors_pixel_values():
    """Each size (one below min_pixels, one above max_pixels, a 1:100 strip) gives the processor's grid
    and, normalised as the tower normalises them, its pixel_values exactly."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    transform = NativeResolutionTransform(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    for seed, size in enumerate(SIZES):
        image = random_image(size, seed)
        expected = processor(images=[image], return_tensors="pt")
        patches = transform(image)
        assert [list(transform.grid_of(size))] == expected["image_grid_thw"].tolist(), size
        assert patches.dtype == torch.uint8 and len(patches) == int(expected["image_grid_thw"].prod())
        assert torch.equal(normalised(patches), expected["pixel_values"]), size
        assert transform.tokens_of(size) * 4 == len(patches)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def qwen_encoder(transform: NativeResolutionTransform | None = None, **data):
    from transformers import AutoTokenizer

    from vlm_train.config import compose
    from vlm_train.data.samples import SampleEncoder

    overrides = ["vision.family=qwen2_5_vl", "data.template=hf", "data.max_length=512"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    cfg = compose(overrides)
    transform = transform or NativeResolutionTransform(max_pixels=28 * 28 * 64)
    tokenizer = AutoTokenizer.from_pretrained(QWEN2_VL_TOKENIZER)
    return SampleEncoder(cfg.data, tokenizer, transform, transform.tokens_of), tokenizer, transform


def two_image_sample(sizes=((60, 90), (123, 45))) -> dict:
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is left? <image>\nAnd right?"},
            {"from": "gpt", "value": "A cat and a dog."},
        ]
    }
    images = {f"{i}.png": png(random_image(size, i)) for i, size in enumerate(sizes)}  # <key>.<n>.png
    return {"__key__": "two", **images, "json": json.dumps(record).encode()}


def test_a_sample_becomes_qwens_vision_spans_with_its_grids_and_positions():
    """Two images of different sizes: each becomes <|vision_start|>, its tokens_of(size) pads,
    <|vision_end|> in the chat template's text; the patches and grids are the images' in slot order;
    the positions are transformers' get_rope_index of the sample; the labels are the answer only."""
    import transformers

    encoder, tokenizer, transform = qwen_encoder()
    key, patches, encoded = encoder.encode(two_image_sample())
    start, pad, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    grids = [transform.grid_of(size) for size in ((60, 90), (123, 45))]
    assert encoded.image_grids == grids and len(patches) == sum(t * h * w for t, h, w in grids)
    text = tokenizer.decode(encoded.input_ids)
    spans = [f"<|vision_start|>{'<|image_pad|>' * (h * w // 4)}<|vision_end|>" for _, h, w in grids]
    assert f"<|im_start|>user\n{spans[0]}\nWhat is left? {spans[1]}\nAnd right?<|im_end|>" in text
    answer = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert tokenizer.decode(answer) == "A cat and a dog.<|im_end|>"
    ids = torch.tensor([encoded.input_ids])
    config = transformers.Qwen2VLConfig(
        text_config={"vocab_size": 16648, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"depth": 1, "embed_dim": 16, "num_heads": 2},
        image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.Qwen2VLModel(config)
    expected, _ = hf.get_rope_index(ids, (ids == pad).int(), torch.tensor(grids))
    assert torch.equal(encoded.positions, expected[:, 0])


def test_bad_images_are_counted_skips_and_odd_sizes_are_resized_as_the_processor_would():
    from vlm_train.data.reader import SkippedSample

    encoder, _, transform = qwen_encoder()
    strip = encoder.encode(two_image_sample(sizes=((10, 2500), (60, 90))))  # 250:1, the processor refuses it
    assert isinstance(strip, SkippedSample) and strip.reason == "bad_image"
    broken = {**two_image_sample(), "1.png": b"not a png"}
    assert encoder.encode(broken).reason == "bad_image"
    _, patches, encoded = encoder.encode(two_image_sample(sizes=((8, 8), (900, 1200))))  # under / over the range
    pixels = [h * w * 14 * 14 for _, h, w in encoded.image_grids]
    assert pixels[0] == 56 * 56 and 28 * 28 * 48 < pixels[1] <= 28 * 28 * 64  # 168 x 252: the processor's
    assert encoded.image_grids[1] == (1, 12, 18) and len(patches) == 16 + 12 * 18


def test_the_visual_token_budget_shrinks_native_images_until_they_fit():
    """data.max_visual_tokens counts merged tokens (known from the image sizes before decoding): over
    it, the images are downscaled as a whole until they fit, or the sample is dropped and counted."""
    encoder, _, transform = qwen_encoder(max_visual_tokens=20)
    _, patches, encoded = encoder.encode(two_image_sample(sizes=((200, 300), (123, 45))))
    tokens = sum(h * w // 4 for _, h, w in encoded.image_grids)
    assert tokens <= 20 < transform.tokens_of((200, 300)) + transform.tokens_of((123, 45))
    assert len(patches) == 4 * tokens
    dropping, _, _ = qwen_encoder(max_visual_tokens=20, over_visual_budget="drop")
    assert dropping.encode(two_image_sample(sizes=((200, 300), (123, 45)))).reason == "visual_budget"


def video_sample(frames: list[Image.Image], fps: float = 2.0, image: Image.Image | None = None) -> dict:
    """A frame-sequence video sample (`<key>.frame.<n>.png` at `fps`), with an image after it when given."""
    question = "<video>\nWhere does it go?" + (" <image>\nAnd here?" if image is not None else "")
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "Up."}]
    members = {f"frame.{i}.png": png(frame) for i, frame in enumerate(frames)}
    if image is not None:
        members["0.png"] = png(image)
    return {"__key__": "clip", **members, "json": json.dumps({"conversations": turns, "fps": fps}).encode()}


def test_a_video_becomes_temporal_patches_with_qwen2_5_positions():
    """A 3-frame clip at 2 fps: padded with its last frame to 2 temporal patches (Qwen's video processor
    pads so), each patch the frames' pixels in the image processor's layout (a clip of one repeated
    frame gives that image's patches); its <|video_pad|> count, grid, seconds per grid step (2 frames
    at 2 fps: 1 s) and the sample's positions are those transformers' Qwen2.5-VL computes. A 1-frame
    clip (fewer frames than the temporal patch) is padded to one patch, never skipped."""
    import transformers

    encoder, tokenizer, _ = qwen_encoder(video="true")
    encoder.transform = transform = NativeResolutionTransform(max_pixels=28 * 28 * 64, tokens_per_second=2)
    frames = [random_image((60, 90), seed) for seed in range(3)]
    _, patches, encoded = encoder.encode(video_sample(frames, image=random_image((56, 56), 9)))
    assert encoded.video_grids == [(2, 4, 6)] and encoded.video_seconds == [1.0]
    assert encoded.videos is not None and len(encoded.videos) == 2 * 4 * 6 and len(patches) == 4 * 4
    last = transform(frames[2])  # the last temporal patch: frame 2 twice, as an image is itself twice
    assert torch.equal(encoded.videos[24:], last)
    video_pad, image_pad = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    ids = torch.tensor([encoded.input_ids])
    assert int((ids == video_pad).sum()) == 2 * 4 * 6 // 4 and int((ids == image_pad).sum()) == 4
    config = transformers.Qwen2_5_VLConfig(
        text_config={"vocab_size": 16648, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "out_hidden_size": 32, "tokens_per_second": 2},
        image_token_id=image_pad, video_token_id=video_pad,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.Qwen2_5_VLModel(config)
    types = (ids == image_pad).int() + 2 * (ids == video_pad).int()
    expected, _ = hf.get_rope_index(
        ids, types, torch.tensor(encoded.image_grids), torch.tensor(encoded.video_grids),
        second_per_grid_ts=torch.tensor(encoded.video_seconds),
    )  # fmt: skip
    assert torch.equal(encoded.positions, expected[:, 0])
    _, _, single = encoder.encode(video_sample(frames[:1]))
    assert single.video_grids == [(1, 4, 6)] and torch.equal(single.videos, transform(frames[0]))


def test_a_qwen3_vl_video_is_timestamped_temporal_patches_with_transformers_positions():
    """Qwen3-VL writes a video as its processor does: each temporal patch after its timestamp (the mean
    of its two frames' times, to one decimal: 3 frames at 2 fps -> 0.25 s and 1.0 s) in its own
    <|vision_start|> ... <|vision_end|>; the sample's positions are transformers' Qwen3-VL get_rope_index
    (each temporal patch placed as an image); one video counted, not two."""
    import transformers

    transform = NativeResolutionTransform(16, max_pixels=32 * 32 * 64, timestamps=True)
    encoder, tokenizer, _ = qwen_encoder(transform, video="true")
    frames = [random_image((60, 90), seed) for seed in range(3)]
    _, patches, encoded = encoder.encode(video_sample(frames, image=random_image((64, 64), 9)))
    (t, h, w), image_grid = encoded.video_grids[0], transform.grid_of((64, 64))
    assert (t, h, w) == (2, *transform.grid_of((60, 90))[1:]) and encoded.num_videos == 1
    per_patch = "<|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>"
    image = "<|vision_start|>" + "<|image_pad|>" * (image_grid[1] * image_grid[2] // 4) + "<|vision_end|>"
    text = tokenizer.decode(encoded.input_ids)
    assert f"user\n<0.2 seconds>{per_patch}<1.0 seconds>{per_patch}\nWhere does it go? {image}\nAnd" in text
    assert tokenizer(text).input_ids == encoded.input_ids  # the timestamps tokenised in their context
    video_pad, image_pad = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    ids = torch.tensor([encoded.input_ids])
    config = transformers.Qwen3VLConfig(
        text_config={"vocab_size": 16648, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "out_hidden_size": 32},
        image_token_id=image_pad, video_token_id=video_pad,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.Qwen3VLModel(config)
    types = (ids == image_pad).int() + 2 * (ids == video_pad).int()
    grids = torch.tensor(encoded.image_grids), torch.tensor(encoded.video_grids)
    expected, _ = hf.get_rope_index(ids, types, *grids)
    assert torch.equal(encoded.positions, expected[:, 0])


def test_packed_rows_carry_each_samples_own_positions():
    """A packed row's positions are its samples' own, end to end (each from 0): what the model's
    packed forward needs (tests/test_qwen_vl.py proves the per-token losses equal)."""
    from vlm_train.data.packing import collate_packed
    from vlm_train.data.samples import collate

    encoder, tokenizer, _ = qwen_encoder()
    samples = [encoder.encode(two_image_sample(sizes)) for sizes in (((60, 90), (123, 45)), ((28, 28), (56, 112)))]
    plain = collate(samples, tokenizer.pad_token_id)
    packed = collate_packed(samples, tokenizer.pad_token_id, max_length=1024)
    lengths = plain["attention_mask"].sum(1).tolist()
    assert packed["input_ids"].shape[0] == 1 and packed["position_ids"].shape == (3, 1, sum(lengths))
    own = [plain["position_ids"][:, row, :n] for row, n in enumerate(lengths)]
    assert torch.equal(packed["position_ids"][:, 0], torch.cat(own, dim=1))
    assert torch.equal(packed["image_grid_thw"], plain["image_grid_thw"])


@pytest.mark.parametrize(("family", "norm"), [("qwen2_5_vl", "rmsnorm"), ("qwen3_vl", "layernorm")])
def test_a_qwen_folder_trains_as_it_is_with_transformers_logits_and_exports_its_processor(
    family, norm, tmp_path, capsys
):
    """A Qwen2.5-VL (Qwen3-VL: 16 px patches, [-1, 1] pixels, DeepStack) folder with its tokenizer: `vlm-convert from-hf` prints the overrides that train it as
    it is; the model they build, fed a sample through vlm_train's own data path (chat template, image
    patches, grids, positions), gives transformers' logits on the same ids and pixels; its export ships
    an image processor that makes the training pixels, and a tokenizer with the chat template."""
    import shutil

    import transformers

    from tests.qwen_helpers import tiny_hf
    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.convert import main as convert
    from vlm_train.data.samples import SampleEncoder, collate
    from vlm_train.interop import to_hf
    from vlm_train.train import image_tokens, image_transform

    tokenizer = transformers.AutoTokenizer.from_pretrained(QWEN2_VL_TOKENIZER)
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    hf = tiny_hf(family, vocab_size=len(tokenizer), ids=tuple(tokenizer.convert_tokens_to_ids(names)))
    folder = tmp_path / f"{family}-tiny"
    hf.save_pretrained(folder)
    for file in QWEN2_VL_TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    assert convert(["from-hf", str(folder), str(tmp_path / "unused")]) == 0
    overrides = capsys.readouterr().out.split()
    assert (
        overrides[:2] == [f"vision.family={family}", f"vision.path={folder}"] and f"connector.norm={norm}" in overrides
    )
    cfg = compose(["experiment=toy", *overrides, "vision.max_pixels=50176"])
    model = build_model(cfg).eval()
    encoder = SampleEncoder(
        cfg.data, model_tokenizer := encoder_tokenizer(cfg), image_transform(model), image_tokens(model)
    )
    batch = collate([encoder.encode(two_image_sample())], model_tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "position_ids")}
    pixels = model.vision.normalize(batch["pixel_values"])
    with torch.no_grad():
        ours = model(batch["pixel_values"], **inputs).logits
        expected = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
            image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(batch["input_ids"] == model.image_token_id).int(),
        ).logits  # fmt: skip
    assert (ours - expected).abs().max() < 1e-4
    to_hf(model, tmp_path / "export", model_tokenizer, template="hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "export")
    images = [Image.open(io.BytesIO(two_image_sample()[f"{i}.png"])) for i in range(2)]
    processed = processor(images=images, return_tensors="pt")
    assert torch.equal(processed["image_grid_thw"], batch["image_grid_thw"])
    assert torch.equal(processed["pixel_values"], pixels)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == tokenizer.chat_template


def encoder_tokenizer(cfg):
    from vlm_train.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.llm)


# --- 2 ranks, ZeRO-3, kill -9 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sized_shards(tmp_path_factory) -> str:
    from tests.qwen_helpers import write_sized_shards

    return write_sized_shards(tmp_path_factory.mktemp("qwen_sizes"), videos=True)


def qwen_run(urls: str, run_dir, experiment: str = "toy-qwen2_5-vl") -> list[str]:
    from tests.qwen_helpers import resumable_run

    return resumable_run(
        urls,
        run_dir,
        "data.video=true",  # toy clips among the scenes: videos, images and text in every batch mix
        "data.max_frames=3",
        "parallel.zero_stage=3",
        "parallel.zero3_persistence_threshold=0",  # every parameter sharded (the toy's are all small)
        experiment=experiment,
    )


@pytest.mark.slow
def test_zero3_trains_a_tiny_qwen2_5_vl_on_two_ranks_and_resumes_bit_identical_after_kill_9(sized_shards, tmp_path):
    """20 steps on 2 ranks at ZeRO-3 (every parameter sharded, tower trained), images of five sizes,
    3-frame clips and text: no hang, the loss falls; the job SIGKILLed after step 9 restarts from its
    checkpoint and logs the uninterrupted run's losses exactly, each rank reading the same samples."""
    from tests.helpers import kill_9_and_resume, read_metrics, step_losses

    whole = kill_9_and_resume(lambda run_dir: qwen_run(sized_shards, run_dir), nproc=2, root=tmp_path, timeout=400)
    losses = list(step_losses(whole).values())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert len({r["visual_tokens"] for r in read_metrics(whole) if "loss" in r}) > 3  # sizes vary


@pytest.mark.slow
def test_zero3_trains_a_tiny_qwen3_vl_with_deepstack_on_two_ranks(sized_shards, tmp_path):
    """Qwen3-VL through the CLI on 2 ranks at ZeRO-3 (every parameter sharded, tower trained): images of
    five sizes, timestamped clips and text in the batches (a micro-batch without media runs a blank
    image through tower and DeepStack mergers: tests/test_qwen_vl.py): 20 steps, no hang, the loss falls."""
    from tests.helpers import run_cli, step_losses

    result = run_cli(qwen_run(sized_shards, tmp_path / "run", "toy-qwen3-vl"), nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = list(step_losses(tmp_path / "run").values())
    assert len(losses) == 20 and sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
