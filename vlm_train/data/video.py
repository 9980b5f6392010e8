"""Video samples: decoding with PyAV, uniform frame sampling up to data.max_frames, a decode deadline.

A sample's video is a file (`<key>.mp4`, or another of data.video_key) or a frame sequence
(`<key>.frame.<n>.<ext>`, n = 0, 1, ..., at the record's "fps", 1 when it gives none), as
`vlm-shards llava` writes LLaVA-Video records. Frames are sampled as LLaVA-Video samples them
(`frames_upbound`): all of them up to data.max_frames, else data.max_frames spread evenly
(`np.linspace(0, total - 1, n, dtype=int)`), each resized to the tower's size as LLaVA-OneVision's
video processor does. A video that does not decode, stops short of a sampled frame (truncated) or
has no frames raises `VideoError`; one whose decode runs past data.decode_timeout_s raises
`DecodeTimeout` (the deadline is checked between frames): the pipeline counts either as a skip.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

FRAME_PREFIX = "frame."
DEFAULT_FPS = 1.0  # a frame sequence without "fps": one frame a second, as LLaVA-Video's frame folders


class VideoError(ValueError):
    """A video that cannot be used: it does not decode, is truncated, or has no frames."""


class DecodeTimeout(Exception):
    """Decoding ran past data.decode_timeout_s."""


@dataclass
class Clip:
    """A sampled video: `frames` [F, 3, S, S] uint8, the time of each in seconds, its whole duration."""

    frames: torch.Tensor
    times: list[float]
    duration: float


@dataclass
class VideoSource:
    """A sample's undecoded video: a file's bytes, or the bytes of its frames in order."""

    file: bytes | None = None
    frames: list[bytes] | None = None
    fps: float = DEFAULT_FPS
    total: int | None = None  # its frames, once counted


def sample_indices(total: int, max_frames: int) -> list[int]:
    """The frames LLaVA-Video reads of a `total`-frame video: all, or `max_frames` evenly spread."""
    if total <= max_frames:
        return list(range(total))
    return np.linspace(0, total - 1, max_frames, dtype=int).tolist()


def time_instruction(clip: Clip) -> str:
    """LLaVA-Video's `add_time_instruction` text (its wording, spacing included)."""
    located = ",".join(f"{t:.2f}s" for t in clip.times)
    return (
        f"The video lasts for {clip.duration:.2f} seconds, and {len(clip.times)} frames are uniformly sampled "
        f"from it. These frames are located at {located}.Please answer the following questions related to this video."
    )


class VideoReader:
    """Counts and decodes a sample's video: frames resized to `size` (the tower's; or a function of
    a frame's (height, width), a native-resolution tower's), at most `frames` of them, within
    `timeout_s` seconds per video."""

    def __init__(self, size: int | Callable[[tuple[int, int]], tuple[int, int]], timeout_s: float):
        self.size, self.timeout_s = size, timeout_s

    def frame_size(self, video: VideoSource) -> tuple[int, int]:
        """(height, width) of the video's frames, from the file's or the first frame's header."""
        if video.frames is not None:
            if not video.frames:
                raise VideoError("the video has no frames")
            try:
                with Image.open(io.BytesIO(video.frames[0])) as image:
                    return image.height, image.width
            except (OSError, SyntaxError, ValueError) as err:
                raise VideoError(f"frame 0 does not decode ({err})") from None
        with _opened(video.file or b"") as container:
            context = container.streams.video[0].codec_context
            return int(context.height), int(context.width)

    def frame_count(self, video: VideoSource) -> int:
        """Frames in the video (a file's from its header, or by reading its packets when the header
        has none, as WebM's): known before decoding, so token counts are too."""
        if video.total is None:
            if video.frames is not None:
                video.total = len(video.frames)
            else:
                video.total = self._file_frames(video.file or b"", time.monotonic() + self.timeout_s)
        if video.total == 0:
            raise VideoError("the video has no frames")
        return video.total

    def read(self, video: VideoSource, frames: int) -> Clip:
        """`frames` frames sampled evenly from the video, resized."""
        deadline = time.monotonic() + self.timeout_s
        total = self.frame_count(video)
        indices = sample_indices(total, frames)
        if video.frames is not None:
            pixels = [self._deadline_checked(self._image(video.frames[i]), deadline) for i in indices]
            fps = video.fps
        else:
            pixels, fps = self._decode_file(video.file or b"", indices, deadline)
        return Clip(torch.stack(pixels), [i / fps for i in indices], total / fps)

    def _file_frames(self, blob: bytes, deadline: float) -> int:
        with _opened(blob) as container:
            stream = container.streams.video[0]
            if stream.frames > 0:
                return int(stream.frames)
            count = 0
            for packet in container.demux(stream):
                count += packet.size > 0
                if time.monotonic() > deadline:
                    raise DecodeTimeout(f"counting frames took over {self.timeout_s} s")
            return count

    def _decode_file(self, blob: bytes, indices: list[int], deadline: float) -> tuple[list[torch.Tensor], float]:
        wanted, pixels = set(indices), []
        with _opened(blob) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    pixels.append(self._resized(frame.to_image()))
                if len(pixels) == len(indices):
                    break
                self._deadline_checked(None, deadline)
        if len(pixels) < len(indices):
            raise VideoError(f"truncated: frame {indices[len(pixels)]} of the {indices[-1] + 1} it declares is missing")
        return pixels, fps

    def _image(self, blob: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(blob)) as image:
            return self._resized(image.convert("RGB"))

    def _resized(self, image: Image.Image) -> torch.Tensor:
        height, width = self.size((image.height, image.width)) if callable(self.size) else (self.size, self.size)
        resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)

    def _deadline_checked(self, value, deadline: float):
        if time.monotonic() > deadline:
            raise DecodeTimeout(f"decoding took over {self.timeout_s} s (data.decode_timeout_s)")
        return value


@contextmanager
def _opened(blob: bytes) -> Iterator[Any]:
    """`av.open` on bytes, whose errors (FFmpeg's, or no video stream) are `VideoError`s."""
    import av  # lazy: only runs with video load FFmpeg

    try:
        container = av.open(io.BytesIO(blob))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoError(f"does not decode ({err})") from None
    try:
        if not container.streams.video:
            raise VideoError("no video stream")
        yield container
    except av.error.FFmpegError as err:
        raise VideoError(f"does not decode ({err})") from None
    finally:
        container.close()
