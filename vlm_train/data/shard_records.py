"""Input records for `vlm-shards`: LLaVA JSON/JSONL (images, or videos as LLaVA-Video-178K has them)
and image-caption CSV/JSONL, read and checked.

Reading fails loudly (a missing file, malformed JSON with its line, no records); a record that
cannot become a training sample is only skipped, with a reason code and a one-line detail, so a
bad record among millions costs that record and not the conversion.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlm_train.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from vlm_train.errors import DataError

ROLES = ("human", "gpt")  # what the templates know; anything else would be trained on as an answer
# File suffixes kept as the sample's image extension; others are named after the decoded format.
IMAGE_SUFFIXES = {"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"}
FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
# The video members the loader reads (data.video_key's default); other files are named after their container.
VIDEO_SUFFIXES = {"mp4", "webm", "mkv", "mov", "avi"}
CONTAINER_SUFFIX = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "mkv", "avi": "avi"}
FRAME_PREFIX = "frame."  # vlm_train.data.video's, not imported: that module imports torch, vlm-shards does not


@dataclass(frozen=True)
class Record:
    """One input record: where it came from (for reports) and the LLaVA-style object to write."""

    index: int  # position among all records of the input, 0-based
    where: str  # "line 12", "record 11", "row 12": how a user finds it in the input file
    value: object  # the parsed record: a dict with conversations (and image, id, ...) when well formed


@dataclass(frozen=True)
class Media:
    """A file a sample carries: tar member `<key>.<suffix>` holding the bytes of `path`."""

    suffix: str  # "png", "mp4", "frame.0.jpg"
    path: str
    size: int  # bytes, as checked: the writer refuses a file that changed since


@dataclass(frozen=True)
class Checked:
    """A record that passed every check, ready to be written as a sample."""

    index: int
    key: str  # WebDataset key: unique, in input order, no dots or slashes
    json_bytes: bytes
    kind: str = "text"  # "text", "image", "video" (a file) or "frames" (a folder of them)
    media: tuple[Media, ...] = ()


@dataclass(frozen=True)
class RejectedRecord:
    """A converter input record left out of the shards (one line of skipped.jsonl); not to be
    confused with reader.SkippedSample, a training sample replaced by a placeholder at run time."""

    index: int
    where: str
    id: str | None
    reason: str  # a short code: missing_image, undecodable_image, bad_role, ...
    detail: str


class RecordProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _input_file(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from None


def _json_lines(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})") from None
        records.append(Record(len(records), f"line {number}", value))
    return records


def read_llava(path: Path) -> list[Record]:
    """Records of a LLaVA JSON array (`.json`) or of a JSON-lines file (`.jsonl`, one per line)."""
    text = _input_file(path)
    if path.suffix == ".jsonl":
        records = _json_lines(path, text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(values, list):
            raise DataError(f"{path}: expected a JSON list of records, found {type(values).__name__}")
        records = [Record(i, f"record {i + 1}", value) for i, value in enumerate(values)]
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def read_captions(path: Path, image_column: str, caption_column: str) -> list[Record]:
    """Image-caption pairs from a CSV with a header row, or from JSON lines, as LLaVA-style records
    whose conversation is the one the plain template trains on: `<image>` -> caption."""
    text = _input_file(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} in the header {reader.fieldnames} (see --image-column)")
        rows = [Record(i, f"row {i + 2}", row) for i, row in enumerate(reader)]
    else:
        rows = _json_lines(path, text)
    if not rows:
        raise DataError(f"{path} holds no records")
    return [Record(r.index, r.where, caption_record(r, image_column, caption_column)) for r in rows]


def caption_record(row: Record, image_column: str, caption_column: str) -> object:
    if not isinstance(row.value, dict):
        return row.value  # reported as not_an_object by check()
    caption = row.value.get(caption_column)
    record: dict = {"id": str(row.value.get("id", row.index))}
    if row.value.get(image_column):
        record["image"] = row.value[image_column]
    record["conversations"] = [
        {"from": "human", "value": IMAGE_TOKEN},
        {"from": "gpt", "value": caption.strip() if isinstance(caption, str) else ""},
    ]
    return record


def sample_key(index: int, record_id: object) -> str:
    """Input position first (unique, sorts in input order), then the record's id for the logs."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(record_id))[:64] if record_id is not None else ""
    return f"{index:09d}-{safe}" if safe else f"{index:09d}"


def check(record: Record, images: Path, videos: Path) -> Checked:
    """The sample a record becomes, or RecordProblem saying why it cannot train. Image paths are
    relative to `images`, video paths (a file, or a folder of frames) to `videos`."""
    value = record.value
    if not isinstance(value, dict):
        raise RecordProblem("not_an_object", f"a record must be a JSON object, found {type(value).__name__}")
    image_markers, video_markers = _check_conversations(value.get("conversations"))
    image, video = _image_field(value), _video_field(value)
    if image and video:
        raise RecordProblem("image_and_video", "a record with both an 'image' and a 'video'")
    key = sample_key(record.index, value.get("id"))
    if video:
        if image_markers + video_markers > 1:
            raise RecordProblem("marker_mismatch", f"{image_markers + video_markers} markers for one video")
        value = {**value, "conversations": video_conversation(value["conversations"])}
        kind, media = _check_video(videos / video, video)
        return Checked(record.index, key, _json_bytes(value), kind, media)
    wanted = 1 if image else 0
    if image_markers != wanted or video_markers:
        found = f"{image_markers} {IMAGE_TOKEN} and {video_markers} {VIDEO_TOKEN}"
        raise RecordProblem("marker_mismatch", f"{found} markers for {wanted} images and no video")
    if not image:
        return Checked(record.index, key, _json_bytes(value))
    return Checked(record.index, key, _json_bytes(value), "image", (_check_image(images / image, image),))


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _image_field(value: dict) -> str | None:
    image = value.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise RecordProblem("multi_image", f"{len(image)} images in one record are not supported")
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise RecordProblem("bad_image_field", f"'image' must be a path, found {type(image).__name__}")
    return image


def _video_field(value: dict) -> str | None:
    video, fps = value.get("video"), value.get("fps")
    if video is not None and not isinstance(video, str):
        raise RecordProblem("bad_video_field", f"'video' must be a path, found {type(video).__name__}")
    if video and fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0):
        raise RecordProblem("bad_video_field", f"'fps' must be a positive number of frames a second, found {fps!r}")
    return video


def _check_conversations(turns: object) -> tuple[int, int]:
    """The numbers of `<image>` and of `<video>` markers of a well-formed conversation."""
    if not isinstance(turns, list) or not turns:
        raise RecordProblem("no_conversations", "no 'conversations' list, or an empty one")
    images = videos = 0
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordProblem("bad_turn", f"turn {number} is not an object with a string 'value'")
        role = turn.get("from")
        if role not in ROLES:
            raise RecordProblem("bad_role", f"turn {number} is from {role!r}; expected one of {list(ROLES)}")
        counts = turn["value"].count(IMAGE_TOKEN), turn["value"].count(VIDEO_TOKEN)
        if any(counts) and role != "human":
            raise RecordProblem("marker_mismatch", f"turn {number}: {IMAGE_TOKEN} or {VIDEO_TOKEN} in an answer")
        images, videos = images + counts[0], videos + counts[1]
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise RecordProblem("no_answer", "no non-empty 'gpt' turn: nothing to train on")
    return images, videos


def video_conversation(turns: list[dict]) -> list[dict]:
    """A video record's turns with the video marked `<video>`: LLaVA-Video's `<image>` marker renamed,
    or, with no marker, `<video>\\n` put first in the first human turn (LLaVA-NeXT puts the media first)."""
    marked = any(IMAGE_TOKEN in t["value"] or VIDEO_TOKEN in t["value"] for t in turns)
    turns = [{**t, "value": t["value"].replace(IMAGE_TOKEN, VIDEO_TOKEN)} for t in turns]
    if not marked:
        first = next((i for i, t in enumerate(turns) if t["from"] == "human"), None)
        if first is None:
            raise RecordProblem("marker_mismatch", f"no human turn to put the {VIDEO_TOKEN} marker in")
        turns[first] = {**turns[first], "value": f"{VIDEO_TOKEN}\n{turns[first]['value']}"}
    return turns


def _read(path: Path, name: str, reason: str, folder: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise RecordProblem(reason, f"{name} is not a readable file under the {folder} folder") from None


def _check_image(path: Path, name: str) -> Media:
    """An image file that decodes completely."""
    data = _read(path, name, "missing_image", "image")
    return Media(_image_suffix(data, path, name, "undecodable_image"), str(path), len(data))


def _image_suffix(data: bytes, path: Path, name: str, reason: str) -> str:
    """The member extension of image bytes that decode completely (else RecordProblem `reason`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.draft("RGB", (256, 256))  # JPEGs decode at a reduced scale: still reads every byte
            image.load()
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, ValueError, bomb errors)
        raise RecordProblem(reason, f"{name}: {type(err).__name__}: {err}") from None
    suffix = path.suffix.lower().lstrip(".")
    return suffix if suffix in IMAGE_SUFFIXES else FORMAT_SUFFIX.get(image_format or "", "img")


def _check_video(path: Path, name: str) -> tuple[str, tuple[Media, ...]]:
    """("video", the file) or ("frames", each frame in order) for a video path that decodes."""
    if path.is_dir():
        return "frames", _check_frames(path, name)
    data = _read(path, name, "missing_video", "video")
    container = _probe_video(data, name)
    suffix = path.suffix.lower().lstrip(".")
    suffix = suffix if suffix in VIDEO_SUFFIXES else CONTAINER_SUFFIX.get(container, "")
    if not suffix:
        detail = f"{name}: a {container} file; the loader reads {', '.join(sorted(VIDEO_SUFFIXES))}"
        raise RecordProblem("unsupported_video_format", detail)
    return "video", (Media(suffix, str(path), len(data)),)


def _check_frames(folder: Path, name: str) -> tuple[Media, ...]:
    """A folder of frames, as LLaVA-NeXT reads one: every file in it, in sorted name order."""
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    if not paths:
        raise RecordProblem("undecodable_video", f"{name}: a folder with no frames")
    frames = []
    for number, path in enumerate(paths):
        frame = f"{name}/{path.name}"
        data = _read(path, frame, "undecodable_video", "video")
        suffix = _image_suffix(data, path, frame, "undecodable_video")
        frames.append(Media(f"{FRAME_PREFIX}{number}.{suffix}", str(path), len(data)))
    return tuple(frames)


def _probe_video(data: bytes, name: str) -> str:
    """The container format of a video file whose packets are all there and whose first frame
    decodes (decoding every frame would cost more than the conversion); RecordProblem otherwise."""
    try:
        container_format, packets, declared = _count_packets(data)
        first_frame = packets > 0 and _first_frame_decodes(data)
    except Exception as err:  # FFmpeg's errors, no video stream (IndexError), ...
        raise RecordProblem("undecodable_video", f"{name}: {type(err).__name__}: {err}") from None
    if declared > packets:
        raise RecordProblem("undecodable_video", f"{name}: truncated: {packets} of the {declared} frames it declares")
    if not packets:
        raise RecordProblem("undecodable_video", f"{name}: the video has no frames")
    if not first_frame:
        raise RecordProblem("undecodable_video", f"{name}: its first frame does not decode")
    return container_format


def _count_packets(data: bytes) -> tuple[str, int, int]:
    """(container format, video packets read, frames the header declares or 0), as the loader counts."""
    import av  # lazy: loads FFmpeg, which image-only conversions never need

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        packets = sum(packet.size > 0 for packet in container.demux(stream))  # the last one flushes
        return container.format.name, packets, stream.frames


def _first_frame_decodes(data: bytes) -> bool:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        return next(container.decode(container.streams.video[0]), None) is not None


def check_or_skip(record: Record, images: Path, videos: Path, check=check) -> Checked | RejectedRecord:
    """`check(record, images, videos)`, or the record rejected with its problem's reason."""
    try:
        return check(record, images, videos)
    except RecordProblem as problem:
        record_id = record.value.get("id") if isinstance(record.value, dict) else None
        record_id = None if record_id is None else str(record_id)
        return RejectedRecord(record.index, record.where, record_id, problem.reason, problem.detail)
