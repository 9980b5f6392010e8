"""Held-out evaluation: teacher-forced loss and greedy-decoded answer accuracy.

Every rank scores an equal share of the held-out samples and runs the same number of forward
passes (decoding stops when no rank has an unfinished answer), so ZeRO-3's parameter gathers stay
in step; the counts are summed across ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vlm_train.data.native_resolution import NativeResolutionTransform
from vlm_train.data.pipeline import SampleEncoder, collate
from vlm_train.data.templates import NATIVE_INPUTS, VIDEO_INPUTS, encode, encode_conversation


@dataclass
class Question:
    kind: str
    pixels: torch.Tensor  # [1, 3, S, S] (AnyRes: [tiles, 3, S, S]; [0, 3, S, S] without an image)
    prompt: list[int]
    answer: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # the image's (height, width), AnyRes only
    video: torch.Tensor | None = None  # the sample's video frames [F, 3, S, S] (data.video; native: patches)
    video_grid: tuple[int, int, int] | None = None  # native resolution: the video's grid, and
    video_seconds: float = 1.0  # its seconds per temporal patch


def questions_of(raw: dict, encoder: SampleEncoder) -> list[Question]:
    """Each human turn of a held-out sample, asked alone about its image (or video)."""
    turns = encoder.conversation(raw)
    video = encoder.video_of(raw) if encoder.cfg.video else None
    if video is not None:
        return _video_questions(raw, turns, encoder)
    image_bytes = next((raw[k] for k in encoder.image_keys if k in raw), None)
    pixels, sizes = encoder.pixels(None), []
    if image_bytes is not None:
        pixels, size = encoder.decode(image_bytes)
        sizes = [size]
    counts = [encoder.image_tokens(s) for s in sizes] if callable(encoder.image_tokens) else encoder.image_tokens
    questions = []
    for ask, reply in zip(turns[0::2], turns[1::2]):
        text = ask["value"].replace("<image>", "").strip()
        turn = [{"from": "human", "value": f"<image>\n{text}" if pixels.shape[0] else text}]
        prompt, _ = encode_conversation(  # the training template, ending where the answer starts
            turn, encoder.tokenizer, encoder.cfg.template, counts, add_generation_prompt=True
        )
        kept_sizes = sizes if callable(encoder.image_tokens) else []  # sizes go to AnyRes models only
        questions.append(Question(ask.get("kind", "answer"), pixels, prompt, reply["value"], kept_sizes))
    return questions


def _video_questions(raw: dict, turns: list[dict], encoder: SampleEncoder) -> list[Question]:
    """A video sample's questions, each asked alone about its video (read as training reads it)."""
    assert callable(encoder.image_tokens) and (encoder.video_tokens is not None or encoder.native)
    media = encoder.read_media(raw, raw.get("__key__", "?"), encoder.image_tokens)
    if not isinstance(media, tuple) or len(media[1]) != 1 or media[0]:
        return []  # a bad video (counted in training), or images with the video: not a question here
    clip = media[1][0]
    video, grid, seconds = clip.frames, None, 1.0
    if encoder.native:
        video, grid, seconds = encoder.native_video(clip)
    if grid is not None:
        tokens = grid[0] * grid[1] * grid[2] // 4
    else:
        assert encoder.video_tokens is not None  # data.video with AnyRes: the model's tokens per video
        tokens = encoder.video_tokens(len(clip.frames))
    questions = []
    for ask, reply in zip(turns[0::2], turns[1::2]):
        text = ask["value"].replace("<video>", "").strip()
        turn = encoder.with_time_instruction([{"from": "human", "value": f"<video>\n{text}"}], [clip])
        encoded = encode(  # the training template, ending where the answer starts
            turn,
            encoder.tokenizer,
            encoder.cfg.template,
            [],
            add_generation_prompt=True,
            video_tokens=[tokens],
            video_timestamps=encoder.video_timestamps([clip]),
        )
        pixels = encoder.pixels(None)
        kind = ask.get("kind", "answer")
        questions.append(Question(kind, pixels, encoded.input_ids, reply["value"], [], video, grid, seconds))
    return questions


@torch.no_grad()
def greedy_generate(
    model,
    pixels: torch.Tensor,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    image_sizes: torch.Tensor | None = None,
    **videos: torch.Tensor,
) -> list[list[int]]:
    """Greedy answers for right-padded prompts (full recompute per token: short answers);
    `image_sizes` [I, 2] for an AnyRes model, `videos`: pixel_values_videos and video_frames (or a
    native-resolution model's image_grid_thw: its M-RoPE positions are recomputed every step)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max()) + max_new_tokens
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)
    for _ in range(max_new_tokens):
        if not _anyone_active(finished, device):
            break
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
        logits = model(pixels, ids, attention_mask=mask, image_sizes=image_sizes, **videos).logits
        step_logits = logits[rows, lengths - 1]
        step_logits[:, model.image_token_id] = float("-inf")  # an image slot needs pixels: never generated
        next_ids = step_logits.argmax(-1)
        for row in (~finished).nonzero().flatten().tolist():
            token = int(next_ids[row])
            finished[row] = token == eos_id
            if token != eos_id:
                answers[row].append(token)
        ids[rows, lengths] = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        lengths = torch.clamp(lengths + (~finished).long(), max=width - 1)
    return answers


def _anyone_active(finished: torch.Tensor, device: torch.device) -> bool:
    active = torch.tensor([float((~finished).any())], device=device)
    if dist.is_initialized():
        dist.all_reduce(active, op=dist.ReduceOp.MAX)
    return bool(active.item())


def evaluate(
    model,
    records: list[dict],
    encoder: SampleEncoder,
    *,
    batch_size: int,
    max_new_tokens: int,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """eval_loss (teacher-forced, token-weighted) and eval_accuracy (exact match), with per-kind accuracy."""
    model.eval()
    share = records[rank::world][: len(records) // world]  # equal shares keep ranks in step
    sums: defaultdict[str, float] = defaultdict(float)
    for start in range(0, len(share), batch_size):
        chunk = [s for s in map(encoder, share[start : start + batch_size]) if s is not None]
        _add_loss(model, chunk, encoder, sums, device)
        _add_accuracy(
            model,
            [q for raw in share[start : start + batch_size] for q in questions_of(raw, encoder)],
            encoder,
            max_new_tokens,
            sums,
            device,
        )
    model.train()
    totals = _all_reduce_sums(sums, device)
    metrics = {
        "eval_loss": totals["loss_sum"] / max(totals["loss_tokens"], 1),
        "eval_accuracy": totals["correct"] / max(totals["asked"], 1),
    }
    for key in sorted(totals):
        if key.startswith("asked_"):
            kind = key[len("asked_") :]
            metrics[f"eval_accuracy_{kind}"] = totals[f"correct_{kind}"] / totals[key]
    return metrics


@torch.no_grad()
def _add_loss(model, chunk, encoder, sums, device) -> None:
    if not chunk:
        return
    batch = collate(chunk, encoder.tokenizer.pad_token_id)
    names = ("pixel_values", "input_ids", "attention_mask", "labels", "image_sizes", *VIDEO_INPUTS, *NATIVE_INPUTS)
    out = model(**{name: batch[name].to(device) for name in names if name in batch})
    sums["loss_sum"] += float(out.loss_sum)
    sums["loss_tokens"] += float(out.num_label_tokens)


def _add_accuracy(model, questions: list[Question], encoder, max_new_tokens, sums, device) -> None:
    tokenizer = encoder.tokenizer
    pixels = torch.cat([q.pixels for q in questions]).to(device)
    sizes = [size for q in questions for size in q.sizes]
    videos = [q.video for q in questions if q.video is not None]
    video_inputs = {}
    if encoder.native and sizes:  # native resolution: grids instead of sizes
        transform = encoder.transform
        assert isinstance(transform, NativeResolutionTransform)
        video_inputs["image_grid_thw"] = torch.tensor([transform.grid_of(s) for s in sizes], device=device)
        sizes = []
    if videos:
        video_inputs["pixel_values_videos"] = torch.cat(videos).to(device)
        grids = [q.video_grid for q in questions if q.video_grid is not None]
        if grids:  # native resolution
            video_inputs["video_grid_thw"] = torch.tensor(grids, device=device)
            seconds = [q.video_seconds for q in questions if q.video is not None]
            video_inputs["second_per_grid_ts"] = torch.tensor(seconds, device=device)
        else:
            video_inputs["video_frames"] = torch.tensor([len(v) for v in videos], device=device)
    answers = greedy_generate(
        model,
        pixels,
        [q.prompt for q in questions],
        max_new_tokens,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        device,
        image_sizes=torch.tensor(sizes, device=device) if sizes else None,
        **video_inputs,
    )
    for question, answer_ids in zip(questions, answers):
        said = " ".join(tokenizer.decode(answer_ids, skip_special_tokens=True).split())
        expected = " ".join(tokenizer.decode(tokenizer(question.answer, add_special_tokens=False).input_ids).split())
        right = float(said == expected)
        sums["asked"] += 1
        sums["correct"] += right
        sums[f"asked_{question.kind}"] += 1
        sums[f"correct_{question.kind}"] += right


def _all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return dict(sums)
    keys: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(keys, sorted(sums))
    names = sorted({k for rank_keys in keys for k in rank_keys})
    values = torch.tensor([sums.get(k, 0.0) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(names, values.tolist()))
