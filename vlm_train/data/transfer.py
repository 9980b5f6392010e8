"""Batches that cross from a loader worker to the trainer."""

from __future__ import annotations

import math

import torch
from torch.utils.data import get_worker_info


def cat_for_transfer(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, written straight into shared memory inside a loader worker: the batch then
    crosses to the trainer without the extra copy the pickler makes of ordinary tensors (as
    torch's default_collate does)."""
    if get_worker_info() is None or not tensors:
        return torch.cat(tensors)
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    numel = math.prod(shape)
    storage = tensors[0]._typed_storage()._new_shared(numel, device=tensors[0].device)
    out = tensors[0].new(storage).resize_(shape)
    return torch.cat(tensors, out=out)
