"""The WebDataset pipeline: shards -> this rank's samples -> decoded, tokenized, collated batches.

Splitting is by sample ranges, not whole shards: each epoch the shard list is shuffled with the
seed, concatenated, and cut into equal contiguous ranges, one per (rank, worker) slot. So every
rank gets the same number of batches whatever the shard count (an uneven split hangs the
collectives), every sample is seen at most once per epoch (exactly once when the total divides
evenly), and a position (epoch, batch) is enough to resume without replaying earlier epochs: a
worker seeks to its block of the shuffled range (a byte offset the checkpoint kept). The position
and the slot arithmetic are data/position.py; data/batches.py runs the DataLoader over this stream.

Bad samples never stop a run: each is replaced by a masked placeholder (every rank keeps full,
equal batches) and counted by reason in `batch["skipped_by_reason"]`, an int64 tensor
[len(SKIP_REASONS)] (`batch["skipped"]`: their total).
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlm_train.config import DataConfig
from vlm_train.data.batches import TrainBatches, modality_batches
from vlm_train.data.packing import collate_packed, first_fit
from vlm_train.data.position import DataLayout, Position, ceil_div, worker_start
from vlm_train.data.preprocess import AnyResTransform, ImageTransform
from vlm_train.data.reader import SkippedSample, Slice, read_slice
from vlm_train.data.samples import (
    REASON_INDEX,
    SKIP_REASONS,
    SLOW_DATA_ENV,
    SampleEncoder,
    collate,
    placeholder,
    skipped,
)
from vlm_train.data.sources import MixSchedule, Source, expand_urls, shard_sizes, slot_slices
from vlm_train.data.token_budget import longest_first, row_media
from vlm_train.data.transfer import PixelSlots, cat_for_transfer, to_wire

log = logging.getLogger(__name__)

__all__ = [  # the samples module's names too: callers take the pipeline's whole API from here
    "REASON_INDEX",
    "SKIP_REASONS",
    "SLOW_DATA_ENV",
    "SampleEncoder",
    "SkippedSample",
    "collate",
    "Slice",
    "TrainBatches",
    "build_train_batches",
    "expand_urls",
    "shard_sizes",
]


def read_raw(slices: list[Slice], hints: dict | None = None) -> Iterator[dict | SkippedSample]:
    """Undecoded samples ({"__key__", ext: bytes}) of each slice, in order; `SkippedSample` for unreadable ones."""
    for piece in slices:
        yield from read_slice(piece, hints)


class ShardStream(IterableDataset):
    """One epoch of batches for one rank; each DataLoader worker streams its own sample range.

    With several sources (a mixture), each source is split into slots on its own and cycles
    through its own epochs; an epoch of the stream is then a nominal length (the sources' slot
    shares summed), which only decides when the DataLoader restarts.
    """

    def __init__(
        self,
        sources: list[Source],
        encoder: SampleEncoder,
        pad_id: int,
        *,
        dp_rank: int,
        dp_size: int,
        workers: int,
        batch_size: int,
        seed: int,
        shuffle_block: int,
        packing: bool = False,
        group_by_modality: bool = False,
        token_budget: int | None = None,
    ):
        self.sources, self.encoder, self.pad_id = sources, encoder, pad_id
        self.dp_rank, self.workers = dp_rank, max(workers, 1)
        self.layout = DataLayout(dp_size, self.workers, batch_size, tuple(source.shape() for source in sources))
        self.batch_size, self.seed, self.shuffle_block = batch_size, seed, max(shuffle_block, 1)
        self.packing, self.group_by_modality, self.token_budget = packing, group_by_modality, token_budget
        self.position = Position()  # where iteration starts: set on the copy `starting_at` returns
        self.hints: dict[str, list[tuple]] = {}  # shard url -> [(sample index, byte offset, key)]
        self.block_starts: dict[int, tuple] = {}  # source -> (url, index, offset) of the last block read
        self.pixel_slots: PixelSlots | None = None  # the loader workers' shared-memory pixel slots

    def starting_at(self, position: Position, pixel_slots: PixelSlots | None) -> ShardStream:
        """This stream from `position` on (its epoch), its pixels in `pixel_slots` (None: in-process)."""
        started = copy.copy(self)
        started.position, started.pixel_slots, started.hints = position, pixel_slots, {}
        for url, *where in position.flat_hints():  # block starts to seek to
            started.hints.setdefault(url, []).append(tuple(where))
        return started

    def slot_batches(self) -> int:
        return self.position.slot_batches(self.layout)

    def __iter__(self) -> Iterator[dict]:
        """This loader worker's batches from the stream's position on, epoch after epoch: workers
        live across epochs (no fork, no empty prefetch queue at each epoch's start). Every slot
        gives the same number of batches in an epoch, so the DataLoader's round robin hands each
        loader worker the same logical worker in every epoch, as a fresh loader would."""
        info = get_worker_info()
        start = worker_start(self.dp_rank, self.workers, self.position.batch, info.id if info is not None else 0)
        stream = self
        while stream.slot_batches() > 0:
            yield from stream.epoch_batches(start.slot, start.done)
            stream = stream.next_epoch()
            start = replace(start, done=0)

    def next_epoch(self) -> ShardStream:
        """This stream from the start of the epoch after its position's (split for its own layout)."""
        following = copy.copy(self)
        following.position, following.hints = Position(self.position.epoch + 1), {}
        return following

    def epoch_batches(self, slot: int, done: int) -> Iterator[dict]:
        """The batches of `slot` in the stream position's epoch, after the first `done`."""
        # Grouped batches are cut from whole windows: a resume re-reads the window it stopped in.
        first = done // self.window_batches() * self.window_batches() if self.group_by_modality else done
        if self.position.in_transition():
            items = self.transition_items(slot, first * self.batch_size)
        else:
            items = self.slot_items(
                slot, (self.position.epoch * self.layout.batches_per_slot() + first) * self.batch_size
            )
        raw_batches: Iterator[tuple[list, torch.Tensor, list | None]]
        if self.group_by_modality:
            raw_batches = self.grouped_batches(items, first, slot)
        else:
            raw_batches = self.plain_batches(items, self.slot_batches() - first)
        fallback = None
        for raw_batch, counts, hints in islice(raw_batches, done - first, None):
            batch, fallback = self.make_batch(raw_batch, counts, fallback, hints)
            yield to_wire(batch)

    def plain_batches(self, items: Iterator, count: int) -> Iterator[tuple[list, torch.Tensor, None]]:
        """`count` batches of the stream's next samples, in stream order (hints: read when made)."""
        for _ in range(count):
            counts = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
            yield self.take(items, self.batch_size, counts), counts, None

    def take(self, items: Iterator, count: int, counts: torch.Tensor) -> list[dict | SkippedSample]:
        """The next `count` samples; empty shards take no position, they are only counted."""
        raw: list[dict | SkippedSample] = []
        while len(raw) < count:
            item = next(items)
            if isinstance(item, SkippedSample) and item.reason == "empty_shard":
                counts[REASON_INDEX[item.reason]] += 1
            else:
                raw.append(item)
        return raw

    def window_batches(self) -> int:
        """Batches per modality-grouping window: the shuffle block rounded up to whole batches."""
        return ceil_div(self.shuffle_block, self.batch_size)

    def grouped_batches(self, items: Iterator, first: int, slot: int) -> Iterator[tuple[list, torch.Tensor, list]]:
        """data.group_by_modality_length: the slot's batches from `first` (a window start) on, each
        window of samples regrouped into batches of one modality (batches.modality_batches)."""
        for start in range(first, self.slot_batches(), self.window_batches()):
            size = min(self.window_batches(), self.slot_batches() - start)
            counts = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
            window = self.take(items, 1, counts)
            # where the window starts (no later block than its first sample's): a resume seeks there
            hints = list(self.block_starts.values())
            window += self.take(items, size * self.batch_size - 1, counts)
            rng = random.Random(f"modality-{self.seed}-{self.position.epoch}-{slot}-{start}")
            for index, raw_batch in enumerate(modality_batches(window, self.batch_size, self.modality_of, rng)):
                yield raw_batch, counts if index == 0 else torch.zeros_like(counts), hints

    def modality_of(self, item: dict | SkippedSample) -> tuple[bool, int]:
        """(has images or a video, length): length is the text field's size in bytes (LLaVA counts
        words). An unreadable sample goes with the media samples (its placeholder copies a batch-mate)."""
        if isinstance(item, SkippedSample):
            return True, 0
        media = bool(self.encoder.image_members(item)) or self.encoder.video_of(item) is not None
        return media, len(item.get(self.encoder.cfg.text_key) or b"")

    def make_batch(
        self, raw_batch: list[dict | SkippedSample], counts: torch.Tensor, fallback, hints: list | None = None
    ) -> tuple[dict, tuple]:
        encoded = [
            self.encoder.encode(item) if isinstance(item, dict) else skipped(item.reason, item.key, "unreadable")
            for item in raw_batch
        ]
        fallback = next((e for e in encoded if not isinstance(e, SkippedSample)), fallback)
        samples = []
        for item in encoded:
            if isinstance(item, SkippedSample):
                counts[REASON_INDEX[item.reason]] += 1
                item = placeholder(fallback, self.pad_id, self.encoder.pixels(None))
            samples.append(item)
        batch = self.collate(samples)
        if self.pixel_slots is not None:
            batch["pixel_slot"] = self.pixel_slots.slot_of(batch["pixel_values"])
        batch["resume_hints"] = list(self.block_starts.values()) if hints is None else hints
        batch["skipped_by_reason"] = counts
        batch["skipped"] = int(counts.sum())
        return batch, fallback

    def collate(self, samples: list[tuple]) -> dict:
        """One batch of encoded samples; with data.max_tokens_per_batch longest first, with the
        media of each row (data/token_budget.py: the trainer cuts it into forwards)."""
        cat = self.pixel_slots.cat if self.pixel_slots is not None else cat_for_transfer
        max_length = self.encoder.cfg.max_length
        if self.token_budget:
            samples = longest_first(samples)
        if self.packing:
            batch = collate_packed(samples, self.pad_id, max_length, cat, cat_for_transfer)
        else:
            batch = collate(samples, self.pad_id, cat, cat_for_transfer)
        if self.token_budget:
            lengths = [len(enc.input_ids) for _, _, enc in samples]
            rows = first_fit(lengths, max_length) if self.packing else [[i] for i in range(len(samples))]
            batch["row_media"] = row_media([[samples[i] for i in row] for row in rows])
        return batch

    def slot_items(self, slot: int, position: int) -> Iterator[dict | SkippedSample]:
        """The slot's endless stream from sample `position` on, the sources interleaved by the mixture."""
        schedule = MixSchedule([source.weight for source in self.sources], self.seed, slot)
        streams = [
            self.source_items(index, slot, consumed) for index, consumed in enumerate(schedule.consumed(position))
        ]
        for index in schedule.sources_from(position):
            item = next(streams[index])
            while isinstance(item, SkippedSample) and item.reason == "empty_shard":
                yield item
                item = next(streams[index])
            yield item

    def transition_items(self, slot: int, skip: int) -> Iterator[dict | SkippedSample]:
        """This slot's share of the rest of a redistributed epoch: pieces of the old slots' streams."""
        transition = self.position.transition
        assert transition is not None, "only a redistributed epoch has a transition"
        old = transition.old_share(self.layout.sources[0].samples)
        for old_slot, first, stop in transition.pieces(self.layout, slot):
            taken = min(skip, stop - first)
            skip -= taken
            if first + taken < stop:
                lo = old_slot * old.per_slot
                stream = self.shuffled(0, self.position.epoch, lo, lo + old.used, first + taken, old_slot)
                yield from islice(stream, stop - first - taken)

    def source_items(self, index: int, slot: int, position: int) -> Iterator[dict | SkippedSample]:
        """One source's samples for this slot from its `position` on, epoch after epoch."""
        source = self.sources[index]
        epoch, skip = divmod(position, source.used)
        lo = slot * source.per_slot
        while True:
            if skip == 0 and slot == 0:  # each empty shard counted once per epoch, by one slot
                for url, size in zip(source.urls, source.sizes):
                    if size == 0:
                        yield SkippedSample("empty_shard", url)
            yield from self.shuffled(index, epoch, lo, lo + source.used, skip, slot)
            epoch, skip = epoch + 1, 0

    def shuffled(
        self, index: int, epoch: int, lo: int, hi: int, skip: int, slot: int
    ) -> Iterator[dict | SkippedSample]:
        """Block-shuffled raw samples of [lo, hi) of one source's epoch, the first `skip` left out
        without reading the whole blocks before them."""
        tag = f"{self.seed}-{epoch}" if index == 0 else f"{self.seed}-source{index}-{epoch}"
        source, block_size = self.sources[index], self.shuffle_block
        first_block = skip // block_size
        slices = slot_slices(source.urls, source.sizes, f"shards-{tag}", lo + first_block * block_size, hi)
        raw = read_raw(slices, self.hints)
        block_index, drop = first_block, skip % block_size
        while block := list(islice(raw, block_size)):
            if isinstance(block[0], dict):  # where this block starts: a resume seeks there
                self.block_starts[index] = block[0]["__where__"]
            random.Random(f"block-{tag}-{slot}-{block_index}").shuffle(block)
            yield from block[drop:]
            block_index, drop = block_index + 1, 0


def build_sources(cfg: DataConfig, slots: int, batch_size: int) -> list[Source]:
    """data.urls (weight data.weight) and each data.mixture entry, split into `slots` slot shares."""
    patterns = [(cfg.urls, cfg.weight, "data.urls")]
    patterns += [(m.urls, m.weight, f"data.mixture[{i}].urls") for i, m in enumerate(cfg.mixture)]
    sources = []
    for pattern, weight, key in patterns:
        urls = expand_urls(pattern, key=key)
        sources.append(Source.split(urls, shard_sizes(urls, cfg.samples_per_shard), weight, slots, batch_size))
    return sources


def build_train_batches(
    cfg: DataConfig,
    tokenizer,
    transform: ImageTransform | AnyResTransform,
    image_tokens: int | Callable[[tuple[int, int]], int],
    *,
    video_tokens: Callable[[int], int] | None = None,
    visual_cost: tuple | None = None,
    dp_rank: int,
    dp_size: int,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
) -> TrainBatches:
    """This data-parallel rank's batches: `dp_size` ranks, `cfg.num_workers` loader workers each
    (`image_tokens`, `video_tokens`, `visual_cost`: see SampleEncoder)."""
    workers = max(cfg.num_workers, 1)
    stream = ShardStream(
        build_sources(cfg, dp_size * workers, batch_size),
        SampleEncoder(cfg, tokenizer, transform, image_tokens, video_tokens, visual_cost),
        tokenizer.pad_token_id,
        dp_rank=dp_rank,
        dp_size=dp_size,
        workers=cfg.num_workers,
        batch_size=batch_size,
        seed=seed,
        shuffle_block=cfg.shuffle_block,
        packing=cfg.packing,
        group_by_modality=cfg.group_by_modality_length,
        token_budget=cfg.max_tokens_per_batch,
    )
    keys_file = None
    if cfg.log_keys:
        keys_file = Path(cfg.log_keys) / f"keys-rank{dp_rank}.txt"
        keys_file.parent.mkdir(parents=True, exist_ok=True)
    return TrainBatches(stream, cfg.num_workers, pin_memory, keys_file)


def read_eval_records(pattern: str, limit: int) -> list[dict]:
    """The first `limit` held-out samples, undecoded, in shard order (identical on every rank)."""
    urls = expand_urls(pattern, key="data.eval_urls")
    pieces = [Slice(u, 0, size) for u, size in zip(urls, shard_sizes(urls))]
    return [r for r in islice(read_raw(pieces), limit) if isinstance(r, dict)]
