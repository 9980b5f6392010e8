"""The tensor-parallel decoder: megatron-core's GPTModel behind the `Decoder` contract (models/decoder.py).

Built from the same `LLMConfig` as the HF backend (Llama family: RMSNorm, SwiGLU, RoPE with its
theta, grouped-query attention, tied or untied embeddings): the HF decoder is built (or loaded)
first, exactly as `llm.backend=hf` would, and its weights are sharded for this TP rank, so both
backends and every TP size start from the same weights. Embedding and output layer are
vocabulary-parallel; the loss is megatron's vocab-parallel cross-entropy, equal on every TP
rank to the unsharded loss. Legend: B batch, T tokens, Dl decoder width, V vocabulary, V/tp a
TP rank's slice of it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlm_train.config import LLMConfig
from vlm_train.errors import ConfigError, LayoutError
from vlm_train.interop.megatron import DecoderShape, hf_to_megatron, megatron_to_hf
from vlm_train.interop.tp_plan import COLUMN_PARALLEL, ROW_PARALLEL, kv_rows
from vlm_train.models.connectors import Connector, Placement
from vlm_train.models.decoder import IGNORE_INDEX, ContextFn, Decoder
from vlm_train.models.llm import CausalLM, build_llm
from vlm_train.models.qwen_vl import MROPE_TEXT_MODELS
from vlm_train.parallel.layout import Layout

ACTIVATION_CHECKPOINTING_REFUSED = (
    "llm.activation_checkpointing=true is not supported with llm.backend=megatron (tensor parallel): "
    "set it to false, or use llm.backend=hf"
)


class MegatronCausalLM(Decoder):
    """GPTModel (megatron's local layer spec) as a vlm_train decoder.

    Hidden states inside GPTModel are sequence-first ([T, B, Dl]): `sequence_first` tells the
    connectors that hook its layers and norms.
    """

    sequence_first = True

    def __init__(self, gpt: Any, shape: DecoderShape, hf_config: Any, tp: int, tp_rank: int):
        super().__init__()
        self.gpt = gpt  # megatron's GPTModel (megatron is not type-checked: Any)
        self.shape, self.hf_config, self.tp, self.tp_rank = shape, hf_config, tp, tp_rank
        self.hidden_size = shape.hidden_size
        per_rank = shape.padded_vocab(tp) // tp
        token_ids = torch.arange(tp_rank * per_rank, (tp_rank + 1) * per_rank)
        # Padding columns of the vocabulary (to a multiple of TP) never win a softmax or an argmax.
        self.register_buffer("vocab_padding", token_ids >= shape.vocab_size, persistent=False)
        self.pads_vocab = shape.padded_vocab(tp) != shape.vocab_size  # else no logits copy to mask them
        self.mrope = hf_config.model_type in MROPE_TEXT_MODELS  # Qwen2(.5)-VL: 3-D positions [3, B, T]

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab_size

    def decoder_layers(self) -> nn.ModuleList:
        return self.gpt.decoder.layers

    def norm_modules(self) -> list[nn.Module]:
        """Every norm over the hidden width: each layer's two and the final one."""
        norms = []
        for layer in self.gpt.decoder.layers:
            norms += [layer.input_layernorm, layer.pre_mlp_layernorm]
        return [*norms, self.gpt.decoder.final_layernorm]

    def embed(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup; the result is whole on every TP rank."""
        return self.gpt.embedding.word_embeddings(ids_BT)

    def enable_activation_checkpointing(self, context_fn: ContextFn | None = None) -> None:
        """Not wired: megatron's own recomputation is not configured, and replaying the connectors'
        per-forward state under it is unproven (build_model refuses the combination first)."""
        raise ConfigError(ACTIVATION_CHECKPOINTING_REFUSED)

    def forward(
        self,
        embeds_BTDl: torch.Tensor,
        attention_mask_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This TP rank's slice of the next-token logits [B, T, V/tp].

        Attention is causal; padding is on the right (as vlm_train's batches are), so positions
        that carry labels never see a padding key. Positions are 0..T-1, or with M-RoPE (Qwen2-VL)
        `position_ids_BT` [3, B, T].
        """
        if self.mrope and position_ids_BT is None:
            positions_T = torch.arange(embeds_BTDl.shape[1], device=embeds_BTDl.device)
            position_ids_BT = positions_T.expand(3, embeds_BTDl.shape[0], -1)
        logits_BTv = self.gpt(
            input_ids=None,
            position_ids=position_ids_BT if self.mrope else None,
            attention_mask=None,
            decoder_input=embeds_BTDl.transpose(0, 1).contiguous(),
        )
        if not self.pads_vocab:
            return logits_BTv
        return logits_BTv.masked_fill(self.vocab_padding, torch.finfo(logits_BTv.dtype).min)

    def gather_logits(self, logits_BTv: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits [B, T, V] on every TP rank (evaluation, parity checks)."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(logits_BTv)[..., : self.vocab_size]

    def token_cross_entropy(
        self, logits_BTv: torch.Tensor, labels_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy (fp32) over labelled positions, and their count — the
        unsharded loss, on every TP rank, from the vocab-parallel logits."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # Only the labelled positions (the same on every TP rank: the batch is), in fp32: a copy,
        # which megatron's kernel may work on in place (see models/decoder.token_cross_entropy).
        targets_BT = labels_BT[:, 1:]
        labelled_BT = targets_BT != IGNORE_INDEX
        logits_Nv = logits_BTv[:, :-1][labelled_BT].float()
        losses_N = vocab_parallel_cross_entropy(logits_Nv, targets_BT[labelled_BT])
        return losses_N.sum(), labelled_BT.sum()

    @torch.no_grad()
    def to_hf(self) -> CausalLM:
        """The whole decoder as a HF CausalLM (collective over the TP group; every rank gets it), its
        LoRA updates (llm.lora) merged into the weights first, in place."""
        from megatron.core import parallel_state
        from transformers import AutoModelForCausalLM

        from vlm_train.parallel.lora_tp import merge_megatron_lora

        merge_megatron_lora(self.gpt)
        local = {k: v.detach().cpu() for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}
        shards: list[Any] = [None] * self.tp  # all_gather_object fills in each rank's state dict
        dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
        if self.mrope:
            from vlm_train.models.qwen_vl import mrope_causal_lm

            hf_model = mrope_causal_lm(self.hf_config)
        else:
            hf_model = AutoModelForCausalLM.from_config(self.hf_config)
        hf_model.load_state_dict(megatron_to_hf(shards, self.shape), strict=not self.shape.tied)
        return CausalLM(hf_model)


def transformer_config(
    shape: DecoderShape, hf_config, tp: int, sequence_parallel: bool = False, precision: str = "fp32"
):
    """megatron's TransformerConfig for a HF Llama config: fusions off, CPU initialisation, and
    weights in `precision` (bf16 | fp32).

    Under bf16 megatron must be told (`bf16=True`): its attention softmax upcasts bf16 scores to
    fp32 only when the config says the inputs are 16-bit (`attention_softmax_in_fp32` alone does
    nothing for an fp32-configured model fed bf16 by DeepSpeed).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = precision == "bf16"
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,  # the weights come from the HF decoder
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        add_qkv_bias=shape.qkv_bias,
        mrope_section=_mrope_section(hf_config),
    )


def layer_spec(fused_attention: bool = True):
    """megatron's local layer spec (torch norms, also where apex imports, and megatron's own parallel
    linears), with its core attention through torch's SDPA (`fused_attention`; megatron's own
    `DotProductAttention` otherwise). Not Transformer Engine's spec, even where TE imports: it fuses
    each pre-norm into the following linear (other weight names, no norm modules for connector
    hooks) and its linears carry their own TP tags — none of which could be verified without a GPU
    (docs/tensor_parallel.md)."""
    from megatron.core.models.gpt import gpt_layer_specs

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if fused_attention:
        spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention()
    return spec


@functools.cache
def sdpa_core_attention() -> type:
    """megatron's `DotProductAttention` with its forward through `F.scaled_dot_product_attention`
    (causal): on GPU torch's flash / memory-efficient kernels, where megatron's local attention
    materialises the scores [B, heads/tp, T, T] with baddbmm and keeps its softmax for backward
    (about 4 GB per layer / tp at B=16, T=2048, 32 heads). Same weights, same math; the softmax
    runs inside the kernel (fp32 accumulation on GPU)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPACoreAttention(DotProductAttention):
        def forward(
            self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
        ):
            if packed_seq_params is not None or attention_bias is not None or attention_mask is not None:
                raise ValueError("the SDPA core attention is causal only: no mask, bias or packed sequences")
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            # [T, B, heads, head width] -> [B, heads, T, head width]
            q_BHTd, k_BHTd, v_BHTd = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            context_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BHTd, v_BHTd, is_causal=True, scale=self.softmax_scale, enable_gqa=groups > 1
            )
            length, batch = query.shape[0], query.shape[1]
            return context_BHTd.permute(2, 0, 1, 3).reshape(length, batch, self.hidden_size_per_partition)

    return SDPACoreAttention


def from_hf_decoder(
    hf_llm: CausalLM, layout: Layout, vocab_size: int | None = None, precision: str = "fp32"
) -> MegatronCausalLM:
    """Shard a HF Llama decoder for this rank's place in the TP group, built for `precision`
    (bf16 | fp32: the run's resolved `train.precision`)."""
    from megatron.core.models.gpt import GPTModel

    hf_config = hf_llm.hf_model.config
    if hf_config.model_type not in ("llama", "mistral", *MROPE_TEXT_MODELS):
        raise ConfigError(
            f"llm.backend=megatron builds Llama-family and Qwen2(.5)-VL decoders, not '{hf_config.model_type}'"
        )
    shape = DecoderShape.from_hf_config(hf_config, vocab_size or hf_llm.vocab_size)
    hf_config.vocab_size = shape.vocab_size
    config = transformer_config(shape, hf_config, layout.tp, precision=precision)
    with torch.random.fork_rng():  # building draws nothing the rest of the model would see
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(fused_attention=hf_config._attn_implementation != "eager"),
            vocab_size=shape.padded_vocab(layout.tp),
            max_sequence_length=hf_config.max_position_embeddings,
            position_embedding_type="mrope" if hf_config.model_type in MROPE_TEXT_MODELS else "rope",
            rotary_base=int(getattr(hf_config, "rope_theta", None) or _rope_theta(hf_config)),
            share_embeddings_and_output_weights=shape.tied,
            parallel_output=True,
        )
    mark_sharded_parameters(gpt)
    weights = hf_to_megatron(hf_llm.hf_model.state_dict(), shape, layout.tp, layout.tp_rank)
    missing, unexpected = gpt.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"HF -> megatron weights do not fit GPTModel: missing {missing}, unexpected {unexpected}")
    gpt.to(config.params_dtype)  # torch norms ignore params_dtype; Megatron's Float16Module casts them too
    return MegatronCausalLM(gpt, shape, hf_config, layout.tp, layout.tp_rank)


def mark_sharded_parameters(gpt: nn.Module) -> None:
    """Tag the TP-sharded weights as megatron's own initialisation does (skipped here: the weights
    come from HF). DeepSpeed's gradient norm counts untagged parameters on TP rank 0 only, so an
    untagged shard would be left out of the norm and clipping would scale wrongly."""
    from megatron.core.tensor_parallel import layers

    split_dim = {layers.ColumnParallelLinear: 0, layers.VocabParallelEmbedding: 0, layers.RowParallelLinear: 1}
    for module in gpt.modules():
        dim = next((d for kind, d in split_dim.items() if isinstance(module, kind)), None)
        if dim is not None and getattr(module, "weight", None) is not None:
            layers.set_tensor_model_parallel_attributes(module.weight, is_parallel=True, dim=dim, stride=1)


def _mrope_section(hf_config) -> list[int] | None:
    """Qwen2(.5)-VL's rotary pairs per (t, h, w) axis; None for 1-D RoPE."""
    if hf_config.model_type not in MROPE_TEXT_MODELS:
        return None
    return list(hf_config.rope_parameters["mrope_section"])


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def build_megatron_llm(cfg: LLMConfig, vocab_size: int, layout: Layout, precision: str = "fp32") -> MegatronCausalLM:
    """The decoder `llm.backend=megatron` trains: `cfg`'s HF decoder, sharded for this TP rank,
    built for `precision` (bf16 | fp32)."""
    return from_hf_decoder(build_llm(cfg, vocab_size), layout, precision=precision)


# --- cross-attention connector blocks, tensor-parallel like the decoder layers they hook -------


class _TPLinear(nn.Module):
    """megatron's Column/RowParallelLinear called like nn.Linear (they return (output, bias))."""

    def __init__(self, parallel: nn.Module):
        super().__init__()
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.parallel(x)
        return out


def _split_linear(linear: nn.Linear, name: str, config, tp: int, tp_rank: int) -> _TPLinear:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    has_bias = linear.bias is not None
    sizes = (linear.in_features, linear.out_features)
    with torch.random.fork_rng():
        if name in COLUMN_PARALLEL:
            parallel = ColumnParallelLinear(*sizes, config=config, init_method=nn.init.zeros_, bias=has_bias)
            weight = kv_rows(linear.weight, tp, tp_rank) if name == "to_kv" else linear.weight.chunk(tp)[tp_rank]
            bias = linear.bias.chunk(tp)[tp_rank] if has_bias else None
        else:
            parallel = RowParallelLinear(
                *sizes,
                config=config,
                init_method=nn.init.zeros_,
                bias=has_bias,
                input_is_parallel=True,
                skip_bias_add=False,
            )
            weight, bias = linear.weight.chunk(tp, dim=1)[tp_rank], linear.bias
    with torch.no_grad():
        parallel.weight.copy_(weight)
        if bias is not None:
            parallel.bias.copy_(bias)
    mark_sharded_parameters(parallel)
    return _TPLinear(parallel)


def shard_cross_attention_blocks(connector: Any, llm: MegatronCausalLM) -> None:
    """Split the gated cross-attention blocks' heads and FFN over the TP ranks, as the decoder's
    own attention and MLP are; weights come from the whole blocks (same init at every TP size)."""
    tp, tp_rank = llm.tp, llm.tp_rank
    if tp == 1:
        return
    for block in connector.blocks:
        if block.heads % tp:
            raise LayoutError(
                f"parallel.tensor_parallel={tp} does not divide the cross-attention blocks' {block.heads} heads "
                "(connector.num_heads)"
            )
        for name in COLUMN_PARALLEL + ROW_PARALLEL:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, _split_linear(getattr(parent, child), name, llm.gpt.config, tp, tp_rank))


def shard_connector(connector: Connector[Any], llm: MegatronCausalLM) -> None:
    """Split what a connector runs inside the decoder (cross-attention blocks) like the decoder."""
    if connector.placement == Placement.CROSS_ATTENTION:
        shard_cross_attention_blocks(connector, llm)
