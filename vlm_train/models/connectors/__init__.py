"""Connectors: how visual features meet the language model. One registry, one factory.

A connector maps tower features [I, P, Dv] to `num_tokens` visual tokens [I, N, Dl] that the VLM
places in the token sequence (`Placement.SEQUENCE`); the cross-attention connector instead works
inside the decoder (`Placement.CROSS_ATTENTION`).

The registry is keyed by each connector's config schema (`config_class.name`), the same schemas
config.py registers with Hydra (`CONNECTOR_SCHEMAS`): a name is spelled once, and `register_connector`
refuses a class whose schema config.py does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from vlm_train.config import CONNECTOR_SCHEMAS, ConnectorConfig
from vlm_train.errors import ConfigError
from vlm_train.models.connectors.base import Connector, ForwardState, Placement, count_trainable
from vlm_train.models.connectors.cross_attention import CrossAttentionConnector
from vlm_train.models.connectors.ln_adapter import LNAdapterConnector
from vlm_train.models.connectors.mlp import MLPConnector
from vlm_train.models.connectors.patch_merger import PatchMergerConnector
from vlm_train.models.connectors.perceiver import PerceiverConnector
from vlm_train.models.connectors.qformer import QFormerConnector

ConnectorT = TypeVar("ConnectorT", bound=type[Connector[Any]])

CONNECTORS: dict[str, type[Connector[Any]]] = {}


def register_connector(connector_class: ConnectorT) -> ConnectorT:
    """Add a connector to the factory under its config schema's name. The schema must be the one
    config.py registered under that name (`@connector_schema`): config validation and this
    factory then know the same connectors."""
    name = connector_class.config_class.name
    if CONNECTOR_SCHEMAS.get(name) is not connector_class.config_class:
        raise TypeError(
            f"{connector_class.__name__}: config.py registers no schema {connector_class.config_class.__name__} as '{name}'"
        )
    if name in CONNECTORS:
        raise TypeError(f"{connector_class.__name__}: connector '{name}' is registered already")
    CONNECTORS[name] = connector_class
    return connector_class


for _connector_class in (
    MLPConnector,
    QFormerConnector,
    PerceiverConnector,
    CrossAttentionConnector,
    LNAdapterConnector,
    PatchMergerConnector,
):
    register_connector(_connector_class)

# What `connector.path` may name inside a folder, in order of preference: a run dir's own file,
# LLaVA's, the whole model `vlm-convert consolidate` writes.
CONNECTOR_FILES = ("connector.safetensors", "mm_projector.bin", "model.safetensors")

__all__ = [
    "CONNECTORS",
    "Connector",
    "ForwardState",
    "Placement",
    "build_connector",
    "register_connector",
    "count_trainable",
    "load_connector_weights",
]


def build_connector(cfg: ConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int) -> Connector[Any]:
    """Build the connector named by `cfg.name`; widths come from the built tower and LLM."""
    if cfg.name not in CONNECTORS:
        raise ConfigError(f"connector={cfg.name} is unknown: choose one of {', '.join(CONNECTORS)}")
    return CONNECTORS[cfg.name].from_config(cfg, vision_dim=vision_dim, llm_dim=llm_dim, num_patches=num_patches)


def load_connector_weights(connector: nn.Module, path: str) -> None:
    """Load trained connector weights from `connector.path`, never unpickling code. It takes:
    LLaVA's `mm_projector.bin` (keys `model.mm_projector.*`), a `connector.safetensors`, a stage-1
    run dir (holding either; written at every checkpoint), or a `vlm-convert consolidate` folder
    (`model.safetensors` of the whole model: its `connector.*` tensors). Every tensor must fit.
    Call it once the connector is attached to its decoder: cross_attention creates its gated blocks then."""
    _load_checked(connector, _connector_part(_read_state(connector_file(path))), path)


def _load_checked(connector: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """load_state_dict, after a one-line error for any missing, unexpected or misshapen tensor."""
    own = connector.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"connector.path={path} does not fit connector: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (connector has {tuple(own[k].shape)})"
        for k in own
        if state[k].shape != own[k].shape
    ]
    if wrong:
        raise ConfigError(
            f"connector.path={path} does not fit connector: {wrong[0]}; are the widths/depth those of stage 1?"
        )
    connector.load_state_dict(state, strict=True)


def connector_file(path: str) -> Path:
    """The weights file `connector.path` names: the file itself, or the one inside a folder."""
    given = Path(path)
    if given.is_dir():
        for name in CONNECTOR_FILES:
            if (given / name).is_file():
                return given / name
    elif given.is_file() and given.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        return given
    raise ConfigError(
        f"connector.path={path}: expected LLaVA's mm_projector.bin, a connector.safetensors, a stage-1 run dir "
        "holding one of them, or a `vlm-convert consolidate` folder (model.safetensors)"
    )


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors: a truncated or foreign file
        reason = " ".join(str(err).split())[:200]  # one line
        raise ConfigError(f"connector.path: cannot read {file}: {type(err).__name__}: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"connector.path: {file} is not a state dict of tensors")
    return state


def _connector_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The connector's tensors under their own names: LLaVA's `model.mm_projector.` prefix and the
    whole model's `connector.` prefix are taken off; other tensors of a whole model are left out."""
    for prefix in ("model.mm_projector.", "mm_projector.", "connector."):
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state
