"""VisionLanguageModel: vision tower -> connector -> causal LM, in plain PyTorch.

Legend: B batch, T tokens, I images (or AnyRes tiles) in the batch, C/H/W pixels, P patches per
image, N visual tokens per image, X visual tokens of the batch, M media tokens of the longest image
or video (cross-attention), Dv tower width, Dl decoder width, V vocabulary.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlm_train.errors import ConfigError
from vlm_train.models.anyres import AnyResLayout
from vlm_train.models.connectors.base import Connector, Placement
from vlm_train.models.connectors.cross_attention import CrossAttentionConnector
from vlm_train.models.decoder import IGNORE_INDEX, Decoder, token_cross_entropy
from vlm_train.models.images import Images, Videos, anyres_images, padded_images, videos_of
from vlm_train.models.native_media import embed_native, fill_slots, native_positions
from vlm_train.models.vision import VisionTower

__all__ = ["IGNORE_INDEX", "VLMOutput", "VisionLanguageModel", "token_cross_entropy"]


@dataclass
class VLMOutput:
    """`loss` is the mean over this batch's label tokens; training reduces `loss_sum` by the
    label-token count of the whole global batch instead (see training/loop.py). With labels and a
    tensor-parallel decoder, `logits` is this TP rank's vocabulary slice."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """A VLM whose visual tokens fill the image-token slots of `input_ids`.

    `input_ids` carry one `image_token_id` per visual-token slot (N per image, in image order),
    as Hugging Face processors expand `<image>`; `pixel_values` holds the batch's images in the
    order their slots appear, in one of the layouts Hugging Face processors produce:

    - [I, C, H, W]: one tower-sized image each (LLaVA, BLIP-2);
    - [B, I, C, H, W] with `pixel_attention_mask` [B, I, H, W] (Idefics2): images padded to the
      batch's largest, all-zero padding images dropped, padded patches masked in tower and resampler;
    - with `anyres` (LLaVA-NeXT, LLaVA-OneVision): tiles [I, T, C, H, W] (or concatenated,
      [sum T, C, H, W]) and `image_sizes` [I, 2], each image's (height, width) before tiling; its
      visual-token count then depends on that size (`anyres.num_tokens`). OneVision's
      `batch_num_images` (images per sample) reads the images of multi-image samples untiled.

    Videos (with AnyRes and a `video_token_id`, LLaVA-OneVision's layout: `anyres.pack_video`) fill
    the video-token slots: `pixel_values_videos` [V, F, C, H, W], or frames [sum F, C, H, W] with
    `video_frames` [V] (frames per video), as the data pipeline sends videos of different lengths.

    With cross-attention, each image (and video) has ONE slot, marking where it occurs; its visual
    tokens (with AnyRes those of its layout) are the media the decoder's gated blocks read.

    A native-resolution tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) takes Qwen's processor layout: `pixel_values`
    [N, K] the images' patches, `image_grid_thw` [I, 3] each image's (t, h, w) in patches (videos:
    `pixel_values_videos`, `video_grid_thw`, Qwen2.5-VL's `second_per_grid_ts`); each merged 2 x 2
    block fills one slot, and `position_ids` [3, B, T] (M-RoPE) are computed per sample when not given.
    """

    def __init__(
        self,
        vision: VisionTower,
        connector: Connector[Any],
        llm: Decoder,
        image_token_id: int,
        anyres: AnyResLayout | None = None,
        video_token_id: int | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        if anyres is not None:
            check_anyres_connector(connector, anyres)
            if not connector.per_patch and connector.placement == Placement.SEQUENCE:
                # a resampler reads an image's tiles as one set: no layout, no newline
                anyres.resampled = connector.num_tokens
                anyres.image_newline.requires_grad_(False)
        self.anyres = anyres
        self.video_token_id = video_token_id
        self.native_resolution = bool(getattr(vision, "native_resolution", False))
        if (
            video_token_id is not None
            and not self.native_resolution
            and (anyres is None or anyres.resampled is not None)
        ):
            raise ConfigError(
                "video frames are laid out as LLaVA-OneVision does: the model needs vision.anyres and a "
                "per-patch connector (mlp, ln_adapter) or cross_attention"
            )
        connector.attach(llm)

    @property
    def num_image_tokens(self) -> int:
        """Image-token slots the text must carry per image (visual tokens, or 1 for cross-attention);
        with AnyRes, those of a tower-sized image (others: `anyres.num_tokens(size)`)."""
        if self.anyres is not None and self.connector.placement == Placement.SEQUENCE:
            return self.anyres.num_tokens((self.vision.image_size, self.vision.image_size))
        return self.connector.num_tokens

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        if self.native_resolution:
            grids = (image_grid_thw, video_grid_thw)
            embeds_BTDl, condition = embed_native(self, input_ids, (pixel_values, pixel_values_videos), grids)
            if position_ids is None:
                position_ids = self.mrope_positions(input_ids, attention_mask, grids, second_per_grid_ts)
        elif self.connector.placement == Placement.SEQUENCE:
            images = self.images(pixel_values, image_sizes, pixel_attention_mask, batch_num_images)
            videos = self.videos(pixel_values_videos, video_frames)
            embeds_BTDl = self.embed(images, input_ids, videos)
            condition = self.connector.conditioned(input_ids == self.image_token_id)
        else:
            images = self.images(pixel_values, image_sizes, pixel_attention_mask, batch_num_images)
            videos = self.videos(pixel_values_videos, video_frames)
            embeds_BTDl, condition = self.llm.embed(input_ids), self.cross_attention_media(images, videos, input_ids)
        with condition:
            logits_BTV = self.llm(embeds_BTDl, attention_mask, position_ids)
        # A tensor-parallel decoder returns its rank's vocabulary slice: it gathers the whole
        # logits and computes the (vocab-parallel, unsharded-equal) loss itself.
        if labels is None:
            return VLMOutput(logits=self.llm.gather_logits(logits_BTV))
        loss_sum, count = self.llm.token_cross_entropy(logits_BTV, labels)
        return VLMOutput(logits_BTV, loss=loss_sum / count.clamp(min=1), loss_sum=loss_sum, num_label_tokens=count)

    def images(
        self,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
    ) -> Images | None:
        """The batch's images as the tower takes them (None without images); see the class docstring."""
        if pixel_values is None or pixel_values.numel() == 0:
            return None
        if self.anyres is not None:
            return anyres_images(self.anyres, pixel_values, image_sizes, batch_num_images)
        if image_sizes is not None or batch_num_images is not None:
            raise ValueError(
                "image_sizes are for AnyRes models (LLaVA-NeXT/OneVision); this model reads one tile per image"
            )
        return padded_images(pixel_values, pixel_attention_mask, self.vision.patch_size)

    def videos(self, pixel_values_videos: torch.Tensor | None, video_frames: torch.Tensor | None) -> Videos | None:
        """The batch's videos (None without any); see the class docstring."""
        videos = videos_of(pixel_values_videos, video_frames)
        if videos is not None and (self.video_token_id is None or self.anyres is None):
            raise ValueError("pixel_values_videos are for LLaVA-OneVision models; this model reads no video")
        return videos

    def embed(self, images: Images | None, input_ids_BT: torch.Tensor, videos: Videos | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens in the image-token (and video-token) slots."""
        embeds_BTDl = self.llm.embed(input_ids_BT)
        slots_BT = input_ids_BT == self.image_token_id
        image_XDl, video_XDl = self.visual_tokens(*self.encode_media(images, videos, slots_BT), images, videos)
        if image_XDl is not None:
            embeds_BTDl = fill_slots(
                embeds_BTDl,
                slots_BT,
                image_XDl,
                f"{len(images.pixels) if images else 0} images",
                f"image-token slots ({self.num_image_tokens} per tower-sized image expected)",
            )
        elif slots_BT.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        if self.video_token_id is None:
            return embeds_BTDl
        video_slots_BT = input_ids_BT == self.video_token_id
        if video_XDl is None or videos is None:
            if video_slots_BT.any():
                raise ValueError("input_ids hold video tokens but no pixel_values_videos were given")
            return embeds_BTDl
        what = f"{len(videos.counts)} videos of {videos.counts} frames"
        return fill_slots(embeds_BTDl, video_slots_BT, video_XDl, what, "video-token slots")

    def visual_tokens(
        self,
        image_tokens_INDl: torch.Tensor | None,
        frame_tokens_FNDl: torch.Tensor | None,
        images: Images | None,
        videos: Videos | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The connector's tokens per tower input -> the images' and the videos' visual tokens [X, Dl]
        in slot order: each image's as they are, or with AnyRes each image's tiles packed into its
        layout (without images: the blank tile's base view and newline, so every parameter takes
        part) and each video's frames into OneVision's video layout, in one `anyres` call."""
        if self.anyres is None or self.anyres.resampled is not None:
            return (None if image_tokens_INDl is None else image_tokens_INDl.flatten(0, 1)), None
        layout = [(1, (1, 1), False)] if images is None else list(zip(images.tiles, images.sizes, images.tiled))
        return self.anyres(image_tokens_INDl, layout, frame_tokens_FNDl, videos.counts if videos else ())

    def encode_media(
        self, images: Images | None, videos: Videos | None, slots_BT: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Connector tokens of the batch's images (or tiles) and of its video frames, from one tower
        call: under ZeRO-3 each call gathers the tower's parameters, so every rank must make the same
        calls whatever its mix of images, video and text, or the ranks hang. Without either, a blank
        image's tokens (`encode_images_or_blank`)."""
        if videos is None and images is not None and self.anyres is not None and self.anyres.resampled is not None:
            return self.resample_per_image(self.tower_features(images.pixels), images.tiles), None
        if videos is None:
            return self.encode_images_or_blank(images, slots_BT), None
        if images is None:
            return None, self.encode_images(videos.frames)
        if images.patch_mask is not None:
            raise ValueError("padded images (pixel_attention_mask) and videos in one batch are not supported")
        parts = [images.pixels, videos.frames]
        if parts[0].dtype != parts[1].dtype:  # uint8 from the loader next to float from a processor
            parts = [self.vision.normalize(p) if p.dtype == torch.uint8 else p for p in parts]
        tokens_INDl = self.encode_images(torch.cat(parts))
        return tokens_INDl[: len(images.pixels)], tokens_INDl[len(images.pixels) :]

    def encode_images_or_blank(self, images: Images | None, slots_BT: torch.Tensor) -> torch.Tensor:
        """Connector outputs for the batch's images (or tiles). Without images, those of one blank
        image: under ZeRO-3 every rank must gather the same parameters, or a rank without images
        hangs the others (its output is then used with weight zero)."""
        if images is not None:
            return self.encode_images(images.pixels, images.patch_mask)
        if slots_BT.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        size = self.vision.image_size
        return self.encode_images(torch.zeros(1, 3, size, size, device=slots_BT.device))

    def encode_images(self, pixels_ICHW: torch.Tensor, patch_mask_IHW: torch.Tensor | None = None) -> torch.Tensor:
        features_IPDv = self.tower_features(pixels_ICHW, patch_mask_IHW)
        if patch_mask_IHW is None:
            return self.connector(features_IPDv)
        return self.connector.masked(features_IPDv, patch_mask_IHW.flatten(1))

    def tower_features(self, pixels_ICHW: torch.Tensor, patch_mask_IHW: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's features of uint8 or normalised pixels; `patch_mask_IHW` is Idefics2's padding
        mask, or a native-resolution tower's grids (its pixels are then patches [N, K])."""
        tower_dtype = next(self.vision.parameters()).dtype
        tower_trains = any(p.requires_grad for p in self.vision.parameters())
        if pixels_ICHW.dtype == torch.uint8:  # as the data loader sends them (data/preprocess.py)
            pixels_ICHW = self.vision.normalize(pixels_ICHW)
        with torch.set_grad_enabled(tower_trains and torch.is_grad_enabled()):
            return self.vision(pixels_ICHW.to(tower_dtype), patch_mask_IHW)

    def cross_attention_media(
        self, images: Images | None, videos: Videos | None, input_ids_BT: torch.Tensor
    ) -> AbstractContextManager:
        """The cross-attention blocks' state for one forward: each image's connector output as one
        media item (fixed size), or with AnyRes each image's and each video's visual tokens as they
        would fill a sequence connector's slots, one item each in the order of their one slot,
        padded to the longest with a key mask."""
        slots_BT = input_ids_BT == self.image_token_id
        if self.anyres is None:
            return self.connector.conditioned(slots_BT, self.encode_images_or_blank(images, slots_BT))
        video_slots_BT = (
            input_ids_BT == self.video_token_id if self.video_token_id is not None else torch.zeros_like(slots_BT)
        )
        if videos is None and video_slots_BT.any():
            raise ValueError("input_ids hold video tokens but no pixel_values_videos were given")
        image_XDl, video_XDl = self.visual_tokens(*self.encode_media(images, videos, slots_BT), images, videos)
        image_items = [] if image_XDl is None else list(image_XDl.split(image_lengths(self.anyres, images)))
        video_items = [] if video_XDl is None else list(video_XDl.split(video_lengths(self.anyres, videos)))
        is_video_S = video_slots_BT[slots_BT | video_slots_BT]
        media_IMDl, keys_IM = padded_media(in_slot_order(image_items, video_items, is_video_S))
        connector = self.connector
        assert isinstance(connector, CrossAttentionConnector)  # check_anyres_connector lets no other through
        return connector.conditioned(slots_BT | video_slots_BT, media_IMDl, keys_IM)

    def mrope_positions(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor | None,
        grids: tuple[torch.Tensor | None, torch.Tensor | None],
        second_per_grid_ts: torch.Tensor | None,
    ) -> torch.Tensor:
        """M-RoPE positions [3, B, T] per sample (models/native_media.py)."""
        return native_positions(self, input_ids_BT, attention_mask_BT, grids, second_per_grid_ts)

    def resample_per_image(self, features_TPDv: torch.Tensor, tiles: list[int]) -> torch.Tensor:
        """AnyRes with a resampler (qformer, perceiver): each image's tiles' patches (base view
        first) as one set, padded to the batch's largest with a mask -> its `num_tokens` [I, N, Dl]."""
        per_image = [tiles_TPDv.flatten(0, 1) for tiles_TPDv in features_TPDv.split(tiles)]
        context_ILDv = nn.utils.rnn.pad_sequence(per_image, batch_first=True)
        lengths = torch.tensor([len(patches) for patches in per_image], device=context_ILDv.device)
        mask_IL = torch.arange(context_ILDv.shape[1], device=context_ILDv.device)[None] < lengths[:, None]
        return self.connector.masked(context_ILDv, mask_IL)


def check_anyres_connector(connector: Connector[Any], anyres: AnyResLayout) -> None:
    """AnyRes lays out per-patch tokens (mlp, ln_adapter; cross_attention's media, one item of its
    own length per image) or lets a resampler (qformer, perceiver) read all of an image's tiles at once."""
    per_patch = connector.per_patch and connector.num_tokens == anyres.tile_grid**2
    resampler = not connector.per_patch and connector.placement == Placement.SEQUENCE and connector.reads_sets
    if not (per_patch or resampler or isinstance(connector, CrossAttentionConnector)):
        raise ConfigError(
            "AnyRes needs a connector that gives one token per patch (mlp, ln_adapter, cross_attention) or "
            f"resamples a set of patches (qformer, perceiver), not {type(connector).__name__}"
        )


def image_lengths(anyres: AnyResLayout, images: Images | None) -> list[int]:
    """Visual tokens of each image's layout; without images, the blank tile's (`visual_tokens`)."""
    if images is None:
        return [anyres.num_tokens((1, 1), tiled=False)]
    return [anyres.num_tokens(size, tiled) for size, tiled in zip(images.sizes, images.tiled)]


def video_lengths(anyres: AnyResLayout, videos: Videos | None) -> list[int]:
    return [anyres.video_tokens(frames) for frames in videos.counts] if videos is not None else []


def in_slot_order(
    images: list[torch.Tensor], videos: list[torch.Tensor], is_video_S: torch.Tensor
) -> list[torch.Tensor]:
    """Media items in the order of their slots (`is_video_S`: each slot, in row-major order, a video's
    or an image's). Without slots, all items (unseen: images in a batch without slots, or the blank)."""
    if not len(is_video_S):
        return images + videos
    slots = (int((~is_video_S).sum()), int(is_video_S.sum()))
    if slots != (len(images), len(videos)):
        raise ValueError(
            f"input_ids hold {slots[0]} image and {slots[1]} video slots for {len(images)} images and "
            f"{len(videos)} videos: cross_attention takes one slot per image and per video"
        )
    queues = (iter(images), iter(videos))
    return [next(queues[int(is_video)]) for is_video in is_video_S.tolist()]


def padded_media(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Media items [n_i, Dl] -> [I, M, Dl] padded to the longest, and the key mask [I, M] (True: real)."""
    media_IMDl = nn.utils.rnn.pad_sequence(items, batch_first=True)
    lengths_I = torch.tensor([len(item) for item in items], device=media_IMDl.device)
    return media_IMDl, torch.arange(media_IMDl.shape[1], device=media_IMDl.device)[None] < lengths_I[:, None]
