"""LLaVA's projector: features [I, P, Dv] -> tokens [I, P, Dl], one visual token per patch."""

from __future__ import annotations

from torch import nn

from vlm_train.config import MLPConnectorConfig
from vlm_train.errors import ConfigError
from vlm_train.models.connectors.base import Connector


class MLPConnector(Connector[MLPConnectorConfig], nn.Sequential):
    """Linear(Dv, Dl) then (GELU, Linear(Dl, Dl)) x (depth - 1); depth 2 is LLaVA-1.5's mlp2x_gelu.

    A Sequential, like LLaVA's `mm_projector`, so its weights ("0.weight", "2.weight") load as-is.
    """

    config_class = MLPConnectorConfig
    per_patch = True

    def __init__(self, vision_dim: int, llm_dim: int, depth: int, num_patches: int):
        layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        nn.Sequential.__init__(self, *layers)
        self.num_tokens = num_patches

    @classmethod
    def from_config(cls, cfg: MLPConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int) -> MLPConnector:
        if cfg.depth < 1:
            raise ConfigError(f"connector.depth={cfg.depth} must be at least 1")
        return cls(vision_dim, llm_dim, cfg.depth, num_patches)
