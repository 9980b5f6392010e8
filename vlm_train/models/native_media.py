"""A native-resolution tower's media in the decoder's input (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the
merged patches of the batch's images and videos in their token slots, Qwen3-VL's DeepStack features
for the decoder's first layers, and the M-RoPE positions of every sample.

Legend: B rows, T tokens, N patches of the batch's media, K values per patch, X visual tokens,
k DeepStack layers, Dv tower width, Dl decoder width.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from vlm_train.errors import ConfigError
from vlm_train.models.connectors.patch_merger import PatchMergerConnector
from vlm_train.models.qwen_vl import MRopeCausalLM, NativeResolutionTower, mrope_positions, per_frame_grids

Media = tuple[torch.Tensor | None, torch.Tensor | None]  # (images', videos') patches or grids


def fill_slots(
    embeds_BTDl: torch.Tensor, slots_BT: torch.Tensor, visual_XDl: torch.Tensor, what: str, slots: str
) -> torch.Tensor:
    """`embeds_BTDl` with `visual_XDl` in its slots, in order; without slots, the visual tokens are
    added with weight zero (so every parameter that made them still gets a gradient)."""
    if not slots_BT.any():
        return embeds_BTDl + 0.0 * visual_XDl.sum()
    if visual_XDl.shape[0] != int(slots_BT.sum()):
        raise ValueError(
            f"{what} give {visual_XDl.shape[0]} visual tokens but input_ids hold {int(slots_BT.sum())} {slots}"
        )
    return embeds_BTDl.masked_scatter(slots_BT.unsqueeze(-1), visual_XDl.to(embeds_BTDl.dtype))


def embed_native(
    model: Any, input_ids_BT: torch.Tensor, patches: Media, grids: Media
) -> tuple[torch.Tensor, AbstractContextManager]:
    """Token embeddings with the images' and then the videos' merged patches in their slots, from one
    tower call (ZeRO-3: every rank makes the same calls; without media, a blank image's), and the
    context the decoder runs in (Qwen3-VL: its DeepStack features; others: none). `model` is the
    VisionLanguageModel."""
    tower, connector = model.vision, model.connector
    assert isinstance(tower, NativeResolutionTower), "only a native-resolution tower reads patches and grids"
    if not isinstance(connector, PatchMergerConnector):
        raise ConfigError("a native-resolution tower's patches are merged by connector=patch_merger")
    media = [(p, g) for p, g in zip(patches, grids) if p is not None and p.numel()]
    if any(grid is None for _, grid in media):
        raise ValueError("a native-resolution tower needs image_grid_thw / video_grid_thw with its patches")
    patches_NK, grids_G3 = (torch.cat(part) for part in zip(*media)) if media else tower.blank(input_ids_BT.device)
    features = model.tower_features(patches_NK, grids_G3)  # [N, Dv], or [1 + k, N, Dv] with DeepStack
    stacked = features.dim() == 3
    tokens_XDl = connector.merge_units(features[0] if stacked else features)
    images = _image_tokens(tower, patches[0], grids[0]) if media else len(tokens_XDl)
    slots = {"image": input_ids_BT == model.image_token_id}
    if model.video_token_id is not None:
        slots["video"] = input_ids_BT == model.video_token_id
    if tokens_XDl[images:].shape[0] and "video" not in slots:
        raise ValueError("pixel_values_videos given, but this model has no video token")
    embeds_BTDl = model.llm.embed(input_ids_BT)
    for kind, slots_BT in slots.items():
        part = tokens_XDl[:images] if kind == "image" else tokens_XDl[images:]
        if slots_BT.any() and not len(part):
            raise ValueError(f"input_ids hold {kind} tokens but no {kind} patches were given")
        embeds_BTDl = fill_slots(embeds_BTDl, slots_BT, part, f"{kind} grids", f"{kind}-token slots")
    if not stacked:
        return embeds_BTDl, nullcontext()
    deep = [connector.merge_deepstack(layer, features[1 + layer]) for layer in range(len(features) - 1)]
    return _with_deepstack(model.llm, embeds_BTDl, slots, deep, images)


def _image_tokens(tower: NativeResolutionTower, patches: torch.Tensor | None, grids: torch.Tensor | None) -> int:
    if patches is None or not patches.numel() or grids is None:
        return 0
    return int(grids.prod(-1).sum()) // tower.merge_size**2


def _with_deepstack(
    llm: Any, embeds_BTDl: torch.Tensor, slots: dict[str, torch.Tensor], deep: list[torch.Tensor], images: int
) -> tuple[torch.Tensor, AbstractContextManager]:
    """Each DeepStack layer's tokens [X, Dl] in the order of the visual positions (images' and
    videos' interleaved as they occur), as transformers' Qwen3VLModel joins them."""
    decoder = getattr(llm, "hf_model", None)
    if not isinstance(decoder, MRopeCausalLM):
        raise ConfigError("a DeepStack tower (vision.family=qwen3_vl) feeds a Qwen3-VL decoder: llm.family=qwen3_vl")
    visual_BT = slots["image"] | slots["video"] if "video" in slots else slots["image"]
    if not visual_BT.any():  # a blank image: its DeepStack tokens join with weight zero (see fill_slots)
        return embeds_BTDl + 0.0 * sum(layer.sum() for layer in deep), nullcontext()
    is_image = slots["image"][visual_BT]
    joined = []
    for layer in deep:
        tokens = layer.new_zeros(len(is_image), layer.shape[-1])
        tokens[is_image] = layer[: int(is_image.sum())]
        tokens[~is_image] = layer[int(is_image.sum()) :]
        joined.append(tokens)
    return embeds_BTDl, decoder.deepstack(visual_BT, joined)


def native_positions(
    model: Any,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None,
    grids: Media,
    second_per_grid_ts: torch.Tensor | None,
) -> torch.Tensor:
    """M-RoPE positions [3, B, T] per sample (`attention_mask_BT`: padding mask or packed segments).
    Qwen2.5-VL spaces a video's temporal positions by tokens_per_second x seconds per grid step;
    Qwen3-VL places each temporal patch of a video as an image of its own (timestamps between)."""
    tower = model.vision
    assert isinstance(tower, NativeResolutionTower), "M-RoPE positions come from a native-resolution tower's grids"
    steps = None
    tokens_per_second = getattr(tower.hf_model.config, "tokens_per_second", None)
    if tokens_per_second is not None and grids[1] is not None:
        seconds = second_per_grid_ts if second_per_grid_ts is not None else torch.ones(len(grids[1]))
        steps = [float(s) * tokens_per_second for s in seconds.tolist()]
    if tower.family == "qwen3_vl" and grids[1] is not None:
        grids = (grids[0], per_frame_grids(grids[1]))
    media_ids = (model.image_token_id, model.video_token_id)
    return mrope_positions(input_ids_BT, attention_mask_BT, media_ids, grids, tower.merge_size, steps)
