"""VisionLanguageModel: vision tower -> connector -> causal LM, in plain PyTorch.

Legend: B batch, T tokens, I images in the batch, C/H/W pixels, P patches per image,
N visual tokens per image, Dv tower width, Dl decoder width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlm_train.models.connectors.base import Connector, Placement
from vlm_train.models.decoder import IGNORE_INDEX, Decoder, token_cross_entropy
from vlm_train.models.vision import VisionTower

__all__ = ["IGNORE_INDEX", "VLMOutput", "VisionLanguageModel", "token_cross_entropy"]


@dataclass
class VLMOutput:
    """`loss` is the mean over this batch's label tokens; training reduces `loss_sum` by the
    label-token count of the whole global batch instead (see training/loop.py). With labels and a
    tensor-parallel decoder, `logits` is this TP rank's vocabulary slice."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """A VLM whose visual tokens fill the image-token slots of `input_ids`.

    `input_ids` carry one `image_token_id` per visual-token slot (N per image, in image order),
    as Hugging Face processors expand `<image>`; `pixel_values` holds the batch's images in the
    order their slots appear, [I, C, H, W].
    """

    def __init__(self, vision: VisionTower, connector: Connector[Any], llm: Decoder, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        connector.attach(llm)

    @property
    def num_image_tokens(self) -> int:
        """Image-token slots the text must carry per image (visual tokens, or 1 for cross-attention)."""
        return self.connector.num_tokens

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        slots_BT = input_ids == self.image_token_id
        if self.connector.placement == Placement.SEQUENCE:
            embeds_BTDl, media_IMDl = self.embed(pixel_values, input_ids), None
        else:
            embeds_BTDl, media_IMDl = self.llm.embed(input_ids), self.encode_images_or_blank(pixel_values, slots_BT)
        with self.connector.conditioned(slots_BT, media_IMDl):
            logits_BTV = self.llm(embeds_BTDl, attention_mask)
        # A tensor-parallel decoder returns its rank's vocabulary slice: it gathers the whole
        # logits and computes the (vocab-parallel, unsharded-equal) loss itself.
        if labels is None:
            return VLMOutput(logits=self.llm.gather_logits(logits_BTV))
        loss_sum, count = self.llm.token_cross_entropy(logits_BTV, labels)
        return VLMOutput(logits_BTV, loss=loss_sum / count.clamp(min=1), loss_sum=loss_sum, num_label_tokens=count)

    def embed(self, pixel_values: torch.Tensor | None, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the visual tokens in the image-token slots."""
        embeds_BTDl = self.llm.embed(input_ids_BT)
        slots_BT = input_ids_BT == self.image_token_id
        visual_INDl = self.encode_images_or_blank(pixel_values, slots_BT)
        if not slots_BT.any():
            return embeds_BTDl + 0.0 * visual_INDl.sum()
        self._check_slots(visual_INDl, slots_BT)
        flat_visual = visual_INDl.reshape(-1, visual_INDl.shape[-1]).to(embeds_BTDl.dtype)
        return embeds_BTDl.masked_scatter(slots_BT.unsqueeze(-1), flat_visual)

    def encode_images_or_blank(self, pixel_values: torch.Tensor | None, slots_BT: torch.Tensor) -> torch.Tensor:
        """Connector outputs for the batch's images. Without images, those of one blank image:
        under ZeRO-3 every rank must gather the same parameters, or a rank without images hangs
        the others (its output is then used with weight zero)."""
        if pixel_values is not None and pixel_values.shape[0] > 0:
            return self.encode_images(pixel_values)
        if slots_BT.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        size = self.vision.image_size
        return self.encode_images(torch.zeros(1, 3, size, size, device=slots_BT.device))

    def encode_images(self, pixels_ICHW: torch.Tensor) -> torch.Tensor:
        tower_dtype = next(self.vision.parameters()).dtype
        tower_trains = any(p.requires_grad for p in self.vision.parameters())
        if pixels_ICHW.dtype == torch.uint8:  # as the data loader sends them (data/preprocess.py)
            pixels_ICHW = self.vision.normalize(pixels_ICHW)
        with torch.set_grad_enabled(tower_trains and torch.is_grad_enabled()):
            features_IPDv = self.vision(pixels_ICHW.to(tower_dtype))
        return self.connector(features_IPDv)

    def _check_slots(self, visual_INDl: torch.Tensor, slots_BT: torch.Tensor) -> None:
        num_visual = visual_INDl.shape[0] * visual_INDl.shape[1]
        if num_visual != int(slots_BT.sum()):
            raise ValueError(
                f"{visual_INDl.shape[0]} images give {num_visual} visual tokens but input_ids hold "
                f"{int(slots_BT.sum())} image-token slots ({self.num_image_tokens} per image expected)"
            )
