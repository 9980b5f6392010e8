"""objective=lm: the decoder alone, trained on text (no tower, no connector).

`LanguageModel` takes the batches the data pipeline makes of text documents (data.read_as=document)
and returns what the VLM returns (`VLMOutput`), so the trainer, the engine and the checkpoints treat
it as they treat a VLM. Its decoder is any `Decoder` (HF, or megatron-core at TP > 1).
Legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_train.models.decoder import Decoder
from vlm_train.models.vlm import VLMOutput


class WithoutImageSlots:
    """What the data pipeline asks of a model whose token ids hold no visual-token slots (pretraining
    objectives: text documents, or an image and its caption side by side)."""

    vision = None  # no VLM tower: `image_size`, `image_mean`, `image_std` say how images are read
    connector = None
    native_resolution = False
    anyres = None
    video_token_id = None
    num_image_tokens = 0


class LanguageModel(WithoutImageSlots, nn.Module):
    """A decoder that reads token ids: `llm` as in a VLM, so a checkpoint's `llm.*` tensors are the
    ones a VLM's decoder loads."""

    image_size, image_mean, image_std = 1, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # no images are read

    def __init__(self, llm: Decoder):
        super().__init__()
        self.llm = llm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        """`pixel_values` must hold no image (a text batch's empty [0, 3, S, S])."""
        if pixel_values is not None and pixel_values.numel():
            raise ValueError("objective=lm reads text only, but the batch holds images")
        logits_BTV = self.llm(self.llm.embed(input_ids), attention_mask, position_ids)
        if labels is None:
            return VLMOutput(logits=self.llm.gather_logits(logits_BTV))
        loss_sum, count = self.llm.token_cross_entropy(logits_BTV, labels)
        return VLMOutput(logits_BTV, loss=loss_sum / count.clamp(min=1), loss_sum=loss_sum, num_label_tokens=count)
