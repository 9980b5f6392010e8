"""Image preprocessing as CLIP/SigLIP expect: resize the short side, centre-crop (normalising is the model's).

Loader workers hand over uint8 pixels: 4x fewer bytes through shared memory and the host-to-device
copy than float32, which is what kept one worker below a plain in-process loop (bench/data.py). The
model normalises them with its tower's mean and std (VisionTower.normalize), bit-identically to
normalising here.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlm_train.models.vision import normalize_pixels


class ImageTransform:
    """PIL image -> uint8 tensor [3, S, S]: the short side resized to S (bicubic), centre-cropped."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)  # what the model will normalise with

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        if (width, height) != (self.size, self.size):
            scale = self.size / min(width, height)
            resized = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            image = image.resize(resized, Image.BICUBIC)
            left, top = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> the float pixels the tower expects (as VisionTower.normalize)."""
        return normalize_pixels(pixels, self.mean, self.std)
