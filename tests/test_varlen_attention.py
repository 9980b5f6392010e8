"""Packed rows through variable-length attention (models/varlen_attention.py): the kernel equals
SDPA with a dense block-diagonal causal mask (GQA included; fp32 outputs 1e-6, gradients 1e-5; fp64
1e-12); a packed batch gives each sample the losses and gradients it has alone (1e-5, tiny Llama
and Qwen2 in fp32); no [T, T] tensor is built on the way; flash_attention_2 gets the same segments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_train.models.llm import CausalLM
from vlm_train.models.varlen_attention import (
    packed_sequences,
    register_varlen_attention,
    varlen_attention_forward,
    varlen_kernel,
)
from vlm_train.parallel.kernels import probe_kernels

VOCAB = 61
# two rows of 23 tokens: every row holds several samples (none spans a row), a 1-token sample,
# and padding tails (segment 0)
SEGMENTS = torch.tensor([[1] * 9 + [2] * 1 + [3] * 10 + [0] * 3, [1] * 6 + [2] * 17])


def dense_reference(query_BHTD, key_BKTD, value_BKTD, segments_BT, scale):
    """SDPA with the block-diagonal causal mask built in full (what packing used to do)."""
    length = segments_BT.shape[1]
    same_B1TT = (segments_BT[:, :, None] == segments_BT[:, None, :]).unsqueeze(1)
    allowed_B1TT = same_B1TT & torch.ones(length, length, dtype=torch.bool).tril()
    groups = query_BHTD.shape[1] // key_BKTD.shape[1]
    key_BHTD, value_BHTD = (t.repeat_interleave(groups, dim=1) for t in (key_BKTD, value_BKTD))
    out_BHTD = F.scaled_dot_product_attention(query_BHTD, key_BHTD, value_BHTD, attn_mask=allowed_B1TT, scale=scale)
    return out_BHTD.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_varlen_function_equals_dense_mask_reference(heads, kv_heads, dtype):
    # fp32: outputs 1e-6 (+1e-6 relative: measured up to 9.5e-7, 4 ulp of values near 2); key/value
    # gradients sum over a group's heads in another order (measured up to 2.6e-6 with 4 heads per
    # group), so 1e-5 there; fp64 shows that the rest is rounding only
    out_tol, grad_tol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    out_rtol = 1e-6 if dtype == torch.float32 else 0.0
    torch.manual_seed(0)
    batch, length = SEGMENTS.shape
    query = torch.randn(batch, heads, length, 16, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(batch, kv_heads, length, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    module = nn.Module()
    module.is_causal = True
    _, varlen = packed_sequences(SEGMENTS)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 9, 10, 20, 23, 29, 46]
    assert varlen["max_length_q"] == 17
    out_BTHD, weights = varlen_attention_forward(module, query, key, value, None, scaling=0.3, **varlen)
    expected_BTHD = dense_reference(query, key, value, SEGMENTS, scale=0.3)
    assert weights is None and out_BTHD.shape == (batch, length, heads, 16)
    torch.testing.assert_close(out_BTHD, expected_BTHD, atol=out_tol, rtol=out_rtol)
    upstream = torch.randn_like(out_BTHD)
    grads = torch.autograd.grad((out_BTHD * upstream).sum(), (query, key, value))
    expected = torch.autograd.grad((expected_BTHD * upstream).sum(), (query, key, value))
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference, atol=grad_tol, rtol=0)


def test_the_fused_call_fits_each_torch_releases_varlen_attn(monkeypatch):
    """torch's varlen_attn (CUDA only) took no `enable_gqa` in torch 2.11: packing crashed at step 1
    on an H200 with it (2026-12-04). The call adapts to the signature: given 2.11's, grouped keys and
    values are repeated to the query heads; given 2.13's, enable_gqa is passed. Each stand-in has that
    release's signature and computes causal attention per segment from the documented arguments."""
    from vlm_train.models.varlen_attention import fused_causal

    def per_segment(query, key, value, cu_seq_q, window_size, scale, enable_gqa=False):
        assert window_size == (-1, 0)  # causal
        lengths = cu_seq_q.diff().tolist()
        outs = [
            F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale,
                enable_gqa=enable_gqa,
            ).transpose(0, 1)
            for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths))
        ]  # fmt: skip
        return torch.cat(outs)

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1)):  # fmt: skip
        assert query.shape[1] == key.shape[1], "torch 2.11's kernel takes as many key heads as query heads"
        return per_segment(query, key, value, cu_seq_q, window_size, scale)

    def torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
        assert enable_gqa == (query.shape[1] != key.shape[1])
        return per_segment(query, key, value, cu_seq_q, window_size, scale, enable_gqa)

    torch.manual_seed(0)
    _, varlen = packed_sequences(SEGMENTS)
    cu_seqlens, length = varlen["cu_seq_lens_q"], SEGMENTS.numel()
    for kv_heads in (6, 2):
        query = torch.randn(length, 6, 16)
        key, value = torch.randn(length, kv_heads, 16), torch.randn(length, kv_heads, 16)
        expected = dense_reference(
            *(t.view(*SEGMENTS.shape, -1, 16).transpose(1, 2) for t in (query, key, value)), SEGMENTS, scale=0.3
        ).reshape(length, 6, 16)
        for release in (torch_2_11, torch_2_13):
            got = fused_causal(release, query, key, value, cu_seqlens, varlen["max_length_q"], 0.3)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_packed_positions_restart_and_kernel_choice():
    # RoPE scores depend on position differences only: the decoder tests below pass with positions
    # that do not restart, so this is what checks them (OPT-style learned positions need them)
    positions_BT, _ = packed_sequences(SEGMENTS)
    assert positions_BT[0].tolist() == [*range(9), 0, *range(10), *range(3)]
    assert positions_BT[1].tolist() == [*range(6), *range(17)]
    assert varlen_kernel(torch.device("cpu"), torch.bfloat16, 64) == "sdpa per segment"
    line = probe_kernels("cpu").report("sdpa", packing=True)
    assert "packed rows vlm_varlen: SDPA per sample" in line


def tiny_decoder(family: str, attn_implementation: str) -> CausalLM:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]  # Qwen2: biases on q, k, v
    config = config_class(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if attn_implementation == "vlm_varlen":
        register_varlen_attention()
    return CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation))


def per_sample_losses(llm: CausalLM, ids_BT: torch.Tensor, segments_BT: torch.Tensor) -> list[torch.Tensor]:
    """Next-token losses of every sample, in row order (each sample's last token predicts nothing)."""
    logits_BTV = llm(llm.embed(ids_BT), segments_BT)
    losses = F.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), ids_BT[:, 1:], reduction="none")
    out = []
    for row in range(ids_BT.shape[0]):
        for segment in segments_BT[row].unique().tolist():
            where = (segments_BT[row] == segment).nonzero().flatten()
            if segment > 0:
                out.append(losses[row, where[:-1]])
    return out


@pytest.mark.parametrize(
    "family,attn_implementation,checkpointing",
    [("llama", "vlm_varlen", False), ("llama", "vlm_varlen", True), ("qwen2", "vlm_varlen", False),
     ("llama", "sdpa", False), ("llama", "eager", False)],  # not built for packing: transformers' block mask
)  # fmt: skip
def test_packed_losses_and_gradients_equal_each_sample_alone(family, attn_implementation, checkpointing):
    llm = tiny_decoder(family, attn_implementation)
    if checkpointing:
        llm.enable_activation_checkpointing()
    ids_BT = torch.randint(0, VOCAB, SEGMENTS.shape, generator=torch.Generator().manual_seed(1))
    packed = per_sample_losses(llm, ids_BT, SEGMENTS)
    packed_grads = torch.autograd.grad(torch.cat(packed).sum(), list(llm.parameters()))
    alone = []
    for row in range(SEGMENTS.shape[0]):
        for segment in SEGMENTS[row].unique().tolist():
            if segment > 0:
                ids_1L = ids_BT[row, SEGMENTS[row] == segment].unsqueeze(0)
                alone += per_sample_losses(llm, ids_1L, torch.ones_like(ids_1L))
    alone_grads = torch.autograd.grad(torch.cat(alone).sum(), list(llm.parameters()))
    assert len(packed) == len(alone) == 5
    for got, expected in zip(packed, alone):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for got, expected in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unpacked_batches_run_as_sdpa():
    """vlm_varlen without packed rows is sdpa, padding mask included (left padding: it matters)."""
    varlen, sdpa = tiny_decoder("llama", "vlm_varlen"), tiny_decoder("llama", "sdpa")
    mask_BT = torch.tensor([[0] * 5 + [1] * 18, [1] * 23])
    ids_BT = torch.randint(0, VOCAB, mask_BT.shape)
    with torch.no_grad():
        got_BTV, expected_BTV = (llm(llm.embed(ids_BT), mask_BT) for llm in (varlen, sdpa))
        unmasked_BTV = sdpa(sdpa.embed(ids_BT), torch.ones_like(mask_BT))
    real_BT = mask_BT.bool()
    torch.testing.assert_close(got_BTV[real_BT], expected_BTV[real_BT], atol=0, rtol=0)
    assert (unmasked_BTV[0, 5:] - expected_BTV[0, 5:]).abs().max() > 1e-3  # the mask is not a no-op


class ShapeSpy(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


@pytest.mark.parametrize("attn_implementation,dense", [("vlm_varlen", False), ("sdpa", True)])
def test_packed_forward_and_backward_build_no_token_by_token_tensor(attn_implementation, dense):
    """sdpa (a decoder not built for packing) is the control: the spy sees its [B, 1, T, T] mask."""
    llm = tiny_decoder("llama", attn_implementation)
    length = SEGMENTS.shape[1]
    ids_BT = torch.randint(0, VOCAB, SEGMENTS.shape)
    with ShapeSpy() as spy:
        logits_BTV = llm(llm.embed(ids_BT), SEGMENTS)
        logits_BTV.sum().backward()
    assert len(spy.shapes) > 100
    square = [shape for shape in spy.shapes if shape[-2:] == (length, length)]
    assert bool(square) == dense, square[:3]


def test_flash_attention_2_takes_the_segments(monkeypatch):
    """llm.attn_implementation=flash_attention_2 with packing: transformers' flash path hands our
    cu_seq_lens to flash_attn_varlen_func (here a stand-in: the per-segment kernel, on CPU)."""
    import transformers.modeling_flash_attention_utils as fa_utils

    from vlm_train.models.varlen_attention import varlen_causal_attention

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):  # fmt: skip
        assert causal and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        calls.append(cu_seqlens_q.tolist())
        return varlen_causal_attention(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, dropout_p)

    functions = (None, flash_attn_varlen_func, None, None, None)
    process = (fa_utils._lazy_define_process_function(flash_attn_varlen_func), dict)
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *args, **kwargs: (functions, process))
    llm = tiny_decoder("llama", "sdpa")
    ids_BT = torch.randint(0, VOCAB, SEGMENTS.shape)
    with torch.no_grad():
        expected_BTV = llm(llm.embed(ids_BT), SEGMENTS)  # transformers' dense block mask
        llm.hf_model.config._attn_implementation_internal = "flash_attention_2"
        logits_BTV = llm(llm.embed(ids_BT), SEGMENTS)
    assert calls == [[0, 9, 10, 20, 23, 29, 46]] * 2  # once per layer
    torch.testing.assert_close(logits_BTV, expected_BTV, atol=1e-5, rtol=0)
