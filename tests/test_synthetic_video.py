"""The synthetic video toy: real PyAV encoding and decoding, real tar shards; the clips need more than
one frame, their words are in the toy vocabularies, and the same seed writes the same bytes."""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlm_train.data import synthetic_video as sv
from vlm_train.data.synthetic import COLORS, SHAPES, VOCABULARY

COLOR_TOLERANCE = 25  # levels per channel after yuv420p; the nearest other colour is 70+ away


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def decode(video: bytes) -> tuple[list[np.ndarray], float]:
    """The decoded RGB frames of a clip and its frame rate, as a data loader would see them."""
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24").astype(int) for frame in container.decode(stream)]
        return frames, float(stream.average_rate)


def color_at_center(frame: np.ndarray, corner: tuple[int, int], size: int) -> np.ndarray:
    x0, y0 = corner
    return frame[y0 + size // 2, x0 + size // 2]


def object_centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) mean of the pixels far from the background: every object colour is 100+ levels away
    from it in some channel."""
    ys, xs = np.nonzero(np.abs(frame - np.asarray(sv.background(), dtype=int)).max(axis=2) > 60)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("encoding", sv.ENCODINGS)
def test_same_seed_writes_the_same_bytes(tmp_path, monkeypatch, encoding):
    def shards(out: Path, seed: int) -> dict[str, bytes]:
        sv.generate(out, train=6, eval=2, shards=2, seed=seed, encoding=encoding)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = shards(tmp_path / "a", seed=3)
    clock = time.time
    monkeypatch.setattr(time, "time", lambda: clock() + 3600)  # an hour later: no wall-clock in the bytes
    assert first == shards(tmp_path / "b", seed=3)
    other = shards(tmp_path / "c", seed=4)
    assert first["train-000000.tar"] != other["train-000000.tar"]


def test_every_question_and_answer_word_is_in_the_toy_vocabularies():
    scenes = [{"color": c, "shape": s, "direction": d} for c in COLORS for s in SHAPES for d in sv.DIRECTIONS]
    used = {word for scene in scenes for text in sv.question(scene) for word in text.split()}
    assert used <= set(VOCABULARY) | set(sv.VIDEO_VOCABULARY), used - set(VOCABULARY) - set(sv.VIDEO_VOCABULARY)
    assert sv.VIDEO_VOCABULARY == sorted(used - set(VOCABULARY))  # only the new words, each used, sorted
    assert {"way", "does", "move", "up", "down"} <= set(sv.VIDEO_VOCABULARY)


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_decoded_clip_shows_the_object_moving_the_stated_way(container):
    """The record's answer is what the decoded video shows: every frame has the object's colour
    where the scene puts it, and it moves TRAVEL px the stated way from the first frame to the last."""
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        members, record = sv.make_sample(rng, container)
        scene, (ask, answer) = record["scene"], record["conversations"]
        assert ask["value"] == f"<video>\nwhich way does the {scene['color']} {scene['shape']} move ?"
        assert ask["kind"] == "direction" and answer["value"] == scene["direction"]
        frames, fps = decode(members[container])
        assert len(frames) == sv.FRAMES and fps == sv.FPS == record["fps"]
        for frame, corner in zip(frames, sv.positions(scene)):
            assert frame.shape == (sv.CANVAS, sv.CANVAS, 3)
            error = np.abs(color_at_center(frame, corner, scene["size"]) - COLORS[scene["color"]])
            assert error.max() <= COLOR_TOLERANCE, (scene, corner, error)
        moved = object_centroid(frames[-1]) - object_centroid(frames[0])
        np.testing.assert_allclose(moved, np.array(sv.DIRECTIONS[answer["value"]]) * sv.TRAVEL, atol=1.5)
        seen.add(answer["value"])
    assert seen == set(sv.DIRECTIONS)


def test_frame_sequence_writes_numbered_pngs_in_order_with_the_fps(tmp_path):
    sv.generate(tmp_path, train=2, eval=1, shards=1, seed=0, encoding="frames")
    members = tar_members(tmp_path / "train-000000.tar")
    expected = [
        f"train-{i:08d}.{name}" for i in range(2) for name in [*(f"frame.{k}.png" for k in range(sv.FRAMES)), "json"]
    ]
    assert [name for name, _ in members] == expected
    record = json.loads(members[sv.FRAMES][1])
    assert record["fps"] == sv.FPS
    scene = record["scene"]
    for (_, png), corner in zip(members[: sv.FRAMES], sv.positions(scene)):
        frame = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        assert tuple(color_at_center(frame, corner, scene["size"])) == COLORS[scene["color"]]


def test_manifest_counts_the_samples_of_each_shard(tmp_path):
    sv.generate(tmp_path, train=10, eval=3, shards=3, seed=0, encoding="mp4")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shards = {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2, "eval-000000.tar": 3}
    assert manifest == {"shards": shards, "total": 13}
    for name, count in shards.items():
        names = [member for member, _ in tar_members(tmp_path / name)]
        assert sum(n.endswith(".mp4") for n in names) == sum(n.endswith(".json") for n in names) == count


def test_cli_writes_webm_shards(tmp_path, monkeypatch):
    argv = ["synthetic_video", "--out", str(tmp_path), "--train", "2", "--eval", "1", "--encoding", "webm"]
    monkeypatch.setattr(sys, "argv", argv)
    sv.main()
    assert json.loads((tmp_path / "manifest.json").read_text())["total"] == 3
    names = [name for name, _ in tar_members(tmp_path / "eval-000000.tar")]
    assert names == ["eval-00000000.json", "eval-00000000.webm"]
    with pytest.raises(ValueError, match="mp4, webm, frames"):
        sv.generate(tmp_path, 1, 1, encoding="gif")


def test_every_clip_is_drawn_on_one_background_that_says_where_not_which_way():
    """The tint is the same in every frame of every clip (so it cannot tell the direction), and it
    differs from place to place: red grows to the right, blue downwards."""
    canvas = np.asarray(sv.background(), dtype=int)
    assert (canvas[:, 1:, 0] >= canvas[:, :-1, 0]).all() and (canvas[1:, :, 2] >= canvas[:-1, :, 2]).all()
    assert canvas[0, -1, 0] - canvas[0, 0, 0] == canvas[-1, 0, 2] - canvas[0, 0, 2] == sv.TINT_HIGH - sv.TINT_LOW
    assert (canvas[:, :, 1] == sv.TINT_GREEN).all()
    rng = random.Random(1)
    for _ in range(8):
        scene = sv.make_clip_scene(rng)
        for frame, (x0, y0) in zip(sv.render_clip(scene), sv.positions(scene)):
            off_object = np.ones(canvas.shape[:2], dtype=bool)
            off_object[y0 : y0 + scene["size"], x0 : x0 + scene["size"]] = False
            assert (np.asarray(frame, dtype=int)[off_object] == canvas[off_object]).all()


def test_one_frame_alone_says_little_about_the_direction():
    """The best single-frame guess stays under 0.45 (chance 0.25), matching the closed form of the
    module docstring in the first and last frame."""
    accuracies = sv.single_frame_accuracies(samples=60_000)
    closed_form = np.mean([(room + 1) / (4 * (room + 1 - sv.TRAVEL)) for room in sv.CANVAS - np.arange(10, 14)])
    for frame, accuracy in accuracies.items():
        assert 0.3 < accuracy <= 0.45, (frame, accuracy)
    assert abs(accuracies[0] - closed_form) < 0.015 and abs(accuracies[sv.FRAMES - 1] - closed_form) < 0.015


def test_single_frame_estimate_sees_a_path_that_gives_the_answer_away(monkeypatch):
    """The estimator is not blind: paths that always start at the canvas edge they leave from make
    the first frame alone enough."""
    fair = sv.make_clip_scene

    def from_the_edge(rng: random.Random) -> dict:
        scene = fair(rng)
        dx, dy = sv.DIRECTIONS[scene["direction"]]
        along = 0 if dx + dy > 0 else sv.TRAVEL
        scene["start"] = [along, scene["start"][1]] if dx else [scene["start"][0], along]
        return scene

    monkeypatch.setattr(sv, "make_clip_scene", from_the_edge)
    assert sv.single_frame_accuracies(frames=(0,), samples=20_000)[0] > 0.9
