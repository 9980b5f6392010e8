"""AnyRes, as LLaVA-NeXT and LLaVA-OneVision read an image at (close to) its own resolution.

The image is resized to the grid pinpoint that fits it best and cut into tower-sized tiles; a
downscaled copy of the whole image (the base view) goes first. The tower and a per-patch
connector turn each tile into a grid of visual tokens; the tiles' grids are stitched into one
feature map of the resized image, the rows that only hold the resize's padding are cut off
("unpad"), and one learned `image_newline` token ends every row. LLaVA-OneVision (`max_tiles`,
its `anyres_max_N`) then shrinks a map bigger than N tiles' worth of tokens bilinearly. The
layout is transformers' `LlavaNextModel.pack_image_features` / `LlavaOnevisionModel`'s, computed
with transformers' own helpers, so imported checkpoints give their logits (tests/test_anyres.py).

Legend: I images, T tiles of one image (the base view first), N visual tokens per tile (a
G x G grid), D token width, H/W feature rows/columns of the stitched map.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AnyResLayout(nn.Module):
    """Tiles per image, visual tokens per image, and the packing of tile tokens into image tokens.

    `grid_pinpoints` are the (height, width) resolutions an image may be resized to (multiples of
    `tile_size`); `tile_grid` is G, the tower's patches per tile side; `max_tiles` is OneVision's
    N of `anyres_max_N` (None: LLaVA-NeXT, no shrinking).
    """

    def __init__(
        self, grid_pinpoints: list[list[int]], tile_size: int, tile_grid: int, width: int, max_tiles: int | None
    ):
        super().__init__()
        self.grid_pinpoints = [[int(h), int(w)] for h, w in grid_pinpoints]
        self.tile_size = tile_size
        self.tile_grid = tile_grid
        self.max_tiles = max_tiles
        self.resampled: int | None = None  # a resampler's tokens per image (the model sets it): no layout
        self.image_newline = nn.Parameter(torch.randn(width) / math.sqrt(width))

    def forward(
        self,
        tiles_XND: torch.Tensor | None,
        images: list[tuple[int, tuple[int, int], bool]],
        frames_FND: torch.Tensor | None = None,
        frames_per_video: list[int] | tuple[int, ...] = (),
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A micro-batch's visual tokens: its images' (`images`: tiles, (height, width), tiled, each;
        `pack`) and its videos' (`pack_video`), None where there are none. One call per forward, on
        every rank: the call is what lets ZeRO-3's module hooks gather `image_newline`."""
        image_XD = video_XD = None
        if tiles_XND is not None:
            per_image = tiles_XND.split([tiles for tiles, _, _ in images])
            image_XD = torch.cat([self.pack(t, size, tiled) for t, (_, size, tiled) in zip(per_image, images)])
        if frames_FND is not None:
            video_XD = torch.cat([self.pack_video(frames) for frames in frames_FND.split(list(frames_per_video))])
        return image_XD, video_XD

    def grid_of(self, size_hw: tuple[int, int]) -> tuple[int, int]:
        """Tile rows and columns of an image of `size_hw` (height, width) pixels."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution(tuple(size_hw), self.grid_pinpoints)
        return math.ceil(height / self.tile_size), math.ceil(width / self.tile_size)

    def tiles_of(self, size_hw: tuple[int, int]) -> int:
        rows, columns = self.grid_of(size_hw)
        return 1 + rows * columns

    def num_tokens(self, size_hw: tuple[int, int], tiled: bool = True) -> int:
        """Visual tokens of one image: what `pack` returns for it (a resampler's: its tokens), known
        before the tower runs."""
        if self.resampled is not None:
            return self.resampled
        tokens_per_tile = self.tile_grid**2
        if not tiled:
            return tokens_per_tile + 1
        rows, columns = self.grid_of(size_hw)
        height, width = self._unpadded(size_hw, rows * self.tile_grid, columns * self.tile_grid)
        height, width = self._shrunk(height, width)
        return tokens_per_tile + height * (width + 1)

    def pack(self, tiles_TND: torch.Tensor, size_hw: tuple[int, int], tiled: bool = True) -> torch.Tensor:
        """One image's tile tokens [T, N, D] -> its visual tokens [n, D] (base view, then the
        unpadded map row by row, each row ending in `image_newline`)."""
        newline_D = self.image_newline.to(tiles_TND.dtype)
        if not tiled:
            return torch.cat((tiles_TND[0], newline_D[None]))
        grid = self.tile_grid
        rows, columns = self.grid_of(size_hw)
        base_ND, tiles_TND = tiles_TND[0], tiles_TND[1:]
        map_DHW = (
            tiles_TND.view(rows, columns, grid, grid, -1)
            .permute(4, 0, 2, 1, 3)
            .reshape(-1, rows * grid, columns * grid)
        )
        height, width = self._unpadded(size_hw, rows * grid, columns * grid)
        top, left = (map_DHW.shape[1] - height) // 2, (map_DHW.shape[2] - width) // 2
        map_DHW = map_DHW[:, top : top + height, left : left + width]
        shrunk = self._shrunk(height, width)
        if shrunk != (height, width):
            map_DHW = nn.functional.interpolate(map_DHW[None], list(shrunk), mode="bilinear")[0]
        newlines_DH1 = newline_D[:, None, None].expand(-1, map_DHW.shape[1], 1)
        rows_HWD = torch.cat((map_DHW, newlines_DH1), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((base_ND, rows_HWD))

    def video_tokens(self, frames: int) -> int:
        """Visual tokens of a video of `frames` frames (see `pack_video`)."""
        return frames * math.ceil(self.tile_grid / 2) ** 2 + 1

    def pack_video(self, frames_FND: torch.Tensor) -> torch.Tensor:
        """LLaVA-OneVision's video layout: each frame's G x G token grid pooled to ceil(G/2) a side
        (bilinear), the frames in order, then one `image_newline` [F * ceil(G/2)^2 + 1, D]."""
        grid, pooled = self.tile_grid, math.ceil(self.tile_grid / 2)
        maps_FDGG = frames_FND.view(frames_FND.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
        maps_FDPP = nn.functional.interpolate(maps_FDGG, size=[pooled, pooled], mode="bilinear")
        tokens_XD = maps_FDPP.permute(0, 2, 3, 1).reshape(-1, frames_FND.shape[-1])
        return torch.cat((tokens_XD, self.image_newline.to(tokens_XD.dtype)[None]))

    @staticmethod
    def _unpadded(size_hw: tuple[int, int], height: int, width: int) -> tuple[int, int]:
        """The rows and columns of a `height` x `width` map that hold the image, not the padding
        added to fit its aspect ratio (transformers' `unpad_image`, its rounding included)."""
        original_height, original_width = (int(s) for s in size_hw)
        if original_width / original_height > width / height:
            new_height = int(round(original_height * (width / original_width), 7))
            return height - 2 * ((height - new_height) // 2), width
        new_width = int(round(original_width * (height / original_height), 7))
        return height, width - 2 * ((width - new_width) // 2)

    def _shrunk(self, height: int, width: int) -> tuple[int, int]:
        """OneVision's anyres_max_N: a map over N tiles' worth of tokens (by 10%) is scaled down."""
        if self.max_tiles is None:
            return height, width
        ratio = math.sqrt(height * width / (self.max_tiles * self.tile_grid**2))
        if ratio <= 1.1:
            return height, width
        return int(height // ratio), int(width // ratio)

    def extra_repr(self) -> str:
        return f"grid_pinpoints={self.grid_pinpoints}, tile_size={self.tile_size}, max_tiles={self.max_tiles}"
