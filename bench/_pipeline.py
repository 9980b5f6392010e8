"""What the benchmarks share: their batches come from the trainer's own constructor, so a key the
trainer reads cannot go missing from a benchmark's batch (tests/test_bench.py); LLaVA-1.5-style
shards for the benchmarks that stream data (bench/gpu.py)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch


def pipeline_batch(cfg, tokenizer, model, layout) -> dict:
    """This rank's first batch of `cfg.data` (vlm_train.train.build_batches); the loader is closed."""
    from vlm_train.train import build_batches

    batches = build_batches(cfg, tokenizer, model, layout, torch.device("cpu"))
    try:
        return next(batches)
    finally:
        batches.close()


def write_llava_shards(folder: Path, samples: int, image_size: int, answer_tokens: int, per_shard: int = 32) -> str:
    """`samples` LLaVA-1.5-style records as WebDataset shards (`<key>.jpg` + `<key>.json`) and a
    manifest.json in `folder`; returns their data.urls pattern. Each: a JPEG of 0.8-1.6x `image_size`
    a side, and 1-3 rounds of conversation (the image in the first) whose answers hold 0.1-1.9x
    `answer_tokens` words in all (the toy scenes' words: about one Llama-2 token each)."""
    import webdataset as wds

    rng, noise, counts = random.Random(0), np.random.default_rng(0), {}
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, samples, per_shard)):
        name, stop = f"shard-{shard:06d}.tar", min(start + per_shard, samples)
        with wds.TarWriter(str(folder / name)) as sink:
            for index in range(start, stop):
                record = json.dumps({"conversations": _conversation(rng, answer_tokens)}).encode()
                sink.write({"__key__": f"{index:08d}", "jpg": _photo(rng, noise, image_size), "json": record})
        counts[name] = stop - start
    (folder / "manifest.json").write_text(json.dumps({"shards": counts, "total": samples}))
    return str(folder / f"shard-{{000000..{len(counts) - 1:06d}}}.tar")


def _conversation(rng: random.Random, answer_tokens: int) -> list[dict]:
    from vlm_train.data.synthetic import PROMPT_WORDS, VOCABULARY

    rounds = rng.randint(1, 3)
    words = rng.randint(max(answer_tokens // 10, rounds), max(answer_tokens * 19 // 10, rounds))
    turns = []
    for index in range(rounds):
        question = ("<image>\n" if index == 0 else "") + " ".join(rng.choices(PROMPT_WORDS, k=8))
        answer = " ".join(rng.choices(VOCABULARY, k=words // rounds))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _photo(rng: random.Random, noise: np.random.Generator, size: int) -> bytes:
    """A synthetic scene, resized, with sensor-like noise so that it compresses like a photo."""
    from PIL import Image

    from vlm_train.data.synthetic import make_scene, render

    width, height = (int(size * rng.uniform(0.8, 1.6)) for _ in range(2))
    scene = np.asarray(render(make_scene(rng, 3), rng).resize((width, height), Image.BICUBIC), np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(scene + noise.normal(0, 12, scene.shape), 0, 255).astype(np.uint8)).save(out, "JPEG")
    return out.getvalue()
