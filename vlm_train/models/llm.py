"""The language decoder: a Hugging Face causal LM behind the `Decoder` contract (models/decoder.py).

The tensor-parallel decoder (parallel/) implements the same contract, so the VLM never knows
which backend it runs. Legend: B batch, T tokens, Dl decoder width, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_train.config import LLMConfig
from vlm_train.errors import ConfigError
from vlm_train.models.decoder import ContextFn, Decoder, token_cross_entropy
from vlm_train.models.varlen_attention import packed_sequences, register_varlen_attention
from vlm_train.models.vision import _require_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class CausalLM(Decoder):
    """Embeds token ids and maps input embeddings to next-token logits (whole vocabulary).

    Packed rows (an attention mask numbering samples 1, 2, ...; data.packing) go in without a mask:
    positions restart at every sample and the samples' boundaries travel as varlen arguments
    (`cu_seq_lens_q/k`, `max_length_q/k`). "vlm_varlen" (models/varlen_attention.py, what
    `build_llm` picks for sdpa under packing) and flash_attention_2 attend per sample with them, no
    [T, T] mask; sdpa or eager without packing get transformers' block mask from the positions.
    """

    sequence_first = False

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        self.hf_model = hf_model
        self.hidden_size = int(hf_model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.get_input_embeddings().weight.shape[0])

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's layer list (Llama/Mistral/Qwen: model.layers; OPT: model.decoder.layers)."""
        body = self.hf_model.base_model
        layers = getattr(body, "layers", None) or getattr(getattr(body, "decoder", None), "layers", None)
        if layers is None:
            raise TypeError(f"cannot find the decoder layers of {type(self.hf_model).__name__}")
        return layers

    def norm_modules(self) -> list[nn.Module]:
        """Every normalisation layer over the hidden width (per-layer norms and the final one)."""
        width = self.hidden_size
        return [
            m
            for m in self.hf_model.modules()
            if (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"))
            and getattr(m, "weight", None) is not None
            and tuple(m.weight.shape) == (width,)
        ]

    def embed(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.hf_model.get_input_embeddings()(ids_BT)

    def forward(
        self,
        embeds_BTDl: torch.Tensor,
        attention_mask_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        varlen: dict[str, Any] = {}
        if attention_mask_BT is not None and attention_mask_BT.dim() == 2 and bool((attention_mask_BT > 1).any()):
            # packed rows: no mask, segments as varlen arguments (see the class docstring); positions
            # restart per sample, unless given (M-RoPE's, computed per sample)
            restarting_BT, varlen = packed_sequences(attention_mask_BT)
            position_ids_BT = restarting_BT if position_ids_BT is None else position_ids_BT
            attention_mask_BT = None
        out = self.hf_model(
            inputs_embeds=embeds_BTDl,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_BT,
            use_cache=False,
            **varlen,
        )
        return out.logits

    def gather_logits(self, logits_BTV: torch.Tensor) -> torch.Tensor:
        """The logits as they are: this decoder is not vocab-parallel."""
        return logits_BTV

    def token_cross_entropy(
        self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return token_cross_entropy(logits_BTV, labels_BT)

    def enable_activation_checkpointing(self, context_fn: ContextFn | None = None) -> None:
        """HF gradient checkpointing, non-reentrant (frozen layers and ZeRO-3 hooks work as usual).
        transformers checkpoints each layer's `forward`, so hooks inside a layer (modality norms)
        rerun at recomputation: `context_fn` gives them the state they saw in the forward."""
        if not self.hf_model.supports_gradient_checkpointing:
            raise ConfigError(f"llm.activation_checkpointing: {type(self.hf_model).__name__} does not support it")
        kwargs: dict[str, object] = {"use_reentrant": False}
        if context_fn is not None:  # only where a connector needs one: other runs checkpoint as before
            kwargs["context_fn"] = context_fn
        self.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_llm(cfg: LLMConfig, vocab_size: int, packing: bool = False) -> CausalLM:
    """A decoder from `cfg.path` or from the size fields; embeddings sized to `vocab_size`
    (the tokenizer's, which may have grown by the image token). `packing` (data.packing) swaps
    sdpa for "vlm_varlen": sdpa on plain batches, variable-length attention on packed ones."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn_implementation = cfg.attn_implementation
    if packing and attn_implementation == "sdpa":
        attn_implementation = register_varlen_attention()
    if cfg.path:
        _require_dir(cfg.path, "llm.path")
        hf_model = AutoModelForCausalLM.from_pretrained(
            cfg.path, torch_dtype=torch.float32, attn_implementation=attn_implementation
        )
    else:
        hf_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_embeddings,
        )
        hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    embeddings = hf_model.get_input_embeddings().weight
    if embeddings.shape[0] < vocab_size:
        # new rows start at the mean of the old ones (as LLaVA does); a meta-device build (vlm-plan)
        # has no values to average, and the mean's covariance check would call .item() on meta
        hf_model.resize_token_embeddings(vocab_size, mean_resizing=embeddings.device.type != "meta")
    return CausalLM(hf_model)
