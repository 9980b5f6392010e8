"""A batch's images as the tower takes them, from the layouts Hugging Face processors produce.

Legend: B samples, I images (or tiles), T tiles of one image, C/H/W pixels, h/w patch rows/columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm_train.models.anyres import AnyResLayout


@dataclass
class Images:
    """`pixels` [I, C, H, W] go through the tower in one batch. `patch_mask` [I, h, w] is True where a
    patch holds image rather than padding (None: no padding). With AnyRes, `pixels` are tiles and
    image k owns the next `tiles[k]` of them, of an original `sizes[k]` (height, width); `tiled[k]` is
    False for an image read as its base view only (LLaVA-OneVision's multi-image samples)."""

    pixels: torch.Tensor
    patch_mask: torch.Tensor | None = None
    tiles: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    tiled: list[bool] = field(default_factory=list)


@dataclass
class Videos:
    """A batch's video frames [sum F, C, H, W] (video k owns the next `counts[k]`)."""

    frames: torch.Tensor
    counts: list[int]


def videos_of(pixels: torch.Tensor | None, frames_per_video: torch.Tensor | None) -> Videos | None:
    """Hugging Face's [V, F, C, H, W], or the pipeline's [sum F, C, H, W] with frames per video [V]."""
    if pixels is None or pixels.numel() == 0:
        return None
    if pixels.dim() == 5 and frames_per_video is None:
        return Videos(pixels.flatten(0, 1), [pixels.shape[1]] * pixels.shape[0])
    if pixels.dim() != 4 or frames_per_video is None or int(frames_per_video.sum()) != pixels.shape[0]:
        raise ValueError(
            f"pixel_values_videos of shape {list(pixels.shape)}: expected [videos, frames, 3, H, W], or "
            "[frames, 3, H, W] with video_frames (frames per video) summing to its frames"
        )
    return Videos(pixels, [int(n) for n in frames_per_video.tolist()])


def padded_images(pixels: torch.Tensor, pixel_mask: torch.Tensor | None, patch_size: int) -> Images:
    """[I, C, H, W], or Idefics2's [B, I, C, H, W] whose all-zero images pad samples with fewer
    images (dropped, as transformers drops them), with `pixel_mask` [B, I, H, W] / [I, H, W]."""
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
        real_I = pixels.flatten(1).ne(0).any(dim=1)
        pixels = pixels[real_I]
        if pixel_mask is not None:
            pixel_mask = pixel_mask.flatten(0, 1)[real_I]
    elif pixels.dim() != 4:
        raise ValueError(
            f"pixel_values of shape {list(pixels.shape)}: expected [images, 3, H, W] or [B, images, 3, H, W]"
        )
    if pixel_mask is None:
        return Images(pixels)
    if pixel_mask.shape != (pixels.shape[0], *pixels.shape[2:]):
        raise ValueError(
            f"pixel_attention_mask of shape {list(pixel_mask.shape)} does not cover pixel_values {list(pixels.shape)}"
        )
    patch_mask = patch_mask_of(pixel_mask, patch_size)
    return Images(pixels, None if bool(patch_mask.all()) else patch_mask)


def patch_mask_of(pixel_mask_IHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A patch counts as image when every pixel in it does (Idefics2's rule)."""
    windows = pixel_mask_IHW.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return windows.sum(dim=(-1, -2)) == patch_size * patch_size


def anyres_images(
    layout: AnyResLayout,
    pixels: torch.Tensor,
    image_sizes: torch.Tensor | None,
    batch_num_images: torch.Tensor | None = None,
) -> Images:
    """Tiles [I, T, C, H, W] (padded to the most tiles) or [sum T, C, H, W], with `image_sizes`.
    `batch_num_images` (images per sample, LLaVA-OneVision): images of multi-image samples are
    read as their base view only, as OneVision does."""
    if image_sizes is None:
        raise ValueError("an AnyRes model needs image_sizes (each image's height and width) with pixel_values")
    sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
    tiled = [True] * len(sizes)
    if batch_num_images is not None:
        tiled = [int(n) == 1 for n in batch_num_images.tolist() for _ in range(int(n))]
        if len(tiled) != len(sizes):
            raise ValueError(f"batch_num_images sums to {len(tiled)} images but image_sizes has {len(sizes)}")
    tiles = [layout.tiles_of(size) if tile else 1 for size, tile in zip(sizes, tiled)]
    if pixels.dim() == 5:
        if pixels.shape[0] != len(sizes) or pixels.shape[1] < max(tiles):
            raise ValueError(
                f"pixel_values of shape {list(pixels.shape)} do not hold the tiles of {len(sizes)} images "
                f"of sizes {sizes} ({tiles} tiles)"
            )
        pixels = torch.cat([image[:count] for image, count in zip(pixels, tiles)])
    elif pixels.dim() != 4 or pixels.shape[0] != sum(tiles):
        raise ValueError(
            f"pixel_values of shape {list(pixels.shape)}: {len(sizes)} images of sizes {sizes} make {sum(tiles)} tiles"
        )
    return Images(pixels, tiles=tiles, sizes=sizes, tiled=tiled)
