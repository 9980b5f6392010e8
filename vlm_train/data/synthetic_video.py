"""Synthetic clips: one coloured shape moving up, down, left or right; the question asks which way.

The video twin of `synthetic.py` (same colours, shapes, 10-13 px objects, 48 px canvas): an answer
that needs more than one frame. Each clip has FRAMES frames at FPS; the object moves STEP px a
frame in a straight line, TRAVEL = 14 px from the first frame to the last, and the whole path stays
on the canvas. Where the path lies is uniform over every place it fits, so one
frame says little: the best guess of the direction from the object's box in one frame alone is
right for 0.40 of the clips in the first or the last frame and 0.36 in the middle one (chance 0.25;
`single_frame_accuracies` estimates it by simulating the generator; exact: 0.399 and 0.358). That
is near the floor a 48 px canvas allows: a first frame within TRAVEL px of the far edge rules that
direction out, so the guess is right for (room + 1) / (4 * (room + 1 - TRAVEL)) of the clips, room =
canvas - size -- 0.57 with 21 px of travel, 0.46 with 17, 0.40 with the 14 px (2 px a frame) chosen,
which stays well visible between the first and the last frame.

The canvas is light and tinted by place: red grows from left to right, blue from top to bottom
(`background`). A frame shows where the object is, not where it goes, so the bound above holds (it
assumes the object's box known exactly); the tint tells a reader where each patch is. A random
tower's patch features say what a patch holds (its colours) but hardly where it is, and the toy
decoder did not learn to find the place from token order: on a plain grey canvas the toy model
stayed at chance (docs/video.md, "The toy").

Written as WebDataset shards plus a `manifest.json` of sample counts, like `synthetic.py`. A
sample is `<key>.mp4` (libx264, yuv420p) or `<key>.webm` (VP9, yuv420p) with `<key>.json`, the
LLaVA-style record ("<video>\\n" + question, "kind": "direction"); `--encoding frames` stores the
clip as `<key>.frame.0.png` ... `<key>.frame.7.png` instead. Every record carries its "fps".

    python -m vlm_train.data.synthetic_video --out data/toy-video --train 4000 --eval 200 --encoding mp4

Same seed, same bytes: encoders run on one thread and tar members carry mtime 0.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_train.data.synthetic import CELL, COLORS, SHAPES, VOCABULARY, _draw_shape

FRAMES = 8
FPS = 4  # FRAMES / FPS = a 2 s clip
CANVAS = 3 * CELL  # px a side, as the square image scenes
STEP = 2  # px the object moves from one frame to the next
TRAVEL = STEP * (FRAMES - 1)
# The background's red (left to right) and blue (top to bottom) ramps, and its constant green.
TINT_LOW, TINT_HIGH, TINT_GREEN = 190, 250, 220
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}  # (dx, dy), y downwards
CHANCE = {"direction": 1 / len(DIRECTIONS)}
QUESTION = "which way does the {color} {shape} move ?"
# Words of the questions and answers that the image toy's vocabulary lacks (the toy tokenizer adds them).
VIDEO_VOCABULARY = sorted((set(QUESTION.split()) | set(DIRECTIONS)) - set(VOCABULARY) - {"{color}", "{shape}"})
ENCODINGS = ("mp4", "webm", "frames")
# Per container: encoder and its options. Encoders run on one thread: threads cannot help a 48 px
# frame, and x264's bytes may depend on its thread count (at 48 px they did not: 1, 2, 4 and auto).
# veryfast: x264 spends most of a 48 px clip setting up, and veryfast sets up in half ultrafast's time
# (~3 vs ~6 ms a clip). bf 0: no B-frames, packets in display order. crf 18: colours survive (tests).
VIDEO_CODECS = {
    "mp4": ("libx264", {"preset": "veryfast", "bf": "0", "crf": "18"}),
    "webm": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}),
}


def make_clip_scene(rng: random.Random) -> dict:
    """Colour, shape, size, direction and first-frame top-left corner ("start") of one moving object,
    its path uniform over every place on the canvas it fits."""
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    size = rng.randint(10, 13)
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    room = CANVAS - size  # largest top-left coordinate
    low_end = rng.randint(0, room - TRAVEL)  # the path's smaller coordinate along its axis
    start_along = low_end if dx + dy > 0 else low_end + TRAVEL
    across = rng.randint(0, room)
    start = [start_along, across] if dx else [across, start_along]
    return {"color": color, "shape": shape, "size": size, "direction": direction, "start": start}


def positions(scene: dict) -> list[tuple[int, int]]:
    """The object's top-left corner in each frame."""
    dx, dy = DIRECTIONS[scene["direction"]]
    x, y = scene["start"]
    return [(x + dx * STEP * k, y + dy * STEP * k) for k in range(FRAMES)]


def background() -> Image.Image:
    """The canvas every clip is drawn on: light, redder to the right and bluer downwards, so that
    each place on it has a colour of its own (see the module docstring)."""
    image = Image.new("RGB", (CANVAS, CANVAS))
    ramp = [TINT_LOW + (TINT_HIGH - TINT_LOW) * k // (CANVAS - 1) for k in range(CANVAS)]
    image.putdata([(ramp[x], TINT_GREEN, ramp[y]) for y in range(CANVAS) for x in range(CANVAS)])
    return image


def render_clip(scene: dict) -> list[Image.Image]:
    """FRAMES RGB frames of `scene` on the tinted background."""
    canvas = background()
    frames = []
    for x0, y0 in positions(scene):
        image = canvas.copy()
        _draw_shape(ImageDraw.Draw(image), scene, x0, y0, scene["size"])
        frames.append(image)
    return frames


def encode_video(frames: Sequence[Image.Image], fps: int, container: str = "mp4") -> bytes:
    """`frames` as an mp4 (H.264) or webm (VP9) file in memory, yuv420p, one frame every 1/fps s."""
    import av  # lazy: only encoding needs it

    if container not in VIDEO_CODECS:
        raise ValueError(f"container {container!r} is not one of {', '.join(VIDEO_CODECS)}")
    codec, options = VIDEO_CODECS[container]
    buffer = io.BytesIO()
    # bitexact: no random segment id (webm) and no muxer version string: same frames, same bytes.
    with av.open(buffer, mode="w", format=container, options={"fflags": "+bitexact"}) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = dict(options)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image)
            frame.pts, frame.time_base = index, Fraction(1, fps)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))  # flush the encoder's delayed frames
    return buffer.getvalue()


def encode_frames(frames: Sequence[Image.Image]) -> dict[str, bytes]:
    """`frames` as the members `frame.0.png`, `frame.1.png`, ... of a frame-sequence sample.

    Unpadded, as the loader expects: a reader orders them by the number (TarWriter writes a
    sample's members sorted by name, so `frame.10.png` would come before `frame.2.png`)."""
    members = {}
    for index, image in enumerate(frames):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        members[f"frame.{index}.png"] = buffer.getvalue()
    return members


def question(scene: dict) -> tuple[str, str]:
    """The (question, answer) pair of a clip."""
    return QUESTION.format(color=scene["color"], shape=scene["shape"]), scene["direction"]


def make_sample(rng: random.Random, encoding: str = "mp4") -> tuple[dict[str, bytes], dict]:
    """The clip's shard members (`mp4`, `webm`, or `frame.<n>.png`) and its LLaVA-style record."""
    scene = make_clip_scene(rng)
    q, a = question(scene)
    conversations = [{"from": "human", "value": f"<video>\n{q}", "kind": "direction"}, {"from": "gpt", "value": a}]
    frames = render_clip(scene)
    members = encode_frames(frames) if encoding == "frames" else {encoding: encode_video(frames, FPS, encoding)}
    return members, {"conversations": conversations, "scene": scene, "fps": FPS}


def write_split(out: Path, split: str, count: int, shard_size: int, seed: int, encoding: str) -> dict[str, int]:
    """Write `count` clips as `<split>-NNNNNN.tar` shards; returns {shard name: samples}."""
    import webdataset as wds  # lazy: it imports torch (seconds); the rest of this module does not

    rng = random.Random(f"{seed}-{split}")
    counts: dict[str, int] = {}
    for shard_index, start in enumerate(range(0, count, shard_size)):
        name = f"{split}-{shard_index:06d}.tar"
        n = min(shard_size, count - start)
        with wds.TarWriter(str(out / name), mtime=0) as sink:  # mtime 0: same seed, same bytes
            for i in range(start, start + n):
                members, record = make_sample(rng, encoding)
                sink.write({"__key__": f"{split}-{i:08d}", **members, "json": json.dumps(record).encode()})
        counts[name] = n
    return counts


def generate(out: str | Path, train: int, eval: int, shards: int = 10, seed: int = 0, encoding: str = "mp4") -> Path:
    """Write the train split in `shards` shards and the held-out split in one, plus a manifest."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = write_split(out, "train", train, max(-(-train // shards), 1), seed, encoding)
    counts |= write_split(out, "eval", eval, max(eval, 1), seed, encoding)
    manifest = {"shards": counts, "total": sum(counts.values())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


BoxCounts = dict[tuple[int, int, int], Counter[str]]  # the object's (x, y, size) -> its clips per direction


def single_frame_accuracies(
    frames: Sequence[int] = (0, FRAMES // 2, FRAMES - 1), samples: int = 100_000, seed: int = 0
) -> dict[int, float]:
    """For each frame index: how often the best guess of the direction from the object's box (x, y,
    size) in that frame alone is right, over `samples` clips drawn by `make_clip_scene`.

    The guess is the Bayes classifier with the posterior counted on half the clips, scored on the
    other half, and the other way round. Scored on the clips it was counted on, it would be far too
    optimistic (0.47 instead of 0.40 at 200 000 clips: ~9 clips per box and direction, and where
    directions tie it would pick each box's luckiest); held out, it matches the closed form of the
    module docstring to 0.003.
    """
    rng = random.Random(seed)
    halves: list[dict[int, BoxCounts]] = [{frame: defaultdict(Counter) for frame in frames} for _ in range(2)]
    for index in range(samples):
        scene = make_clip_scene(rng)
        path = positions(scene)
        for frame in frames:
            x, y = path[frame]
            halves[index % 2][frame][(x, y, scene["size"])][scene["direction"]] += 1
    accuracies = {}
    for frame in frames:
        first, second = halves[0][frame], halves[1][frame]
        accuracies[frame] = (_held_out_right(first, second) + _held_out_right(second, first)) / samples
    return accuracies


def _held_out_right(fitted: BoxCounts, scored: BoxCounts) -> float:
    """Clips of `scored` whose direction is the most frequent one of their box in `fitted`; a box
    `fitted` never saw is guessed at random (right for a quarter of its clips, in expectation)."""
    right = 0.0
    for box, directions in scored.items():
        if box in fitted:
            right += directions[max(sorted(fitted[box]), key=fitted[box].__getitem__)]
        else:
            right += sum(directions.values()) / len(DIRECTIONS)
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoding", choices=ENCODINGS, default="mp4", help="a video file per clip, or its frames")
    args = parser.parse_args()
    out = generate(args.out, args.train, args.eval, args.shards, args.seed, args.encoding)
    print(f"wrote {args.train} train and {args.eval} held-out clips ({args.encoding}) to {out}")


if __name__ == "__main__":
    main()
