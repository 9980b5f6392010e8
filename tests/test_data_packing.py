"""Packing: several samples per row, each attended (variable-length attention, no [T, T] mask) and
positioned as if alone, so every answer token's loss equals the unpacked one (fp32, 1e-5); the
pipeline packs the same samples. The attention kernel itself: tests/test_varlen_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TOKENIZER, run_cli, step_losses, toy_overrides, write_shards
from vlm_train import compose
from vlm_train.build import build_model
from vlm_train.data.packing import collate_packed, first_fit
from vlm_train.data.pipeline import SampleEncoder, build_train_batches, collate
from vlm_train.data.preprocess import ImageTransform
from vlm_train.data.reader import Slice, read_slice
from vlm_train.models.vlm import IGNORE_INDEX


def token_losses(model, batch: dict) -> dict[str, list[float]]:
    """Per answer token cross-entropy, grouped by sample key in token order."""
    with torch.no_grad():
        logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).logits
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    segments = batch["attention_mask"][:, 1:]
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    keys = iter(batch["keys"])
    out: dict[str, list[float]] = {}
    for row in range(logits.shape[0]):
        for segment in segments[row].unique().tolist():
            if segment == 0:
                continue
            where = (segments[row] == segment) & targets[row]
            out[next(keys)] = losses[row][where].tolist()
    return out


def test_packed_per_token_losses_equal_unpacked(tmp_path):
    torch.manual_seed(0)
    pattern = write_shards(tmp_path, [12])
    cfg = compose(["experiment=toy", f"data.urls={pattern}", "data.packing=true"])
    model = build_model(cfg, TOKENIZER).eval()
    assert model.llm.hf_model.config._attn_implementation == "vlm_varlen"  # no [T, T] mask: varlen
    vision = model.vision
    transform = ImageTransform(vision.image_size, vision.image_mean, vision.image_std)
    encoder = SampleEncoder(cfg.data, TOKENIZER, transform, model.num_image_tokens)
    samples = [encoder(raw) for raw in read_slice(Slice(pattern.replace("{000..000}", "000"), 0, 12))]
    packed = collate_packed(samples, TOKENIZER.pad_token_id, 160)
    assert packed["input_ids"].shape[0] < len(samples) // 2  # several samples share each row
    assert int(packed["attention_mask"].max()) >= 2
    unpacked = {}
    for sample in samples:  # each alone: no padding, nothing else in the row
        unpacked |= token_losses(model, collate([sample], TOKENIZER.pad_token_id))
    together = token_losses(model, packed)
    assert together.keys() == unpacked.keys()
    for key, losses in unpacked.items():
        assert len(losses) > 0 and len(together[key]) == len(losses)
        torch.testing.assert_close(torch.tensor(together[key]), torch.tensor(losses), atol=1e-5, rtol=0)


def test_first_fit_respects_capacity_and_order():
    rows = first_fit([30, 20, 50, 10, 40], capacity=60)
    assert rows == [[0, 1, 3], [2], [4]]


def test_pipeline_packs_the_same_samples(tmp_path):
    pattern = write_shards(tmp_path, [24])
    base = ["experiment=toy", f"data.urls={pattern}", "data.num_workers=0"]
    transform = ImageTransform(48, (0.5,) * 3, (0.5,) * 3)
    epochs = []
    for packing in ("false", "true"):
        data = compose([*base, f"data.packing={packing}"]).data
        batches = build_train_batches(data, TOKENIZER, transform, 9, dp_rank=0, dp_size=1, batch_size=8, seed=0)
        epochs.append([next(batches) for _ in range(3)])
    for plain, packed in zip(*epochs):
        assert sorted(plain["keys"]) == sorted(packed["keys"])
        assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
        assert packed["input_ids"].shape[1] <= 128
        answer_tokens = (plain["labels"][:, 1:] != IGNORE_INDEX).sum()
        assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == answer_tokens
        assert packed["pixel_values"].shape == plain["pixel_values"].shape


@pytest.mark.slow
def test_packed_training_run_has_the_unpacked_losses(toy_data, tmp_path):
    losses = {}
    for packing in ("false", "true"):
        run_dir = tmp_path / packing
        overrides = toy_overrides(toy_data, run_dir, f"data.packing={packing}", "train.max_steps=3")
        result = run_cli([*overrides, "train.micro_batch_size=8", "data.num_workers=0"])
        assert result.returncode == 0, result.stderr[-2000:]
        losses[packing] = step_losses(run_dir)
    assert losses["true"].keys() == {1, 2, 3}
    for step, loss in losses["false"].items():  # same samples, same weights: the same token-weighted loss
        assert abs(losses["true"][step] - loss) < 1e-5, (step, losses)
