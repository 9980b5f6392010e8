"""What every connector offers the VLM, and the per-forward state its decoder hooks read.

Two placements: `Placement.SEQUENCE` connectors return visual tokens [I, N, Dl] that fill the N
image-token slots per image; `Placement.CROSS_ATTENTION` connectors return media [I, M, Dl] that
the decoder attends to from inside (the text then carries one image token per image, marking where
it occurs). Connectors that work inside the decoder install hooks on it in `attach` and read the
per-batch state (image positions, media) that `conditioned` makes available for one forward pass;
that state lives in a `ForwardState`, so activation checkpointing's recomputation sees it again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import Enum
from typing import ClassVar, Generic, TypeVar

import torch
from torch import nn

from vlm_train.config import ConnectorConfig
from vlm_train.models.decoder import ContextFn, Decoder

ConfigT = TypeVar("ConfigT", bound=ConnectorConfig)
StateT = TypeVar("StateT")


class Placement(str, Enum):
    """Where a connector's output meets the decoder. A `str` enum: equal to its value ("sequence",
    "cross_attention"), as YAML, logs and older code spell it."""

    SEQUENCE = "sequence"
    CROSS_ATTENTION = "cross_attention"

    def __str__(self) -> str:
        return self.value


class ForwardState(Generic[StateT]):
    """A value hooks inside the decoder read during one forward pass (None outside it).

    `holding(value)` sets it for the pass. Activation checkpointing recomputes a layer in backward,
    after the pass has cleared the value; `replay_contexts` (checkpoint's `context_fn`) captures the
    value when the layer first runs and holds it again while the layer is recomputed.
    """

    def __init__(self) -> None:
        self.value: StateT | None = None

    @contextmanager
    def holding(self, value: StateT | None) -> Iterator[None]:
        previous, self.value = self.value, value
        try:
            yield
        finally:
            self.value = previous

    def replay_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        return nullcontext(), self.holding(self.value)


class Connector(nn.Module, ABC, Generic[ConfigT]):
    """Maps tower features [I, P, Dv] to what the decoder takes (see the module docstring).

    A subclass names its config schema in `config_class` (whose `name` is the connector's name in
    the registry, vlm_train/models/connectors/__init__.py) and builds itself in `from_config`.
    """

    config_class: ClassVar[type[ConnectorConfig]]
    placement: ClassVar[Placement] = Placement.SEQUENCE
    per_patch: ClassVar[bool] = False  # one output token per tower patch, in the patches' order (AnyRes needs it)
    reads_sets: ClassVar[bool] = False  # `masked` reads any number of patches (AnyRes: an image's tiles at once)
    num_tokens: int  # image-token slots per image in input_ids

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: ConfigT, vision_dim: int, llm_dim: int, num_patches: int) -> Connector[ConfigT]:
        """Build from the connector's own config section; widths come from the built tower and LLM."""

    def masked(self, features_IPDv: torch.Tensor, patch_mask_IP: torch.Tensor) -> torch.Tensor:
        """The connector's output when some patches are padding (`patch_mask_IP` False there)."""
        raise ValueError(f"a {type(self).__name__} cannot skip padded patches: give images without padding")

    def attach(self, llm: Decoder) -> None:
        """Install hooks on the decoder; the default connector needs none."""

    def conditioned(
        self,
        image_positions_BT: torch.Tensor,
        media_IMDl: torch.Tensor | None = None,
    ) -> AbstractContextManager:
        """Make this batch's image positions (and media) visible to the hooks for one forward."""
        return nullcontext()

    def checkpoint_context_fn(self) -> ContextFn | None:
        """Activation checkpointing's `context_fn` replaying the state `conditioned` set, or None
        when the connector's hooks read none (checkpointing then runs without a context_fn)."""
        return None

    def fixed_parameters(self) -> list[nn.Parameter]:
        """Parameters that stay at their initial values whatever `connector.freeze` says."""
        return []

    def freezes_llm(self) -> bool:
        """True when the connector's design trains nothing but itself (the LLM stays frozen)."""
        return False


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
