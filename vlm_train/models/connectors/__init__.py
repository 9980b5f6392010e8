"""Connectors: how visual features meet the language model. One registry, one factory.

A connector maps tower features [I, P, Dv] to `num_tokens` visual tokens [I, N, Dl] that the VLM
places in the token sequence (placement "sequence"); the cross-attention connector instead works
inside the decoder (placement "cross_attention").
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm_train.config import ConnectorConfig
from vlm_train.errors import ConfigError
from vlm_train.models.connectors.base import Connector, count_trainable
from vlm_train.models.connectors.cross_attention import CrossAttentionConnector
from vlm_train.models.connectors.ln_adapter import LNAdapterConnector
from vlm_train.models.connectors.mlp import MLPConnector
from vlm_train.models.connectors.perceiver import PerceiverConnector
from vlm_train.models.connectors.qformer import QFormerConnector

CONNECTORS: dict[str, type[Connector]] = {
    "mlp": MLPConnector,
    "qformer": QFormerConnector,
    "perceiver": PerceiverConnector,
    "cross_attention": CrossAttentionConnector,
    "ln_adapter": LNAdapterConnector,
}

__all__ = ["CONNECTORS", "Connector", "build_connector", "count_trainable", "load_connector_weights"]


def build_connector(cfg: ConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int) -> Connector:
    """Build the connector named by `cfg.name`; widths come from the built tower and LLM."""
    if cfg.name not in CONNECTORS:
        raise ConfigError(f"connector={cfg.name} is unknown: choose one of {', '.join(CONNECTORS)}")
    connector = CONNECTORS[cfg.name].from_config(cfg, vision_dim=vision_dim, llm_dim=llm_dim, num_patches=num_patches)
    if cfg.path:
        load_connector_weights(connector, cfg.path)
    return connector


def load_connector_weights(connector: nn.Module, path: str) -> None:
    """Load pretrained connector weights (e.g. LLaVA's mm_projector.bin), never unpickling code."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"connector.path={path} is not a file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    prefixes = ("model.mm_projector.", "mm_projector.", "connector.")
    state = {_strip(k, prefixes): v for k, v in state.items()}
    missing, unexpected = connector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"connector.path={path} does not fit connector: missing {missing}, unexpected {unexpected}")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
