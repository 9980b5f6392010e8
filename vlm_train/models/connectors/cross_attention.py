"""Flamingo's gated cross-attention: blocks inserted before decoder layers 0, k, 2k, ...
(`connector.every` = k) let text attend to the images that precede it in its sample. Legend: B
batch, T tokens, I images (media items) in the batch, P patches, M media tokens per image, L
resampler latents, N = I * M media tokens of the batch, Dv/Dl widths, H heads.

Each block is x + tanh(g_attn) * xattn(LN(x), media), then x + tanh(g_ff) * ff(LN(x)), with both
gates initialised to zero: at initialisation the model is exactly the plain LLM. The decoder's
code is not copied: a forward pre-hook on each chosen layer runs the block on its input.

Which images a text token reads (`connector.media`): `most_recent`, as Flamingo (OpenFlamingo's
`only_attend_immediate_media`), only the last image whose slot is at or before it in its sample;
`all_preceding`, every such image. Tokens before a sample's first image read none (the blocks
leave them as they are).

Media = a linear map of the patch features to the LLM width, or with `connector.resampler=perceiver`
Flamingo's Perceiver resampler reading those: L learned latents per image [I, L, Dl].

Media items may differ in length (AnyRes images and videos, laid out as a sequence connector would
put them in the text): they come padded to the longest, with a key mask `keys_IM` (True on real
tokens); a text token (or the resampler) reads only the real tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_train.config import CrossAttentionConnectorConfig
from vlm_train.models.connectors.base import Connector, ForwardState, Placement
from vlm_train.models.connectors.perceiver import idefics2_resampler
from vlm_train.models.decoder import ContextFn, Decoder

if TYPE_CHECKING:
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]] | None]


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x_BTD: torch.Tensor, media_IMD: torch.Tensor, allowed_BTN: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        I, M, _ = media_IMD.shape
        dh = D // self.heads  # heads (H) inferred: a tensor-parallel block holds only its share of them
        q_BHTd = self.to_q(self.norm(x_BTD)).view(B, T, -1, dh).transpose(1, 2)
        k_HNd, v_HNd = self.to_kv(media_IMD.to(x_BTD.dtype)).view(I * M, 2, -1, dh).permute(1, 2, 0, 3)
        scores_BHTN = q_BHTd @ k_HNd.transpose(-1, -2) / math.sqrt(dh)
        # finite fill: a row with no image allowed gets harmless uniform weights, zeroed below
        scores_BHTN = scores_BHTN.masked_fill(~allowed_BTN[:, None], torch.finfo(scores_BHTN.dtype).min)
        attended_BTD = (F.softmax(scores_BHTN, dim=-1) @ v_HNd).transpose(1, 2).reshape(B, T, -1)
        sees_image_BT1 = allowed_BTN.any(-1, keepdim=True).to(x_BTD.dtype)
        x_BTD = x_BTD + torch.tanh(self.attn_gate) * self.to_out(attended_BTD) * sees_image_BT1
        return x_BTD + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x_BTD)) * sees_image_BT1


class CrossAttentionConnector(Connector[CrossAttentionConnectorConfig]):
    """Media = a linear map of the patch features to the LLM width; gated blocks read it."""

    config_class = CrossAttentionConnectorConfig
    placement = Placement.CROSS_ATTENTION

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        every: int,
        heads: int,
        ff_mult: int,
        most_recent: bool = True,
        resampler: Idefics2PerceiverResampler | None = None,
    ):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.resampler = resampler  # Idefics2PerceiverResampler (or None: the projected patches are the media)
        self.every, self.heads, self.ff_mult, self.llm_dim = every, heads, ff_mult, llm_dim
        self.most_recent = most_recent
        self.blocks = nn.ModuleList()
        self.num_tokens = 1  # one image token marks where each image occurs
        self.sequence_first = False  # the attached decoder's (attach sets it)
        self._state = ForwardState[tuple[torch.Tensor, torch.Tensor]]()  # (media_IMD, allowed_BTN), one forward

    @classmethod
    def from_config(
        cls, cfg: CrossAttentionConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int
    ) -> CrossAttentionConnector:
        resampler = perceiver_resampler(cfg, llm_dim) if cfg.resampler == "perceiver" else None
        most_recent = cfg.media == "most_recent"
        return cls(vision_dim, llm_dim, cfg.every, cfg.num_heads, cfg.ff_mult, most_recent, resampler)

    def forward(self, features_IPDv: torch.Tensor) -> torch.Tensor:
        """Per-patch media tokens [I, P, Dl] (AnyRes lays them out per image before `resample`)."""
        return self.proj(features_IPDv)

    def resample(
        self, media_IMDl: torch.Tensor, keys_IM: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The media the blocks read: with the resampler each item's latents [I, L, Dl], read from its
        real tokens only (and then all real: no key mask); without it, the media as they are."""
        if self.resampler is None:
            return media_IMDl, keys_IM
        if keys_IM is None:
            keys_IM = torch.ones(media_IMDl.shape[:2], dtype=torch.bool, device=media_IMDl.device)
        # a module call: ZeRO-3's hooks gather the resampler's parameters around its forward
        return self.resampler(context=media_IMDl, attention_mask=keys_IM), None

    def media_tokens(self, patches: int) -> int:
        """Media tokens an image of `patches` tower features gives the blocks."""
        return self.resampler.n_latents if self.resampler is not None else patches

    def attach(self, llm: Decoder) -> None:
        # megatron's decoder (parallel/tensor_parallel.py) passes hidden states sequence-first
        self.sequence_first = llm.sequence_first
        for index, layer in enumerate(llm.decoder_layers()):
            if index % self.every == 0:
                self.blocks.append(GatedCrossAttentionBlock(self.llm_dim, self.heads, self.ff_mult))
                layer.register_forward_pre_hook(self._pre_hook(len(self.blocks) - 1), with_kwargs=True)

    def _pre_hook(self, block_index: int) -> PreHook:
        def block(hidden: torch.Tensor, media_IMD: torch.Tensor, allowed_BTN: torch.Tensor) -> torch.Tensor:
            if self.sequence_first:
                return self.blocks[block_index](hidden.transpose(0, 1), media_IMD, allowed_BTN).transpose(0, 1)
            return self.blocks[block_index](hidden, media_IMD, allowed_BTN)

        def run_block(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            state = self._state.value
            if state is None:
                return None
            if args:
                return (block(args[0], *state), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"], *state)}

        return run_block

    def conditioned(
        self,
        image_positions_BT: torch.Tensor,
        media_IMDl: torch.Tensor | None = None,
        keys_IM: torch.Tensor | None = None,
    ) -> AbstractContextManager:
        """`image_positions_BT` marks each media item's one slot (item i: the i-th slot in row-major
        order); `keys_IM` (None: all real) is False on the padding of items shorter than M."""
        if media_IMDl is None:
            raise ValueError("cross_attention is conditioned on media: the VLM passes the images' connector outputs")
        media_IMDl, keys_IM = self.resample(media_IMDl, keys_IM)
        allowed_BTI = media_mask(image_positions_BT, media_IMDl.shape[0], self.most_recent)
        allowed_BTN = allowed_BTI.repeat_interleave(media_IMDl.shape[1], dim=-1)
        if keys_IM is not None:
            allowed_BTN = allowed_BTN & keys_IM.flatten()
        return self._state.holding((media_IMDl, allowed_BTN))

    def checkpoint_context_fn(self) -> ContextFn | None:
        # transformers checkpoints a layer's forward, inside the pre-hook that runs the block: the
        # block is not recomputed today, but a decoder that checkpoints the whole call would
        return self._state.replay_contexts


def media_mask(image_positions_BT: torch.Tensor, num_images: int, most_recent: bool) -> torch.Tensor:
    """allowed[b, t, i]: image i (numbered in row-major order of the image slots) is in row b at or
    before position t, and with `most_recent` the last such image. Images beyond the slots (a
    batch without images gets one blank image) are allowed nowhere."""
    seen_BT = image_positions_BT.long().cumsum(dim=1)  # images at or before t in row b
    per_row_B1 = seen_BT[:, -1:]
    first_B1 = per_row_B1.cumsum(dim=0) - per_row_B1  # number of row b's first image
    last_BT = first_B1 + seen_BT - 1  # number of the last image at or before t (when one is)
    lowest_BT = last_BT if most_recent else first_B1.expand_as(last_BT)
    images_I = torch.arange(num_images, device=image_positions_BT.device)
    in_range_BTI = (images_I >= lowest_BT[..., None]) & (images_I <= last_BT[..., None])
    return in_range_BTI & (seen_BT > 0)[..., None]


def perceiver_resampler(cfg: CrossAttentionConnectorConfig, llm_dim: int) -> Idefics2PerceiverResampler:
    """Flamingo's Perceiver resampler at the LLM width: `resampler_latents` learned latents attend to
    [media; latents] for `resampler_depth` layers (transformers' Idefics2 module, as connector=perceiver)."""
    heads = (cfg.resampler_heads, cfg.resampler_head_dim, cfg.resampler_heads)
    return idefics2_resampler(llm_dim, cfg.resampler_latents, cfg.resampler_depth, heads)
