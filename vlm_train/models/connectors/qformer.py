"""BLIP-2's Querying Transformer: Q learned queries read the image through BERT-style layers
(self-attention over the queries, cross-attention to the patch features every
`cross_attention_freq` layers), then a linear map to the LLM width: [I, P, Dv] -> [I, Q, Dl].

The layers are transformers' own `Blip2QFormerModel`, and the parameter names are BLIP-2's
(`query_tokens`, `qformer.*`, `language_projection.*`), so BLIP-2 checkpoints map one to one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm_train.config import QFormerConnectorConfig
from vlm_train.models.connectors.base import Connector

if TYPE_CHECKING:
    from transformers import Blip2QFormerModel


class QFormerConnector(Connector[QFormerConnectorConfig]):
    config_class = QFormerConnectorConfig
    reads_sets = True

    def __init__(self, qformer: Blip2QFormerModel, num_queries: int, llm_dim: int):
        super().__init__()
        width = qformer.config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * qformer.config.initializer_range)
        self.qformer = qformer
        self.language_projection = nn.Linear(width, llm_dim)
        self.num_tokens = num_queries

    @classmethod
    def from_config(
        cls, cfg: QFormerConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int
    ) -> QFormerConnector:
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        config = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            cross_attention_frequency=cfg.cross_attention_freq,
            encoder_hidden_size=vision_dim,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return cls(Blip2QFormerModel(config), cfg.num_queries, llm_dim)

    def masked(self, features_IPDv: torch.Tensor, patch_mask_IP: torch.Tensor) -> torch.Tensor:
        # A module call, not a method call: ZeRO-3's hooks gather query_tokens around forward only.
        return self(features_IPDv, patch_mask_IP)

    def forward(self, features_IPDv: torch.Tensor, patch_mask_IP: torch.Tensor | None = None) -> torch.Tensor:
        """The queries cross-attend to the patches `patch_mask_IP` keeps (all of them when None)."""
        queries_IQDq = self.query_tokens.expand(features_IPDv.shape[0], -1, -1)
        mask = None if patch_mask_IP is None else patch_mask_IP.long()
        out = self.qformer(query_embeds=queries_IQDq, encoder_hidden_states=features_IPDv, encoder_attention_mask=mask)
        return self.language_projection(out.last_hidden_state.to(self.language_projection.weight.dtype))
