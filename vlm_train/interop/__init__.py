"""Hugging Face import and export (LLaVA <-> mlp, BLIP-2 <-> qformer, Idefics2 <-> perceiver).

Tensor-parallel weights, one module per concern: `tp_plan` (which weights are split over the TP
ranks, on which dimension), `megatron` (HF Llama <-> megatron-core GPTModel layouts, using the
plan), `tp_checkpoint` (a TP run's checkpoint read into the HF-decoder model, for vlm-convert).
"""

from vlm_train.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
