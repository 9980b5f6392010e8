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

from dataclasses import dataclass, replace

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


def resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP's processor: short side to `size` (long side rounded down, as transformers'
    get_resize_output_image_size does), bicubic, then the centre `size` x `size` crop."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # transformers' exact expression: the same rounding
    resized = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 tensor [3, S, S], by `aspect_ratio` (crop | pad | resize, see the module)."""

    size: int
    mean: tuple[float, ...]  # what the model will normalise with; pad's background colour
    std: tuple[float, ...]
    aspect_ratio: str = "crop"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image aspect ratio {self.aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")

    @property
    def background(self) -> tuple[int, ...]:
        """pad's colour: the tower's mean as LLaVA computes it (truncated, not rounded)."""
        return tuple(int(x * 255) for x in self.mean)

    def with_aspect_ratio(self, aspect_ratio: str) -> ImageTransform:
        """The same transform with another aspect-ratio policy."""
        return replace(self, aspect_ratio=aspect_ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect_ratio == "resize":
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:
            if self.aspect_ratio == "pad":
                image = expand2square(image, self.background)
            image = resize_and_centre_crop(image, self.size)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> the float pixels the tower expects (as VisionTower.normalize)."""
        return normalize_pixels(pixels, self.mean, self.std)
