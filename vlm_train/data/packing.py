"""Packing: a micro-batch's samples laid end to end in as few rows as fit `data.max_length`.

A packed row marks each token with its sample's segment number (1, 2, ...; 0 is padding) in
`attention_mask`; the decoder (models/llm.py) turns that into a block-diagonal causal mask and
positions that restart at every sample, so each sample is computed exactly as it would be alone.
The first token of every sample carries no label: unpacked, it is never a target either, and here
it would otherwise be predicted from the previous sample's last token.
"""

from __future__ import annotations

import torch

from vlm_train.data.templates import Encoded, image_sizes_of, position_ids_of
from vlm_train.models.vlm import IGNORE_INDEX


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: each sample goes to the first row it fits in (order kept within rows)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


def collate_packed(
    samples: list[tuple[str, torch.Tensor, Encoded]], pad_id: int, max_length: int, cat=torch.cat, video_cat=torch.cat
) -> dict:
    """Packed batch: input_ids/labels [R,T], attention_mask [R,T] of segment numbers, pixel_values in
    the order the image slots appear row by row (concatenated by `cat`), keys in the same order."""
    rows = first_fit([len(enc.input_ids) for _, _, enc in samples], max_length)
    length = max(sum(len(samples[i][2].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for segment, index in enumerate(row, start=1):
            enc = samples[index][2]
            n = len(enc.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(enc.input_ids)
            labels[r, offset + 1 : offset + n] = torch.tensor(enc.labels[1:], dtype=torch.long)
            segments[r, offset : offset + n] = segment
            offset += n
    order = [index for row in rows for index in row]
    return {
        "pixel_values": cat([samples[i][1] for i in order]),
        "input_ids": input_ids,
        "attention_mask": segments,
        "labels": labels,
        "keys": [samples[i][0] for i in order],
        **image_sizes_of([samples[i][2] for i in order], video_cat),
        **position_ids_of([enc for _, _, enc in samples], rows, length),
    }
