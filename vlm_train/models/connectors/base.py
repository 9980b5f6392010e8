"""What every connector offers the VLM.

Two placements: "sequence" connectors return visual tokens [I, N, Dl] that fill the N image-token
slots per image; "cross_attention" connectors return media [I, M, Dl] that the decoder attends to
from inside (the text then carries one image token per image, marking where it occurs).
Connectors that work inside the decoder install hooks on it in `attach` and read the per-batch
state (image positions, media) that `conditioned` makes available for one forward pass.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


class Connector(nn.Module):
    placement: str = "sequence"
    num_tokens: int  # image-token slots per image in input_ids

    def attach(self, llm: nn.Module) -> None:
        """Install hooks on the decoder; the default connector needs none."""

    def conditioned(
        self,
        image_positions_BT: torch.Tensor,
        media_IMDl: torch.Tensor | None = None,
    ) -> AbstractContextManager:
        """Make this batch's image positions (and media) visible to the hooks for one forward."""
        return nullcontext()

    def fixed_parameters(self) -> list[nn.Parameter]:
        """Parameters that stay at their initial values whatever `connector.freeze` says."""
        return []

    def freezes_llm(self) -> bool:
        """True when the connector's design trains nothing but itself (the LLM stays frozen)."""
        return False


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
