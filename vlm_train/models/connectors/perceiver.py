"""The Flamingo/Idefics2 Perceiver resampler: Idefics2's modality-projection MLP maps patch
features to the LLM width, then `num_latents` learned latents attend to [features; latents] for
`depth` layers: [I, P, Dv] -> [I, L, Dl].

The modules are transformers' own (`Idefics2MLP`, `Idefics2PerceiverResampler`) under Idefics2's
names (`modality_projection`, `perceiver_resampler`), so Idefics2 checkpoints map one to one.
"""

from __future__ import annotations

import torch

from vlm_train.config import PerceiverConnectorConfig
from vlm_train.models.connectors.base import Connector


class PerceiverConnector(Connector[PerceiverConnectorConfig]):
    config_class = PerceiverConnectorConfig
    reads_sets = True

    def __init__(self, modality_projection: torch.nn.Module, perceiver_resampler: torch.nn.Module, num_latents: int):
        super().__init__()
        self.modality_projection = modality_projection
        self.perceiver_resampler = perceiver_resampler
        self.num_tokens = num_latents

    @classmethod
    def from_config(
        cls, cfg: PerceiverConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int
    ) -> PerceiverConnector:
        from transformers.models.idefics2.modeling_idefics2 import Idefics2MLP

        projection = Idefics2MLP(
            hidden_size=vision_dim,
            intermediate_size=cfg.intermediate_size or 4 * llm_dim,
            output_size=llm_dim,
            hidden_act="silu",
        )
        resampler = idefics2_resampler(
            llm_dim, cfg.num_latents, cfg.depth, (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads)
        )
        return cls(projection, resampler, cfg.num_latents)

    def masked(self, features_IPDv: torch.Tensor, patch_mask_IP: torch.Tensor) -> torch.Tensor:
        # A module call, not a method call: ZeRO-3's hooks gather parameters around forward only.
        return self(features_IPDv, patch_mask_IP)

    def forward(self, features_IPDv: torch.Tensor, patch_mask_IP: torch.Tensor | None = None) -> torch.Tensor:
        """Latents attend to the patches `patch_mask_IP` keeps (Idefics2's images padded to a common
        size, AnyRes images' tiles padded to the batch's most); all of them when None."""
        if patch_mask_IP is None:
            patch_mask_IP = torch.ones(features_IPDv.shape[:2], dtype=torch.bool, device=features_IPDv.device)
        context_IPDl = self.modality_projection(features_IPDv)
        return self.perceiver_resampler(context=context_IPDl, attention_mask=patch_mask_IP)


def idefics2_resampler(width: int, latents: int, depth: int, heads: tuple[int, int, int]) -> torch.nn.Module:
    """transformers' Idefics2 Perceiver resampler at `width`: `latents` learned latents attend to
    [context; latents] for `depth` layers; `heads` = (heads, head width, key/value heads)."""
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    num_heads, head_dim, kv_heads = heads
    config = Idefics2PerceiverConfig(
        hidden_size=width,
        resampler_n_latents=latents,
        resampler_depth=depth,
        resampler_n_heads=num_heads,
        resampler_head_dim=head_dim,
        num_key_value_heads=kv_heads,
    )
    return Idefics2PerceiverResampler._from_config(config)
