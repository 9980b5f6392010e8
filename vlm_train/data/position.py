"""A run's position in its data: plain values and pure functions (no loaders, no processes).

Vocabulary. A *layout* is `dp_size` data-parallel ranks x `workers` loader workers x micro-batch
`batch_size`. Each (rank, worker) pair is a *slot* (slot = dp_rank * workers + worker) that reads
its own contiguous range of each epoch's samples (see pipeline.py). A *position* is (epoch,
batch): `batch` counts this rank's batches of the epoch, which its workers serve in turn (rank
batch b comes from worker b % workers).

A resume mid-epoch under a different layout is redistributed exactly: the rest of that epoch
keeps the checkpoint's slot partition (what each old slot had not yet given), concatenated in
old-slot order and cut into equal shares for the new slots (a `Transition`); the next epoch is
split for the new layout as usual. No sample is repeated; the few that do not fill a whole batch
on every new slot (fewer than new slots x micro-batch) are left out of that epoch.

The checkpoint format (`Position.state_dict`) is unchanged from before this module: the
data-parallel size is stored under the key "world" (in the layout and in a transition), and a
transition saved as "dp_size" loads too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm_train.errors import DataError

# (url, sample index, byte offset, key): where a worker's current tar block starts; a resume seeks there.
Hint = tuple[Any, ...]


def ceil_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded up (exact on ints, negative numerators included)."""
    return -(-numerator // denominator)


@dataclass(frozen=True)
class SlotShare:
    """One source's share of a slot each epoch: `per_slot` samples, of which `used` (whole batches) are read."""

    per_slot: int
    used: int


def slot_share(samples: int, slots: int, batch_size: int) -> SlotShare:
    """`samples` cut into `slots` equal contiguous ranges, each read in whole batches of `batch_size`."""
    per_slot = samples // slots
    return SlotShare(per_slot, per_slot // batch_size * batch_size)


def batches_done(batch: int, worker: int, workers: int) -> int:
    """Batches (logical) `worker` gave before its rank's batch `batch`: it serves rank batches
    worker, worker + workers, worker + 2 * workers, ..."""
    return max(0, ceil_div(batch - worker, workers))


@dataclass(frozen=True)
class WorkerStart:
    """Where one loader worker starts after the rank resumed at some batch."""

    worker: int  # the logical worker (the slot's worker index) this loader worker serves
    slot: int  # dp_rank * workers + worker
    done: int  # batches that slot already gave this epoch


def worker_start(dp_rank: int, workers: int, start_batch: int, loader_worker: int) -> WorkerStart:
    """The slot loader worker `loader_worker` serves when the rank starts at `start_batch`.

    After resuming at batch b, the DataLoader asks its worker 0 first: it serves the slot that
    batch b came from, so the batch order is the same as in an uninterrupted run."""
    worker = (loader_worker + start_batch) % workers
    return WorkerStart(worker, dp_rank * workers + worker, batches_done(start_batch, worker, workers))


@dataclass(frozen=True)
class SourceShape:
    """What the position depends on of one source: its shard count, sample count and weight."""

    shards: int
    samples: int
    weight: float


@dataclass(frozen=True)
class DataLayout:
    """How a run reads its data: data-parallel ranks x loader workers x micro-batch, over its sources."""

    dp_size: int
    workers: int  # logical loader workers per rank, >= 1 (data.num_workers=0 reads in-process as one)
    batch_size: int
    sources: tuple[SourceShape, ...]

    @property
    def slots(self) -> int:
        return self.dp_size * self.workers

    def batches_per_slot(self) -> int:
        """Batches each slot gives in an epoch split for this layout (the sources' shares summed)."""
        used = sum(slot_share(s.samples, self.slots, self.batch_size).used for s in self.sources)
        return used // self.batch_size

    def to_state(self) -> dict:
        """The checkpoint's layout keys ("world" is the data-parallel size: the stored name)."""
        sources = [[s.shards, s.samples, s.weight] for s in self.sources]
        return {"world": self.dp_size, "workers": self.workers, "batch_size": self.batch_size, "sources": sources}

    def describe(self) -> str:
        sources = f"{len(self.sources)} source(s), {sum(s.samples for s in self.sources)} samples"
        return f"{self.dp_size} data-parallel ranks x {self.workers} workers x micro-batch {self.batch_size}, {sources}"


def saved_layout(state: dict, current: DataLayout) -> DataLayout | None:
    """The layout a checkpoint's position is valid for; None when the checkpoint does not say
    (saved before layouts or, with a mixture, before sources were stored)."""
    dp_size, workers, batch_size, sources = (state.get(key) for key in ("world", "workers", "batch_size", "sources"))
    if sources is None and len(current.sources) == 1:  # a checkpoint from before mixtures: one source
        sources = [[s.shards, s.samples, s.weight] for s in current.sources]
    if dp_size is None or workers is None or batch_size is None or sources is None:
        return None
    return DataLayout(dp_size, workers, batch_size, tuple(SourceShape(*source) for source in sources))


@dataclass(frozen=True)
class Transition:
    """The rest of `epoch`, begun under another layout (dp_size x workers x batch_size, stopped at
    per-rank `batch`), served by this run's slots. Only a single-source run redistributes, so the
    old split follows from that source's sample count."""

    epoch: int
    dp_size: int
    workers: int
    batch_size: int
    batch: int

    def old_share(self, samples: int) -> SlotShare:
        """An old slot's share of the source, as the old layout split it."""
        return slot_share(samples, self.dp_size * self.workers, self.batch_size)

    def remaining(self, samples: int) -> list[tuple[int, int, int]]:
        """(old slot, first, stop): the positions of each old slot's stream not yet consumed."""
        used, left = self.old_share(samples).used, []
        for dp_rank in range(self.dp_size):
            for worker in range(self.workers):
                done = batches_done(self.batch, worker, self.workers)
                left.append((dp_rank * self.workers + worker, done * self.batch_size, used))
        return left

    def share(self, layout: DataLayout) -> int:
        """Samples each slot of `layout` takes: an equal whole number of batches."""
        total = sum(stop - first for _, first, stop in self.remaining(layout.sources[0].samples))
        return total // layout.slots // layout.batch_size * layout.batch_size

    def pieces(self, layout: DataLayout, slot: int) -> list[tuple[int, int, int]]:
        """(old slot, first, stop) pieces that make up `slot`'s share, in order."""
        share = self.share(layout)
        lo, hi, offset, pieces = slot * share, (slot + 1) * share, 0, []
        for old_slot, first, stop in self.remaining(layout.sources[0].samples):
            begin, end = max(lo, offset), min(hi, offset + stop - first)
            if begin < end:
                pieces.append((old_slot, first + begin - offset, first + end - offset))
            offset += stop - first
        return pieces

    def to_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "world": self.dp_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "batch": self.batch,
        }

    @classmethod
    def from_state(cls, state: dict) -> Transition:
        dp_size = state["dp_size"] if "dp_size" in state else state["world"]
        return cls(state["epoch"], dp_size, state["workers"], state["batch_size"], state["batch"])


@dataclass(frozen=True)
class Position:
    """This rank's place in its data: (epoch, batch), the block starts each worker's last batch
    read (a resume seeks there), and a redistributed epoch if one was begun under another layout."""

    epoch: int = 0
    batch: int = 0
    hints: dict[int, list[Hint]] = field(default_factory=dict)  # logical worker -> block starts
    transition: Transition | None = None

    def in_transition(self) -> bool:
        return self.transition is not None and self.transition.epoch == self.epoch

    def slot_batches(self, layout: DataLayout) -> int:
        """Batches each slot gives in this epoch (a redistributed epoch gives its equal share)."""
        if self.transition is None or not self.in_transition():
            return layout.batches_per_slot()
        return self.transition.share(layout) // layout.batch_size

    def batches_per_epoch(self, layout: DataLayout) -> int:
        """This rank's batches in this epoch."""
        return self.slot_batches(layout) * layout.workers

    def flat_hints(self) -> list[Hint]:
        return [hint for hints in self.hints.values() for hint in hints]

    def after_batch(self, layout: DataLayout, hints: list[Hint]) -> Position:
        """The position once this rank took its next batch, whose worker read from `hints`."""
        worker_hints = {**self.hints, self.batch % layout.workers: hints}
        epoch, batch = self.epoch, self.batch + 1
        if batch == self.batches_per_epoch(layout):
            epoch, batch = epoch + 1, 0
        return Position(epoch, batch, worker_hints, self.transition)

    def state_dict(self, layout: DataLayout) -> dict:
        """Plain values for the checkpoint: the position plus the layout it is valid for. Shard
        order, offsets and shuffles follow from the seed, so they need no storage."""
        hints = [list(hint) for hint in self.flat_hints()]
        transition = self.transition.to_state() if self.transition is not None and self.in_transition() else None
        return {"epoch": self.epoch, "batch": self.batch, "hints": hints, "transition": transition, **layout.to_state()}


@dataclass(frozen=True)
class Redistribution:
    """A layout change mid-epoch: `left` samples of `epoch` over `slots` new slots, `left_out` of
    which do not fill a batch on every slot."""

    epoch: int
    left: int
    slots: int
    left_out: int


@dataclass(frozen=True)
class Resumed:
    position: Position
    redistributed: Redistribution | None = None  # set when this resume began a redistributed epoch


def resume(state: dict, layout: DataLayout) -> Resumed:
    """The position that continues `state` (a `Position.state_dict`) under `layout`.

    The same layout continues exactly. A different layout at an epoch boundary (batch 0) splits
    the next epoch anew; mid-epoch it redistributes the rest of the epoch (a `Transition`).
    Refused with a one-line DataError: a change of sources (shards, sample count, weights), a
    layout change mid-epoch with a mixture, or a second change before a redistributed epoch ends.
    """
    epoch, batch = state["epoch"], state["batch"]
    hints = {0: [tuple(hint) for hint in state.get("hints", [])]} if batch else {}
    saved = saved_layout(state, layout)
    if saved == layout:
        transition = Transition.from_state(state["transition"]) if state.get("transition") else None
        return Resumed(Position(epoch, batch, hints, transition))
    if batch == 0:
        return Resumed(Position(epoch, batch, hints))
    if saved is None or state.get("transition") or saved.sources != layout.sources or len(layout.sources) != 1:
        described = saved.describe() if saved is not None else "a layout it does not record"
        raise DataError(
            f"the checkpoint's data position (epoch {epoch}, batch {batch}) is for {described}, this run has "
            f"{layout.describe()}: resume with the same values, or from a checkpoint saved at an epoch boundary"
        )
    transition = Transition(epoch, saved.dp_size, saved.workers, saved.batch_size, batch)
    left = sum(stop - first for _, first, stop in transition.remaining(layout.sources[0].samples))
    kept = transition.share(layout) * layout.slots
    position = Position(epoch, 0, hints, transition)
    return Resumed(position, Redistribution(epoch, left, layout.slots, left - kept))
