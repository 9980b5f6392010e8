"""Plain helpers the tests share (no fixtures: those live in conftest.py). Import them as
`from tests.helpers import ...`; test modules never import each other."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def toy_overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A fast toy run: small batches, one loader worker, no end-of-run evaluation."""
    return [
        "experiment=toy",
        f"data.synthetic_dir={data_dir}",
        f"run.dir={run_dir}",
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval=false",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *target: str, max_restarts: int = 0) -> list[str]:
    """The torchrun command line for `target` (e.g. "-m", "vlm_train.train", overrides...) on a free port."""
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    port = f"--master_port={free_port()}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", port, *restarts, *target]


def run_cli(overrides: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`vlm-train` in a fresh process (torchrun for nproc > 1), as a user would start it."""
    if nproc == 1:
        command = [sys.executable, "-m", "vlm_train.train", *overrides]
    else:
        command = torchrun(nproc, "-m", "vlm_train.train", *overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def run_worker(worker) -> None:
    """The `__main__` of a launched test worker: `worker(plan)` with the JSON plan named by argv[1].
    A failure exits at once: loader workers and process groups left behind would keep a failed
    rank alive until the launch times out, instead of failing the test in seconds."""
    try:
        worker(json.loads(Path(sys.argv[1]).read_text()))
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def kill_9_and_resume(overrides_of, nproc: int, root: Path, kill_after: int = 9, timeout: int = 600) -> Path:
    """A 20-step job (`overrides_of(run_dir)`, saving every 4 steps, logging sample keys) run whole; run
    again, its whole launch SIGKILLed after step `kill_after`, and restarted: the restart logs the
    whole run's losses exactly, and each rank reads the same samples in the same order. Returns the
    whole run's folder."""
    import os
    import signal
    import subprocess
    import time

    whole, killed = root / "whole", root / "killed"
    result = run_cli(overrides_of(whole), nproc=nproc, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = step_losses(whole)
    assert sorted(expected) == list(range(1, 21))
    job = subprocess.Popen(
        torchrun(nproc, "-m", "vlm_train.train", *overrides_of(killed)),
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while kill_after not in (step_losses(killed) if (killed / "metrics.jsonl").exists() else {}):
        assert job.poll() is None and time.monotonic() < deadline, f"the job ended (or hung) before step {kill_after}"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert int((killed / "checkpoints" / "latest").read_text().removeprefix("step_")) < 20
    result = run_cli(overrides_of(killed), nproc=nproc, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(killed) if "loss" in r]
    assert sorted({r["step"] for r in records}) == list(range(1, 21))
    assert all(r["loss"] == expected[r["step"]] for r in records), (records, expected)
    for name in sorted(p.name for p in (whole / "keys").iterdir()):
        tail = [(run / "keys" / name).read_text().splitlines()[-8:] for run in (whole, killed)]
        assert tail[0] == tail[1], name
    return whole


def keep_only_checkpoint(whole: Path, resumed: Path, step: int) -> None:
    """`resumed` as `whole`'s run dir would be had the run stopped right after its step-`step` checkpoint."""
    resumed.mkdir(exist_ok=True)
    shutil.copytree(whole / "checkpoints" / f"step_{step}", resumed / "checkpoints" / f"step_{step}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{step}")
    shutil.copy(whole / "config.yaml", resumed / "config.yaml")


# --- data: the toy tokenizer and transform, and WebDataset shards written by the tests ---------

QUESTION = "what color is the circle ?"


def __getattr__(name: str):
    """`TOKENIZER` (the toy tokenizer) and `TRANSFORM` (48 px, mean/std 0.5), built on first use:
    building them imports transformers, which launched test workers that only need `run_worker`
    should not pay for."""
    if name in ("TOKENIZER", "TRANSFORM"):
        return _data_constants()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _data_constants() -> dict:
    from vlm_train.data.preprocess import ImageTransform
    from vlm_train.data.tokenizer import build_toy_tokenizer

    return {"TOKENIZER": build_toy_tokenizer(), "TRANSFORM": ImageTransform(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def conversation(question: str, answer: str) -> bytes:
    """A sample's json field: one human turn and one gpt turn."""
    return json.dumps(
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    ).encode()


def image_sample(rng: random.Random, key: str) -> dict:
    """A synthetic scene sample (png + json) drawn from `rng`."""
    from vlm_train.data.synthetic import make_sample

    png, record = make_sample(rng)
    return {"__key__": key, "png": png, "json": json.dumps(record).encode()}


def text_sample(key: str, answer: str = "red", question: str = QUESTION) -> dict:
    """A text-only sample: no image, no <image> marker."""
    return {"__key__": key, "json": conversation(question, answer)}


def write_tar(path: Path, samples: Iterable[dict]) -> None:
    """One WebDataset shard holding `samples` in order."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def write_shards(folder: Path, sizes: list[int], seed: int = 0, corrupt: Collection[int] = frozenset()) -> str:
    """Shards of synthetic samples with the given sizes (no manifest: sizes come from the tars);
    samples whose running index is in `corrupt` get a truncated image. Returns the brace pattern."""
    rng, index = random.Random(seed), 0
    folder.mkdir(parents=True, exist_ok=True)
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            sample = image_sample(rng, f"s{index:05d}")
            if index in corrupt:
                sample["png"] = sample["png"][: len(sample["png"]) // 3]  # a truncated image
            samples.append(sample)
            index += 1
        write_tar(folder / f"part-{shard:03d}.tar", samples)
    return str(folder / f"part-{{000..{len(sizes) - 1:03d}}}.tar")


def batches_for(pattern: str, dp_rank: int, dp_size: int, workers: int, batch_size: int, seed: int = 0):
    """The toy experiment's training batches over `pattern` for one rank (shuffle block 16)."""
    from vlm_train import compose
    from vlm_train.data.pipeline import build_train_batches

    cfg = compose(
        ["experiment=toy", f"data.urls={pattern}", f"data.num_workers={workers}", "data.shuffle_block=16"]
    ).data
    return build_train_batches(
        cfg,
        _data_constants()["TOKENIZER"],
        _data_constants()["TRANSFORM"],
        9,
        dp_rank=dp_rank,
        dp_size=dp_size,
        batch_size=batch_size,
        seed=seed,
    )


# --- models -------------------------------------------------------------------------------------


def toy_model(*extra: str, tokenizer=None):
    """The toy experiment's model (seeded: the same weights every call), with `extra` overrides."""
    import torch

    from vlm_train import build_model, compose

    torch.manual_seed(0)
    return build_model(compose(["experiment=toy", *extra]), tokenizer)


def open_gates(model, value: float = 0.5):
    """cross_attention's gates set to `value` (they start at zero, where the model is the plain LLM
    and any comparison of images would pass); the model in eval mode."""
    import torch

    with torch.no_grad():
        for block in model.connector.blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)
    return model.eval()


COLOUR_ANSWERS = ("red", "green", "blue")  # one colour fills each image: the answer is in the pixels only


def colour_images(count: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """`count` uint8 [3, 48, 48] images, each one noisy colour, the colours in turn (balanced), with
    that colour's name."""
    import torch

    from vlm_train.data.synthetic import COLORS

    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        colour = COLOUR_ANSWERS[i % len(COLOUR_ANSWERS)]
        noise = torch.randint(-20, 21, (3, 48, 48), generator=generator)
        images.append(((torch.tensor(COLORS[colour]).view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8), colour))
    return images


def make_batch(model, tokenizer, with_image=(True, True)):
    """Two samples; the image-token slots are expanded the way the data pipeline does it."""
    import torch

    from vlm_train.data.templates import encode
    from vlm_train.models.vlm import IGNORE_INDEX

    questions = ["what color is the circle ?", "where is the red square ?"]
    ids, labels, pixels = [], [], []
    for question, has_image in zip(questions, with_image):
        text = f"<image>\n{question}" if has_image else question
        enc = encode(
            [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}],
            tokenizer,
            "chat",
            model.num_image_tokens,
        )
        ids.append(enc.input_ids)
        labels.append(enc.labels)
        if has_image:
            pixels.append(torch.randn(1, 3, model.vision.image_size, model.vision.image_size))
    length = max(map(len, ids))
    pad = lambda rows, value: torch.tensor([r + [value] * (length - len(r)) for r in rows])  # noqa: E731
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in ids])
    pixel_values = torch.cat(pixels) if pixels else torch.empty(0, 3, model.vision.image_size, model.vision.image_size)
    return pixel_values, pad(ids, tokenizer.pad_token_id), mask, pad(labels, IGNORE_INDEX)


# --- checkpoint folders holding only config.json: real shapes at meta size, no weights ------------

LLAMA2_TOKENIZER = REPO / "tests" / "assets" / "tokenizers" / "llama2"

# meta-llama/Llama-2-7b-hf's config.json (vicuna-7b-v1.5 ships the same shapes)
LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32000,
}
# openai/clip-vit-large-patch14-336's config.json: the whole CLIP model, as users download it
CLIP_L_336_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "vocab_size": 49408,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
}
# google/siglip-so400m-patch14-384's config.json: the whole SigLIP model, as users download it
SIGLIP_SO400M_384_CONFIG = {
    "architectures": ["SiglipModel"],
    "model_type": "siglip",
    "text_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "max_position_embeddings": 64,
        "vocab_size": 32000,
    },
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}
# What a preset's vision.path / llm.path folder holds, by the preset's option name under configs/:
# its checkpoint's config.json and, for a decoder, the tokenizer files beside it.
QWEN2_5_VL_7B_CONFIG = {  # Qwen2.5-VL-7B-Instruct's config.json (its token ids those of the vendored tokenizer)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "vision_start_token_id": 16643, "vision_end_token_id": 16644, "image_token_id": 16646, "video_token_id": 16647,
    "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}  # fmt: skip


QWEN3_VL_8B_CONFIG = {  # Qwen3-VL-8B-Instruct's config.json (its token ids those of the vendored tokenizer)
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": False,
    "vision_start_token_id": 16643, "vision_end_token_id": 16644, "image_token_id": 16646, "video_token_id": 16647,
    "text_config": {
        "model_type": "qwen3_vl_text", "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 262144,
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "vocab_size": 151936,
    },
    "vision_config": {
        "model_type": "qwen3_vl", "deepstack_visual_indexes": [8, 16, 24], "depth": 27,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3, "intermediate_size": 4304,
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}  # fmt: skip


QWEN2_VL_TOKENIZER = REPO / "tests" / "assets" / "tokenizers" / "qwen2-vl"
CHECKPOINT_CONFIGS: dict[str, dict[str, dict]] = {
    "vision": {
        "clip-vit-l-336px": CLIP_L_336_CONFIG,
        "siglip-so400m-384px": SIGLIP_SO400M_384_CONFIG,
        "qwen2_5-vl-7b": QWEN2_5_VL_7B_CONFIG,  # one folder for vision.path and llm.path
        "qwen3-vl-8b": QWEN3_VL_8B_CONFIG,
    },
    "llm": {"vicuna-7b": LLAMA2_7B_CONFIG, "qwen2_5-vl-7b": QWEN2_5_VL_7B_CONFIG, "qwen3-vl-8b": QWEN3_VL_8B_CONFIG},
}


def write_config_only_folder(folder: Path, config: dict, tokenizer: Path | None = None) -> Path:
    """A checkpoint folder without weights: config.json (+ the tokenizer's files), enough for a
    meta-size build (vlm_train.plan.build_meta_model) of the model it describes."""
    folder.mkdir(parents=True, exist_ok=True)  # a Qwen-VL folder serves vision.path and llm.path
    (folder / "config.json").write_text(json.dumps(config))
    for file in tokenizer.iterdir() if tokenizer else ():
        shutil.copy(file, folder / file.name)
    return folder


def write_config_only_folders(root: Path) -> tuple[Path, Path]:
    """Llama-2-7B and CLIP ViT-L/14-336 as folders holding config.json (+ tokenizer): no weights."""
    llm = write_config_only_folder(root / "llama-2-7b", LLAMA2_7B_CONFIG, LLAMA2_TOKENIZER)
    vision = write_config_only_folder(root / "clip-vit-large-patch14-336", CLIP_L_336_CONFIG)
    return llm, vision
