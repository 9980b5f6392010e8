"""The WebDataset pipeline: equal batches per rank, each sample once per epoch, exact mid-epoch
resume, labels on answers only, bad samples skipped, missing shards reported."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.helpers import TOKENIZER, TRANSFORM, batches_for, write_shards
from vlm_train.data.pipeline import expand_urls, shard_sizes
from vlm_train.data.templates import encode
from vlm_train.data.tokenizer import IMAGE_TOKEN
from vlm_train.errors import DataError
from vlm_train.models.vlm import IGNORE_INDEX


def one_epoch_keys(batches) -> list[list[str]]:
    per_epoch = batches.batches_per_epoch
    return [next(batches)["keys"] for _ in range(per_epoch)]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    pattern = write_shards(tmp_path, [40, 24, 32, 16, 48])  # 160 samples, uneven shards
    seen_per_epoch = [Counter(), Counter()]
    for rank in (0, 1):
        batches = batches_for(pattern, rank, dp_size=2, workers=2, batch_size=4)
        for epoch in (0, 1):
            keys = one_epoch_keys(batches)
            assert len(keys) == 20  # the same number of batches on every rank
            seen_per_epoch[epoch].update(k for batch in keys for k in batch)
    for seen in seen_per_epoch:
        assert len(seen) == 160 and set(seen.values()) == {1}
    assert batches.epoch == 2


def test_loader_workers_live_across_epochs_and_keep_the_batch_order(tmp_path):
    """No fork per epoch: the processes that served epoch 0 serve epoch 1, in the order a fresh
    loader per epoch gives; also after a resume at an odd batch, where loader worker 0 serves
    logical worker 1."""
    pattern = write_shards(tmp_path, [24, 24])  # 12 batches of 4 per epoch
    expected, state = [], None
    for _ in range(3):  # a fresh loader for each epoch, started from the epoch boundary
        fresh = batches_for(pattern, 0, dp_size=1, workers=2, batch_size=4)
        if state is not None:
            fresh.load_state_dict(state)
        expected += [next(fresh)["keys"] for _ in range(12)]
        state = fresh.state_dict()
        fresh.close()
    expected = expected[:30]  # into the third epoch
    for stop in (0, 5):
        head = batches_for(pattern, 0, dp_size=1, workers=2, batch_size=4)
        keys = [next(head)["keys"] for _ in range(stop)]
        batches = batches_for(pattern, 0, dp_size=1, workers=2, batch_size=4)
        batches.load_state_dict(head.state_dict())
        keys.append(next(batches)["keys"])
        workers = batches.worker_pids
        keys += [next(batches)["keys"] for _ in range(29 - stop)]
        assert batches.epoch == 2 and len(workers) == 2 and batches.worker_pids == workers
        assert keys == expected, f"resumed at batch {stop}"
        head.close(), batches.close()


def test_uneven_total_gives_equal_batches_and_no_repeats(tmp_path):
    pattern = write_shards(tmp_path, [7, 30, 3, 11, 20])  # 71 samples, 3 ranks
    counts, seen = [], Counter()
    for rank in range(3):
        batches = batches_for(pattern, rank, dp_size=3, workers=1, batch_size=5)
        keys = one_epoch_keys(batches)
        counts.append(len(keys))
        seen.update(k for batch in keys for k in batch)
    assert counts == [4, 4, 4]
    assert set(seen.values()) == {1} and len(seen) == 60


def test_mid_epoch_resume_continues_the_same_sequence(tmp_path):
    pattern = write_shards(tmp_path, [32, 32, 32])
    reference = batches_for(pattern, dp_rank=1, dp_size=2, workers=2, batch_size=4)
    expected = [next(reference)["keys"] for _ in range(18)]  # crosses into the second epoch
    for stop in (3, 7, 12):
        first = batches_for(pattern, dp_rank=1, dp_size=2, workers=2, batch_size=4)
        head = [next(first)["keys"] for _ in range(stop)]
        resumed = batches_for(pattern, dp_rank=1, dp_size=2, workers=2, batch_size=4)
        resumed.load_state_dict(first.state_dict())
        tail = [next(resumed)["keys"] for _ in range(18 - stop)]
        assert head + tail == expected, f"resume after {stop} batches diverged"


@pytest.mark.parametrize("world, workers, batch_size", [(1, 0, 4), (4, 1, 2), (3, 2, 3)])
def test_mid_epoch_resume_under_a_new_layout_redistributes_exactly(tmp_path, world, workers, batch_size):
    pattern = write_shards(tmp_path, [40, 24, 32, 16, 48])  # 160 samples; old layout: 2 ranks x 2 workers x 4
    head, state = [], None
    for rank in (0, 1):
        old = batches_for(pattern, rank, dp_size=2, workers=2, batch_size=4)
        head += [k for _ in range(7) for k in next(old)["keys"]]
        state = old.state_dict()  # every rank saves the same position (epoch 0, batch 7)
    assert (state["epoch"], state["batch"]) == (0, 7)
    tail = []
    for rank in range(world):
        new = batches_for(pattern, rank, dp_size=world, workers=workers, batch_size=batch_size)
        new.load_state_dict(state)
        per_epoch = new.batches_per_epoch
        tail += [k for _ in range(per_epoch) for k in next(new)["keys"]]
        assert new.epoch == 1  # then the next epoch, split for the new layout
        assert len(next(new)["keys"]) == batch_size
    slots = world * max(workers, 1)
    assert len(set(head + tail)) == len(head) + len(tail)  # nothing repeated
    assert 0 <= 160 - len(head) - len(tail) < slots * batch_size  # only a partial batch per slot left out


def test_a_resumed_redistributed_epoch_continues_and_a_second_change_is_refused(tmp_path):
    pattern = write_shards(tmp_path, [32, 32])
    old = batches_for(pattern, 0, dp_size=1, workers=2, batch_size=4)
    [next(old) for _ in range(3)]
    new = batches_for(pattern, 0, dp_size=1, workers=0, batch_size=2)
    new.load_state_dict(old.state_dict())
    reference = batches_for(pattern, 0, dp_size=1, workers=0, batch_size=2)
    reference.load_state_dict(old.state_dict())
    expected = [next(reference)["keys"] for _ in range(8)]
    head = [next(new)["keys"] for _ in range(3)]
    again = batches_for(pattern, 0, dp_size=1, workers=0, batch_size=2)
    again.load_state_dict(new.state_dict())
    assert head + [next(again)["keys"] for _ in range(5)] == expected
    other = batches_for(pattern, 0, dp_size=1, workers=2, batch_size=2)
    with pytest.raises(DataError, match="data position .* is for 1 data-parallel ranks x 1 workers x micro-batch 2"):
        other.load_state_dict(new.state_dict())
    fewer = batches_for(write_shards(tmp_path / "fewer", [32]), 0, dp_size=1, workers=0, batch_size=2)
    with pytest.raises(DataError, match="2 workers x micro-batch 4, 1 source.s., 64 samples, this run has"):
        fewer.load_state_dict(old.state_dict())  # other data: refused, never guessed


def test_batch_contents(tmp_path):
    pattern = write_shards(tmp_path, [16])
    batch = next(batches_for(pattern, dp_rank=0, dp_size=1, workers=0, batch_size=4))
    assert batch["pixel_values"].shape == (4, 3, 48, 48)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    image_id = TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ((batch["input_ids"] == image_id).sum(1) == 9).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_labels_cover_answers_only():
    turns = [
        {"from": "human", "value": "<image>\nwhat color is the circle ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "where is the red circle ?"},
        {"from": "gpt", "value": "top left"},
    ]
    enc = encode(turns, TOKENIZER, "chat", image_tokens=9)
    answer_ids = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert TOKENIZER.decode(answer_ids) == "red </s> top left </s>"
    assert enc.input_ids.count(TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN)) == 9 and enc.num_images == 1


def test_corrupt_images_are_skipped_not_fatal(tmp_path, caplog):
    pattern = write_shards(tmp_path, [20], corrupt={3, 11})
    batches = batches_for(pattern, dp_rank=0, dp_size=1, workers=0, batch_size=6)
    epoch = [next(batches) for _ in range(batches.batches_per_epoch)]
    keys = [k for batch in epoch for k in batch["keys"]]
    assert "s00003" not in keys and "s00011" not in keys
    assert len(keys) == 18  # full batches: a placeholder with masked labels fills each gap
    assert sum(batch["skipped"] for batch in epoch) == 2
    placeholders = [(b, row) for b in epoch for row, k in enumerate(b["keys"]) if k.startswith("skipped:")]
    assert len(placeholders) == 2
    assert all((b["labels"][row] == IGNORE_INDEX).all() for b, row in placeholders)
    assert "skipping sample s00003" in caplog.text


def test_shard_sizes_from_manifest_and_from_tars(toy_data):
    urls = expand_urls(f"{toy_data}/train-{{000000..000009}}.tar")
    assert shard_sizes(urls) == [64] * 10
    (toy_data / "manifest.json").rename(toy_data / "manifest.off")
    try:
        assert shard_sizes(urls) == [64] * 10
    finally:
        (toy_data / "manifest.off").rename(toy_data / "manifest.json")


def test_pattern_that_matches_nothing_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="matches no shard"):
        expand_urls(f"{tmp_path}/nothing-{{000..003}}.tar")


def test_preprocess_resizes_and_crops_to_uint8():
    from PIL import Image

    image = Image.new("RGB", (96, 64), (255, 0, 0))
    pixels = TRANSFORM(image)
    assert pixels.shape == (3, 48, 48) and pixels.dtype == torch.uint8  # loader workers send uint8
    torch.testing.assert_close(TRANSFORM.normalize(pixels)[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_model_normalises_uint8_pixels_exactly_as_float_preprocessing():
    """The model's on-device normalisation equals normalising in the loader (bit for bit)."""
    import numpy as np

    from vlm_train import build_model, compose

    model = build_model(compose(["experiment=toy"]))
    pixels = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    mean = torch.tensor(model.vision.image_mean).view(3, 1, 1)
    std = torch.tensor(model.vision.image_std).view(3, 1, 1)
    by_hand = (torch.from_numpy(pixels.numpy().astype(np.float32) / 255.0) - mean) / std
    assert torch.equal(model.vision.normalize(pixels), by_hand)
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels), model.encode_images(by_hand))


def test_objects_frozen_for_forked_workers_are_collectable_once_the_loader_closes(tmp_path):
    """Loaders freeze the garbage collector's objects before forking workers (no copy-on-write of
    every page a collection would touch); once the last loader with workers closes, they are
    unfrozen, so a model or engine dropped after training can be freed."""
    import gc

    batches = batches_for(write_shards(tmp_path, [16]), 0, dp_size=1, workers=1, batch_size=4)
    next(batches)
    assert gc.get_freeze_count() > 0
    batches.close()
    assert gc.get_freeze_count() == 0
