"""The minimal adapter: does aligning a modality to a language model need more than this?

Visual features get a parameter-free LayerNorm, a learned per-channel scale and shift, and one
linear map to the LLM width (trainable or frozen). With `modality_norms`, every normalisation
layer of the (frozen) LLM gains a second affine, initialised from its own and applied at
image-token positions only — per-domain normalisation, as in domain adaptation; these and the
adapter are then all that trains.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_train.config import LNAdapterConnectorConfig
from vlm_train.errors import ConfigError
from vlm_train.models.connectors.base import Connector, ForwardState
from vlm_train.models.decoder import ContextFn, Decoder


class ImageAffine(nn.Module):
    """The image-position weight (and bias) of one of the LLM's norms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        out = normalized * self.weight
        return out + self.bias if self.bias is not None else out


class LNAdapterConnector(Connector[LNAdapterConnectorConfig]):
    config_class = LNAdapterConnectorConfig
    per_patch = True

    def __init__(self, vision_dim: int, llm_dim: int, num_patches: int, train_projection: bool, modality_norms: bool):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim, elementwise_affine=False)
        self.scale = nn.Parameter(torch.ones(vision_dim))
        self.shift = nn.Parameter(torch.zeros(vision_dim))
        self.bridge = nn.Linear(vision_dim, llm_dim, bias=False)
        self.train_projection, self.modality_norms = train_projection, modality_norms
        self.image_norms = nn.ModuleList()
        self.num_tokens = num_patches
        self.sequence_first = False  # the attached decoder's (attach sets it)
        self._image_positions = ForwardState[torch.Tensor]()  # [B, T] bool, during one forward

    @classmethod
    def from_config(
        cls, cfg: LNAdapterConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int
    ) -> LNAdapterConnector:
        return cls(vision_dim, llm_dim, num_patches, cfg.train_projection, cfg.modality_norms)

    def forward(self, features_IPDv: torch.Tensor) -> torch.Tensor:
        return self.bridge(self.norm(features_IPDv) * self.scale + self.shift)

    def fixed_parameters(self) -> list[nn.Parameter]:
        weight = self.bridge.weight
        assert isinstance(weight, nn.Parameter)  # torch annotates Linear.weight as a plain Tensor
        return [] if self.train_projection else [weight]

    def freezes_llm(self) -> bool:
        return self.modality_norms

    def attach(self, llm: Decoder) -> None:
        if not self.modality_norms:
            return
        # megatron's decoder (parallel/tensor_parallel.py) normalises sequence-first hidden states
        self.sequence_first = llm.sequence_first
        for norm in llm.norm_modules():
            _check_supported(norm)
            assert isinstance(norm.weight, torch.Tensor)  # LayerNorm and RMSNorm have one
            self.image_norms.append(ImageAffine(norm.weight, getattr(norm, "bias", None)))
            norm.register_forward_hook(self._norm_hook(len(self.image_norms) - 1))

    def _norm_hook(self, index: int) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor | None]:
        def image_positions_use_their_own_affine(
            module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            positions_BT = self._image_positions.value
            if positions_BT is None:
                return None
            # Always run the image affine (a rank whose batch has no image still gathers it
            # under ZeRO-3); text positions keep the LLM's own output exactly.
            image_out = self.image_norms[index](_normalize(module, args[0])).to(output.dtype)
            positions = positions_BT.transpose(0, 1) if self.sequence_first else positions_BT
            return torch.where(positions[..., None], image_out, output)

        return image_positions_use_their_own_affine

    def conditioned(
        self, image_positions_BT: torch.Tensor, media_IMDl: torch.Tensor | None = None
    ) -> AbstractContextManager:
        return self._image_positions.holding(image_positions_BT if self.modality_norms else None)

    def checkpoint_context_fn(self) -> ContextFn | None:
        # the norms sit inside the layers activation checkpointing recomputes
        return self._image_positions.replay_contexts if self.modality_norms else None


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _check_supported(norm: nn.Module) -> None:
    # Gemma-style norms scale by (1 + weight): a second affine there would need its own rule.
    if not (isinstance(norm, nn.LayerNorm) or _is_rms_norm(norm)) or type(norm).__name__.startswith("Gemma"):
        raise ConfigError(
            f"connector.modality_norms supports LayerNorm and Llama-style RMSNorm, not {type(norm).__name__}"
        )


def _normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output before its affine, computed as the norm itself does."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
