"""Hugging Face Llama <-> megatron-core GPTModel weights, in memory, at any TP size.

A HF decoder's state dict is cut into the shard one TP rank holds (`hf_to_megatron`), and the
shards of all TP ranks are joined back into a HF state dict (`megatron_to_hf`): no offline
conversion step per TP size. Layouts (megatron-core 0.16, local layer spec):

    linear_qkv   rows grouped per KV group g: [q heads of g | k of g | v of g], groups split over TP
    linear_proj  row-parallel: input columns split over TP
    linear_fc1   per TP rank: [gate slice | up slice] (SwiGLU), rows split over TP
    linear_fc2   row-parallel: input columns split over TP
    embeddings and the output layer: vocabulary rows split over TP, padded to a multiple of TP

Parameters are plain tensors here; nothing in this module needs a process group.
`load_tp_checkpoint` reads a TP run's checkpoint (any ZeRO stage) into the HF-decoder model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlm_train.errors import ConfigError


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

    def padded_vocab(self, tp: int) -> int:
        return -(-self.vocab_size // tp) * tp

    @classmethod
    def from_hf_config(cls, config, vocab_size: int | None = None) -> DecoderShape:
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=vocab_size or config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )


def _hf(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def _mg(i: int, name: str) -> str:
    return f"decoder.layers.{i}.{name}"


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _qkv_full(hf: dict, i: int, shape: DecoderShape) -> torch.Tensor:
    """HF q/k/v -> megatron's fused QKV rows, grouped per KV group."""
    groups, dh, hidden = shape.num_kv_heads, shape.head_dim, shape.hidden_size
    q = hf[_hf(i, "self_attn.q_proj.weight")].view(groups, -1, dh, hidden)
    k = hf[_hf(i, "self_attn.k_proj.weight")].view(groups, 1, dh, hidden)
    v = hf[_hf(i, "self_attn.v_proj.weight")].view(groups, 1, dh, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def hf_to_megatron(hf: dict[str, torch.Tensor], shape: DecoderShape, tp: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The GPTModel state dict of TP rank `tp_rank` (of `tp`) from a HF Llama state dict."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, dim=0)[tp_rank].clone()

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, dim=1)[tp_rank].clone()

    vocab = shape.padded_vocab(tp)
    out = {"embedding.word_embeddings.weight": rows(_pad_rows(hf["model.embed_tokens.weight"], vocab))}
    for i in range(shape.num_layers):
        gate, up = hf[_hf(i, "mlp.gate_proj.weight")], hf[_hf(i, "mlp.up_proj.weight")]
        out[_mg(i, "input_layernorm.weight")] = hf[_hf(i, "input_layernorm.weight")].clone()
        out[_mg(i, "self_attention.linear_qkv.weight")] = rows(_qkv_full(hf, i, shape))
        out[_mg(i, "self_attention.linear_proj.weight")] = cols(hf[_hf(i, "self_attn.o_proj.weight")])
        out[_mg(i, "pre_mlp_layernorm.weight")] = hf[_hf(i, "post_attention_layernorm.weight")].clone()
        out[_mg(i, "mlp.linear_fc1.weight")] = torch.cat([rows(gate), rows(up)])
        out[_mg(i, "mlp.linear_fc2.weight")] = cols(hf[_hf(i, "mlp.down_proj.weight")])
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
    if not shape.tied:
        out["output_layer.weight"] = rows(_pad_rows(hf["lm_head.weight"], vocab))
    return out


def megatron_to_hf(shards: list[dict[str, torch.Tensor]], shape: DecoderShape) -> dict[str, torch.Tensor]:
    """A HF Llama state dict from the GPTModel state dicts of every TP rank, in rank order."""

    def rows(key: str) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=0)

    def cols(key: str) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=1)

    groups, dh, hidden = shape.num_kv_heads, shape.head_dim, shape.hidden_size
    q_per_group = shape.num_heads // groups
    embed = rows("embedding.word_embeddings.weight")[: shape.vocab_size]
    hf = {"model.embed_tokens.weight": embed, "model.norm.weight": shards[0]["decoder.final_layernorm.weight"]}
    for i in range(shape.num_layers):
        qkv = rows(_mg(i, "self_attention.linear_qkv.weight")).view(groups, q_per_group + 2, dh, hidden)
        fc1 = [s[_mg(i, "mlp.linear_fc1.weight")].chunk(2) for s in shards]
        hf[_hf(i, "self_attn.q_proj.weight")] = qkv[:, :q_per_group].reshape(-1, hidden)
        hf[_hf(i, "self_attn.k_proj.weight")] = qkv[:, q_per_group].reshape(-1, hidden)
        hf[_hf(i, "self_attn.v_proj.weight")] = qkv[:, q_per_group + 1].reshape(-1, hidden)
        hf[_hf(i, "self_attn.o_proj.weight")] = cols(_mg(i, "self_attention.linear_proj.weight"))
        hf[_hf(i, "mlp.gate_proj.weight")] = torch.cat([gate for gate, _ in fc1])
        hf[_hf(i, "mlp.up_proj.weight")] = torch.cat([up for _, up in fc1])
        hf[_hf(i, "mlp.down_proj.weight")] = cols(_mg(i, "mlp.linear_fc2.weight"))
        hf[_hf(i, "input_layernorm.weight")] = shards[0][_mg(i, "input_layernorm.weight")]
        hf[_hf(i, "post_attention_layernorm.weight")] = shards[0][_mg(i, "pre_mlp_layernorm.weight")]
    hf["lm_head.weight"] = embed if shape.tied else rows("output_layer.weight")[: shape.vocab_size]
    return {k: v.contiguous().clone() for k, v in hf.items()}


def tp_rank_files(folder: Path, tp_rank: int, into: Path) -> Path:
    """A view of checkpoint `folder` holding only TP rank `tp_rank`'s files, named as a TP=1
    checkpoint's (links, nothing copied): DeepSpeed's ZeRO consolidation then reads one TP rank."""
    view = into / folder.name
    view.mkdir(parents=True)
    for path in folder.iterdir():
        if "mp_rank_" not in path.name:
            (view / path.name).symlink_to(path.resolve())
        elif f"mp_rank_{tp_rank:02d}" in path.name:
            (view / path.name.replace(f"mp_rank_{tp_rank:02d}", "mp_rank_00")).symlink_to(path.resolve())
    return view


def _tp_rank_weights(view: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    from vlm_train.training.checkpoint import consolidated_state_dict, safe_torch_load

    if zero_stage > 0:
        return consolidated_state_dict(view, zero_stage)
    # megatron's layers add `_extra_state` entries (None) that the generic reader would not take
    module = safe_torch_load(view / "mp_rank_00_model_states.pt")["module"]
    return {name: value.float() for name, value in module.items() if isinstance(value, torch.Tensor)}


def load_tp_checkpoint(model: nn.Module, folder: Path, zero_stage: int, tp: int) -> None:
    """Load a TP run's checkpoint into `model`, the same VLM built with the HF decoder.

    Each TP rank's weights are consolidated over ZeRO, the decoder shards are joined into HF
    names, tower and connector come from TP rank 0 (whole on every TP rank) except the
    cross-attention blocks' split linears, which are joined too. Parameters the
    run kept frozen (not in checkpoints) keep the values `model` was rebuilt with.
    """
    with tempfile.TemporaryDirectory() as scratch:
        states = [_tp_rank_weights(tp_rank_files(folder, r, Path(scratch) / str(r)), zero_stage) for r in range(tp)]
    shape = DecoderShape.from_hf_config(model.llm.hf_model.config, model.llm.vocab_size)
    rebuilt = model.llm.hf_model.state_dict()
    shards = []
    for rank, state in enumerate(states):
        shard = hf_to_megatron(rebuilt, shape, tp, rank)  # frozen decoder weights: as rebuilt
        shard.update({k.removeprefix("llm.gpt."): v for k, v in state.items() if k.startswith("llm.gpt.")})
        shards.append(shard)
    whole = join_cross_attention_shards([{k: v for k, v in s.items() if not k.startswith("llm.")} for s in states])
    whole.update({f"llm.hf_model.{k}": v for k, v in megatron_to_hf(shards, shape).items()})
    if shape.tied:
        whole.pop("llm.hf_model.lm_head.weight")
    missing, unexpected = model.load_state_dict(whole, strict=False)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    if unexpected or set(missing) - frozen - {"llm.hf_model.lm_head.weight"}:
        raise ConfigError(
            f"{folder} does not fit the model: missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]}"
        )


# --- cross-attention connector blocks (parallel/tensor_parallel.py splits them at TP > 1) ---

# Flamingo block linears: output-split (column) or input-split (row) over the TP ranks.
COLUMN_PARALLEL = ("to_q", "to_kv", "ff.0")
ROW_PARALLEL = ("to_out", "ff.2")


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
            whole[target] = torch.cat(parts, dim=1) if suffix == "weight" else value
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
