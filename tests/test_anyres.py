"""AnyRes (LLaVA-NeXT, LLaVA-OneVision) against transformers on tiny random configs: images of
several non-square sizes prepared by transformers' own image processors, a multi-image sample,
logits both directions (HF -> from_hf -> ours, ours -> to_hf -> from_pretrained), and the
visual-token count the data side needs before the tower runs."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from vlm_train.interop import from_hf, to_hf

IMAGE_TOKEN = 60
VIDEO_TOKEN = 61
VOCAB = 64
TILE = 28  # tower image size; 14-px patches: a 2 x 2 grid of visual tokens per tile
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
SIZES = [(40, 90), (70, 30), (50, 50), (20, 100)]  # (height, width), none square but one


def tiny_config(kind: str, tile: int = TILE, pinpoints: list[list[int]] = PINPOINTS):
    """LLaVA-NeXT on a CLIP tower (CLS dropped), or OneVision on SigLIP (anyres_max_1: every
    multi-tile map is shrunk, so the bilinear path runs)."""
    import transformers

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    tower.update(image_size=tile, patch_size=14)
    text = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ).to_dict()
    if kind == "llava_next":
        vision = transformers.CLIPVisionConfig(**tower).to_dict()
        return transformers.LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_grid_pinpoints=pinpoints
        )
    vision = transformers.SiglipVisionConfig(**tower).to_dict()
    return transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_1",
    )


def processed(kind: str, sizes: list[tuple[int, int]], seed: int = 0, per_sample: list[int] | None = None) -> dict:
    """pixel_values [I, tiles, 3, 28, 28] and image_sizes as transformers' image processor makes them
    (OneVision's also batch_num_images: `per_sample` images in each sample, default one each)."""
    from transformers import LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    if per_sample is not None:
        ends = np.cumsum(per_sample)
        images = [images[end - count : end] for count, end in zip(per_sample, ends)]
    processor_class = LlavaNextImageProcessorPil if kind == "llava_next" else LlavaOnevisionImageProcessorPil
    processor = processor_class(
        size={"height": TILE, "width": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    return dict(processor(images, return_tensors="pt"))


def token_rows(counts_per_sample: list[list[int]]) -> torch.Tensor:
    """One row per sample: text, each image's slots, text; right-padded with token 0."""
    rows = []
    for sample, counts in enumerate(counts_per_sample):
        row = [10 + sample, 11, 12]
        for count in counts:
            row += [IMAGE_TOKEN] * count + [20 + sample, 21]
        rows.append(row)
    width = max(map(len, rows))
    return torch.tensor([row + [0] * (width - len(row)) for row in rows])


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_anyres_import_and_export_keep_the_logits(kind, tmp_path):
    import transformers

    torch.manual_seed(0)
    hf_class = getattr(
        transformers,
        {"llava_next": "LlavaNextForConditionalGeneration"}.get(kind, "LlavaOnevisionForConditionalGeneration"),
    )
    hf = hf_class(tiny_config(kind)).eval()
    hf.save_pretrained(tmp_path / "hf")
    inputs = processed(kind, SIZES)
    ours = from_hf(tmp_path / "hf").eval()
    counts = [ours.anyres.num_tokens(size) for size in SIZES]
    assert len(set(counts)) >= 3, counts  # the sizes give different token counts
    # sample 0 holds images 0 and 1, sample 1 images 2 and 3
    input_ids = token_rows([counts[:2], counts[2:]])
    mask = (input_ids != 0).long()
    with torch.no_grad():
        # transformers checks that the slots equal its features: a wrong num_tokens fails here
        reference = hf(input_ids=input_ids, attention_mask=mask, **inputs).logits
        got = ours(inputs["pixel_values"], input_ids, mask, image_sizes=inputs["image_sizes"]).logits
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)

    reversed_tiles = inputs["pixel_values"].flip(1)
    with torch.no_grad():
        moved = ours(reversed_tiles, input_ids, mask, image_sizes=inputs["image_sizes"]).logits
    assert (moved - reference).abs().max() > 1e-3  # every tile's place in the layout matters

    to_hf(ours, tmp_path / "exported")
    reloaded = hf_class.from_pretrained(tmp_path / "exported").eval()
    assert reloaded.config.image_grid_pinpoints == PINPOINTS
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=mask, **inputs).logits
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-4)


def test_onevision_multi_image_samples_read_base_views_only(tmp_path):
    """OneVision tiles the image of a one-image sample; a multi-image sample's images are read as
    their base view plus a newline (`batch_num_images`), as transformers does."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration(tiny_config("llava_onevision")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    sizes = [(40, 90), (70, 30), (50, 50)]
    inputs = processed("llava_onevision", sizes, per_sample=[1, 2])
    assert inputs["batch_num_images"].tolist() == [1, 2]
    counts = [ours.anyres.num_tokens(sizes[0]), *(ours.anyres.num_tokens(s, tiled=False) for s in sizes[1:])]
    assert counts[1] == counts[2] == 5  # 2 x 2 base view + newline
    input_ids = token_rows([counts[:1], counts[1:]])
    mask = (input_ids != 0).long()
    with torch.no_grad():
        reference = hf(input_ids=input_ids, attention_mask=mask, **inputs).logits
        got = ours(input_ids=input_ids, attention_mask=mask, **inputs).logits  # the processor's own names
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)


def test_onevision_video_keeps_the_logits_both_ways(tmp_path):
    """A video sample (4 frames, each 3 x 3 token grid pooled 2 x 2 bilinear, one newline) next to
    an image sample: logits equal transformers' after import and after export."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_config("llava_onevision", tile=42, pinpoints=[[42, 84], [84, 42], [84, 84]])
    hf = LlavaOnevisionForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    assert ours.video_token_id == VIDEO_TOKEN
    videos = torch.randn(1, 4, 3, 42, 42)
    video_slots = ours.anyres.video_tokens(4)
    assert video_slots == 4 * 2 * 2 + 1
    image_sizes = torch.tensor([[50, 90]])
    images = torch.randn(1, ours.anyres.tiles_of((50, 90)), 3, 42, 42)
    rows = [
        [10, 11] + [VIDEO_TOKEN] * video_slots + [12, 13],
        [14] + [IMAGE_TOKEN] * ours.anyres.num_tokens((50, 90)) + [15],
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    inputs = dict(input_ids=input_ids, pixel_values=images, image_sizes=image_sizes, pixel_values_videos=videos)
    with torch.no_grad():
        reference = hf(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, reference, rtol=0, atol=1e-4)
        shuffled = {**inputs, "pixel_values_videos": videos[:, [1, 0, 2, 3]]}
        assert (ours(**shuffled).logits - reference).abs().max() > 1e-4  # frame order matters
    to_hf(ours, tmp_path / "exported")
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    assert reloaded.config.video_token_id == VIDEO_TOKEN
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, reference, rtol=0, atol=1e-4)


def test_anyres_inputs_that_do_not_fit_are_one_line_errors(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(tiny_config("llava_next")).save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    inputs = processed("llava_next", SIZES[:2])
    input_ids = token_rows([[ours.anyres.num_tokens(s) for s in SIZES[:2]]])
    with pytest.raises(ValueError, match="needs image_sizes"):
        ours(inputs["pixel_values"], input_ids)
    with pytest.raises(ValueError, match="make .* tiles"):
        ours(inputs["pixel_values"].flatten(0, 1)[:-1], input_ids, image_sizes=inputs["image_sizes"])
    too_few = token_rows([[ours.anyres.num_tokens(SIZES[0]) - 1, ours.anyres.num_tokens(SIZES[1])]])
    with pytest.raises(ValueError, match="image-token slots"):
        ours(inputs["pixel_values"], too_few, image_sizes=inputs["image_sizes"])


# --- the data side: LLaVA-NeXT's pixels, token counts known before the tower, batches that fit ---

PIXEL_SIZES = [(400, 900), (700, 300), (500, 500), (200, 1000), (336, 336), (1500, 1200)]


@pytest.mark.parametrize("processor_name", ["LlavaNextImageProcessorPil", "LlavaOnevisionImageProcessorPil"])
def test_anyres_tiles_are_the_image_processors_pixels(processor_name):
    """AnyResTransform's uint8 tiles equal transformers' (rescale and normalise off), bit for bit,
    at LLaVA-NeXT's own 336 px pinpoints, for sizes that pick every pinpoint and round both ways."""
    import transformers
    from PIL import Image

    from vlm_train.data.preprocess import AnyResTransform

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor = getattr(transformers, processor_name)(
        size={"height": 336, "width": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=pinpoints,
        do_rescale=False,
        do_normalize=False,
    )
    transform = AnyResTransform(336, tuple(map(tuple, pinpoints)))
    rng = np.random.default_rng(0)
    for height, width in PIXEL_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        reference = processor(image, return_tensors="pt")["pixel_values"][0]
        tiles = transform(image)
        assert tiles.dtype == torch.uint8 and tiles.shape == reference.shape, (height, width)
        assert torch.equal(tiles.float(), reference), (height, width)


def png(height: int, width: int, seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


ANYRES_SIZES = [(30, 100), (100, 40), (48, 48), (70, 70), (20, 150), (90, 60), (48, 100)]


def anyres_shard(folder, bad: bool = False) -> str:
    """Samples with images of several sizes (and a text-only one); `bad` adds a sample with more
    <image> markers than images."""
    from tests.helpers import conversation, text_sample, write_tar

    samples = [
        {"__key__": f"a{i}", "png": png(h, w, i), "json": conversation("<image>\nwhat color is the circle ?", "red")}
        for i, (h, w) in enumerate(ANYRES_SIZES)
    ]
    samples.insert(3, text_sample("text"))
    if bad:
        samples.append({"__key__": "two-markers", "png": png(40, 40, 9), "json": conversation("<image> <image>", "x")})
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / "part-000.tar", samples)
    return str(folder / "part-{000..000}.tar")


@pytest.mark.parametrize("packing", [False, True])
def test_anyres_batches_carry_sizes_and_slots_the_model_fills(packing, tmp_path):
    """The pipeline's token counts per image (known before the tower runs) are the model's: every
    batch, packed or not, goes through forward with loss; `image_sizes` follow the slot order."""
    from tests.helpers import TOKENIZER, toy_model
    from vlm_train import compose
    from vlm_train.data.pipeline import REASON_INDEX, build_train_batches
    from vlm_train.train import image_tokens, image_transform

    model = toy_model("vision.anyres=anyres_max_2", tokenizer=TOKENIZER)
    cfg = compose(
        ["experiment=toy", f"data.urls={anyres_shard(tmp_path / 'data', bad=True)}", "data.num_workers=0"]
        + (["data.packing=true", "data.max_length=512"] if packing else ["data.max_length=256"])
    ).data
    batches = build_train_batches(
        cfg, TOKENIZER, image_transform(model), image_tokens(model), dp_rank=0, dp_size=1, batch_size=3, seed=0
    )
    seen_sizes, skipped = [], 0
    for batch in islice(batches, 3):
        sizes = batch["image_sizes"].tolist()
        tiles = sum(model.anyres.tiles_of(size) for size in sizes)
        assert batch["pixel_values"].shape[0] == tiles
        slots = int((batch["input_ids"] == model.image_token_id).sum())
        assert slots == sum(model.anyres.num_tokens(size) for size in sizes)
        out = model(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"], batch["image_sizes"]
        )
        assert torch.isfinite(out.loss)
        seen_sizes += [tuple(s) for s, key in zip(sizes, batch["keys"]) if not key.startswith("skipped")]
        skipped += int(batch["skipped_by_reason"][REASON_INDEX["image_token_mismatch"]])
    assert set(seen_sizes) <= set(ANYRES_SIZES) and len(set(seen_sizes)) >= 5
    assert skipped == 1


def test_toy_run_with_anyres_trains_and_evaluates(tmp_path, toy_data):
    """`vision.anyres=anyres_max_4` end to end: training steps and the end-of-run evaluation
    (greedy decoding with image_sizes), from the CLI."""
    from tests.helpers import read_metrics, run_cli, toy_overrides

    result = run_cli(
        toy_overrides(
            toy_data,
            tmp_path / "run",
            "vision.anyres=anyres_max_4",
            "train.max_steps=4",
            "train.eval=true",
            "data.eval_samples=8",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_accuracy" in r for r in records)


def test_exported_llava_next_processor_and_model_reproduce_training(tmp_path):
    """A toy AnyRes model exported with its tokenizer: transformers' AutoProcessor on the folder
    gives the image tokens and (normalised) tiles our pipeline gave, and the exported model's
    logits on the processor's inputs are ours on the pipeline's."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.helpers import TOKENIZER, toy_model
    from vlm_train.data.templates import encode_conversation
    from vlm_train.train import image_tokens, image_transform

    model = toy_model("vision.anyres=anyres", tokenizer=TOKENIZER).eval()
    to_hf(model, tmp_path / "hf", TOKENIZER, template="chat")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.default_rng(0)
    for height, width in [(30, 100), (100, 40), (70, 70)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        turns = [{"from": "human", "value": "<image>\nwhat color is the circle ?"}]
        ids, _ = encode_conversation(turns, TOKENIZER, "chat", [image_tokens(model)((height, width))], True)
        tiles = image_transform(model)(image)
        content = [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ids, (height, width)
        normalised = model.vision.normalize(tiles)
        torch.testing.assert_close(inputs["pixel_values"][0, : len(tiles)], normalised, rtol=0, atol=1e-6)
        with torch.no_grad():
            ours = model(tiles, torch.tensor([ids]), image_sizes=torch.tensor([[height, width]])).logits
            theirs = reloaded(**inputs).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_onevision_token_counts_are_its_processors(tmp_path):
    """anyres.num_tokens equals LlavaOnevisionProcessor's own count (its _get_number_of_features,
    run on the exported image processor: building the processor itself needs torchvision), and the
    exported image processor gives our tiles."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    from tests.helpers import TOKENIZER, toy_model
    from vlm_train.interop.hf import chat_template
    from vlm_train.train import image_transform

    model = toy_model("vision.anyres=anyres_max_2", tokenizer=TOKENIZER).eval()
    to_hf(model, tmp_path / "hf", TOKENIZER, template="chat")
    image_processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == chat_template("chat", TOKENIZER)
    assert not getattr(TOKENIZER, "chat_template", None)  # the caller's tokenizer is left as it was
    counter = SimpleNamespace(
        image_processor=image_processor, num_image_tokens=model.anyres.tile_grid**2, vision_aspect_ratio="anyres_max_2"
    )
    counter._get_unpadded_features = lambda *args: LlavaOnevisionProcessor._get_unpadded_features(counter, *args)
    size = model.vision.image_size
    rng = np.random.default_rng(0)
    shrunk = 0
    for height, width in ANYRES_SIZES + [(200, 60), (60, 200), (150, 150)]:
        expected = LlavaOnevisionProcessor._get_number_of_features(counter, height, width, size, size)
        assert model.anyres.num_tokens((height, width)) == expected, (height, width)
        rows, columns = model.anyres.grid_of((height, width))
        shrunk += rows * columns > 2
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        tiles = image_transform(model)(image)
        pixels = image_processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels[: len(tiles)], model.vision.normalize(tiles), rtol=0, atol=1e-6)
    assert shrunk >= 3  # anyres_max_2 shrinks the maps of bigger grids


def test_toy_anyres_experiment_generates_sized_scenes_and_trains(tmp_path):
    """`experiment=toy-anyres` generates scenes of every size in synthetic.SIZES on first use and
    trains on them with AnyRes from the CLI (a short run; docs/anyres.md has the full comparison)."""
    import io
    import tarfile

    from PIL import Image

    from tests.helpers import read_metrics, run_cli
    from vlm_train.data.synthetic import SIZES

    data, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = ["experiment=toy-anyres", f"data.synthetic_dir={data}", f"run.dir={run_dir}", "data.synthetic_train=60"]
    overrides += ["data.synthetic_eval=8", "data.eval_samples=8", "train.max_steps=3", "train.micro_batch_size=4"]
    result = run_cli(overrides + ["train.log_every=1", "train.save_every=0", "data.num_workers=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    with tarfile.open(data / "train-000000.tar") as tar:
        pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
    sizes = {Image.open(io.BytesIO(png)).size[::-1] for png in pngs}
    assert sizes == set(SIZES)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and any("eval_accuracy" in r for r in records)


# --- the visual-token budget and images too large to decode ---


def anyres_batches(model, pattern: str, *overrides: str):
    from tests.helpers import TOKENIZER
    from vlm_train import compose
    from vlm_train.data.pipeline import build_train_batches
    from vlm_train.train import image_tokens, image_transform

    cfg = compose(["experiment=toy", f"data.urls={pattern}", "data.num_workers=0", "data.max_length=256", *overrides])
    return build_train_batches(
        cfg.data, TOKENIZER, image_transform(model), image_tokens(model), dp_rank=0, dp_size=1, batch_size=4, seed=0
    )


@pytest.mark.parametrize("policy", ["downscale", "drop"])
def test_samples_over_the_visual_token_budget_are_downscaled_or_dropped(policy, tmp_path):
    """data.max_visual_tokens=30: with downscale every image sample is kept, read smaller (its
    sizes and slots shrink to fit); with drop the samples over it are counted skips."""
    from tests.helpers import TOKENIZER, toy_model
    from vlm_train.data.pipeline import REASON_INDEX

    model = toy_model("vision.anyres=anyres", tokenizer=TOKENIZER)
    over = [size for size in ANYRES_SIZES if model.anyres.num_tokens(size) > 30]
    assert 2 <= len(over) < len(ANYRES_SIZES)
    batches = anyres_batches(
        model, anyres_shard(tmp_path / "data"), "data.max_visual_tokens=30", f"data.over_visual_budget={policy}"
    )
    kept, skipped = [], 0
    for batch in islice(batches, 2):
        skipped += int(batch["skipped_by_reason"][REASON_INDEX["visual_budget"]])
        starts = 0
        for row, key in enumerate(batch["keys"]):
            slots = int((batch["input_ids"][row] == model.image_token_id).sum())
            if key.startswith("a") and slots:
                kept.append((int(key[1:]), tuple(batch["image_sizes"][starts].tolist()), slots))
                starts += 1
            assert slots <= 30 or key.startswith("skipped")
    if policy == "drop":
        assert skipped == len(over) and {ANYRES_SIZES[i] for i, _, _ in kept}.isdisjoint(over)
    else:
        assert skipped == 0 and len(kept) == len(ANYRES_SIZES)
        shrunk = {ANYRES_SIZES[i]: size for i, size, _ in kept if size != ANYRES_SIZES[i]}
        assert set(shrunk) == set(over)
        for (height, width), (new_h, new_w) in shrunk.items():
            assert new_h < height and new_w < width and abs(new_w / new_h - width / height) < 0.2 * width / height


def bomb_png(height: int, width: int) -> bytes:
    """A PNG whose header says `height` x `width` (a decompression bomb's size) over one row of data."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = zlib.compress(b"\0" + b"\0" * 3 * min(width, 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


@pytest.mark.parametrize("anyres", [False, True])
def test_a_decompression_bomb_and_an_image_sample_over_budget_are_counted_skips(anyres, tmp_path):
    """A 20000 x 20000 PNG is refused from its header (PIL's decompression-bomb limit), never
    decoded: a counted bad_image. Without AnyRes (fixed tokens per image) a sample with more
    images than the budget holds cannot be downscaled: a counted visual_budget skip."""
    from tests.helpers import TOKENIZER, conversation, toy_model, write_tar
    from vlm_train.data.pipeline import REASON_INDEX

    model = toy_model(*(["vision.anyres=anyres"] if anyres else []), tokenizer=TOKENIZER)
    samples = [
        {"__key__": "bomb", "png": bomb_png(20000, 20000), "json": conversation("<image>\nwhat ?", "red")},
        {"__key__": "ok", "png": png(48, 48, 1), "json": conversation("<image>\nwhat color is the circle ?", "red")},
        {
            "__key__": "four",
            **{f"{i}.png": png(48, 48, i) for i in range(4)},
            "json": conversation("<image> <image> <image> <image> what ?", "red"),
        },
        {"__key__": "ok2", "png": png(48, 48, 2), "json": conversation("<image>\nwhat color is the circle ?", "red")},
    ]
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "part-000.tar", samples)
    budget = model.num_image_tokens * 2  # one image fits, four do not (even shrunk: every image keeps a base view)
    batches = anyres_batches(model, str(tmp_path / "data" / "part-{000..000}.tar"), f"data.max_visual_tokens={budget}")
    batch = next(batches)
    counts = batch["skipped_by_reason"]
    assert int(counts[REASON_INDEX["bad_image"]]) == 1 and int(counts[REASON_INDEX["visual_budget"]]) == 1
    assert sorted(k for k in batch["keys"] if not k.startswith("skipped")) == ["ok", "ok2"]


@pytest.mark.parametrize("connector", ["perceiver", "qformer"])
def test_resamplers_read_each_image_s_tiles_as_one_set_of_any_size(connector, tmp_path):
    """A resampler gives `num_tokens` per image whatever its tiles: images of 4 and 5 tiles in one
    batch (the smaller padded, masked) give each sample the logits it has alone; the padding
    changes nothing. A trained step reaches the resampler; the newline (unused) stays frozen; the
    export refuses AnyRes through a resampler in one line."""
    from tests.helpers import TOKENIZER, toy_model
    from vlm_train.errors import ConfigError
    from vlm_train.interop.hf import to_hf

    torch.manual_seed(0)
    model = toy_model("vision.anyres=anyres", f"connector={connector}", tokenizer=TOKENIZER).eval()
    sizes = [(30, 100), (70, 70)]  # 1 + 3 tiles and 1 + 4 tiles
    assert [model.anyres.tiles_of(s) for s in sizes] == [4, 5]
    assert {model.anyres.num_tokens(s) for s in sizes} == {model.connector.num_tokens}
    tiles = [torch.randint(0, 256, (model.anyres.tiles_of(s), 3, 48, 48), dtype=torch.uint8) for s in sizes]
    rows = token_rows([[model.connector.num_tokens] for _ in sizes])
    rows[rows == IMAGE_TOKEN] = model.image_token_id
    together = model(torch.cat(tiles), rows, image_sizes=torch.tensor(sizes)).logits
    for row, (size, pixels) in enumerate(zip(sizes, tiles)):
        alone = model(pixels, rows[row : row + 1], image_sizes=torch.tensor([size])).logits
        torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)
    model.train()
    labels = rows.masked_fill(rows == model.image_token_id, -100)
    model(torch.cat(tiles), rows, labels=labels, image_sizes=torch.tensor(sizes)).loss.backward()
    grads = [p.grad for p in model.connector.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert not model.anyres.image_newline.requires_grad
    with pytest.raises(ConfigError, match="no Hugging Face family reads AnyRes tiles"):
        to_hf(model, tmp_path / "hf")


def test_anyres_with_the_ln_adapter_trains_a_step():
    """The other per-patch connector: a forward and backward with AnyRes batches of two sizes."""
    from tests.helpers import TOKENIZER, toy_model

    model = toy_model("vision.anyres=anyres", "connector=ln_adapter", tokenizer=TOKENIZER)
    sizes = [(30, 100), (70, 70)]
    tiles = torch.randint(0, 256, (sum(model.anyres.tiles_of(s) for s in sizes), 3, 48, 48), dtype=torch.uint8)
    input_ids = token_rows([[model.anyres.num_tokens(s) for s in sizes]])
    input_ids[input_ids == IMAGE_TOKEN] = model.image_token_id
    labels = input_ids.clone()
    labels[input_ids == model.image_token_id] = -100
    out = model(tiles, input_ids, labels=labels, image_sizes=torch.tensor(sizes))
    out.loss.backward()
    assert model.anyres.image_newline.grad is not None and model.anyres.image_newline.grad.abs().sum() > 0


@pytest.mark.slow
def test_resampler_anyres_trains_under_zero3_on_two_ranks(tmp_path):
    """ZeRO-3 gathers a connector's own parameters (the Q-Former's query tokens) only around its
    forward: the per-image resampling must go through the module call. 2 ranks, 3 steps, the tower
    training too."""
    from tests.helpers import read_metrics, run_cli

    urls = anyres_shard(tmp_path / "data")
    overrides = [
        "experiment=toy",
        "connector=qformer",
        "vision.anyres=anyres",
        "vision.freeze=false",
        f"data.urls={urls}",
        f"run.dir={tmp_path / 'run'}",
        "parallel.zero_stage=3",
        "parallel.zero3_persistence_threshold=0",  # every parameter sharded (the toy's are all small)
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.max_steps=3",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
    ]
    result = run_cli(overrides, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
