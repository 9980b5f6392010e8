"""cross_attention with AnyRes images and video: each image (and video) is one media item of its own
length -- the visual tokens a sequence connector would put in the text for it -- padded to the
batch's longest with a key mask, behind ONE slot in the text. Every test opens the gates first
(they start at zero, where the model is the plain LLM and any comparison would pass)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers import open_gates

SIZES = [(30, 100), (70, 70)]  # 1 + 3 and 1 + 4 tiles of the toy's 48-px tower: 39 and 51 visual tokens


def anyres_model():
    from tests.helpers import TOKENIZER, toy_model

    return open_gates(toy_model("vision.anyres=anyres", "connector=cross_attention", tokenizer=TOKENIZER))


def video_setup():
    """toy-video (AnyRes + video) with cross_attention: config, tokenizer, model with open gates."""
    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.data.tokenizer import load_tokenizer

    cfg = compose(["experiment=toy-video", "connector=cross_attention", "data.urls=unused", "data.max_frames=8"])
    tokenizer = load_tokenizer(cfg.llm, video=True)
    torch.manual_seed(0)
    return cfg, tokenizer, open_gates(build_model(cfg, tokenizer))


def tiles_of(model, size: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (model.anyres.tiles_of(size), 3, 48, 48), generator=generator, dtype=torch.uint8)


def padded_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    return ids, torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])


def test_anyres_images_of_different_lengths_and_text_give_each_sample_its_logits_alone(tmp_path):
    """Images of 39 and 51 visual tokens (the shorter padded, masked) and a text-only sample: each
    sample's logits are those it has alone. Slots: one per image whatever its size; the export
    refuses in one line (no Hugging Face family has gated cross-attention)."""
    from vlm_train.errors import ConfigError
    from vlm_train.interop.hf import to_hf
    from vlm_train.train import image_tokens

    model = anyres_model()
    assert [model.anyres.num_tokens(size) for size in SIZES] == [39, 51]
    assert model.num_image_tokens == 1 and [image_tokens(model)(size) for size in SIZES] == [1, 1]
    image = model.image_token_id
    rows = [[5, 6, image, 7, 8, 9], [5, image, 7, 8, 9, 10, 11], [5, 7, 8]]
    ids, mask = padded_rows(rows)
    tiles = [tiles_of(model, size, seed) for seed, size in enumerate(SIZES)]
    together = model(torch.cat(tiles), ids, mask, image_sizes=torch.tensor(SIZES)).logits
    for row, (pixels, size) in enumerate([(tiles[0], [SIZES[0]]), (tiles[1], [SIZES[1]]), (None, None)]):
        one = torch.tensor(rows[row : row + 1])
        alone = model(pixels, one, image_sizes=None if size is None else torch.tensor(size)).logits
        torch.testing.assert_close(together[row, : len(rows[row])], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="no Hugging Face family takes a CrossAttentionConnector") as refused:
        to_hf(model, tmp_path / "hf")
    assert "\n" not in str(refused.value)


def test_a_token_before_the_second_image_does_not_see_it():
    """Two images in one sample: new pixels for the second change nothing before its slot and the
    logits from its slot on."""
    model = anyres_model()
    image = model.image_token_id
    ids = torch.tensor([[5, image, 6, 7, image, 8, 9]])
    first, second = tiles_of(model, SIZES[0], 0), tiles_of(model, SIZES[1], 1)
    other_second = tiles_of(model, SIZES[1], 2)
    sizes = torch.tensor(SIZES)
    logits = model(torch.cat([first, second]), ids, image_sizes=sizes).logits
    changed = model(torch.cat([first, other_second]), ids, image_sizes=sizes).logits
    torch.testing.assert_close(changed[0, :4], logits[0, :4], rtol=0, atol=1e-6)
    assert (changed[0, 4:] - logits[0, 4:]).abs().amax(dim=-1).min() > 1e-4


def test_videos_of_different_lengths_and_an_image_give_each_sample_its_logits_alone():
    """Videos of 3 and 5 frames (13 and 21 visual tokens) and a sample holding an image, then a
    video: media items follow their slots' order (not images first), each sample its logits alone."""
    from vlm_train.train import video_tokens

    torch.manual_seed(0)
    _, tokenizer, model = video_setup()
    video, image = tokenizer.convert_tokens_to_ids("<video>"), model.image_token_id
    assert video_tokens(model)(5) == 1 and [model.anyres.video_tokens(n) for n in (3, 5)] == [13, 21]
    frames = [torch.randint(0, 256, (n, 3, 48, 48), dtype=torch.uint8) for n in (3, 5, 4)]
    tiles = tiles_of(model, SIZES[0], 0)
    rows = [[5, video, 7, 8], [5, 6, video, 7, 8], [5, image, 6, video, 7, 8, 9]]
    ids, mask = padded_rows(rows)
    together = model(
        tiles,
        ids,
        mask,
        image_sizes=torch.tensor(SIZES[:1]),
        pixel_values_videos=torch.cat(frames),
        video_frames=torch.tensor([3, 5, 4]),
    ).logits
    for row, clip in enumerate(frames):
        one = ids[row : row + 1, : len(rows[row])]
        pixels, sizes = (tiles, torch.tensor(SIZES[:1])) if row == 2 else (None, None)
        alone = model(pixels, one, image_sizes=sizes, pixel_values_videos=clip[None]).logits
        torch.testing.assert_close(together[row, : len(rows[row])], alone[0], rtol=1e-5, atol=1e-5)


def test_the_pipeline_gives_one_slot_per_image_and_per_video_and_the_model_reads_its_batch():
    """The data side (`image_tokens` / `video_tokens` of the model): an AnyRes image sample and a
    video sample each carry one slot; their collated batch goes through the model."""
    from tests.helpers import image_sample
    from vlm_train.data.samples import SampleEncoder, collate
    from vlm_train.data.synthetic_video import make_sample
    from vlm_train.data.templates import VIDEO_INPUTS
    from vlm_train.train import image_tokens, image_transform, video_tokens

    cfg, tokenizer, model = video_setup()
    encoder = SampleEncoder(cfg.data, tokenizer, image_transform(model), image_tokens(model), video_tokens(model))
    members, record = make_sample(random.Random(0))
    samples = [
        encoder.encode(image_sample(random.Random(0), "image")),
        encoder.encode({"__key__": "video", **members, "json": json.dumps(record).encode()}),
    ]
    video = tokenizer.convert_tokens_to_ids("<video>")
    slots = [(enc.input_ids.count(model.image_token_id), enc.input_ids.count(video)) for _, _, enc in samples]
    assert slots == [(1, 0), (0, 1)]
    batch = collate(samples, tokenizer.pad_token_id)
    names = ("pixel_values", "input_ids", "attention_mask", "labels", "image_sizes", *VIDEO_INPUTS)
    out = model(**{name: batch[name] for name in names if name in batch})
    assert torch.isfinite(out.loss)


@pytest.mark.slow
def test_cross_attention_with_anyres_trains_under_zero3_on_two_ranks(tmp_path):
    """The CLI, 2 ranks, ZeRO-3, the tower training too: the media layout (`image_newline`) and the
    gated blocks are gathered inside module calls; 6 steps with finite losses."""
    import math

    from tests.helpers import read_metrics, run_cli

    overrides = [
        "experiment=toy-anyres",
        "connector=cross_attention",
        "vision.freeze=false",
        f"data.synthetic_dir={tmp_path / 'data'}",
        "data.synthetic_train=48",
        "data.synthetic_eval=8",
        f"run.dir={tmp_path / 'run'}",
        "parallel.zero_stage=3",
        "parallel.zero3_persistence_threshold=0",  # every parameter sharded (the toy's are all small)
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
    ]
    result = run_cli(overrides, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in records)


def test_the_visual_token_budget_counts_the_media_tokens_not_the_one_slot():
    """data.max_visual_tokens=20 with cross_attention: an 8-frame clip (one slot, but 33 media tokens:
    8 frames of 4 pooled tokens and the newline) is cut to the 4 frames that fit (17 tokens)."""
    from dataclasses import replace

    from vlm_train.data.samples import SampleEncoder
    from vlm_train.data.synthetic_video import make_sample
    from vlm_train.train import image_tokens, image_transform, video_tokens, visual_cost

    cfg, tokenizer, model = video_setup()
    data = replace(cfg.data, max_visual_tokens=20)
    encoder = SampleEncoder(
        data, tokenizer, image_transform(model), image_tokens(model), video_tokens(model), visual_cost(model)
    )
    members, record = make_sample(random.Random(0))
    _, _, encoded = encoder.encode({"__key__": "video", **members, "json": json.dumps(record).encode()})
    assert encoded.video_frames == [4] and model.anyres.video_tokens(4) == 17
    assert encoded.input_ids.count(tokenizer.convert_tokens_to_ids("<video>")) == 1
