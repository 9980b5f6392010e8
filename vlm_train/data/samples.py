"""One WebDataset sample -> what a batch row needs: `SampleEncoder` decodes its images (and video,
data/video.py), encodes its conversation with the data template, and fits it to data.max_length
and data.max_visual_tokens;
`collate` makes the right-padded batch. A sample that cannot be used becomes a `SkippedSample`
with one of SKIP_REASONS (the pipeline counts it and puts a masked placeholder in its place).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from PIL import Image

from vlm_train.config import DataConfig
from vlm_train.data.documents import encode_caption, encode_document
from vlm_train.data.native_resolution import NativeResolutionTransform
from vlm_train.data.preference import encode_pair
from vlm_train.data.preprocess import AnyResTransform, ImageTransform
from vlm_train.data.reader import SkippedSample, skipped
from vlm_train.data.templates import (
    ConversationError,
    Encoded,
    ImageCountError,
    check_template,
    encode,
    image_sizes_of,
    position_ids_of,
    truncate,
)
from vlm_train.data.tokenizer import VIDEO_TOKEN, media_token_ids
from vlm_train.data.video import (
    DEFAULT_FPS,
    FRAME_PREFIX,
    Clip,
    DecodeTimeout,
    VideoError,
    VideoReader,
    VideoSource,
    time_instruction,
)
from vlm_train.models.vlm import IGNORE_INDEX

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "corrupt_tar",  # a truncated or corrupt tar member, or a shard shorter than its declared size
    "bad_image",  # image bytes that do not decode
    "missing_field",  # no (or malformed) text field: data.text_key
    "too_long",  # longer than data.max_length even after cutting text (visual tokens are never cut)
    "image_token_mismatch",  # <image> markers != images in the sample
    "empty_shard",  # a shard without samples (counted once per epoch; takes no batch position)
    "bad_conversation",  # turns that do not alternate human/gpt, or that data.template cannot encode
    "visual_budget",  # more visual tokens than data.max_visual_tokens (dropped, or no downscale fits)
    "bad_video",  # a video that does not decode, is truncated or has no frames; or one while data.video=false
    "decode_timeout",  # a video whose decode ran past data.decode_timeout_s
    "not_a_pair",  # objective=dpo: no chosen and rejected replies (data/preference.py)
    "identical_pair",  # objective=dpo: the chosen and rejected replies are the same
    "prompt_mismatch",  # objective=dpo: chosen and rejected conversations with different prompts
)
REASON_INDEX = {reason: index for index, reason in enumerate(SKIP_REASONS)}


SLOW_DATA_ENV = "VLM_TRAIN_SLOW_DATA_S"  # tests: seconds a loader sleeps per sample (a deliberately slow loader)


class SampleEncoder:
    """Raw WebDataset sample -> (key, pixels [I,3,S,S], Encoded), or `SkippedSample` with the reason.

    `image_tokens` is the visual-token slots per image, or with AnyRes (an `AnyResTransform`,
    pixels [tiles, 3, S, S]) a function of the image's (height, width): the images are then decoded
    before the text is encoded, and `Encoded.image_sizes` carries their sizes to the model.
    `video_tokens` (data.video) is a video's visual-token slots as a function of its frame count.
    `visual_cost` (image size -> tokens, frames -> tokens) is what data.max_visual_tokens counts when
    it differs from the slots (cross_attention: one slot per image, its visual tokens in the media).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        transform: ImageTransform | AnyResTransform | NativeResolutionTransform,
        image_tokens: int | Callable[[tuple[int, int]], int],
        video_tokens: Callable[[int], int] | None = None,
        visual_cost: tuple[Callable[[tuple[int, int]], int], Callable[[int], int] | None] | None = None,
    ):
        self.cfg = cfg
        self.visual_cost = visual_cost
        self.tokenizer = tokenizer
        if isinstance(transform, ImageTransform):  # crop | pad | resize, and JPEG drafts: the data's call
            transform = replace(transform, aspect_ratio=cfg.image_aspect_ratio, jpeg_draft=cfg.jpeg_draft)
        self.transform = transform
        self.image_tokens = image_tokens
        self.image_keys = cfg.image_key.split(";")
        self.image_token_id, self.video_token_id = media_token_ids(tokenizer)
        self.video_tokens = video_tokens
        self.video_keys = cfg.video_key.split(";")
        self.visual_ids = [self.image_token_id]
        self.native = isinstance(transform, NativeResolutionTransform)
        if cfg.video:
            if video_tokens is None and not self.native:
                raise ValueError("data.video needs the model's tokens per video (an AnyRes model with a video token)")
            self.visual_ids.append(self.video_token_id if self.video_token_id is not None else -1)
        frame_size = transform.resized if isinstance(transform, NativeResolutionTransform) else transform.size
        self.video_reader = VideoReader(frame_size, cfg.decode_timeout_s)
        check_template(tokenizer, cfg.template)  # at start-up: data.template=hf needs a chat template
        self.extra_seconds = float(os.environ.get(SLOW_DATA_ENV, "0"))

    def __call__(self, raw: dict) -> tuple[str, torch.Tensor, Encoded] | None:
        """The encoded sample, or None for a bad one (logged)."""
        result = self.encode(raw)
        return None if isinstance(result, SkippedSample) else result

    def encode(self, raw: dict) -> tuple[str, torch.Tensor, Encoded] | SkippedSample:
        if self.cfg.read_as != "conversation":  # objective=lm | clip | siglip (data/documents.py)
            return encode_document(self, raw) if self.cfg.read_as == "document" else encode_caption(self, raw)
        if self.cfg.preference:
            return encode_pair(self, raw)
        return self.encode_one(raw)

    def encode_one(self, raw: dict) -> tuple[str, torch.Tensor, Encoded] | SkippedSample:
        key = raw.get("__key__", "?")
        if self.extra_seconds:
            time.sleep(self.extra_seconds)
        if not self.cfg.video and self.video_of(raw) is not None:
            return skipped("bad_video", key, "a video sample, but data.video=false")
        if callable(self.image_tokens):
            return self.encode_sized(raw, key, self.image_tokens)
        try:
            turns = self.conversation(raw)
            encoded = encode(turns, self.tokenizer, self.cfg.template, self.image_tokens)
        except ConversationError as err:
            return skipped("bad_conversation", key, str(err))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return skipped("missing_field", key, f"no usable '{self.cfg.text_key}' field ({err})")
        try:
            pixels = self.images(self.image_members(raw))
        except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            return skipped("bad_image", key, f"image does not decode ({err})")
        return self.fitted(key, pixels, encoded, pixels.shape[0])

    def encode_sized(
        self, raw: dict, key: str, tokens_of: Callable[[tuple[int, int]], int]
    ) -> tuple[str, torch.Tensor, Encoded] | SkippedSample:
        """AnyRes and video: the media first (image sizes and frame counts decide their token counts,
        and data.max_visual_tokens may shrink them), then the text."""
        media = self.read_media(raw, key, tokens_of)
        if isinstance(media, SkippedSample):
            return media
        decoded, clips = media
        sizes = [size for _, size in decoded]
        frames = [clip.frames.shape[0] for clip in clips]
        native_videos = [self.native_video(clip) for clip in clips] if self.native else []
        try:
            turns = self.with_time_instruction(self.conversation(raw), clips)
            if native_videos:
                video_tokens = [t * h * w // 4 for _, (t, h, w), _ in native_videos]
            else:
                video_tokens = [self.video_tokens(n) for n in frames] if self.video_tokens else []
            encoded = encode(
                turns,
                self.tokenizer,
                self.cfg.template,
                [tokens_of(s) for s in sizes],
                video_tokens=video_tokens,
                video_timestamps=self.video_timestamps(clips),
            )
        except ImageCountError as err:
            return skipped("image_token_mismatch", key, str(err))
        except ConversationError as err:
            return skipped("bad_conversation", key, str(err))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return skipped("missing_field", key, f"no usable '{self.cfg.text_key}' field ({err})")
        pixels = torch.cat([tiles for tiles, _ in decoded]) if decoded else self.pixels(None)
        videos = torch.cat([clip.frames for clip in clips]) if clips else None
        encoded = replace(encoded, image_sizes=sizes, videos=videos, video_frames=frames)
        if isinstance(self.transform, NativeResolutionTransform):  # grids, not sizes, go to the model
            encoded = replace(encoded, image_sizes=[], image_grids=[self.transform.grid_of(s) for s in sizes])
        if native_videos:
            patches, grids, seconds = zip(*native_videos)
            encoded = replace(
                encoded,
                videos=torch.cat(patches),
                video_frames=[],
                video_grids=list(grids),
                video_seconds=list(seconds),
            )
        return self.fitted(key, pixels, encoded, len(sizes), len(clips))

    def read_media(
        self, raw: dict, key: str, tokens_of: Callable[[tuple[int, int]], int]
    ) -> tuple[list[tuple[torch.Tensor, tuple[int, int]]], list[Clip]] | SkippedSample:
        """The sample's images (tiles, size) and video clips, at the sizes and frame counts that fit
        data.max_visual_tokens."""
        blobs, video = self.image_members(raw), self.video_of(raw)
        try:
            sizes = [self.size_of(blob) for blob in blobs]
            frames = [min(self.video_reader.frame_count(video), self.cfg.max_frames)] if video else []
            video_cost = self.native_video_cost(video) if video is not None and self.native else None
            fitting = self.within_budget(sizes, frames, tokens_of, video_cost)
            if fitting is None:
                count = self.visual_count(sizes, frames, tokens_of, video_cost)
                return skipped("visual_budget", key, self.over_budget(count))
            decoded = [self.decode(blob, size) for blob, size in zip(blobs, fitting[0])]
            clips = [self.video_reader.read(video, count) for count in fitting[1]] if video else []
        except VideoError as err:
            return skipped("bad_video", key, f"video: {err}")
        except DecodeTimeout as err:
            return skipped("decode_timeout", key, str(err))
        except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            return skipped("bad_image", key, f"image does not decode ({err})")
        return decoded, clips

    def visual_count(self, sizes: list[tuple[int, int]], frames: list[int], tokens_of, video_cost=None) -> int:
        """The visual tokens data.max_visual_tokens counts for these images and videos (`video_cost`:
        a native-resolution video's tokens per frame count, its frame size being its own)."""
        image_tokens, video_tokens = self.visual_cost or (tokens_of, video_cost or self.video_tokens)
        return sum(map(image_tokens, sizes)) + sum(map(video_tokens or (lambda count: 0), frames))

    def native_video_cost(self, video: VideoSource) -> Callable[[int], int]:
        """A native-resolution video's tokens as a function of its frames (its frame size from the header)."""
        transform = self.transform
        assert isinstance(transform, NativeResolutionTransform)
        size = self.video_reader.frame_size(video)
        return lambda frames: transform.video_tokens(frames, size)

    def video_timestamps(self, clips: list[Clip]) -> list[list[float]]:
        """Qwen3-VL: each clip's temporal patches' times (its prompt writes them); others: none."""
        transform = self.transform
        if not isinstance(transform, NativeResolutionTransform) or not transform.timestamps:
            return []
        return [transform.patch_times(clip.times) for clip in clips]

    def native_video(self, clip: Clip) -> tuple[torch.Tensor, tuple[int, int, int], float]:
        """A decoded clip as a native-resolution tower takes it: patches, grid, seconds per grid step."""
        transform = self.transform
        assert isinstance(transform, NativeResolutionTransform)
        return transform.video(clip.frames, clip.times)

    def within_budget(
        self,
        sizes: list[tuple[int, int]],
        frames: list[int],
        tokens_of: Callable[[tuple[int, int]], int],
        video_cost: Callable[[int], int] | None = None,
    ) -> tuple[list[tuple[int, int]], list[int]] | None:
        """The image sizes and video frame counts to read the sample at: as they are when their visual
        tokens fit data.max_visual_tokens; else (over_visual_budget=downscale) the videos' frames cut,
        by 10% steps down to one, then the images all shrunk by the largest factor in steps of 10%
        that fits; None when dropped or when nothing fits."""
        budget = self.cfg.max_visual_tokens
        if budget is None or self.visual_count(sizes, frames, tokens_of, video_cost) <= budget:
            return sizes, frames
        if self.cfg.over_visual_budget == "drop":
            return None
        for fewer in fewer_frames(frames):
            if self.visual_count(sizes, fewer, tokens_of, video_cost) <= budget:
                return sizes, fewer
        single = [1] * len(frames)
        factor = 1.0
        while factor > 0.01:
            factor *= 0.9
            scaled = [(max(1, round(h * factor)), max(1, round(w * factor))) for h, w in sizes]
            if self.visual_count(scaled, single, tokens_of, video_cost) <= budget:
                return scaled, single
        return None

    def with_time_instruction(self, turns: list[dict], clips: list[Clip]) -> list[dict]:
        """data.video_timestamps: LLaVA-Video's time instruction after the `<video>` marker of the
        first turn that has one (`"<video>\\n{instruction}\\n{the rest}"`, as its training code builds it)."""
        if not (self.cfg.video_timestamps and len(clips) == 1):
            return turns
        index = next((i for i, turn in enumerate(turns) if VIDEO_TOKEN in turn["value"]), None)
        if index is None:
            return turns
        rest = turns[index]["value"].replace(VIDEO_TOKEN, "")
        value = f"{VIDEO_TOKEN}\n{time_instruction(clips[0])}\n{rest}"
        return [*turns[:index], {**turns[index], "value": value}, *turns[index + 1 :]]

    def over_budget(self, tokens: int) -> str:
        how = "dropped" if self.cfg.over_visual_budget == "drop" else "no downscale fits"
        return f"{tokens} visual tokens over data.max_visual_tokens={self.cfg.max_visual_tokens} ({how})"

    def fitted(self, key: str, pixels: torch.Tensor, encoded: Encoded, images: int, videos: int = 0):
        """The sample cut to data.max_length, or a skip when its markers and media disagree, its
        visual tokens are over data.max_visual_tokens, or it cannot be cut."""
        if encoded.num_images != images:
            return skipped("image_token_mismatch", key, f"{encoded.num_images} <image> markers for {images} images")
        if encoded.num_videos != videos:
            return skipped("image_token_mismatch", key, f"{encoded.num_videos} <video> markers for {videos} videos")
        visual = sum(encoded.input_ids.count(visual_id) for visual_id in self.visual_ids)
        if self.cfg.max_visual_tokens is not None and visual > self.cfg.max_visual_tokens:
            return skipped("visual_budget", key, self.over_budget(visual))
        fitted = truncate(self.with_positions(encoded), self.cfg.max_length, *self.visual_ids)
        if fitted is None:
            return skipped("too_long", key, f"longer than data.max_length={self.cfg.max_length} without cutting images")
        return key, pixels, fitted

    def with_positions(self, encoded: Encoded) -> Encoded:
        """Native resolution: the sample's M-RoPE positions [3, L], computed here, once per sample."""
        if not isinstance(self.transform, NativeResolutionTransform):
            return encoded
        from vlm_train.models.qwen_vl import mrope_positions, per_frame_grids

        grids = torch.tensor(encoded.image_grids, dtype=torch.long).view(-1, 3)
        video_grids = torch.tensor(encoded.video_grids, dtype=torch.long).view(-1, 3)
        per_second = self.transform.tokens_per_second  # Qwen2.5-VL: a video's time steps in positions
        steps = [per_second * seconds for seconds in encoded.video_seconds] if per_second else None
        if self.transform.timestamps:  # Qwen3-VL: each temporal patch placed as an image of its own
            video_grids = per_frame_grids(video_grids)
        ids = torch.tensor(encoded.input_ids)[None]
        media = (self.image_token_id, self.video_token_id)
        positions = mrope_positions(ids, None, media, (grids, video_grids), self.transform.merge_size, steps)
        return replace(encoded, positions=positions[:, 0])

    def conversation(self, raw: dict) -> list[dict]:
        if self.cfg.text_key == "json" and "json" in raw:
            record = json.loads(raw["json"])
            if "conversations" not in record and "texts" in record:
                return document_turns(record["texts"])
            return record["conversations"]
        if self.cfg.text_key in raw:  # a caption: image-caption corpora (LAION/CC style)
            return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": raw[self.cfg.text_key].decode()}]
        raise KeyError(f"no '{self.cfg.text_key}' field")

    def image_members(self, raw: dict) -> list[bytes]:
        """The sample's images in order: `<key>.<ext>` (one image), or `<key>.<n>.<ext>` with n = 0, 1, ...
        (several: interleaved documents, multi-image conversations)."""
        numbered = []
        for name, value in raw.items():
            index, _, ext = name.partition(".")
            if index.isdigit() and ext in self.image_keys:
                numbered.append((int(index), value))
        if numbered:
            return [value for _, value in sorted(numbered)]
        return [raw[k] for k in self.image_keys if k in raw][:1]

    def video_of(self, raw: dict) -> VideoSource | None:
        """The sample's video: a file (`<key>.mp4`, ... data.video_key), or a frame sequence
        (`<key>.frame.<n>.<image ext>`, at the record's "fps"); None without one."""
        file = next((raw[k] for k in self.video_keys if k in raw), None)
        if file is not None:
            return VideoSource(file=file)
        frames = []
        for name, value in raw.items():
            index, _, ext = name.removeprefix(FRAME_PREFIX).partition(".")
            if name.startswith(FRAME_PREFIX) and index.isdigit() and ext in self.image_keys:
                frames.append((int(index), value))
        if not frames:
            return None
        return VideoSource(frames=[value for _, value in sorted(frames)], fps=frame_rate(raw))

    def images(self, blobs: list[bytes]) -> torch.Tensor:
        """Pixels [I, 3, S, S] of the sample's images (I = 0 for a text-only sample)."""
        if len(blobs) == 1:
            return self.pixels(blobs[0])  # a cat of one would copy it once more
        return torch.cat([self.pixels(blob) for blob in blobs]) if blobs else self.pixels(None)

    def pixels(self, image_bytes: bytes | None) -> torch.Tensor:
        """[1, 3, S, S] (AnyRes: [tiles, 3, S, S]; native resolution: patches [N, K]); none without an image."""
        if image_bytes is None:
            return empty_pixels(self.transform)
        return self.decode(image_bytes)[0]

    def decode(self, image_bytes: bytes, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image's tower inputs [1 or tiles, 3, S, S] and its (height, width), resized (bicubic)
        to `size` first when given and different (a downscale to the visual-token budget)."""
        with Image.open(io.BytesIO(image_bytes)) as opened:
            image = opened
            if size is not None and size != (image.height, image.width):
                image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
            pixels = self.transform(image)
            return (pixels if pixels.dim() != 3 else pixels.unsqueeze(0)), (image.height, image.width)

    @staticmethod
    def size_of(image_bytes: bytes) -> tuple[int, int]:
        """(height, width) from the image's header, without decoding its pixels."""
        with Image.open(io.BytesIO(image_bytes)) as image:
            return image.height, image.width


def fewer_frames(frames: list[int]) -> list[list[int]]:
    """The frame counts cut by 10% steps (at least one frame each), largest first."""
    cuts: list[list[int]] = []
    factor = 1.0
    while any(count > 1 for count in frames) and factor > 0.01:
        factor *= 0.9
        fewer = [max(1, int(count * factor)) for count in frames]
        if not cuts or fewer != cuts[-1]:
            cuts.append(fewer)
    return cuts


def frame_rate(raw: dict) -> float:
    """A frame sequence's frames per second: the record's "fps" (LLaVA-Video's folders: 1)."""
    try:
        fps = float(json.loads(raw.get("json") or b"{}").get("fps", DEFAULT_FPS))
    except (ValueError, TypeError, AttributeError):
        return DEFAULT_FPS
    return fps if fps > 0 else DEFAULT_FPS


def document_turns(texts: list[str | None]) -> list[dict]:
    """An interleaved document (MMC4/OBELICS style: `texts[i]` is None where the i-th item is an
    image) as turns: each image a human turn `<image>` (no labels), each text an answer turn. With
    data.template=plain this is the document itself: image tokens, then text, labels on the text."""
    return [{"from": "human", "value": "<image>"} if t is None else {"from": "gpt", "value": t} for t in texts]


def collate(samples: list[tuple[str, torch.Tensor, Encoded]], pad_id: int, cat=torch.cat, video_cat=torch.cat) -> dict:
    """Right-padded batch: pixel_values [I,3,S,S] (concatenated by `cat`), input_ids/attention_mask/labels
    [B,T], keys; AnyRes image_sizes, and videos (`video_cat`): see templates.image_sizes_of. A
    preference pair is two rows, chosen then rejected, each with the pair's media."""
    samples = [row for sample in samples for row in pair_rows(sample)]
    length = max(len(enc.input_ids) for _, _, enc in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    ids, targets = input_ids.numpy(), labels.numpy()  # numpy reads a list of ints ~5x faster than torch.tensor
    for row, (_, _, enc) in enumerate(samples):
        n = len(enc.input_ids)
        ids[row, :n] = enc.input_ids
        targets[row, :n] = enc.labels
        attention_mask[row, :n] = 1
    return {
        "pixel_values": cat([pixels for _, pixels, _ in samples]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "keys": [key for key, _, _ in samples],
        **image_sizes_of([enc for _, _, enc in samples], video_cat),
        **position_ids_of([enc for _, _, enc in samples], [[row] for row in range(len(samples))], length),
    }


def pair_rows(sample: tuple[str, torch.Tensor, Encoded]) -> list[tuple[str, torch.Tensor, Encoded]]:
    """A sample as its rows: itself, or a preference pair's chosen and rejected rows."""
    key, pixels, encoded = sample
    if encoded.rejected is None:
        return [sample]
    return [(key, pixels, replace(encoded, rejected=None)), (key, pixels, encoded.rejected)]


def empty_pixels(transform) -> torch.Tensor:
    """A transform's output for no image: [0, 3, S, S], or native resolution's [0, K] patches."""
    if isinstance(transform, NativeResolutionTransform):
        return transform.empty()
    return torch.empty(0, 3, transform.size, transform.size, dtype=torch.uint8)


def placeholder(sample: tuple[str, torch.Tensor, Encoded] | None, pad_id: int, empty: torch.Tensor) -> tuple:
    """Stands in for a skipped sample so every rank still runs full batches (unequal batch counts
    hang the collectives): a copy of a good sample whose labels are all masked, so it adds nothing
    to the loss or the token count; a one-token text when the stream has no good sample yet."""
    if sample is None:
        return "skipped:", empty, Encoded([pad_id], [IGNORE_INDEX], 0)
    key, pixels, enc = sample
    rejected = enc.rejected and replace(enc.rejected, labels=[IGNORE_INDEX] * len(enc.rejected.labels))
    return f"skipped:{key}", pixels, replace(enc, labels=[IGNORE_INDEX] * len(enc.labels), rejected=rejected)
