"""The WebDataset pipeline: shards -> this rank's samples -> decoded, tokenized, collated batches.

Splitting is by sample ranges, not whole shards: each epoch the shard list is shuffled with the
seed, concatenated, and cut into equal contiguous ranges, one per (rank, worker) slot. So every
rank gets the same number of batches whatever the shard count (an uneven split hangs the
collectives), every sample is seen at most once per epoch (exactly once when the total divides
evenly), and a position (epoch, batch) is enough to resume without replaying earlier epochs.
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_train.config import DataConfig
from vlm_train.data.preprocess import ImageTransform
from vlm_train.data.templates import Encoded, encode, truncate
from vlm_train.errors import DataError

log = logging.getLogger(__name__)


def expand_urls(pattern: str, key: str = "data.urls") -> list[str]:
    """Brace-expand a shard pattern; local shards must exist (remote ones are opened lazily)."""
    import webdataset as wds

    urls = wds.shardlists.expand_urls(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"{key}={pattern} matches no shard")
    if missing:
        raise DataError(f"{key}={pattern}: {len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]}")
    return urls


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard, from a `manifest.json` beside the shards or by reading tar headers."""
    sizes = []
    manifests: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        manifest_file = path.parent / "manifest.json"
        if manifest_file.is_file() and manifest_file not in manifests:
            manifests[manifest_file] = json.loads(manifest_file.read_text()).get("shards", {})
        known = manifests.get(manifest_file, {}).get(path.name)
        sizes.append(known if known is not None else _count_tar_samples(url))
    return sizes


def _count_tar_samples(url: str) -> int:
    if not Path(url).is_file():
        raise DataError(f"{url}: remote shards need a manifest.json with sample counts")
    try:
        with tarfile.open(url) as tar:
            return len({m.name.split("/")[-1].split(".")[0] for m in tar.getmembers() if m.isreg()})
    except tarfile.TarError as err:
        raise DataError(f"{url} is not a readable tar file: {err}") from None


@dataclass(frozen=True)
class Slice:
    url: str
    start: int  # first sample within the shard
    stop: int


def slot_slices(urls: list[str], sizes: list[int], epoch: int, seed: int, lo: int, hi: int) -> list[Slice]:
    """The shard pieces covering samples [lo, hi) of this epoch's shuffled concatenation."""
    order = list(range(len(urls)))
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    slices, offset = [], 0
    for index in order:
        begin, end = max(lo, offset), min(hi, offset + sizes[index])
        if begin < end:
            slices.append(Slice(urls[index], begin - offset, end - offset))
        offset += sizes[index]
    return slices


def read_raw(slices: list[Slice]) -> Iterator[dict]:
    """Undecoded samples ({"__key__", ext: bytes}) of each slice, in order."""
    import webdataset as wds

    for piece in slices:
        samples = wds.tariterators.tarfile_samples([{"url": piece.url}])
        yield from islice(samples, piece.start, piece.stop)


class SampleEncoder:
    """Raw WebDataset sample -> (key, pixels [I,3,S,S], Encoded), or None for a bad sample."""

    def __init__(self, cfg: DataConfig, tokenizer, transform: ImageTransform, image_tokens: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.transform = transform
        self.image_tokens = image_tokens
        self.image_keys = cfg.image_key.split(";")
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    def __call__(self, raw: dict) -> tuple[str, torch.Tensor, Encoded] | None:
        key = raw.get("__key__", "?")
        try:
            turns = self.conversation(raw)
            image_bytes = next((raw[k] for k in self.image_keys if k in raw), None)
            pixels = self.pixels(image_bytes)
        except (ValueError, KeyError, OSError) as err:
            log.warning("skipping sample %s: %s", key, err)
            return None
        encoded = encode(turns, self.tokenizer, self.cfg.template, self.image_tokens)
        if encoded.num_images != pixels.shape[0]:
            log.warning(
                "skipping sample %s: %d <image> markers for %d images", key, encoded.num_images, pixels.shape[0]
            )
            return None
        encoded = truncate(encoded, self.cfg.max_length, self.image_token_id)
        if encoded is None:
            log.warning("skipping sample %s: longer than data.max_length=%d", key, self.cfg.max_length)
            return None
        return key, pixels, encoded

    def conversation(self, raw: dict) -> list[dict]:
        if self.cfg.text_key == "json" and "json" in raw:
            return json.loads(raw["json"])["conversations"]
        if self.cfg.text_key in raw:  # a caption: image-caption corpora (LAION/CC style)
            return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": raw[self.cfg.text_key].decode()}]
        raise KeyError(f"no '{self.cfg.text_key}' field")

    def pixels(self, image_bytes: bytes | None) -> torch.Tensor:
        if image_bytes is None:
            return torch.empty(0, 3, self.transform.size, self.transform.size)
        with Image.open(io.BytesIO(image_bytes)) as image:
            return self.transform(image).unsqueeze(0)


def collate(samples: list[tuple[str, torch.Tensor, Encoded]], pad_id: int) -> dict:
    """Right-padded batch: pixel_values [I,3,S,S], input_ids/attention_mask/labels [B,T], keys."""
    from vlm_train.models.vlm import IGNORE_INDEX

    length = max(len(enc.input_ids) for _, _, enc in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, (_, _, enc) in enumerate(samples):
        n = len(enc.input_ids)
        input_ids[row, :n] = torch.tensor(enc.input_ids)
        labels[row, :n] = torch.tensor(enc.labels)
        attention_mask[row, :n] = 1
    return {
        "pixel_values": torch.cat([pixels for _, pixels, _ in samples]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "keys": [key for key, _, _ in samples],
    }


def _placeholder(sample: tuple[str, torch.Tensor, Encoded]) -> tuple[str, torch.Tensor, Encoded]:
    """Stands in for a skipped sample so every rank still runs full batches (unequal batch counts
    hang the collectives): a copy of a good sample whose labels are all masked, so it adds nothing
    to the loss or the token count."""
    from vlm_train.models.vlm import IGNORE_INDEX

    key, pixels, enc = sample
    return f"skipped:{key}", pixels, Encoded(enc.input_ids, [IGNORE_INDEX] * len(enc.labels), enc.num_images)


class ShardStream(IterableDataset):
    """One epoch of batches for one rank; each DataLoader worker streams its own sample range."""

    def __init__(
        self,
        urls: list[str],
        sizes: list[int],
        encoder: SampleEncoder,
        pad_id: int,
        *,
        rank: int,
        world: int,
        workers: int,
        batch_size: int,
        seed: int,
        shuffle_block: int,
    ):
        self.urls, self.sizes, self.encoder, self.pad_id = urls, sizes, encoder, pad_id
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.batch_size, self.seed, self.shuffle_block = batch_size, seed, max(shuffle_block, 1)
        self.epoch, self.start_batch = 0, 0
        self.samples_per_slot = sum(sizes) // (world * self.workers)
        self.batches_per_slot = self.samples_per_slot // batch_size
        if self.batches_per_slot == 0:
            raise DataError(
                f"{sum(sizes)} samples cannot give {world} ranks x {self.workers} workers a batch of "
                f"{batch_size} each: use more data, fewer data.num_workers or a smaller train.micro_batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_per_slot * self.workers

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # After resuming at batch b, DataLoader asks worker 0 first: it serves the slot that
        # batch b came from, so batch order is the same as in an uninterrupted run.
        logical = (worker + self.start_batch) % self.workers
        done = max(0, -(-(self.start_batch - logical) // self.workers))
        slot = self.rank * self.workers + logical
        lo, used = slot * self.samples_per_slot, self.batches_per_slot * self.batch_size
        raw = self.shuffled(lo, lo + used, skip=done * self.batch_size, slot=slot)
        fallback = None
        while raw_batch := list(islice(raw, self.batch_size)):
            encoded = [self.encoder(sample) for sample in raw_batch]
            fallback = next((e for e in encoded if e is not None), fallback)
            if fallback is None:
                raise DataError(f"no sample of {[r.get('__key__') for r in raw_batch]} could be decoded")
            batch = collate([e if e is not None else _placeholder(fallback) for e in encoded], self.pad_id)
            batch["skipped"] = sum(e is None for e in encoded)
            yield batch

    def shuffled(self, lo: int, hi: int, skip: int, slot: int) -> Iterator[dict]:
        """Block-shuffled raw samples of [lo, hi), the first `skip` left out without reading
        the whole blocks before them."""
        block_size = self.shuffle_block
        first_block = skip // block_size
        slices = slot_slices(self.urls, self.sizes, self.epoch, self.seed, lo + first_block * block_size, hi)
        raw = read_raw(slices)
        block_index, drop = first_block, skip % block_size
        while block := list(islice(raw, block_size)):
            random.Random(f"block-{self.seed}-{self.epoch}-{slot}-{block_index}").shuffle(block)
            yield from block[drop:]
            block_index, drop = block_index + 1, 0


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    # Slurm signals every process of a step; a worker killed by SIGTERM would abort the trainer's
    # final save, so workers ignore what the trainer handles (training/signals.py).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TrainBatches:
    """This rank's endless batch stream, epoch after epoch, with a resumable position."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.epoch, self.batch = 0, 0
        self._iterator: Iterator[dict] | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self.stream.set_position(self.epoch, self.batch)
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=4 if self.num_workers else None,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.batch += 1
        if self.batch == self.stream.batches_per_epoch:
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "world": self.stream.world,
            "workers": self.stream.workers,
            "batch_size": self.stream.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        layout = (self.stream.world, self.stream.workers, self.stream.batch_size)
        saved = (state["world"], state["workers"], state["batch_size"])
        if layout != saved:
            raise DataError(
                f"the checkpoint's data position is for (ranks, workers, batch) = {saved}, this run has "
                f"{layout}: resume with the same data.num_workers, train.micro_batch_size and world size"
            )
        self.epoch, self.batch, self._iterator = state["epoch"], state["batch"], None


def build_train_batches(
    cfg: DataConfig,
    tokenizer,
    transform: ImageTransform,
    image_tokens: int,
    *,
    rank: int,
    world: int,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
) -> TrainBatches:
    urls = expand_urls(cfg.urls)
    encoder = SampleEncoder(cfg, tokenizer, transform, image_tokens)
    stream = ShardStream(
        urls,
        shard_sizes(urls),
        encoder,
        tokenizer.pad_token_id,
        rank=rank,
        world=world,
        workers=cfg.num_workers,
        batch_size=batch_size,
        seed=seed,
        shuffle_block=cfg.shuffle_block,
    )
    return TrainBatches(stream, cfg.num_workers, pin_memory)


def read_eval_records(pattern: str, limit: int) -> list[dict]:
    """The first `limit` held-out samples, undecoded, in shard order (identical on every rank)."""
    urls = expand_urls(pattern, key="data.eval_urls")
    return list(islice(read_raw([Slice(u, 0, size) for u, size in zip(urls, shard_sizes(urls))]), limit))
