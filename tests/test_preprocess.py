"""Image preprocessing matches the references pixel for pixel: crop = transformers' CLIP processor,
pad = LLaVA's expand2square (mean colour) then the CLIP processor, resize = SigLIP's processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tests.helpers import TOKENIZER
from vlm_train import compose
from vlm_train.data.pipeline import SampleEncoder
from vlm_train.data.preprocess import ImageTransform

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZE = 336  # CLIP ViT-L/14-336, LLaVA-1.5's tower
# wide, tall, a long side whose resize rounds differently than round() would (500 * 336 / 333 =
# 504.5), odd sizes, smaller than the tower, square
SHAPES = [(640, 480), (333, 517), (500, 333), (97, 61), (61, 97), (200, 200)]


def llava_expand2square(pil_img, background_color):
    """haotian-liu/LLaVA llava/mm_utils.py expand2square, as published."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def noisy_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: any difference in resize size, filter or crop box shows in the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 3 % 256], -1)
    rgb = rgb + np.random.default_rng(seed).normal(0, 30, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def clip_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def ours(image: Image.Image, aspect_ratio: str) -> torch.Tensor:
    transform = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD, aspect_ratio)
    pixels = transform(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, SIZE, SIZE)  # workers still send uint8
    return transform.normalize(pixels)


@pytest.mark.parametrize("shape", SHAPES)
def test_crop_is_clips_processor(shape):
    image = noisy_image(*shape)
    reference = clip_processor()(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ours(image, "crop"), reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_pad_is_llavas_expand2square_with_the_mean_colour(shape):
    image = noisy_image(*shape)
    background = tuple(int(x * 255) for x in clip_processor().image_mean)  # as LLaVA's train.py computes it
    reference = clip_processor()(llava_expand2square(image, background), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ours(image, "pad"), reference)
    hf = LlavaImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_pad=True)
    assert torch.equal(ours(image, "pad"), hf(image, return_tensors="pt")["pixel_values"][0])


def test_pad_fills_with_the_towers_mean_colour_and_keeps_the_whole_image():
    tall = Image.new("RGB", (100, 300), (255, 0, 0))
    pixels = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD, "pad")(tall)
    assert pixels[:, SIZE // 2, 2].tolist() == [122, 116, 104]  # int(mean * 255): CLIP's grey, not black
    assert pixels[:, SIZE // 2, SIZE // 2].tolist() == [255, 0, 0]  # the image, centred, not cropped away
    assert pixels[:, 0, SIZE // 2].tolist() == [255, 0, 0]  # its full height kept


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_resize_is_siglips_processor(shape):
    image = noisy_image(*shape)
    siglip = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    assert torch.equal(ours(image, "resize"), siglip(image, return_tensors="pt")["pixel_values"][0])


def test_the_pipeline_uses_data_image_aspect_ratio():
    image = noisy_image(90, 48)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    raw = {"__key__": "k", "png": buffer.getvalue(), "txt": b"a caption"}
    transform = ImageTransform(48, CLIP_MEAN, CLIP_STD)  # crop, as train.py builds it
    for aspect_ratio in ("crop", "pad", "resize"):
        cfg = compose(["experiment=toy", "data.text_key=txt", f"data.image_aspect_ratio={aspect_ratio}"]).data
        _, pixels, _ = SampleEncoder(cfg, TOKENIZER, transform, 9).encode(raw)
        assert torch.equal(pixels[0], ImageTransform(48, CLIP_MEAN, CLIP_STD, aspect_ratio)(image)), aspect_ratio
    stage2 = compose(
        ["experiment=llava15-7b-stage2", "data.urls=x", *(f"{key}.path=x" for key in ("connector", "llm", "vision"))]
    )
    assert stage2.data.image_aspect_ratio == "pad"  # LLaVA-1.5's stage 2


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("aspect_ratio", ["crop", "pad", "resize"])
def test_jpeg_draft_decodes_a_large_jpeg_smaller_close_to_the_full_decode(aspect_ratio):
    """data.jpeg_draft: a 1600x1200 JPEG is decoded at 1/2 (crop, resize: 800x600 still covers the
    448x336 resize) or 1/4 (pad: the long side to 336); the pixels are close to, not the same as,
    a full decode. A 640x480 source has no smaller scale that covers the resize: exact."""
    exact = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD, aspect_ratio)
    drafted = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD, aspect_ratio, jpeg_draft=True)
    large = jpeg_bytes(noisy_image(1600, 1200))
    probe = Image.open(io.BytesIO(large))
    drafted.draft(probe)
    assert probe.size == ((400, 300) if aspect_ratio == "pad" else (800, 600))
    full, fast = exact(Image.open(io.BytesIO(large))), drafted(Image.open(io.BytesIO(large)))
    difference = (full.int() - fast.int()).abs().float()
    assert 0 < difference.mean() < 3  # of 255 levels
    small = jpeg_bytes(noisy_image(640, 480))
    assert torch.equal(exact(Image.open(io.BytesIO(small))), drafted(Image.open(io.BytesIO(small))))


def test_the_sample_encoder_decodes_in_draft_only_when_asked():
    raw = {"__key__": "k", "jpg": jpeg_bytes(noisy_image(1600, 1200)), "txt": b"a caption"}
    transform = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD)
    pixels = {}
    for draft in (False, True):
        cfg = compose(["experiment=toy", "data.text_key=txt", f"data.jpeg_draft={draft}"]).data
        pixels[draft] = SampleEncoder(cfg, TOKENIZER, transform, 9).encode(raw)[1][0]
    assert torch.equal(pixels[False], transform(Image.open(io.BytesIO(raw["jpg"]))))
    assert not torch.equal(pixels[True], pixels[False])
