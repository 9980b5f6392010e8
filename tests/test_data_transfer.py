"""Batches from loader workers (data/transfer.py): pixels through reused shared-memory slots,
token tensors inline as numpy arrays. The trainer gets exactly the in-process batch, whether it
drops each batch at once (slots reused) or keeps them all (no slot rewritten while viewed: fresh
segments instead)."""

from __future__ import annotations

import gc
import subprocess
import sys

import torch

from tests.helpers import REPO, batches_for, write_shards
from vlm_train.data.batches import PREFETCH


def in_slot(pixels: torch.Tensor, slots) -> int | None:
    """The slot whose trainer-side mapping holds `pixels`, None for a fresh segment."""
    pointer = pixels.data_ptr()
    return next((slot for slot, storage in slots._mapped.items() if storage.data_ptr() == pointer), None)


def test_worker_pixels_equal_in_process_pixels_through_reused_slots(tmp_path):
    pattern = write_shards(tmp_path, [48])  # one epoch: 12 batches of 4
    reference = batches_for(pattern, dp_rank=0, dp_size=1, workers=0, batch_size=4)
    expected = [next(reference) for _ in range(24)]

    batches = batches_for(pattern, dp_rank=0, dp_size=1, workers=1, batch_size=4)
    used = []
    for want in expected[:12]:  # the trainer is done with each batch before it takes the next
        got = next(batches)
        assert got["keys"] == want["keys"] and torch.equal(got["pixel_values"], want["pixel_values"])
        for name in ("input_ids", "attention_mask", "labels", "skipped_by_reason"):  # crossed as numpy arrays
            assert isinstance(got[name], torch.Tensor) and torch.equal(got[name], want[name]), name
        used.append(in_slot(got["pixel_values"], batches.pixel_slots))
        del got
    assert None not in used and len(set(used)) <= PREFETCH + 1  # 12 batches, at most 5 segments

    kept = [next(batches) for _ in range(12)]  # second epoch: every batch held, none released
    slots = batches.pixel_slots
    for got, want in zip(kept, expected[12:]):
        assert got["keys"] == want["keys"] and torch.equal(got["pixel_values"], want["pixel_values"])
    placed = [in_slot(got["pixel_values"], slots) for got in kept]
    assert len({s for s in placed if s is not None}) == sum(s is not None for s in placed) <= PREFETCH + 1
    assert placed.count(None) >= 12 - (PREFETCH + 1)  # the rest came in fresh segments
    # The worker goes on into the third epoch; stopped, its batches in flight keep their slots
    # (they are dropped with the loader), so only the slots the trainer held are checked.
    batches.close()
    held = {s for s in placed if s is not None}
    del kept, placed
    gc.collect()
    assert held and all(slots._free[slot].acquire(block=False) for slot in held)  # every slot given back


def test_a_program_that_fails_while_workers_run_still_exits(tmp_path):
    # Workers ignore SIGTERM (the trainer handles it), so multiprocessing's exit hook alone would
    # wait for them forever.
    pattern = write_shards(tmp_path, [16])
    script = (
        "from tests.helpers import batches_for\n"
        f"batches = batches_for({pattern!r}, dp_rank=0, dp_size=1, workers=1, batch_size=4)\n"
        "next(batches)\n"
        "raise SystemExit('a user error while the loader runs')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "a user error while the loader runs" in done.stderr
