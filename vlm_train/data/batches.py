"""A rank's batch stream over epochs, its checkpointed position, and resuming it under a new layout.

A position is (epoch, batch) in one layout: data-parallel ranks x loader workers x micro-batch
(plus the sources). A resume mid-epoch under a different layout is redistributed exactly: the
rest of that epoch keeps the checkpoint's slot partition (what each old slot had not yet given),
concatenated in old-slot order and cut into equal shares for the new slots (a `Transition`);
the next epoch is split for the new layout as usual. No sample is repeated; the few that do not
fill a whole batch on every new slot (fewer than new slots x micro-batch) are left out of that
epoch, with a warning that says how many.
"""

from __future__ import annotations

import atexit
import gc
import logging
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

from vlm_train.data.transfer import PixelSlots
from vlm_train.errors import DataError

if TYPE_CHECKING:
    from vlm_train.data.pipeline import ShardStream
    from vlm_train.data.sources import Source

log = logging.getLogger(__name__)
PREFETCH = 4  # batches each loader worker prepares ahead


@dataclass(frozen=True)
class Transition:
    """The rest of `epoch`, begun under another layout (world x workers x batch_size, stopped at
    per-rank `batch`), served by this run's slots."""

    epoch: int
    world: int
    workers: int
    batch_size: int
    batch: int

    def remaining(self, old: Source) -> list[tuple[int, int, int]]:
        """(old slot, first, stop): the positions of each old slot's stream not yet consumed."""
        left = []
        for rank in range(self.world):
            for logical in range(self.workers):
                done = max(0, -(-(self.batch - logical) // self.workers))
                left.append((rank * self.workers + logical, done * self.batch_size, old.used))
        return left

    def share(self, old: Source, slots: int, batch_size: int) -> int:
        """Samples each new slot takes: an equal whole number of batches."""
        total = sum(stop - first for _, first, stop in self.remaining(old))
        return total // slots // batch_size * batch_size

    def pieces(self, old: Source, slots: int, batch_size: int, slot: int) -> list[tuple[int, int, int]]:
        """(old slot, first, stop) pieces that make up new `slot`'s share, in order."""
        share = self.share(old, slots, batch_size)
        lo, hi, offset, pieces = slot * share, (slot + 1) * share, 0, []
        for old_slot, first, stop in self.remaining(old):
            begin, end = max(lo, offset), min(hi, offset + stop - first)
            if begin < end:
                pieces.append((old_slot, first + begin - offset, first + end - offset))
            offset += stop - first
        return pieces


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
    # final save, so workers ignore what the trainer handles (training/signals.py).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


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

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False, keys_file: Path | None = None):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.epoch, self.batch = 0, 0
        self.hints: dict[int, list] = {}  # per worker: block starts of the last batch it gave
        self.keys_file = keys_file
        self._iterator: Iterator[dict] | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def close(self) -> None:
        """Stop the loader workers now. They ignore SIGTERM, so an interpreter exit that still
        holds the loader (an exception's traceback does) would wait for them forever."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None

    def __next__(self) -> dict:
        if self._iterator is None:
            self.stream.set_position(self.epoch, self.batch, [h for hs in self.hints.values() for h in hs])
            # A worker has at most PREFETCH batches in flight, plus the one the trainer is taking.
            self.stream.pixel_slots = PixelSlots(self.num_workers, PREFETCH + 1) if self.num_workers else None
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=PREFETCH if self.num_workers else None,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
            if self.num_workers:
                _WITH_WORKERS.add(self)
                # Workers are forked: objects the parent's garbage collector would otherwise walk in
                # each child (touching, so copying, every page that holds one) are frozen first.
                gc.freeze()
            self._iterator = iter(loader)
        batch = next(self._iterator)
        if self.stream.pixel_slots is not None:
            self.stream.pixel_slots.take(batch)
        self.hints[self.batch % self.stream.workers] = batch.pop("resume_hints", [])
        if self.keys_file is not None:
            with self.keys_file.open("a") as out:  # debug aid (data.log_keys): one line per batch taken
                out.write(f"{self.epoch} {self.batch} {' '.join(batch['keys'])}\n")
        self.batch += 1
        if self.batch == self.stream.batches_per_epoch:
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
        return batch

    def layout(self) -> dict:
        return {
            "world": self.stream.world,
            "workers": self.stream.workers,
            "batch_size": self.stream.batch_size,
            "sources": [[len(s.urls), sum(s.sizes), s.weight] for s in self.stream.sources],
        }

    def state_dict(self) -> dict:
        """This rank's data position: (epoch, batch) plus the layout it is valid for, and where each
        worker's current tar block starts (so a resume seeks there). Shard order, offsets and
        shuffles follow from the seed, so they need no storage."""
        hints = [list(h) for hs in self.hints.values() for h in hs]
        transition = self.stream.transition
        active = asdict(transition) if transition is not None and transition.epoch == self.epoch else None
        return {"epoch": self.epoch, "batch": self.batch, "hints": hints, "transition": active, **self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` stopped: the next batch is the one an uninterrupted run
        would take, no sample repeated or skipped, at a cost independent of how far the run got
        (workers seek to their block, reading tar headers of one shard only).

        A different data-parallel world size, data.num_workers or train.micro_batch_size:
        - at an epoch boundary (batch 0), the next epoch is simply split for the new layout;
        - mid-epoch, the rest of the epoch is redistributed exactly (see the module docstring):
          no sample repeated, fewer than new slots x micro-batch left out of that epoch (warned);
          every rank must load a state of the same (epoch, batch), as all ranks of a run save.
        Refused with a one-line DataError: a change of sources (shards, sample count, weights),
        a layout change mid-epoch with a mixture, or a second change before a redistributed epoch ends.
        """
        current, saved = self.layout(), {key: state.get(key) for key in ("world", "workers", "batch_size", "sources")}
        if state.get("sources") is None:  # a checkpoint from before mixtures: one source
            saved["sources"] = current["sources"] if len(current["sources"]) == 1 else None
        self.epoch, self.batch, self._iterator = state["epoch"], state["batch"], None
        self.hints = {0: [tuple(h) for h in state.get("hints", [])]} if state["batch"] else {}
        if saved == current:
            if state.get("transition"):
                self.stream.transition = Transition(**state["transition"])
            return
        if state["batch"] == 0:
            return
        if state.get("transition") or saved["sources"] != current["sources"] or len(current["sources"]) != 1:
            raise DataError(
                f"the checkpoint's data position (epoch {state['epoch']}, batch {state['batch']}) is for "
                f"{_describe(saved)}, this run has {_describe(current)}: resume with the same values, or "
                "from a checkpoint saved at an epoch boundary"
            )
        self.start_transition(
            Transition(state["epoch"], saved["world"], saved["workers"], saved["batch_size"], state["batch"])
        )

    def start_transition(self, transition: Transition) -> None:
        from vlm_train.data.sources import Source

        stream, source = self.stream, self.stream.sources[0]
        old = Source.split(
            source.urls, source.sizes, source.weight, transition.world * transition.workers, transition.batch_size
        )
        stream.transition, self.batch = transition, 0
        slots = stream.world * stream.workers
        share = transition.share(old, slots, stream.batch_size)
        left = sum(stop - first for _, first, stop in transition.remaining(old))
        log.warning(
            "data layout changed mid-epoch %d: its %d remaining samples are redistributed over %d slots; "
            "%d that do not fill a batch on every slot are left out of this epoch",
            transition.epoch,
            left,
            slots,
            left - share * slots,
        )


def _describe(layout: dict) -> str:
    sources = layout["sources"]
    shape = f"{len(sources)} source(s), {sum(s[1] for s in sources)} samples" if sources else "unknown sources"
    return (
        f"{layout['world']} data-parallel ranks x {layout['workers']} workers x micro-batch "
        f"{layout['batch_size']}, {shape}"
    )
