"""Image preprocessing as CLIP/SigLIP expect: resize the short side, centre-crop, normalise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """PIL image -> float tensor [3, S, S], normalised with the tower's mean and std."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        if (width, height) != (self.size, self.size):
            scale = self.size / min(width, height)
            resized = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            image = image.resize(resized, Image.BICUBIC)
            left, top = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std
