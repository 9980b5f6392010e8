"""Variable-length attention for packed rows (data.packing): causal attention within each sample only.

A packed batch reaches the decoder flattened into one sequence of N = B*T tokens cut into segments
by cumulative lengths `cu_seqlens` (int32, [S+1], 0 first and N last), the convention of
flash-attn's `flash_attn_varlen_func` and of transformers' flash keyword arguments
(`cu_seq_lens_q/k`, `max_length_q/k`). No [T, T] mask exists anywhere: each segment attends to
its own past only, so memory is O(sum L_i^2) at most (the per-segment SDPA loop) or O(N) (fused).

`register_varlen_attention()` adds the implementation "vlm_varlen" to transformers' attention and
mask interfaces. Without segment keyword arguments it is transformers' sdpa, so one model serves
packed and unpacked batches alike; with them, transformers builds no mask (position ids that
restart do not make one) and the segments come from the keyword arguments only.

Legend: B batch, T tokens per row, N = B*T flattened tokens, S segments, L a segment's length,
H query heads, K key/value heads (H a multiple of K: grouped-query attention), D head width.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATION = "vlm_varlen"  # the name under transformers' AttentionInterface / AttentionMaskInterface


def packed_sequences(segments_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed rows: `segments_BT` numbers each token's sample (1, 2, ...; 0 padding). Returns
    positions restarting at every sample and the varlen keyword arguments over the flattened
    tokens (each sample, and each row's padding tail, is a segment of its own: the tail's outputs
    carry no labels). Two host syncs: the segment count (nonzero) and the longest segment."""
    rows, length = segments_BT.shape
    starts_BT = torch.ones_like(segments_BT, dtype=torch.bool)
    starts_BT[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    index_BT = torch.arange(length, device=segments_BT.device).expand_as(segments_BT)
    first_BT = torch.where(starts_BT, index_BT, torch.zeros_like(index_BT)).cummax(dim=1).values
    starts_S = starts_BT.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([starts_S, starts_S.new_full((1,), rows * length)]).to(torch.int32)
    max_length = int(cu_seqlens.diff().max())
    kwargs = {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_length}
    return index_BT - first_BT, kwargs | {"max_length_k": max_length}


def varlen_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, dropout: float = 0.0) -> str:
    """Which kernel packed attention runs, decided here only: torch's fused varlen_attn (its bundled
    flash-attention) on CUDA in fp16/bf16 where the GPU and head width allow it, else SDPA per segment
    (CPU, fp32, dropout). flash-attn itself serves packing through llm.attn_implementation=flash_attention_2."""
    fused = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0  # varlen_attn has no dropout
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch_varlen_attn() is not None
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )
    return "torch varlen_attn" if fused else "sdpa per segment"


@functools.cache
def torch_varlen_attn() -> Callable[..., Any] | None:
    """torch's `varlen_attn` where this torch has it."""
    try:  # torch >= 2.10
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_causal_attention(
    query_NHD: torch.Tensor,
    key_NKD: torch.Tensor,
    value_NKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each segment of the flattened tokens; [N, H, D]."""
    kernel = varlen_kernel(query_NHD.device, query_NHD.dtype, query_NHD.shape[-1], dropout)
    if kernel == "torch varlen_attn":
        varlen_attn = torch_varlen_attn()
        assert varlen_attn is not None
        return fused_causal(varlen_attn, query_NHD, key_NKD, value_NKD, cu_seqlens, max_length, scale)
    return _sdpa_per_segment(query_NHD, key_NKD, value_NKD, cu_seqlens, scale, dropout)


def fused_causal(
    varlen_attn: Callable[..., Any],
    query_NHD: torch.Tensor,
    key_NKD: torch.Tensor,
    value_NKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    scale: float | None,
) -> torch.Tensor:
    """torch's `varlen_attn`, causal. Its `enable_gqa` came after its first release (torch 2.11 has
    none, 2.13 has it): where it is missing, grouped keys and values are repeated to the query heads."""
    extra: dict[str, Any] = {}
    if query_NHD.shape[1] != key_NKD.shape[1]:
        if _takes_enable_gqa(varlen_attn):
            extra["enable_gqa"] = True
        else:
            groups = query_NHD.shape[1] // key_NKD.shape[1]
            key_NKD, value_NKD = key_NKD.repeat_interleave(groups, 1), value_NKD.repeat_interleave(groups, 1)
    # window (-1, 0): no limit to the left, nothing to the right, i.e. causal
    return varlen_attn(
        query_NHD, key_NKD, value_NKD, cu_seqlens, cu_seqlens, max_length, max_length,
        scale=scale, window_size=(-1, 0), **extra,
    )  # fmt: skip


@functools.cache
def _takes_enable_gqa(function: Callable[..., Any]) -> bool:
    return "enable_gqa" in inspect.signature(function).parameters


@torch.compiler.disable  # the segment lengths are data: a compiled block runs this loop eagerly
def _sdpa_per_segment(
    query_NHD: torch.Tensor,
    key_NKD: torch.Tensor,
    value_NKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    gqa = query_NHD.shape[1] != key_NKD.shape[1]
    lengths = cu_seqlens.diff().tolist()  # a host sync per layer on CUDA (this path is fp32 there)
    outputs = []
    for q_LHD, k_LKD, v_LKD in zip(query_NHD.split(lengths), key_NKD.split(lengths), value_NKD.split(lengths)):
        out_HLD = F.scaled_dot_product_attention(
            q_LHD.transpose(0, 1), k_LKD.transpose(0, 1), v_LKD.transpose(0, 1),
            dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa,
        )  # fmt: skip
        outputs.append(out_HLD.transpose(0, 1))
    return torch.cat(outputs)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, T, D], key/value [B, K, T, D] in,
    [B, T, H, D] out. With `cu_seq_lens_q` in `kwargs`: causal attention per segment; without: sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    max_length = int(kwargs["max_length_q"])
    _check_supported(module, attention_mask, kwargs, max_length)
    batch, heads, length, width = query.shape
    out_NHD = varlen_causal_attention(
        _flatten(query), _flatten(key), _flatten(value), cu_seqlens, max_length, scale=scaling, dropout=dropout
    )
    return out_NHD.view(batch, length, heads, width), None


def _flatten(states_BHTD: torch.Tensor) -> torch.Tensor:
    batch, heads, length, width = states_BHTD.shape
    return states_BHTD.transpose(1, 2).reshape(batch * length, heads, width)


def _check_supported(module: nn.Module, attention_mask: torch.Tensor | None, kwargs: dict, max_length: int) -> None:
    if attention_mask is not None:
        raise ValueError("vlm_varlen: pass either segment lengths (cu_seq_lens_q) or an attention mask, not both")
    if kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"]) is not kwargs["cu_seq_lens_q"]:
        raise NotImplementedError("vlm_varlen: self-attention only (cu_seq_lens_k must be cu_seq_lens_q)")
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise NotImplementedError("vlm_varlen: causal attention only")
    window = kwargs.get("sliding_window")
    if window is not None and max_length > window:
        raise NotImplementedError(f"vlm_varlen: a segment of {max_length} tokens exceeds the sliding window {window}")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("vlm_varlen: no logit softcap or attention sinks")


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask interface's entry: no mask without a padding mask (the segments come as keyword
    arguments, restarting position ids build nothing); sdpa's mask otherwise (padding, a cache)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    q_offset = kwargs.get("q_offset", 0)
    if attention_mask is None and isinstance(q_offset, int) and q_offset == 0:
        if kwargs.get("kv_length") == kwargs.get("q_length"):
            return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, attention_mask=attention_mask, **kwargs)


@functools.cache
def register_varlen_attention() -> str:
    """Add "vlm_varlen" to transformers' attention and mask interfaces (once); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, varlen_mask)
    return IMPLEMENTATION
