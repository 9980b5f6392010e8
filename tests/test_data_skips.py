"""Bad samples of every kind are skipped, logged with their key, counted by reason, and replaced by
masked placeholders so the batch count never changes; pipe: and http shards read like local ones."""

from __future__ import annotations

import functools
import http.server
import json
import random
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from tests.helpers import TOKENIZER, TRANSFORM, conversation, image_sample, write_tar
from vlm_train import compose
from vlm_train.data.pipeline import SKIP_REASONS, build_train_batches
from vlm_train.data.synthetic import make_sample
from vlm_train.data.tokenizer import IMAGE_TOKEN
from vlm_train.models.vlm import IGNORE_INDEX


def bad_corpus(folder: Path) -> tuple[str, dict[str, str]]:
    """Three shards of 12 samples with one bad sample of each kind, a truncated shard whose manifest
    declares all its samples, and an empty shard; returns the pattern and {key: reason}."""
    rng, png = random.Random(0), make_sample(random.Random(1))[0]
    shards = [[image_sample(rng, f"a{i:02d}") for i in range(12)], [image_sample(rng, f"b{i:02d}") for i in range(12)]]
    shards[0][3]["png"] = png[: len(png) // 3]  # truncated image
    del shards[0][5]["json"]  # no text field
    shards[0][7]["json"] = b"{not json"  # malformed text field
    shards[1][2]["json"] = conversation(f"{'red ' * 60}{IMAGE_TOKEN}", "red")  # the image sits past max_length
    shards[1][4]["json"] = conversation(f"{IMAGE_TOKEN} {IMAGE_TOKEN} what", "red")  # 2 markers, 1 image
    shards[1][6]["json"] = conversation(f"{IMAGE_TOKEN} what", "red " * 60)  # long answer: truncated, kept
    expected = {"a03": "bad_image", "a05": "missing_field", "a07": "missing_field", "b02": "too_long"}
    expected["b04"] = "image_token_mismatch"
    third = [image_sample(rng, f"c{i:02d}") for i in range(12)]
    for index, samples in enumerate([*shards, third]):
        write_tar(folder / f"part-{index}.tar", samples)
    whole = (folder / "part-2.tar").read_bytes()
    cut = whole.index(b"c08.json") + 520  # inside c08's first member: c08 and later are lost
    (folder / "part-2.tar").write_bytes(whole[:cut])
    expected |= {f"part-2.tar#{i}": "corrupt_tar" for i in range(8, 12)}
    write_tar(folder / "part-3.tar", [])
    (folder / "manifest.json").write_text(
        json.dumps({"shards": {f"part-{i}.tar": n for i, n in enumerate([12, 12, 12, 0])}})
    )
    return str(folder / "part-{0..3}.tar"), expected


def test_every_bad_input_kind_is_skipped_and_counted_by_reason(tmp_path, caplog):
    pattern, expected = bad_corpus(tmp_path)
    cfg = compose(["experiment=toy", f"data.urls={pattern}", "data.num_workers=0", "data.max_length=48"]).data
    batches = build_train_batches(cfg, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=6, seed=0)
    assert batches.batches_per_epoch == 6
    epoch = [next(batches) for _ in range(6)]
    counts = sum(batch["skipped_by_reason"] for batch in epoch)
    assert dict(zip(SKIP_REASONS, counts.tolist())) == {
        **{reason: 0 for reason in SKIP_REASONS},
        **Counter(expected.values()),
        "empty_shard": 1,
    }
    assert sum(batch["skipped"] for batch in epoch) == int(counts.sum())
    assert all(batch["input_ids"].shape[0] == 6 for batch in epoch)
    keys = [k for batch in epoch for k in batch["keys"]]
    assert len([k for k in keys if not k.startswith("skipped:")]) == 36 - len(expected)
    for key in expected:
        assert f"{key}: " in caplog.text  # "skipping sample <key>: <why>" at warning level
    for batch in epoch:
        for row, key in enumerate(batch["keys"]):
            if key.startswith("skipped:"):
                assert (batch["labels"][row] == IGNORE_INDEX).all()
            else:
                assert (batch["labels"][row] != IGNORE_INDEX).any()
    kept_long = next(b for b in epoch if "b06" in b["keys"])
    row = kept_long["keys"].index("b06")
    assert int(kept_long["attention_mask"][row].sum()) == 48  # truncated to max_length, image kept whole
    image_id = TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((kept_long["input_ids"][row] == image_id).sum()) == 9


@contextmanager
def http_server(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_pipe_and_http_shards_read_like_local_ones(tmp_path):
    rng = random.Random(3)
    for index in range(2):
        write_tar(tmp_path / f"p-{index}.tar", [image_sample(rng, f"p{index}{i:02d}") for i in range(8)])
    remote = ["data.samples_per_shard=8"]
    with http_server(tmp_path) as address:
        runs = []
        for overrides in (
            [f"data.urls={tmp_path}/p-{{0..1}}.tar"],
            [f"data.urls=pipe:cat {tmp_path}/p-{{0..1}}.tar", *remote],
            [f"data.urls={address}/p-{{0..1}}.tar", *remote],
        ):
            cfg = compose(["experiment=toy", "data.num_workers=0", *overrides]).data
            batches = build_train_batches(cfg, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=4, seed=0)
            runs.append([next(batches) for _ in range(6)])  # one epoch and a half: shards reopened mid-way
    for local, *others in zip(*runs):
        for other in others:
            assert other["keys"] == local["keys"]
            torch.testing.assert_close(other["pixel_values"], local["pixel_values"])
    assert all(int(b["skipped_by_reason"].sum()) == 0 for run in runs for b in run)
