"""Images for a native-resolution tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), as Qwen's image processor makes them.

An image keeps (close to) its own size: `smart_resize` (transformers' own) rounds each side to a
multiple of 28 px (patch 14 x merge 2; Qwen3-VL: 32) within `min_pixels`..`max_pixels`, keeping the aspect ratio;
the resize is bicubic, as the processor's. The resized image is cut into 14 px patches in merge-unit
order (each 2 x 2 block's four patches in a row, blocks row by row), each patch repeated over the
temporal patch (2: an image is a one-frame video), flattened channel-major: uint8 [N, 3 x 2 x 14 x 14].
The model normalises them (NativeResolutionTower.normalize); the normalised values equal the
processor's `pixel_values` (tests/test_qwen_vl_data.py). Its grid (t, h, w) in patches is what
the tower, the image's token count (h x w / 4) and its M-RoPE positions are computed from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vlm_train.data.preprocess import pixels_view


@dataclass(frozen=True)
class NativeResolutionTransform:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    tokens_per_second: float | None = None  # Qwen2.5-VL: temporal positions per second of video (None: Qwen2-VL)
    timestamps: bool = False  # Qwen3-VL: each temporal patch of a video in its own span after its timestamp

    @property
    def size(self) -> int:
        """The smallest image's side (one merge unit): what a text-only sample's blank stands for."""
        return self.patch_size * self.merge_size

    @property
    def patch_values(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def resized(self, size_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) an image of `size_hw` is resized to (ValueError past a 200:1 aspect ratio)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # no torchvision

        factor = self.patch_size * self.merge_size
        return smart_resize(*size_hw, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def grid_of(self, size_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(t, h, w) in patches of an image of `size_hw` (height, width)."""
        height, width = self.resized(size_hw)
        return 1, height // self.patch_size, width // self.patch_size

    def tokens_of(self, size_hw: tuple[int, int]) -> int:
        """Visual tokens of an image of `size_hw`: its merged 2 x 2 blocks."""
        _, rows, columns = self.grid_of(size_hw)
        return rows * columns // self.merge_size**2

    def empty(self) -> torch.Tensor:
        """No image's patches [0, K]."""
        return torch.empty(0, self.patch_values, dtype=torch.uint8)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = self.resized((image.height, image.width))
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return self.patches(pixels_view(image).permute(2, 0, 1)[None])

    def video_tokens(self, frames: int, size_hw: tuple[int, int]) -> int:
        """Visual tokens of `frames` frames of `size_hw`: their temporal pairs' merged blocks."""
        return -(-frames // self.temporal_patch_size) * self.tokens_of(size_hw)

    def video(self, frames_FCHW: torch.Tensor, times: list[float]) -> tuple[torch.Tensor, tuple[int, int, int], float]:
        """A clip's frames (all resized alike by `resized`) -> its patches [N, K], grid (t, h, w) and
        seconds per temporal patch (Qwen2.5-VL's second_per_grid_ts). Frames that do not fill the last
        temporal patch are padded with the last frame, as Qwen's video processor pads them."""
        short = -len(frames_FCHW) % self.temporal_patch_size
        if short:
            frames_FCHW = torch.cat([frames_FCHW, frames_FCHW[-1:].expand(short, -1, -1, -1)])
        _, _, height, width = frames_FCHW.shape
        grid = (len(frames_FCHW) // self.temporal_patch_size, height // self.patch_size, width // self.patch_size)
        step = times[1] - times[0] if len(times) > 1 else 1.0  # seconds between sampled frames
        return self.patches(frames_FCHW), grid, self.temporal_patch_size * step

    def patch_times(self, times: list[float]) -> list[float]:
        """Each temporal patch's time in seconds (Qwen3-VL's timestamps): the mean of its first and last
        frame's, the last patch filled with the last frame as `video` fills it."""
        t = self.temporal_patch_size
        times = list(times) + [times[-1]] * (-len(times) % t)
        return [(times[i] + times[i + t - 1]) / 2 for i in range(0, len(times), t)]

    def patches(self, frames_FCHW: torch.Tensor) -> torch.Tensor:
        """Frames of one size [F, 3, H, W] (F a multiple of the temporal patch, or 1: repeated) ->
        patches [F / 2 x h x w, K] in the processor's order."""
        if len(frames_FCHW) == 1:
            frames_FCHW = frames_FCHW.expand(self.temporal_patch_size, -1, -1, -1)
        frames, channels, height, width = frames_FCHW.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        rows, columns = height // p, width // p
        grid = frames_FCHW.reshape(frames // t, t, channels, rows // m, m, p, columns // m, m, p)
        # (frames/t, rows/m, columns/m, m, m, C, t, p, p): merge units row by row, channel-major patches
        return grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(-1, channels * t * p * p).contiguous()
