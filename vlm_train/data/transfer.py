"""Pixel batches that cross from a loader worker to the trainer, through reused shared memory.

A tensor a worker returns travels as a shared-memory segment. A fresh segment per batch costs the
worker a page fault for every 4 KiB it writes (the kernel hands out zeroed pages one by one):
at 336 px and batches of 16 that is 1,300 faults per batch, about a tenth of the worker's CPU
time (bench/data.py). `PixelSlots` gives each worker a few segments that it writes batch after
batch instead: its pages are faulted in once, and the trainer keeps them mapped.

Ownership of a slot passes through a semaphore: the worker takes it (without waiting) before it
writes; the trainer gives it back once the pixels are out of it: at once when the DataLoader's
pin-memory thread copied them, otherwise when the last tensor viewing them is freed (the trainer
reads them in place, no copy). A worker that finds all its slots taken writes a fresh segment, as
torch's own collate does: never a wait, never a slot written while read.
"""

from __future__ import annotations

import math
import multiprocessing
import weakref

import numpy as np
import torch
from torch.utils.data import get_worker_info


class PixelSlots:
    """`depth` reusable shared-memory pixel buffers per loader worker; made in the trainer before
    the workers start (they inherit the semaphores), filled by the workers, emptied by `take`."""

    def __init__(self, workers: int, depth: int):
        self.depth = depth
        self._free = [multiprocessing.Semaphore(1) for _ in range(workers * depth)]
        self._owned: dict[int, torch.UntypedStorage] = {}  # worker side: its slots' segments
        self._mapped: dict[int, torch.UntypedStorage] = {}  # trainer side: kept mapped between batches

    def cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """torch.cat into one of this worker's free slots (a fresh segment when none is free, or
        outside a worker: a plain tensor)."""
        info = get_worker_info()
        if info is None or not tensors:
            return torch.cat(tensors)
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        nbytes = math.prod(shape) * tensors[0].element_size()
        if nbytes == 0:  # a batch of text-only samples
            return torch.cat(tensors)
        for slot in range(info.id * self.depth, (info.id + 1) * self.depth):
            if self._free[slot].acquire(block=False):
                storage = self._owned.get(slot)
                if storage is None or storage.nbytes() < nbytes:
                    storage = self._owned[slot] = torch.UntypedStorage._new_shared(nbytes)
                out = torch.empty(0, dtype=tensors[0].dtype).set_(storage, 0, shape)  # type: ignore[call-overload]  # torch's stubs lack the stride-less form it accepts
                return torch.cat(tensors, out=out)
        return cat_for_transfer(tensors)

    def slot_of(self, tensor: torch.Tensor) -> int | None:
        """The slot (worker side) whose segment holds `tensor`, None for any other tensor."""
        pointer = tensor.untyped_storage().data_ptr()
        return next((slot for slot, storage in self._owned.items() if storage.data_ptr() == pointer), None)

    def take(self, batch: dict) -> None:
        """Trainer side: hand the batch's pixels to the trainer and give their slot back to its worker
        once they are out of it. Pinned pixels (DataLoader pin_memory) are a copy already: the slot
        is free at once. Otherwise the trainer gets the slot's memory itself, and the slot comes back
        when the last tensor that views it is gone (so a slot is never rewritten while still read)."""
        slot = batch.pop("pixel_slot", None)
        if slot is None:
            return
        pixels = batch["pixel_values"]
        if pixels.is_pinned():
            self._free[slot].release()
            return
        self._mapped[slot] = pixels.untyped_storage()  # stays mapped: the next batch here maps no pages
        lease = torch.from_numpy(pixels.reshape(-1).view(torch.uint8).numpy())  # own storage, same memory
        weakref.finalize(lease.untyped_storage(), self._free[slot].release)
        batch["pixel_values"] = lease.view(pixels.dtype).view(pixels.shape)


def cat_for_transfer(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, written straight into a new shared-memory segment inside a loader worker: the
    batch then crosses to the trainer without the extra copy the pickler makes of ordinary
    tensors (as torch's default_collate does)."""
    if get_worker_info() is None or not tensors:
        return torch.cat(tensors)
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    storage = tensors[0]._typed_storage()._new_shared(math.prod(shape), device=tensors[0].device)
    out = tensors[0].new(storage).resize_(shape)
    return torch.cat(tensors, out=out)


PIXELS = ("pixel_values", "pixel_values_videos")  # written into shared memory by the worker: sent as they are


def to_wire(batch: dict) -> dict:
    """Worker side, before the batch crosses: every tensor but the pixels (token ids, masks, labels,
    counts: small) as a numpy array, which the pickler writes inline. A tensor would get a shared-
    memory segment of its own, each batch (a file, an mmap, a passed descriptor, page faults:
    about 1 ms of CPU per tensor per batch measured, some 3% of a worker's time at 336 px).
    In-process (no worker) the batch is left as it is."""
    if get_worker_info() is None:
        return batch
    return {k: v.numpy() if isinstance(v, torch.Tensor) and k not in PIXELS else v for k, v in batch.items()}


def from_wire(batch: dict) -> dict:
    """Trainer side: the numpy arrays `to_wire` made back into tensors (no copy)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
