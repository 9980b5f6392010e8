"""A rank's batch stream over epochs (`TrainBatches`), its checkpointed position, and resuming it
under a new layout. The position itself (what it is, how it advances, how a resume under another
layout maps onto it) is data/position.py; this module runs the DataLoader over a stream that
starts there (pipeline.ShardStream).
"""

from __future__ import annotations

import atexit
import gc
import logging
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from torch.utils.data import DataLoader, IterableDataset

from vlm_train.data.position import DataLayout, Position, resume
from vlm_train.data.transfer import PixelSlots, from_wire

log = logging.getLogger(__name__)
PREFETCH = 4  # batches each loader worker prepares ahead


class PositionedStream(Protocol):
    """What TrainBatches needs of a sample stream (pipeline.ShardStream is the one)."""

    @property
    def layout(self) -> DataLayout: ...

    def starting_at(self, position: Position, pixel_slots: PixelSlots | None) -> IterableDataset:
        """The stream's batches of `position`'s epoch from `position` on (a new dataset: the
        stream itself is left as it is), pixels placed in `pixel_slots` when given."""
        ...


def modality_batches(window: list, batch_size: int, modality_of: Callable, rng: random.Random) -> list[list]:
    """One grouping window (a whole number of batches of samples) as batches of one modality each,
    as LLaVA's LengthGroupedSampler(group_by_modality=True) makes them, within the window.

    `modality_of(sample)` -> (has images, length). Image samples and text-only samples are batched
    apart, each longest first (similar lengths pad less; ties keep the shuffled order); the batch
    order is then shuffled with `rng`. The two modalities' leftovers (fewer than a batch each) make
    up exactly one batch between them, since the window holds whole batches: that mixed batch
    comes last, as LLaVA's `additional_batch` does. Nothing is dropped or repeated, and the window
    gives the same number of batches as ungrouped, so every rank's batch count is unchanged.
    """
    groups: dict[bool, list[tuple[int, object]]] = {True: [], False: []}
    for sample in window:
        has_images, length = modality_of(sample)
        groups[has_images].append((length, sample))
    batches, leftover = [], []
    for group in groups.values():
        ordered = [sample for _, sample in sorted(group, key=lambda pair: -pair[0])]
        whole = len(ordered) // batch_size * batch_size
        batches += [ordered[i : i + batch_size] for i in range(0, whole, batch_size)]
        leftover += ordered[whole:]
    rng.shuffle(batches)
    assert len(leftover) in (0, batch_size), "a grouping window holds whole batches"
    return batches + [leftover] if leftover else batches


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    # Slurm signals every process of a step; a worker killed by SIGTERM would abort the trainer's
    # final save, so workers ignore what the trainer handles (parallel/signals.py).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _as_made(batch: Any) -> Any:
    return batch


_WITH_WORKERS: weakref.WeakSet[TrainBatches] = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    # multiprocessing's own exit hook (registered before this one, so run after it) sends SIGTERM
    # to loader workers, which ignore it, then waits for them: a program that ends while a loader
    # still runs (an uncaught exception, a bench script) would never exit.
    for batches in list(_WITH_WORKERS):
        batches.close()


class TrainBatches:
    """This rank's endless batch stream, epoch after epoch, with a resumable position."""

    def __init__(
        self, stream: PositionedStream, num_workers: int, pin_memory: bool = False, keys_file: Path | None = None
    ):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.position = Position()
        self.keys_file = keys_file
        self.pixel_slots: PixelSlots | None = None  # shared-memory pixel slots of the current loader workers
        self._iterator: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def batch(self) -> int:
        return self.position.batch

    @property
    def batches_per_epoch(self) -> int:
        """This rank's batches in the current epoch."""
        return self.position.batches_per_epoch(self.stream.layout)

    def __iter__(self) -> TrainBatches:
        return self

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running loader workers (none in-process or before the first batch)."""
        return [worker.pid for worker in getattr(self._iterator, "_workers", [])]

    def close(self) -> None:
        """Stop the loader workers now. They ignore SIGTERM, so an interpreter exit that still
        holds the loader (an exception's traceback does) would wait for them forever."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None
        if self in _WITH_WORKERS:
            _WITH_WORKERS.discard(self)
            if not _WITH_WORKERS:  # no forked workers left: what was frozen for them may be collected again
                gc.unfreeze()

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._start_loader()
        batch = from_wire(next(self._iterator))
        if self.pixel_slots is not None:
            self.pixel_slots.take(batch)
        hints = batch.pop("resume_hints", [])
        if self.keys_file is not None:
            with self.keys_file.open("a") as out:  # debug aid (data.log_keys): one line per batch taken
                out.write(f"{self.epoch} {self.batch} {' '.join(batch['keys'])}\n")
        self.position = self.position.after_batch(self.stream.layout, hints)
        return batch  # at an epoch's end the same workers go on with the next (ShardStream.__iter__)

    def _start_loader(self) -> Iterator[dict]:
        # A worker has at most PREFETCH batches in flight, plus the one the trainer is taking.
        self.pixel_slots = PixelSlots(self.num_workers, PREFETCH + 1) if self.num_workers else None
        loader = DataLoader(
            self.stream.starting_at(self.position, self.pixel_slots),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=PREFETCH if self.num_workers else None,
            worker_init_fn=_leave_stop_signals_to_the_trainer,
            collate_fn=_as_made,  # torch's default would turn to_wire's arrays back into tensors in the worker
        )
        if self.num_workers:
            _WITH_WORKERS.add(self)
            # Workers are forked: objects the parent's garbage collector would otherwise walk in
            # each child (touching, so copying, every page that holds one) are frozen first.
            gc.freeze()
        return iter(loader)

    def state_dict(self) -> dict:
        """This rank's data position: (epoch, batch) plus the layout it is valid for, and where each
        worker's current tar block starts (so a resume seeks there); see position.Position.state_dict."""
        return self.position.state_dict(self.stream.layout)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` stopped: the next batch is the one an uninterrupted run
        would take, no sample repeated or skipped, at a cost independent of how far the run got
        (workers seek to their block, reading tar headers of one shard only).

        A different data-parallel size, data.num_workers or train.micro_batch_size:
        - at an epoch boundary (batch 0), the next epoch is simply split for the new layout;
        - mid-epoch, the rest of the epoch is redistributed exactly (see position.py): no sample
          repeated, fewer than new slots x micro-batch left out of that epoch (warned); every
          rank must load a state of the same (epoch, batch), as all ranks of a run save.
        Refused with a one-line DataError: a change of sources (shards, sample count, weights),
        a layout change mid-epoch with a mixture, or a second change before a redistributed epoch ends.
        """
        resumed = resume(state, self.stream.layout)
        self.position, self._iterator = resumed.position, None
        moved = resumed.redistributed
        if moved is not None:
            log.warning(
                "data layout changed mid-epoch %d: its %d remaining samples are redistributed over %d slots; "
                "%d that do not fill a batch on every slot are left out of this epoch",
                moved.epoch,
                moved.left,
                moved.slots,
                moved.left_out,
            )
