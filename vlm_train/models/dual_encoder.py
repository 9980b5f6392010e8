"""objective=clip|siglip: an image tower and a text tower mapping into one embedding, as transformers'
CLIPModel / SiglipModel (vision.family picks which), with a learnable temperature and bias.

The towers are transformers' own, so the trained pair saves as a CLIPModel / SiglipModel folder that
`vision.path` loads (its vision tower) and transformers' zero-shot tools read. Each caption is pooled
at its last real token (its end-of-sequence token, as CLIP pools and as SigLIP's last position is when
unpadded); the loss, which needs every data-parallel rank's embeddings, is training/contrastive.py's.
Legend: B batch (one image and one caption per row), T caption tokens, E embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_train.models.language_model import WithoutImageSlots
from vlm_train.models.vision import normalize_pixels

# The papers' starting values: CLIP t = 1/0.07 (no bias); SigLIP t = 10, b = -10.
INITIAL_SCALE_BIAS = {"clip": (1 / 0.07, 0.0), "siglip": (10.0, -10.0)}


@dataclass
class DualEncoderOutput:
    image_embeds: torch.Tensor  # [B, E], unit length
    text_embeds: torch.Tensor  # [B, E], unit length
    scale: torch.Tensor  # the temperature t = exp(log_scale), a scalar
    bias: torch.Tensor  # SigLIP's b (0 and fixed for CLIP's loss), a scalar


class ScaleBias(nn.Module):
    """The learnable temperature t = exp(log_scale) (CLIP: capped at 100) and bias b, [1] each. A module
    of its own: ZeRO-3 gathers a module's parameters for its forward and its backward, which parameters
    of the model's root, whose output is a dataclass its hooks do not look into, would not get."""

    def __init__(self, scale: float, bias: float, clamp: bool, train_bias: bool):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(scale)]))
        self.bias = nn.Parameter(torch.tensor([float(bias)]), requires_grad=train_bias)
        self.clamp = clamp

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale = self.log_scale.clamp(max=math.log(100)) if self.clamp else self.log_scale
        return log_scale.exp(), self.bias * 1.0


class DualEncoder(WithoutImageSlots, nn.Module):
    """`hf_model` is a transformers CLIPModel or SiglipModel without its logit_scale (and logit_bias):
    `logit` holds the loss's own, written into a saved model's (`hf_state_dict`)."""

    def __init__(
        self,
        hf_model: Any,
        family: str,
        objective: str,
        image_stats: tuple[tuple, tuple],
        scale_bias: tuple[float, float],
    ):
        nn.Module.__init__(self)
        self.hf_model = hf_model
        self.family, self.objective = family, objective
        self.image_mean, self.image_std = image_stats
        self.image_size = int(hf_model.config.vision_config.image_size)
        for name in ("logit_scale", "logit_bias"):  # the HF model's scalars: written from ours at save time
            if hasattr(hf_model, name):
                delattr(hf_model, name)  # (DeepSpeed cannot broadcast a 0-dim parameter)
        scale, bias = scale_bias
        self.logit = ScaleBias(scale, bias, clamp=objective == "clip", train_bias=objective == "siglip")

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> DualEncoderOutput:
        """`pixel_values` [B, 3, S, S] (uint8 as the loader sends them, or normalised floats); the
        other batch keys (labels, ...) are not read: a row is its image and its caption."""
        scale, bias = self.logit()
        return DualEncoderOutput(
            self.embed_images(pixel_values), self.embed_texts(input_ids, attention_mask), scale, bias
        )

    def embed_images(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        if pixels_BCHW.dtype == torch.uint8:
            pixels_BCHW = normalize_pixels(pixels_BCHW, self.image_mean, self.image_std)
        dtype = next(self.hf_model.vision_model.parameters()).dtype
        pooled = self.hf_model.vision_model(pixel_values=pixels_BCHW.to(dtype)).pooler_output
        if self.family == "clip":
            pooled = self.hf_model.visual_projection(pooled)
        return F.normalize(pooled.float(), dim=-1)

    def embed_texts(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        text_model = self.hf_model.text_model
        hidden_BTD = text_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
        last_B = attention_mask_BT.sum(-1).clamp(min=1) - 1  # right-padded: the last real token
        pooled = hidden_BTD[torch.arange(len(last_B), device=last_B.device), last_B]
        pooled = self.hf_model.text_projection(pooled) if self.family == "clip" else text_model.head(pooled)
        return F.normalize(pooled.float(), dim=-1)


def hf_state_dict(state: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DualEncoder's whole state dict -> its HF model's (shaped as `hf_state`, a fresh one's), with
    the trained temperature (and bias) in the HF model's logit_scale (and logit_bias)."""
    hf = {key.removeprefix("hf_model."): value for key, value in state.items() if key.startswith("hf_model.")}
    hf["logit_scale"] = state["logit.log_scale"].reshape(hf_state["logit_scale"].shape)
    if "logit_bias" in hf_state:
        hf["logit_bias"] = state["logit.bias"].reshape(hf_state["logit_bias"].shape)
    return hf
