"""objective=clip|siglip: the contrastive losses with negatives from every data-parallel rank.

Each rank embeds its own rows (an image and its caption each) and gathers every rank's embeddings
(autograd-aware: the gradient of a gathered row goes back to the rank that made it, summed over
ranks, as big_vision and open_clip's `gather_with_grad` do). It then scores its own rows against all
N rows of the global micro-batch:

- clip (CLIP's softmax loss): for each own row, the cross-entropy of its image over all N captions and
  of its caption over all N images, averaged: sum_i (CE(t x_i . Y) + CE(t y_i . X)) / 2;
- siglip (SigLIP's sigmoid loss): for each own image i and every caption j, -log sigmoid(z_ij (t x_i.y_j
  + b)), z = 1 for the pair, -1 otherwise; summed over j.

The trainer adds the ranks' sums and divides by N (the loss unit is a pair), so DP ranks holding
N/dp rows each give exactly the loss and gradients of one rank holding all N. Rows whose labels are
all masked (placeholders for skipped samples) are neither anchors nor negatives.
Legend: b rows on this rank, N rows on all ranks, E embedding width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlm_train.models.decoder import IGNORE_INDEX


class _GatherRows(torch.autograd.Function):
    """all_gather along rows; backward sums the gathered rows' gradients over ranks and returns
    this rank's slice (a reduce-scatter, written as all_reduce + slice: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.rows = dist.get_rank() * rows.shape[0], rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.contiguous().clone()
        dist.all_reduce(summed)
        return summed[ctx.start : ctx.start + ctx.rows]


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows in rank order (autograd-aware), and where this rank's start."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows, 0
    return _GatherRows.apply(rows), dist.get_rank() * rows.shape[0]


def real_pairs(labels_BT: torch.Tensor) -> torch.Tensor:
    """Rows that are pairs (not placeholders for skipped samples): any labelled token."""
    return (labels_BT != IGNORE_INDEX).any(-1)


def clip_loss_sum(images_bE, texts_bE, scale, real_b) -> torch.Tensor:
    """CLIP's symmetric softmax loss, summed over this rank's real rows (see the module docstring)."""
    all_images, start = gather_rows(images_bE)
    all_texts, _ = gather_rows(texts_bE)
    all_real = gather_rows(real_b.float())[0].detach() > 0  # gathered without grad: a mask
    targets_b = torch.arange(start, start + len(images_bE), device=images_bE.device)
    losses = []
    for own, others in ((images_bE, all_texts), (texts_bE, all_images)):
        logits_bN = (scale * own @ others.T).masked_fill(~all_real[None], torch.finfo(own.dtype).min)
        losses.append(F.cross_entropy(logits_bN, targets_b, reduction="none"))
    return torch.where(real_b, (losses[0] + losses[1]) / 2, 0.0).sum()  # a placeholder's own target is masked


def siglip_loss_sum(images_bE, texts_bE, scale, bias, real_b) -> torch.Tensor:
    """SigLIP's sigmoid loss over this rank's images and every rank's captions, summed."""
    all_texts, start = gather_rows(texts_bE)
    all_real = gather_rows(real_b.float())[0].detach() > 0
    logits_bN = scale * images_bE @ all_texts.T + bias
    signs_bN = -torch.ones_like(logits_bN)
    signs_bN[torch.arange(len(images_bE)), torch.arange(start, start + len(images_bE))] = 1.0
    pairs_bN = real_b[:, None] & all_real[None]
    return -(F.logsigmoid(signs_bN * logits_bN) * pairs_bN).sum()


def contrastive_forward(engine, inputs: dict[str, torch.Tensor], objective: str) -> tuple[torch.Tensor, dict]:
    """This rank's loss sum (the trainer divides by all ranks' pairs) and the temperature and bias."""
    out = engine(**inputs)
    real_b = real_pairs(inputs["labels"])
    if objective == "clip":
        loss_sum = clip_loss_sum(out.image_embeds, out.text_embeds, out.scale, real_b)
    else:
        loss_sum = siglip_loss_sum(out.image_embeds, out.text_embeds, out.scale, out.bias, real_b)
    return loss_sum, {"temperature": float(out.scale.detach()), "bias": float(out.bias.detach())}
