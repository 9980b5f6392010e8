"""Data: WebDataset shards -> preprocessed, tokenized, collated batches.

`encode_conversation(turns, tokenizer, template, image_tokens) -> (input_ids, labels)` shows what a
conversation becomes for training (vlm_train.data.templates); the pipeline uses the same function.
"""

from __future__ import annotations

__all__ = ["encode_conversation"]


def __getattr__(name: str):
    # Lazy: `import vlm_train.data.synthetic` (shard writers, the toy generator) stays free of torch.
    if name == "encode_conversation":
        from vlm_train.data.templates import encode_conversation

        return encode_conversation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
