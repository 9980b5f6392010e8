"""Token-budget batching (`data.max_tokens_per_batch`): a loaded micro-batch run as forwards of
at most the budget in padded tokens (rows x the longest row, visual tokens included).

The data position keeps its unit, the loaded batch of `train.micro_batch_size` samples per rank:
checkpoints, exact resume and every rank's batch count per epoch are unchanged, and so is the
global batch in samples. The loader orders a budgeted batch's samples longest first (packed:
first-fit decreasing) and records what media each row holds (`row_media`); the trainer cuts the
rows into consecutive groups (`forwards`), each trimmed to its own longest row. Ranks may need
different numbers of forwards: a step runs the largest count over ranks, and a rank with fewer
runs idle forwards (`idle_forward`: one row whose labels are all masked), so every rank runs the
same collectives (ZeRO-3 gathers parameters in every forward) and the loss, normalised by the
global batch's answer tokens, is unchanged.
"""

from __future__ import annotations

import torch

from vlm_train.models.decoder import IGNORE_INDEX

# what each row holds, per column of `row_media`: rows of the batch tensor of that name
MEDIA = ("pixel_values", "image_sizes", "video_frames", "pixel_values_videos")
ROWS = ("input_ids", "attention_mask", "labels")


def longest_first(samples: list[tuple]) -> list[tuple]:
    """`(key, pixels, Encoded)` samples by token count, longest first (ties keep their order)."""
    return sorted(samples, key=lambda sample: -len(sample[2].input_ids))


def row_media(rows: list[list[tuple]]) -> torch.Tensor:
    """[R, 4] int64: per row (its samples), the rows it holds of each MEDIA tensor: image pixel
    rows (tiles with AnyRes), images (AnyRes `image_sizes`), videos, video frames."""
    counts = [
        [
            sum(pixels.shape[0] for _, pixels, _ in row),
            sum(len(enc.image_sizes) for _, _, enc in row),
            sum(len(enc.video_frames) for _, _, enc in row),
            sum(0 if enc.videos is None else enc.videos.shape[0] for _, _, enc in row),
        ]
        for row in rows
    ]
    return torch.tensor(counts, dtype=torch.int64).view(-1, len(MEDIA))


def row_lengths(attention_mask_BT: torch.Tensor) -> list[int]:
    """Each row's length up to its last real token (packed rows: segment numbers, 0 is padding)."""
    positions_BT = torch.arange(1, attention_mask_BT.shape[1] + 1).expand_as(attention_mask_BT)
    return (positions_BT * (attention_mask_BT > 0)).amax(dim=1).tolist()


def groups(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges [start, stop) whose rows x longest row fit `budget` (a row longer
    than the budget goes alone; the config refuses data.max_length above it)."""
    ranges: list[tuple[int, int]] = []
    start, longest = 0, 0
    for row, length in enumerate(lengths):
        if row > start and (row - start + 1) * max(longest, length) > budget:
            ranges.append((start, row))
            start, longest = row, 0
        longest = max(longest, length)
    return ranges + [(start, len(lengths))] if lengths else ranges


def forwards(batch: dict, budget: int) -> list[dict]:
    """The forwards of a loaded budgeted batch: its rows cut into `groups`, each with its own
    media, trimmed to its longest row. Skip counts go with the first forward only."""
    lengths = row_lengths(batch["attention_mask"])
    ranges = groups(lengths, budget)
    offsets = torch.cat([torch.zeros(1, len(MEDIA), dtype=torch.int64), batch["row_media"].cumsum(0)]).tolist()
    parts = []
    for index, (start, stop) in enumerate(ranges):
        part = rows_of(batch, start, stop, max(lengths[start:stop]), offsets)
        part["skipped_by_reason"] = batch["skipped_by_reason"] * (index == 0)
        parts.append(part)
    return parts


def rows_of(batch: dict, start: int, stop: int, length: int, offsets: list[list[int]]) -> dict:
    """Rows [start, stop) of `batch` cut to `length` tokens, with the media those rows hold."""
    part = {name: batch[name][start:stop, :length] for name in ROWS}
    for column, name in enumerate(MEDIA):
        if name in batch:
            part[name] = batch[name][offsets[start][column] : offsets[stop][column]]
    part["row_media"] = batch["row_media"][start:stop]
    return part


def idle_forward(forward: dict) -> dict:
    """A forward that adds nothing: the first row of `forward`, its labels all masked, no skips.
    It still runs the tower and the connector, so its collectives match the other ranks'."""
    offsets = torch.cat([torch.zeros(1, len(MEDIA), dtype=torch.int64), forward["row_media"].cumsum(0)]).tolist()
    idle = rows_of(forward, 0, 1, row_lengths(forward["attention_mask"][:1])[0], offsets)
    idle["labels"] = torch.full_like(idle["labels"], IGNORE_INDEX)
    idle["skipped_by_reason"] = torch.zeros_like(forward["skipped_by_reason"])
    return idle
