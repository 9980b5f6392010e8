"""The decoder contract: what the VLM and the connectors may use of a language decoder.

Two implementations: the Hugging Face causal LM (models/llm.py, `CausalLM`) and the tensor-parallel
megatron-core decoder (parallel/tensor_parallel.py, `MegatronCausalLM`). The VLM and the connectors
call these members and nothing else, so neither knows which backend runs.
Legend: B batch, T tokens, Dl decoder width, V vocabulary (a TP rank's slice of it, V/tp, where the
decoder is vocab-parallel).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of positions that carry no loss

# torch.utils.checkpoint's `context_fn`: (context around a layer's forward, context around its recomputation)
ContextFn = Callable[[], tuple[AbstractContextManager, AbstractContextManager]]


class Decoder(nn.Module, ABC):
    """A language decoder behind the interface the VLM and the connectors use.

    `sequence_first` (a class attribute every implementation sets) says whether hidden states
    inside the decoder are [T, B, Dl] (megatron) rather than [B, T, Dl] (HF): connectors that hook
    `decoder_layers()` or `norm_modules()` transpose accordingly.
    """

    sequence_first: ClassVar[bool]
    hidden_size: int  # Dl

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(getattr(cls, "sequence_first", None), bool):
            raise TypeError(f"{cls.__name__} must set the class attribute sequence_first (True or False)")

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The vocabulary's size V (unpadded: the tokenizer's, image token included)."""

    @abstractmethod
    def embed(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, Dl], whole on every rank."""

    @abstractmethod
    def forward(
        self,
        embeds_BTDl: torch.Tensor,
        attention_mask_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, T, V] (a vocab-parallel decoder: this rank's slice [B, T, V/tp])."""

    @abstractmethod
    def gather_logits(self, logits_BTV: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits [B, T, V] from what `forward` returned."""

    @abstractmethod
    def token_cross_entropy(
        self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy (fp32) over labelled positions of `forward`'s logits, and
        their count: the unsharded loss, whatever the decoder's sharding."""

    @abstractmethod
    def norm_modules(self) -> list[nn.Module]:
        """Every normalisation layer over the hidden width (per-layer norms and the final one)."""

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's layers, in order (connectors may hook them)."""

    @abstractmethod
    def enable_activation_checkpointing(self, context_fn: ContextFn | None = None) -> None:
        """Recompute each layer in backward instead of keeping its activations. `context_fn`
        (torch.utils.checkpoint's) replays per-forward state that hooks read (a connector's
        `checkpoint_context_fn()`). A decoder that cannot raises ConfigError."""


def token_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (fp32) over labelled positions, and their count.

    Only the N labelled positions are taken to fp32: a LLaVA batch labels a few percent of its
    positions (stage 1: ~30 of ~620), and an fp32 copy of every position's logits plus the
    log-softmax autograd keeps of it cost 4 bytes x B x T x V each (4 GB apiece at B=16, T=2048,
    V=32k). Selecting costs one host sync (the count of labelled positions)."""
    shifted_labels = labels_BT[:, 1:]
    labelled_BT = shifted_labels != IGNORE_INDEX
    logits_NV = logits_BTV[:, :-1][labelled_BT].float()
    loss_sum = F.cross_entropy(logits_NV, shifted_labels[labelled_BT], reduction="sum")
    return loss_sum, labelled_BT.sum()
