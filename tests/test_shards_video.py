"""`vlm-shards llava` with LLaVA-Video-178K-style records: video files and frame folders become the
shard members the loader reads (`<key>.mp4`, `<key>.frame.<n>.png`), `<image>` markers `<video>`,
and missing, corrupt, truncated or empty videos counted skips."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
from PIL import Image

from tests.shard_helpers import TEXT_ONLY, convert, image_records, read_shards

VIDEO_TURNS = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "It gets brighter."}]


def encode_video(target: str | io.BytesIO, frames: int, container: str = "mp4", codec: str = "libx264", **options):
    """`frames` 32x32 frames, each a lighter gray, encoded with PyAV to a file or a buffer."""
    with av.open(target, "w", format=container, options=options) as output:
        stream = output.add_stream(codec, rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        output.start_encoding()  # writes the header even when no frame follows
        for i in range(frames):
            output.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 32), (30 * i,) * 3))))
        output.mux(stream.encode())


def tiny_video(frames: int = 8, container: str = "mp4", codec: str = "libx264") -> bytes:
    buffer = io.BytesIO()
    encode_video(buffer, frames, container, codec)
    return buffer.getvalue()


def frame_folder(folder: Path, count: int) -> list[bytes]:
    """PNG frames written last name first (only sorting by name puts them in order); their bytes in name order."""
    frames = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    folder.mkdir(parents=True)
    for i in reversed(range(count)):
        (folder / f"{i:03d}.png").write_bytes(frames[i])
    return frames


def video_record(record_id: str, video: str, turns: list[dict] = VIDEO_TURNS, **fields) -> dict:
    """A LLaVA-Video-178K record: the video marked `<image>` in the text."""
    return {"id": record_id, "conversations": turns, "data_source": "test", "video": video, **fields}


def tar_members(out: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Every sample's members (name without the key, bytes) by key; WebDataset's TarWriter writes a
    sample's members in sorted name order (frame.10 before frame.2, json after frame.*)."""
    samples: dict[str, list[tuple[str, bytes]]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, []).append((suffix, tar.extractfile(member).read()))
    return samples


def test_llava_video_records_beside_image_records(tmp_path, capsys):
    """LLaVA-Video records (a file, or a folder of frames) convert with `<video>` in the text, next
    to image and text-only records; unusable videos are counted skips."""
    images, videos = tmp_path / "images", tmp_path / "videos"
    pictures = image_records(images, 2)
    (videos / "clips").mkdir(parents=True)
    clip, mkv = tiny_video(), tiny_video(container="matroska")
    (videos / "clips" / "a.mp4").write_bytes(clip)
    (videos / "clips" / "b.MKV").write_bytes(mkv)  # member extension: the suffix, lowercased
    frames = frame_folder(videos / "frames" / "c", 5)
    (videos / "clips" / "cut.mp4").write_bytes(clip[: len(clip) // 2])  # its index (moov) is lost
    encode_video(str(videos / "clips" / "fast.mp4"), 48, movflags="faststart")  # index first: it opens
    (videos / "clips" / "fast.mp4").write_bytes((videos / "clips" / "fast.mp4").read_bytes()[:2300])
    (videos / "clips" / "empty.avi").write_bytes(tiny_video(0, "avi", "mpeg4"))
    no_marker = [{"from": "human", "value": "What happens?"}, VIDEO_TURNS[1]]
    good = [
        pictures[0],
        video_record("v-mp4", "clips/a.mp4"),
        video_record("v-frames", "frames/c", fps=2),
        {"id": "text", "conversations": TEXT_ONLY},
        video_record("v-mkv", "clips/b.MKV", no_marker),
        pictures[1],
        video_record("v-frames-1fps", "frames/c"),
    ]
    bad = [
        ("missing_video", video_record("b1", "clips/nowhere.mp4"), "not a readable file"),
        ("undecodable_video", video_record("b2", "clips/cut.mp4"), "InvalidDataError"),
        ("undecodable_video", video_record("b3", "clips/fast.mp4"), "truncated"),
        ("undecodable_video", video_record("b4", "clips/empty.avi"), "has no frames"),
        ("image_and_video", {**video_record("b5", "clips/a.mp4"), "image": pictures[0]["image"]}, "both"),
        (
            "marker_mismatch",
            video_record("b6", "clips/a.mp4", [{"from": "human", "value": "<image><image>"}, TEXT_ONLY[1]]),
            "2 markers",
        ),
        (
            "marker_mismatch",
            {**pictures[0], "conversations": [{"from": "human", "value": "<image><video>"}, TEXT_ONLY[1]]},
            "1 <video>",
        ),
    ]
    (tmp_path / "data.json").write_text(json.dumps(good[:4] + [record for _, record, _ in bad] + good[4:]))
    assert convert(tmp_path / "data.json", images, tmp_path / "out", "--videos", str(videos)) == 0

    out = tmp_path / "out"
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["reason"], s["id"]) for s in skipped] == [(reason, record["id"]) for reason, record, _ in bad]
    for skip, (_, _, detail) in zip(skipped, bad):
        assert detail in skip["detail"], skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["total"], manifest["text_only"], manifest["image_extensions"]) == (7, 1, {"png": 2})
    assert manifest["videos"] == {"frames": 2, "mkv": 1, "mp4": 1}
    assert manifest["skipped"] == {
        "image_and_video": 1,
        "marker_mismatch": 2,
        "missing_video": 1,
        "undecodable_video": 3,
    }

    members = tar_members(out)
    records = {key: json.loads(dict(sample)["json"]) for key, sample in members.items()}
    by_id = {record["id"]: (key, record) for key, record in records.items()}
    assert [r["id"] for r in records.values()] == [r["id"] for r in good]  # input order
    for record in good:  # image and text-only records as before
        if "video" not in record:
            assert by_id[record["id"]][1] == record
    frame_members = [(f"frame.{i}.png", frame) for i, frame in enumerate(frames)]
    for record_id, media, first_turn in [
        ("v-mp4", [("mp4", clip)], "<video>\nWhat happens?"),
        ("v-frames", frame_members, "<video>\nWhat happens?"),
        ("v-mkv", [("mkv", mkv)], "<video>\nWhat happens?"),  # no marker: one put first
        ("v-frames-1fps", frame_members, "<video>\nWhat happens?"),
    ]:
        key, written = by_id[record_id]
        assert dict(members[key]) == {"json": dict(members[key])["json"], **dict(media)}, record_id
        source = next(r for r in good if r["id"] == record_id)
        assert written == {**source, "conversations": [{"from": "human", "value": first_turn}, VIDEO_TURNS[1]]}
    assert by_id["v-frames"][1]["fps"] == 2 and "fps" not in by_id["v-frames-1fps"][1]

    from vlm_train.data.video import FRAME_PREFIX  # the loader's side of the contract

    assert frame_members[0][0].startswith(FRAME_PREFIX)
    webdataset_view = {s["__key__"]: s for s in read_shards(out)}  # WebDataset groups frames by key too
    assert webdataset_view[by_id["v-frames"][0]]["frame.4.png"] == frames[4]


def test_videos_under_the_images_folder_their_extensions_and_bad_fields(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "clips").mkdir(parents=True)
    (images / "clips" / "a.webm").write_bytes(tiny_video(container="webm", codec="libvpx-vp9"))
    (images / "clips" / "noext").write_bytes(tiny_video())  # named after its container
    (images / "clips" / "c.flv").write_bytes(tiny_video(container="flv", codec="flv"))
    frame_folder(images / "bmp", 2)
    Image.new("RGB", (8, 8)).save(images / "bmp" / "002.bmp")  # the loader reads it under data.image_key only
    frame_folder(images / "broken", 2)
    (images / "broken" / "001.png").write_bytes(b"not a png")
    (images / "empty").mkdir()
    marker_last = [{"from": "human", "value": "What happens? <image>"}, VIDEO_TURNS[1]]
    records = [
        video_record("webm", "clips/a.webm", marker_last),
        video_record("noext", "clips/noext"),
        video_record("bmp", "bmp"),
        video_record("flv", "clips/c.flv"),
        video_record("broken", "broken"),
        video_record("empty", "empty"),
        video_record("fps", "bmp", fps=0),
        video_record("list", ["clips/a.webm"]),
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    assert convert(tmp_path / "d.json", images, tmp_path / "o") == 0  # no --videos: paths under --images
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    assert reasons == ["unsupported_video_format", *["undecodable_video"] * 2, *["bad_video_field"] * 2]
    webm, noext, bmp = read_shards(tmp_path / "o")
    assert webm["webm"] == (images / "clips" / "a.webm").read_bytes()
    assert json.loads(webm["json"])["conversations"][0]["value"] == "What happens? <video>"  # where it was
    assert noext["mp4"] == (images / "clips" / "noext").read_bytes()
    assert [k for k in bmp if k.startswith("frame.")] == ["frame.0.png", "frame.1.png", "frame.2.bmp"]
    assert "'data.image_key=bmp;jpeg;jpg;png;webp'" in capsys.readouterr().out


def test_max_size_counts_video_members(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    records = []
    for i in range(3):
        (videos / f"{i}.mp4").write_bytes(tiny_video())
        frame_folder(videos / f"frames{i}", 5)
        records += [video_record(f"v{i}", f"{i}.mp4"), video_record(f"f{i}", f"frames{i}")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    assert convert(tmp_path / "d.json", tmp_path, out, "--videos", str(videos), "--max-size", "10K") == 0
    counts = json.loads((out / "manifest.json").read_text())["shards"]
    assert sum(counts.values()) == 6 and len(counts) >= 3
    for name, count in counts.items():
        assert (out / name).stat().st_size <= 10 * 1024 or count == 1, (name, count)
