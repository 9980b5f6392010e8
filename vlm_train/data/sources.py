"""Where samples come from: shard patterns, their sizes, and a weighted mixture of sources.

Every source is split by sample ranges (see pipeline.py). A mixture interleaves the sources of
one (rank, worker) slot on a fixed schedule: blocks of `MIX_BLOCK` samples hold each source in
proportion to its weight (largest remainder), in an order shuffled per block with the seed. How
many samples each source gave before position n is then a closed form plus one block, so a
resume never replays the schedule from the start.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from vlm_train.data.position import SourceShape, slot_share
from vlm_train.data.reader import Slice, count_samples, is_local
from vlm_train.errors import DataError

log = logging.getLogger(__name__)

MIX_BLOCK = 1000


def expand_urls(pattern: str, key: str = "data.urls") -> list[str]:
    """Brace-expand a shard pattern; local shards must exist (remote ones are opened lazily)."""
    urls = wds.shardlists.expand_urls(pattern)
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"{key}={pattern} matches no shard")
    if missing:
        raise DataError(f"{key}={pattern}: {len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]}")
    return urls


def shard_sizes(urls: list[str], samples_per_shard: int | None = None) -> list[int]:
    """Samples per shard: from a `manifest.json` beside local shards, else their tar headers;
    remote shards (pipe:, http) take `samples_per_shard` (data.samples_per_shard)."""
    sizes, manifests = [], {}
    for url in urls:
        if not is_local(url):
            if samples_per_shard is None:
                raise DataError(f"{url}: remote shards need data.samples_per_shard (samples in each shard)")
            sizes.append(samples_per_shard)
            continue
        path = Path(url)
        folder = path.parent
        if folder not in manifests:
            manifests[folder] = _manifest_counts(folder / "manifest.json")
        known = manifests[folder].get(path.name)
        sizes.append(known if known is not None else count_samples(url))
        if sizes[-1] == 0:
            log.warning("shard %s holds no samples: skipped", url)
    return sizes


def _manifest_counts(manifest: Path) -> dict[str, int]:
    """{shard file name: samples}; accepts {"shards": {name: n}} or {"shards": [{"name"|"url"|"path", "samples"|"count"}]}."""
    if not manifest.is_file():
        return {}
    shards = json.loads(manifest.read_text()).get("shards", {})
    if isinstance(shards, dict):
        return {name: int(n) for name, n in shards.items()}
    counts = {}
    for entry in shards:
        name = entry.get("name") or entry.get("url") or entry.get("path")
        count = entry.get("samples", entry.get("count"))
        if name is not None and count is not None:
            counts[Path(name).name] = int(count)
    return counts


@dataclass(frozen=True)
class Source:
    """One corpus of the mixture: its shards, their sizes, its relative weight, and its share of a
    (rank, worker) slot: `per_slot` samples each epoch, of which `used` (whole batches) are read."""

    urls: list[str]
    sizes: list[int]
    weight: float
    per_slot: int
    used: int

    @classmethod
    def split(cls, urls: list[str], sizes: list[int], weight: float, slots: int, batch_size: int) -> Source:
        share = slot_share(sum(sizes), slots, batch_size)
        if share.used == 0:
            raise DataError(
                f"{sum(sizes)} samples of {urls[0]}... cannot give {slots} (rank, worker) slots a batch of "
                f"{batch_size} each: use more data, fewer data.num_workers or a smaller train.micro_batch_size"
            )
        return cls(urls, sizes, weight, share.per_slot, share.used)

    def shape(self) -> SourceShape:
        """What a data position depends on of this source (data/position.py)."""
        return SourceShape(len(self.urls), sum(self.sizes), self.weight)


def slot_slices(urls: list[str], sizes: list[int], order_key: str, lo: int, hi: int) -> list[Slice]:
    """The shard pieces covering samples [lo, hi) of the concatenation shuffled by `order_key`."""
    order = list(range(len(urls)))
    random.Random(order_key).shuffle(order)
    slices, offset = [], 0
    for index in order:
        begin, end = max(lo, offset), min(hi, offset + sizes[index])
        if begin < end:
            slices.append(Slice(urls[index], begin - offset, end - offset))
        offset += sizes[index]
    return slices


class MixSchedule:
    """Which source gives each sample of one slot's stream, and how many each gave before position n."""

    def __init__(self, weights: list[float], seed: int, slot: int):
        self.seed, self.slot, self.sources = seed, slot, len(weights)
        exact = [MIX_BLOCK * w / sum(weights) for w in weights]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in by_remainder[: MIX_BLOCK - sum(counts)]:
            counts[i] += 1
        self.per_block = counts

    def block(self, index: int) -> list[int]:
        if self.sources == 1:
            return [0] * MIX_BLOCK
        order = [source for source, n in enumerate(self.per_block) for _ in range(n)]
        random.Random(f"mix-{self.seed}-{self.slot}-{index}").shuffle(order)
        return order

    def consumed(self, position: int) -> list[int]:
        """Samples each source gave before `position`."""
        full, partial = divmod(position, MIX_BLOCK)
        head = self.block(full)[:partial]
        return [full * n + head.count(source) for source, n in enumerate(self.per_block)]

    def sources_from(self, position: int):
        index, offset = divmod(position, MIX_BLOCK)
        while True:
            yield from self.block(index)[offset:]
            index, offset = index + 1, 0
