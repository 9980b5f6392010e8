"""What the benchmarks share: their batches come from the trainer's own constructor, so a key the
trainer reads cannot go missing from a benchmark's batch (tests/test_bench.py)."""

from __future__ import annotations

import torch


def pipeline_batch(cfg, tokenizer, model, layout) -> dict:
    """This rank's first batch of `cfg.data` (vlm_train.train.build_batches); the loader is closed."""
    from vlm_train.train import build_batches

    batches = build_batches(cfg, tokenizer, model, layout, torch.device("cpu"))
    try:
        return next(batches)
    finally:
        batches.close()
