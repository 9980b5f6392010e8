"""Helpers the video test modules share (test modules never import each other): the toy-video
model and tokenizer, one rank's training batches as vlm-train builds them, the model's inputs."""

from __future__ import annotations

import torch


def toy_video_setup(*overrides: str):
    """config, tokenizer and model of experiment=toy-video (AnyRes and video on the toy tower)."""
    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.data.tokenizer import load_tokenizer

    cfg = compose(["experiment=toy-video", "data.urls=unused", "data.max_frames=8", *overrides])  # the toy reads 2
    tokenizer = load_tokenizer(cfg.llm, video=True)
    torch.manual_seed(0)
    return cfg, tokenizer, build_model(cfg, tokenizer)


def encoder_for(cfg, tokenizer, model):
    from vlm_train.data.samples import SampleEncoder
    from vlm_train.train import image_tokens, image_transform, video_tokens

    return SampleEncoder(cfg.data, tokenizer, image_transform(model), image_tokens(model), video_tokens(model))


def one_rank_batches(cfg, tokenizer, model, batch_size: int):
    """The training batches of one data-parallel rank, as vlm-train builds them for `model`."""
    from vlm_train.data.pipeline import build_train_batches
    from vlm_train.train import image_tokens, image_transform, video_tokens, visual_cost

    return build_train_batches(
        cfg.data,
        tokenizer,
        image_transform(model),
        image_tokens(model),
        video_tokens=video_tokens(model),
        visual_cost=visual_cost(model),
        dp_rank=0,
        dp_size=1,
        batch_size=batch_size,
        seed=0,
    )


def model_inputs(batch: dict) -> dict:
    from vlm_train.data.templates import VIDEO_INPUTS

    names = ("pixel_values", "input_ids", "attention_mask", "labels", "image_sizes", *VIDEO_INPUTS)
    return {name: batch[name] for name in names if name in batch}
