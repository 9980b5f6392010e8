"""Data: WebDataset shards -> preprocessed, tokenized, collated batches.

`encode_conversation(turns, tokenizer, template, image_tokens) -> (input_ids, labels)` shows what a
conversation becomes for training (vlm_train.data.templates); the pipeline uses the same function.
"""

from __future__ import annotations

__all__ = ["encode_conversation"]


def __getattr__(name: str):
    # Lazy, and not for a circle: importing any vlm_train.data submodule runs this file first, and
    # `import vlm_train.data.synthetic` (shard writers, the toy generator) stays free of torch
    # (0.4 s instead of several seconds) only if templates -> models.vlm -> torch waits until asked.
    if name == "encode_conversation":
        from vlm_train.data.templates import encode_conversation

        return encode_conversation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
