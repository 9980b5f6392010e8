"""Interleaved documents and multi-image conversations: `<key>.<n>.<ext>` images in order, each in
its image-token slots, for the sequence connectors and cross-attention alike."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers import TOKENIZER, TRANSFORM, write_tar
from vlm_train import compose
from vlm_train.build import build_model
from vlm_train.data.pipeline import build_train_batches
from vlm_train.data.preprocess import ImageTransform
from vlm_train.data.synthetic import make_sample
from vlm_train.data.tokenizer import IMAGE_TOKEN
from vlm_train.models.vlm import IGNORE_INDEX


def interleaved_shard(folder) -> str:
    rng = random.Random(5)
    samples = []
    for index in range(4):
        first, second = make_sample(rng)[0], make_sample(rng)[0]
        document = {"texts": [None, "red circle", None, "blue square"]}  # OBELICS: None where an image goes
        conversation = {
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN} {IMAGE_TOKEN} what color"},
                {"from": "gpt", "value": "red"},
            ]
        }
        record = document if index % 2 == 0 else conversation
        samples.append({"__key__": f"d{index}", "0.png": first, "1.png": second, "json": json.dumps(record).encode()})
    write_tar(folder / "doc-0.tar", samples)
    return str(folder / "doc-{0..0}.tar")


@pytest.mark.parametrize("connector", ["mlp", "cross_attention"])
def test_interleaved_samples_train_with_every_image_in_place(tmp_path, connector):
    pattern = interleaved_shard(tmp_path)
    cfg = compose(["experiment=toy", f"connector={connector}", f"data.urls={pattern}", "data.template=plain"])
    torch.manual_seed(0)
    model = build_model(cfg, TOKENIZER)
    vision = model.vision
    transform = ImageTransform(vision.image_size, vision.image_mean, vision.image_std)
    cfg.data.num_workers = 0
    batches = build_train_batches(
        cfg.data, TOKENIZER, transform, model.num_image_tokens, dp_rank=0, dp_size=1, batch_size=4, seed=0
    )
    batch = next(batches)
    assert int(batch["skipped_by_reason"].sum()) == 0
    assert batch["pixel_values"].shape[0] == 8  # two images per sample, in slot order
    slots = (batch["input_ids"] == TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN)).sum(1)
    assert slots.tolist() == [2 * model.num_image_tokens] * 4
    document = batch["keys"].index("d0")
    answer = [t for t, label in zip(batch["input_ids"][document], batch["labels"][document]) if label != IGNORE_INDEX]
    assert TOKENIZER.decode(answer) == "red circle blue square"  # labels on the text only ("\n" seps: no toy token)
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())


def test_numbered_images_come_in_index_order_and_a_single_image_stays_one():
    from vlm_train.data.pipeline import SampleEncoder

    cfg = compose(["experiment=toy", "data.urls=unused"]).data
    encoder = SampleEncoder(cfg, TOKENIZER, TRANSFORM, 9)
    raw = {"__key__": "k", "10.png": b"c", "2.jpg": b"b", "0.png": b"a", "json": b"{}"}
    assert encoder.image_members(raw) == [b"a", b"b", b"c"]
    assert encoder.image_members({"__key__": "k", "jpg": b"j", "png": b"p"}) == [b"p"]  # data.image_key order
