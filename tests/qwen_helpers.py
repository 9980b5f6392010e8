"""Helpers the Qwen-VL test modules share (test modules never import each other): tiny random
Qwen2-VL / Qwen2.5-VL models, batches in Qwen's processor layout, the tiny model's overrides, and
shards of toy scenes at several sizes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

IMAGE, VIDEO, START, END = 290, 291, 292, 293
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
TIMESTAMP = 30  # stands for a Qwen3-VL video frame's "<t seconds>" text


def tiny_hf(family: str, vocab_size: int = 300, ids: tuple[int, int, int, int] = (IMAGE, VIDEO, START, END)):
    """A tiny random Qwen2-VL, Qwen2.5-VL (window attention in layer 0, full in layer 1) or Qwen3-VL
    (DeepStack from tower layers 0 and 1 into decoder layers 0 and 1, a 6 x 6 position-embedding
    grid); `ids`: its image, video, vision-start and vision-end token ids."""
    import transformers

    torch.manual_seed(0)
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen3_vl":
        vision = dict(
            depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, patch_size=16,
            num_position_embeddings=36, deepstack_visual_indexes=[0, 1],
        )  # fmt: skip
        text |= dict(head_dim=16, rope_parameters=text["rope_parameters"] | {"mrope_interleaved": True})
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    else:
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, window_size=56,
            fullatt_block_indexes=[1], tokens_per_second=2,
        )  # fmt: skip
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids[0], video_token_id=ids[1],
        vision_start_token_id=ids[2], vision_end_token_id=ids[3],
    )  # fmt: skip
    model = model_cls(config).eval()
    with torch.no_grad():  # biases and norms away from their 0/1 init, so a dropped one shows
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name or "ln_q" in name or "pos_embed" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def qwen_batch(samples: list[list], seed: int = 0, family: str = "qwen2_vl") -> dict[str, torch.Tensor]:
    """Samples of text ids and ("image" | "video", (t, h, w)) parts -> a right-padded batch in
    Qwen's processor layout (patches [N, 3*2*p*p] random, grids, mm_token_type_ids); Qwen3-VL's
    videos as its processor writes them, each temporal patch after a timestamp in its own span."""
    patch = PATCH[family]
    generator = torch.Generator().manual_seed(seed)
    rows, patches, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
    for sample in samples:
        ids: list[int] = []
        for part in sample:
            if isinstance(part, int):
                ids.append(part)
                continue
            kind, grid = part
            t, h, w = grid
            if kind == "video" and family == "qwen3_vl":
                ids += ([TIMESTAMP, START] + [VIDEO] * (h * w // 4) + [END]) * t
            else:
                ids += [START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [END]
            patches[kind].append(torch.randn(t * h * w, 3 * 2 * patch * patch, generator=generator))
            grids[kind].append(list(grid))
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in rows]),
        "mm_token_type_ids": (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int(),
    }
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if patches[kind]:
            batch[key] = torch.cat(patches[kind])
            batch[f"{kind}_grid_thw"] = torch.tensor(grids[kind])
    return batch


TINY_QWEN = [
    "vision.family=qwen2_5_vl", "vision.path=null", "vision.patch_size=14", "vision.hidden_size=32",
    "vision.intermediate_size=64", "vision.num_heads=4", "vision.window_size=56", "vision.full_attention_layers=[1]",
    "llm.family=qwen2_5_vl", "llm.hidden_size=64", "llm.num_heads=4", "llm.num_kv_heads=2",
    "llm.intermediate_size=128", "connector=patch_merger", "connector.norm=rmsnorm",
]  # fmt: skip


TINY_QWEN3 = [
    "vision.family=qwen3_vl", "vision.path=null", "vision.patch_size=16", "vision.hidden_size=32",
    "vision.intermediate_size=64", "vision.num_heads=4", "vision.num_layers=2", "vision.deepstack_layers=[0,1]",
    "vision.num_position_embeddings=36", "llm.family=qwen3_vl", "llm.hidden_size=64", "llm.num_heads=4",
    "llm.num_kv_heads=2", "llm.intermediate_size=128", "connector=patch_merger", "connector.norm=layernorm",
]  # fmt: skip
TINY = {"qwen2_5_vl": TINY_QWEN, "qwen3_vl": TINY_QWEN3}


def write_sized_shards(folder: Path, seed: int = 3, videos: bool = False) -> str:
    """Two shards of 32 toy scenes at five sizes and aspect ratios (48x144 to 96x96), a few text-only
    (and with `videos`, a few toy-video clips: data.video=true reads them)."""
    from tests.helpers import text_sample, write_tar
    from vlm_train.data import synthetic, synthetic_video

    rng = random.Random(seed)
    for part in range(2):
        samples = []
        for i in range(32):
            if i % 8 == 7:
                samples.append(text_sample(f"p{part}-{i:03d}"))
                continue
            if videos and i % 8 == 3:
                members, record = synthetic_video.make_sample(rng)
                samples.append({"__key__": f"p{part}-{i:03d}", **members, "json": json.dumps(record).encode()})
                continue
            png_bytes, record = synthetic.make_sample(rng, layout="sizes")
            samples.append({"__key__": f"p{part}-{i:03d}", "png": png_bytes, "json": json.dumps(record).encode()})
        write_tar(folder / f"part-{part}.tar", samples)
    return str(folder / "part-{0..1}.tar")


def resumable_run(urls: str, run_dir, *extra: str, experiment: str = "toy-qwen2_5-vl") -> list[str]:
    """A 20-step fp32 run of `experiment` (tower trained) that `kill_9_and_resume` can kill and
    resume: a checkpoint every 4 steps, every step logged, each rank's sample keys logged."""
    return [
        f"experiment={experiment}",
        f"data.urls={urls}",
        f"run.dir={run_dir}",
        f"data.log_keys={run_dir}/keys",
        "vision.freeze=false",
        "train.precision=fp32",
        "data.num_workers=1",
        "data.shuffle_block=8",
        "train.micro_batch_size=4",
        "train.max_steps=20",
        "train.warmup_steps=2",
        "train.save_every=4",
        "train.log_every=1",
        "train.eval=false",
        *extra,
    ]
