"""Image preprocessing as the vision towers' own processors do it (normalising is the model's).

`data.image_aspect_ratio` picks how a non-square image becomes the tower's S x S input:
- crop: CLIP's processor: the short side resized to S (bicubic), then centre-cropped. The output
  size and crop box are computed as transformers' CLIPImageProcessor computes them, so the pixels
  are the same, bit for bit (tests/test_preprocess.py).
- pad: LLaVA-1.5's `expand2square` first (llava/mm_utils.py): the image pasted centred on a square
  of the tower's mean colour, `tuple(int(x * 255) for x in image_mean)`, then the crop path (a
  square only resizes). The same pixels as LLaVA's training code and transformers'
  LlavaImageProcessor(do_pad=True).
- resize: a straight bicubic resize to S x S (SigLIP's processor); the aspect ratio is not kept.

Loader workers hand over uint8 pixels: 4x fewer bytes through shared memory and the host-to-device
copy than float32, which is what kept one worker below a plain in-process loop (bench/data.py). The
model normalises them with its tower's mean and std (VisionTower.normalize), bit-identically to
normalising here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlm_train.models.vision import normalize_pixels

ASPECT_RATIOS = ("crop", "pad", "resize")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's `expand2square`: `image` pasted centred (rounded down) on a square of `background`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """CLIP's processor's resize: the short side to `size` (the long side rounded down, as
    transformers' get_resize_output_image_size does), bicubic; the image itself when it is so."""
    width, height = image.size
    if min(width, height) == size:  # PIL would return a copy of it
        return image
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # transformers' exact expression: the same rounding
    return image.resize((size, new_long) if width <= height else (new_long, size), Image.Resampling.BICUBIC)


def centre_crop_origin(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """(left, top) of the centre `size` x `size` crop, rounded down as CLIP's processor does."""
    return (image_size[0] - size) // 2, (image_size[1] - size) // 2


def pixels_view(image: Image.Image) -> torch.Tensor:
    """The image's pixels [H, W, C] uint8 in one copy (PIL's `tobytes`, which numpy wraps without
    copying again). The buffer is a bytes object, so numpy marks it read-only and torch warns that
    it does not track that: nothing writes a transform's output (collate copies it into the batch)."""
    array = np.asarray(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 tensor [3, S, S], by `aspect_ratio` (crop | pad | resize, see the module)."""

    size: int
    mean: tuple[float, ...]  # what the model will normalise with; pad's background colour
    std: tuple[float, ...]
    aspect_ratio: str = "crop"
    jpeg_draft: bool = False  # see `draft`

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image aspect ratio {self.aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")

    @property
    def background(self) -> tuple[int, ...]:
        """pad's colour: the tower's mean as LLaVA computes it (truncated, not rounded)."""
        return tuple(int(x * 255) for x in self.mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A view [3, S, S] of one copy of the resized image's pixels: the crop is a slice of it
        (collate's one copy into the batch makes it contiguous)."""
        if self.jpeg_draft:
            self.draft(image)
        if image.mode != "RGB":  # convert() to the same mode would copy the decoded image
            image = image.convert("RGB")
        if self.aspect_ratio == "resize":
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
            return pixels_view(image).permute(2, 0, 1)
        if self.aspect_ratio == "pad":
            image = expand2square(image, self.background)
        image = resize_short_side(image, self.size)
        left, top = centre_crop_origin(image.size, self.size)
        return pixels_view(image)[top : top + self.size, left : left + self.size].permute(2, 0, 1)

    def draft(self, image: Image.Image) -> None:
        """data.jpeg_draft: a JPEG not yet decoded is decoded at the smallest of 1/1, 1/2, 1/4, 1/8
        of its size (libjpeg's DCT-domain scaling) that still covers what the bicubic resize makes
        (crop: the short side resized to S; pad: the long side; resize: S x S), so the resize
        always shrinks. Not the same pixels as a full decode then resize (bench/data.py states the
        difference); a no-op for other formats and for images smaller than twice that."""
        width, height = image.size
        if self.aspect_ratio == "resize":
            needed = (self.size, self.size)
        else:
            side = min(width, height) if self.aspect_ratio == "crop" else max(width, height)
            needed = (math.ceil(self.size * width / side), math.ceil(self.size * height / side))
        image.draft("RGB", needed)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> the float pixels the tower expects (as VisionTower.normalize)."""
        return normalize_pixels(pixels, self.mean, self.std)


@dataclass(frozen=True)
class AnyResTransform:
    """PIL image -> uint8 tiles [1 + R*C, 3, S, S] as LLaVA-NeXT's and LLaVA-OneVision's image
    processors make them (the same pixels, tests/test_anyres.py): first the whole image resized to
    S x S (the base view), then the image resized to fit the best of `grid_pinpoints` (height,
    width) keeping its aspect ratio, centred on black, and cut into S x S tiles row by row."""

    size: int
    grid_pinpoints: tuple[tuple[int, int], ...]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from transformers.image_processing_utils import select_best_resolution

        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        target_h, target_w = select_best_resolution((height, width), [list(p) for p in self.grid_pinpoints])
        fitted_h, fitted_w = fit_inside((height, width), (target_h, target_w))
        fitted = image.resize((fitted_w, fitted_h), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        canvas.paste(fitted, ((target_w - fitted_w) // 2, (target_h - fitted_h) // 2))
        base = (
            image
            if image.size == (self.size, self.size)
            else image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        )
        grid_HWC = pixels_view(canvas)
        side = self.size
        tiles = [
            grid_HWC[top : top + side, left : left + side]
            for top in range(0, target_h, side)
            for left in range(0, target_w, side)
        ]
        return torch.stack([pixels_view(base), *tiles]).permute(0, 3, 1, 2)


def fit_inside(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) an image takes inside `target_hw` keeping its aspect ratio (rounded up,
    as transformers' get_patch_output_size)."""
    (height, width), (target_h, target_w) = size_hw, target_hw
    scale_w, scale_h = target_w / width, target_h / height  # scale first: the same float rounding
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)
