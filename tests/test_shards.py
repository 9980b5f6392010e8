"""`vlm-shards`: LLaVA JSON/JSONL and caption pairs -> WebDataset shards the pipeline trains on,
existing corpora read as-is through a manifest, skipped records reported, user errors as one line."""

from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, TOKENIZER, TRANSFORM, read_metrics, run_cli, toy_overrides, write_tar
from tests.shard_helpers import TEXT_ONLY, convert, image_records, read_shards
from vlm_train import compose
from vlm_train.data.pipeline import build_train_batches
from vlm_train.data.shards import main
from vlm_train.data.synthetic import caption, make_sample, make_scene, render, write_split
from vlm_train.data.templates import encode


def bad_records(images: Path, good: dict) -> dict[str, dict]:
    """One record per skip reason, keyed by the reason the report must give."""
    (images / "truncated.png").write_bytes((images / good["image"]).read_bytes()[:60])
    turns = good["conversations"]
    return {
        "missing_image": {"id": "b1", "image": "nowhere.png", "conversations": turns},
        "undecodable_image": {"id": "b2", "image": "truncated.png", "conversations": turns},
        "no_conversations": {"id": "b3", "image": good["image"]},
        "bad_role": {"id": "b4", "conversations": [{"from": "system", "value": "hi"}, *TEXT_ONLY]},
        "bad_turn": {"id": "b5", "conversations": [{"from": "human"}, TEXT_ONLY[1]]},
        "no_answer": {"id": "b6", "conversations": [TEXT_ONLY[0], {"from": "gpt", "value": " "}]},
        "marker_mismatch": {"id": "b7", "image": good["image"], "conversations": TEXT_ONLY},
        "multi_image": {"id": "b8", "image": [good["image"], good["image"]], "conversations": turns},
        "not_an_object": ["a", "list"],
    }


def epoch_batches(pattern: str, batch_size: int, *extra: str) -> list[dict]:
    cfg = compose(["experiment=toy", f"data.urls={pattern}", "data.num_workers=1", *extra]).data
    batches = build_train_batches(cfg, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=batch_size, seed=3)
    return [next(batches) for _ in range(batches.batches_per_epoch)]


def test_llava_round_trip_with_skip_report(tmp_path, capsys):
    images = tmp_path / "images"
    good = image_records(images, 24)
    Image.open(images / "img0.png").save(images / "img0.JPEG", format="JPEG")  # suffix kept, lowercased
    good[0]["image"] = "img0.JPEG"
    good[1]["image"] = [good[1]["image"]]  # a one-image list is a single image
    good += [{"id": f"text-{i}", "conversations": TEXT_ONLY} for i in range(4)]  # text-only, no image
    bad = bad_records(images, good[2])
    records = good[:10] + list(bad.values()) + good[10:]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    assert convert(tmp_path / "data.json", images, out, "--max-count", "8") == 0

    stdout = capsys.readouterr().out
    assert f"wrote 28 samples in 4 shards to {out}" in stdout and f"skipped {len(bad)} of {len(records)}" in stdout
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"] for s in skipped] == list(bad)  # in input order, one per kind
    assert [s["where"] for s in skipped] == [f"record {i}" for i in range(11, 11 + len(bad))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == {f"shard-{i:06d}.tar": n for i, n in enumerate([8, 8, 8, 4])}
    assert (manifest["total"], manifest["text_only"], manifest["image_extensions"]) == (28, 4, {"jpeg": 1, "png": 23})

    samples = read_shards(out)  # plain WebDataset: equal content, input order
    assert [s["__key__"] for s in samples] == sorted(s["__key__"] for s in samples)
    for sample, record in zip(samples, good, strict=True):
        assert json.loads(sample["json"]) == record
        image = record.get("image")
        image = image[0] if isinstance(image, list) else image
        image_members = {k: v for k, v in sample.items() if k in ("png", "jpeg")}
        assert image_members == ({Path(image).suffix[1:].lower(): (images / image).read_bytes()} if image else {})

    # The same shards once more from JSON lines with one worker: byte-identical.
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = tmp_path / "again"
    assert convert(tmp_path / "data.jsonl", images, again, "--max-count", "8", workers=1) == 0
    for shard in manifest["shards"]:
        assert (again / shard).read_bytes() == (out / shard).read_bytes()
    assert "line 11" in (again / "skipped.jsonl").read_text()

    # Our pipeline reads every converted sample once per epoch, encoded as the record says.
    by_key = {s["__key__"]: json.loads(s["json"]) for s in samples}
    batches = epoch_batches(str(out / "shard-{000000..000003}.tar"), batch_size=4)
    keys = [k for batch in batches for k in batch["keys"]]
    assert sorted(keys) == sorted(by_key)
    for batch in batches:
        images_in_batch = sum("image" in by_key[k] for k in batch["keys"])
        assert batch["pixel_values"].shape[0] == images_in_batch
        for row, key in enumerate(batch["keys"]):
            expected = encode(by_key[key]["conversations"], TOKENIZER, "chat", 9)
            n = len(expected.input_ids)
            assert batch["input_ids"][row, :n].tolist() == expected.input_ids
            assert batch["labels"][row, :n].tolist() == expected.labels
            assert batch["attention_mask"][row].sum() == n


def test_max_size_bounds_every_shard(tmp_path):
    images = tmp_path / "images"
    records = image_records(images, 12)
    Image.new("RGB", (64, 64)).save(images / "big.bmp")  # 12 kB: larger than --max-size, a shard of its own
    records[5]["image"] = "big.bmp"
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    assert convert(tmp_path / "data.json", images, out, "--max-size", "10K") == 0
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("shard-*.tar"))}
    counts = json.loads((out / "manifest.json").read_text())["shards"]
    assert sum(counts.values()) == 12 and len(counts) >= 3
    for name, size in sizes.items():
        assert size <= 10 * 1024 or counts[name] == 1, (name, size, counts[name])
    assert [s.get("bmp") is not None for s in read_shards(out)].count(True) == 1


def caption_pairs(folder: Path, count: int) -> list[tuple[str, str]]:
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        scene = make_scene(rng)
        render(scene, rng).save(folder / f"c{i}.png")
        pairs.append((f"c{i}.png", caption(scene)))
    return pairs


def test_captions_and_an_existing_laion_style_corpus_train_alike(tmp_path, capsys):
    """Caption pairs converted to LLaVA records, and the same pairs as a LAION-style corpus
    (png + txt + metadata json) read as-is, give identical batches under the plain template."""
    images = tmp_path / "images"
    pairs = caption_pairs(images, 10)
    rows = [("image", "caption"), *pairs, ("gone.png", "a red circle"), (pairs[0][0], "  ")]
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        handle.write("".join(f"{image},{text}\n" for image, text in rows))
    out = tmp_path / "converted"
    assert convert(tmp_path / "pairs.csv", images, out, "--max-count", "4") == 0
    reasons = {s["where"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert reasons == {"row 12": "missing_image", "row 13": "no_answer"}
    converted = read_shards(out)
    assert [json.loads(s["json"])["conversations"][1]["value"] for s in converted] == [text for _, text in pairs]
    assert json.loads(converted[0]["json"])["conversations"][0] == {"from": "human", "value": "<image>"}
    jsonl = tmp_path / "pairs.jsonl"  # the same pairs as JSON lines: the same shards
    jsonl.write_text("".join(json.dumps({"image": image, "caption": text}) + "\n" for image, text in rows[1:]))
    args = ["--images", str(images), "--out", str(tmp_path / "from_jsonl"), "--max-count", "4"]
    assert main(["captions", "--jsonl", str(jsonl), *args]) == 0
    for shard in sorted(out.glob("shard-*.tar")):
        assert (tmp_path / "from_jsonl" / shard.name).read_bytes() == shard.read_bytes()

    laion = tmp_path / "laion"
    laion.mkdir()
    for shard, start in enumerate(range(0, 10, 4)):
        samples = []
        for i in range(start, min(start + 4, 10)):
            image, text = (images / pairs[i][0]).read_bytes(), pairs[i][1].encode()
            meta = json.dumps({"caption": pairs[i][1], "url": f"http://x/{i}"}).encode()
            samples.append({"__key__": f"{i:09d}", "png": image, "txt": text, "json": meta})
        write_tar(laion / f"{shard:05d}.tar", samples)
    capsys.readouterr()
    assert main(["manifest", str(laion), "--workers", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "10 samples in 3 shards (json 10, png 10, txt 10)" in stdout
    assert f"'data.urls={laion}/{{00000..00002}}.tar' data.text_key=txt data.template=plain" in stdout
    counts = json.loads((laion / "manifest.json").read_text())["shards"]
    assert counts == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}

    ours = epoch_batches(str(out / "shard-{000000..000002}.tar"), 2, "data.template=plain")
    theirs = epoch_batches(str(laion / "{00000..00002}.tar"), 2, "data.template=plain", "data.text_key=txt")
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        for name in ("pixel_values", "input_ids", "labels", "attention_mask"):
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["llava", "--json", "{tmp}/absent.json"], "absent.json does not exist"),
        (["llava", "--json", "{tmp}/broken.json"], "broken.json:3: malformed JSON"),
        (["llava", "--json", "{tmp}/broken.jsonl"], "broken.jsonl:2: malformed JSON"),
        (["llava", "--json", "{tmp}/empty.json"], "empty.json holds no records"),
        (["llava", "--json", "{tmp}/object.json"], "expected a JSON list of records, found dict"),
        (["llava", "--json", "{tmp}/allbad.json"], "all 1 records were skipped, e.g. record 1"),
        (["llava", "--json", "{tmp}/ok.json", "--images", "{tmp}/absent"], "--images {tmp}/absent is not a folder"),
        (["llava", "--json", "{tmp}/ok.json", "--videos", "{tmp}/absent"], "--videos {tmp}/absent is not a folder"),
        (["llava", "--json", "{tmp}/ok.json", "--out", "{tmp}/full"], "already holds shards"),
        (["captions", "--csv", "{tmp}/nocol.csv"], "no column 'caption' in the header ['image', 'text']"),
        (["manifest", "{tmp}/images"], "holds no .tar shards"),
        (["manifest", "{tmp}/full"], "full/shard-000000.tar is not a readable tar file"),
        (["llava", "--json", "{tmp}/ok.json", "--out", "{tmp}/ok.json"], "--out {tmp}/ok.json is a file, not a folder"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "broken.json").write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\n{"id": 2\n')
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "object.json").write_text('{"id": 1}')
    (tmp_path / "allbad.json").write_text(json.dumps([{"id": "x", "conversations": []}]))
    (tmp_path / "ok.json").write_text(json.dumps([{"id": "t", "conversations": TEXT_ONLY}]))
    (tmp_path / "nocol.csv").write_text("image,text\na.png,hello\n")
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] != "manifest":
        args += [a for a in ("--images", str(tmp_path / "images")) if "--images" not in args]
        args += ["--out", str(tmp_path / "out")] if "--out" not in args else []
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("vlm-shards: error: ")
    assert message.format(tmp=tmp_path) in stderr


def test_console_error_has_no_traceback(tmp_path):
    command = [sys.executable, "-m", "vlm_train.data.shards", "llava", "--json", str(tmp_path / "x.json")]
    command += ["--images", str(tmp_path), "--out", str(tmp_path / "o")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"vlm-shards: error: {tmp_path / 'x.json'} does not exist or is not a file"


@pytest.mark.slow
def test_vlm_train_trains_on_converted_shards(tmp_path):
    """Synthetic scenes exported as LLaVA JSON + PNG files and converted give exactly the batches of
    the generator's own shards (same samples, same shard sizes); then a real run trains on them."""
    rng, images, records = random.Random("5-train"), tmp_path / "images", []
    images.mkdir()
    for i in range(48):
        png, record = make_sample(rng)
        (images / f"{i}.png").write_bytes(png)
        records.append({"id": str(i), "image": f"{i}.png", **record})
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "converted"
    assert convert(tmp_path / "data.json", images, out, "--max-count", "16") == 0
    reference = tmp_path / "reference"
    reference.mkdir()
    write_split(reference, "train", 48, 16, seed=5, max_objects=1)
    ours = epoch_batches(str(out / "shard-{000000..000002}.tar"), 4)
    theirs = epoch_batches(str(reference / "train-{000000..000002}.tar"), 4)
    assert len(ours) == len(theirs) == 12
    for a, b in zip(ours, theirs):
        for name in ("pixel_values", "input_ids", "labels"):
            assert torch.equal(a[name], b[name]), name

    run_dir = tmp_path / "run"
    urls = f"data.urls={out}/shard-{{000000..000002}}.tar"
    result = run_cli(toy_overrides(out, run_dir, urls, "train.max_steps=6", "train.warmup_steps=0"))
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_jpeg_bytes_are_kept_as_is(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG", quality=71)
    (images / "photo").write_bytes(buffer.getvalue())  # no suffix: named after the decoded format
    turns = [{"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "p", "image": "photo", "conversations": turns}]))
    assert convert(tmp_path / "d.json", images, tmp_path / "o") == 0
    (sample,) = read_shards(tmp_path / "o")
    assert sample["jpg"] == buffer.getvalue() and sample["__key__"] == "000000000-p"
