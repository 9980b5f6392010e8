"""Hugging Face Llama <-> megatron-core GPTModel weight layouts, in memory, at any TP size.

A HF decoder's state dict is cut into the shard one TP rank holds (`hf_to_megatron`), and the
shards of all TP ranks are joined back into a HF state dict (`megatron_to_hf`): no offline
conversion step per TP size. Which weight is split on which dimension is the TP plan
(interop/tp_plan.py); this module owns the names and the fused layouts (megatron-core 0.16, local
layer spec):

    linear_qkv   rows grouped per KV group g: [q heads of g | k of g | v of g], groups split over TP
    linear_proj  row-parallel: input columns split over TP
    linear_fc1   per TP rank: [gate slice | up slice] (SwiGLU), rows split over TP
    linear_fc2   row-parallel: input columns split over TP
    embeddings and the output layer: vocabulary rows split over TP, padded to a multiple of TP

Parameters are plain tensors here; nothing in this module needs a process group. Reading a TP
run's checkpoint is interop/tp_checkpoint.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The cross-attention plan is re-exported for parallel/tensor_parallel.py, which imports it from here.
from vlm_train.interop.tp_plan import padded_vocab, shard, unshard

__all__ = ["DecoderShape", "hf_to_megatron", "megatron_to_hf"]

EMBED, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
QKV, PROJ = "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
FC1, FC2 = "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"


@dataclass(frozen=True)
class DecoderShape:
    """What the weight layouts depend on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the real vocabulary; the megatron tables hold `padded_vocab(tp)` rows
    tied: bool
    qkv_bias: bool = False  # Qwen2's q/k/v projections carry biases

    def padded_vocab(self, tp: int) -> int:
        """Rows of the vocabulary tables on all TP ranks together."""
        return padded_vocab(self.vocab_size, tp)

    @classmethod
    def from_hf_config(cls, config: Any, vocab_size: int | None = None) -> DecoderShape:
        """The shape of a HF Llama-family config (`vocab_size` overrides the config's)."""
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=vocab_size or config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(config, "attention_bias", str(config.model_type).startswith("qwen2"))),
        )


def _hf(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def _mg(i: int, name: str) -> str:
    return f"decoder.layers.{i}.{name}"


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _qkv_full(hf: dict[str, torch.Tensor], i: int, shape: DecoderShape, part: str = "weight") -> torch.Tensor:
    """HF q/k/v weights (or biases) -> megatron's fused QKV rows, grouped per KV group."""
    groups, dh = shape.num_kv_heads, shape.head_dim
    q, k, v = (hf[_hf(i, f"self_attn.{name}_proj.{part}")] for name in "qkv")
    columns = q.shape[1:]  # (hidden,) for weights, () for biases
    parts = [q.view(groups, -1, dh, *columns), k.view(groups, 1, dh, *columns), v.view(groups, 1, dh, *columns)]
    return torch.cat(parts, dim=1).reshape(-1, *columns)


def hf_to_megatron(hf: dict[str, torch.Tensor], shape: DecoderShape, tp: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The GPTModel state dict of TP rank `tp_rank` (of `tp`) from a HF Llama state dict."""

    def cut(weight: torch.Tensor, name: str) -> torch.Tensor:
        return shard(weight, name, tp, tp_rank)

    vocab = shape.padded_vocab(tp)
    out = {EMBED: cut(_pad_rows(hf["model.embed_tokens.weight"], vocab), EMBED)}
    for i in range(shape.num_layers):
        gate, up = hf[_hf(i, "mlp.gate_proj.weight")], hf[_hf(i, "mlp.up_proj.weight")]
        out[_mg(i, "input_layernorm.weight")] = hf[_hf(i, "input_layernorm.weight")].clone()
        out[_mg(i, QKV)] = cut(_qkv_full(hf, i, shape), QKV)
        if shape.qkv_bias:
            out[_mg(i, QKV_BIAS)] = cut(_qkv_full(hf, i, shape, "bias"), QKV_BIAS)
        out[_mg(i, PROJ)] = cut(hf[_hf(i, "self_attn.o_proj.weight")], PROJ)
        out[_mg(i, "pre_mlp_layernorm.weight")] = hf[_hf(i, "post_attention_layernorm.weight")].clone()
        out[_mg(i, FC1)] = torch.cat([cut(gate, FC1), cut(up, FC1)])
        out[_mg(i, FC2)] = cut(hf[_hf(i, "mlp.down_proj.weight")], FC2)
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
    if not shape.tied:
        out[OUTPUT] = cut(_pad_rows(hf["lm_head.weight"], vocab), OUTPUT)
    return out


def megatron_to_hf(shards: list[dict[str, torch.Tensor]], shape: DecoderShape) -> dict[str, torch.Tensor]:
    """A HF Llama state dict from the GPTModel state dicts of every TP rank, in rank order."""

    def joined(key: str, name: str) -> torch.Tensor:
        return unshard([s[key] for s in shards], name)

    groups, dh, hidden = shape.num_kv_heads, shape.head_dim, shape.hidden_size
    q_per_group = shape.num_heads // groups
    embed = joined(EMBED, EMBED)[: shape.vocab_size]
    hf = {"model.embed_tokens.weight": embed, "model.norm.weight": shards[0]["decoder.final_layernorm.weight"]}
    for i in range(shape.num_layers):
        qkv = joined(_mg(i, QKV), QKV).view(groups, q_per_group + 2, dh, hidden)
        fc1 = [s[_mg(i, FC1)].chunk(2) for s in shards]
        hf[_hf(i, "self_attn.q_proj.weight")] = qkv[:, :q_per_group].reshape(-1, hidden)
        hf[_hf(i, "self_attn.k_proj.weight")] = qkv[:, q_per_group].reshape(-1, hidden)
        hf[_hf(i, "self_attn.v_proj.weight")] = qkv[:, q_per_group + 1].reshape(-1, hidden)
        if shape.qkv_bias:
            bias = joined(_mg(i, QKV_BIAS), QKV_BIAS).view(groups, q_per_group + 2, dh)
            for offset, name in ((slice(0, q_per_group), "q"), (q_per_group, "k"), (q_per_group + 1, "v")):
                hf[_hf(i, f"self_attn.{name}_proj.bias")] = bias[:, offset].reshape(-1)
        hf[_hf(i, "self_attn.o_proj.weight")] = joined(_mg(i, PROJ), PROJ)
        hf[_hf(i, "mlp.gate_proj.weight")] = unshard([gate for gate, _ in fc1], FC1)
        hf[_hf(i, "mlp.up_proj.weight")] = unshard([up for _, up in fc1], FC1)
        hf[_hf(i, "mlp.down_proj.weight")] = joined(_mg(i, FC2), FC2)
        hf[_hf(i, "input_layernorm.weight")] = shards[0][_mg(i, "input_layernorm.weight")]
        hf[_hf(i, "post_attention_layernorm.weight")] = shards[0][_mg(i, "pre_mlp_layernorm.weight")]
    hf["lm_head.weight"] = embed if shape.tied else joined(OUTPUT, OUTPUT)[: shape.vocab_size]
    return {k: v.contiguous().clone() for k, v in hf.items()}
