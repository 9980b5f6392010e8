"""The tensor-parallel plan: which weights are split over the TP ranks, and on which dimension.

megatron's convention: a column-parallel linear splits its output rows (dim 0) and a row-parallel
one its input columns (dim 1); embedding and output tables split their vocabulary rows. Every
weight not named here (norms, biases of row-parallel linears) is whole on every TP rank. Tensors
are plain here: nothing in this module needs a process group or megatron.
"""

from __future__ import annotations

import torch

ROWS, COLS = 0, 1

# GPTModel's split weights (names below `decoder.layers.{i}.` for the layers) and their split dim.
DECODER_PLAN: dict[str, int] = {
    "embedding.word_embeddings.weight": ROWS,  # vocabulary, padded to a multiple of TP
    "self_attention.linear_qkv.weight": ROWS,  # whole KV groups per rank (megatron_layout's QKV)
    "self_attention.linear_qkv.bias": ROWS,  # Qwen2's q/k/v biases, grouped as the weight's rows
    "self_attention.linear_proj.weight": COLS,
    "mlp.linear_fc1.weight": ROWS,  # gate and up each split, then stacked per rank
    "mlp.linear_fc2.weight": COLS,
    "output_layer.weight": ROWS,  # vocabulary, padded like the embedding
}

# Flamingo cross-attention block linears: output-split (column) or input-split (row) over the TP ranks.
COLUMN_PARALLEL = ("to_q", "to_kv", "ff.0")
ROW_PARALLEL = ("to_out", "ff.2")


def shard(weight: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """TP rank `tp_rank`'s slice of the whole decoder weight `name` (a DECODER_PLAN key)."""
    return weight.chunk(tp, dim=DECODER_PLAN[name])[tp_rank].clone()


def unshard(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """The whole decoder weight `name` from every TP rank's slice, in rank order."""
    return torch.cat(parts, dim=DECODER_PLAN[name])


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Rows of the vocabulary tables at TP size `tp`: the vocabulary rounded up to a multiple of it."""
    return -(-vocab_size // tp) * tp


def kv_rows(weight: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """to_kv's rows are [k | v]: each TP rank takes its heads' slice of both."""
    k, v = weight.chunk(2)
    return torch.cat([k.chunk(tp)[tp_rank], v.chunk(tp)[tp_rank]])


def join_cross_attention_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole block weights (nn.Linear names) from every TP rank's connector state dict."""
    whole = {}
    for key, value in shards[0].items():
        name, suffix = _tp_linear_key(key)
        if name is None:
            whole[key] = value
            continue
        parts = [s[key] for s in shards]
        target = key.replace(".parallel.", ".")
        if name in ROW_PARALLEL:
            whole[target] = torch.cat(parts, dim=COLS) if suffix == "weight" else value
        elif name == "to_kv":
            whole[target] = torch.cat([p.chunk(2)[0] for p in parts] + [p.chunk(2)[1] for p in parts])
        else:
            whole[target] = torch.cat(parts)
    return whole


def _tp_linear_key(key: str) -> tuple[str | None, str]:
    """('to_kv', 'weight') for 'connector.blocks.0.to_kv.parallel.weight'; (None, '') otherwise."""
    head, sep, suffix = key.rpartition(".parallel.")
    if not sep:
        return None, ""
    name = next((n for n in COLUMN_PARALLEL + ROW_PARALLEL if head.endswith("." + n)), None)
    return name, suffix
