"""Hugging Face import and export (LLaVA <-> mlp, BLIP-2 <-> qformer, Idefics2 <-> perceiver)."""

from vlm_train.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
