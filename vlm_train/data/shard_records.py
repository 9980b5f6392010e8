"""Input records for `vlm-shards`: LLaVA JSON/JSONL and image-caption CSV/JSONL, read and checked.

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

from vlm_train.data.tokenizer import IMAGE_TOKEN
from vlm_train.errors import DataError

ROLES = ("human", "gpt")  # what the templates know; anything else would be trained on as an answer
# File suffixes kept as the sample's image extension; others are named after the decoded format.
IMAGE_SUFFIXES = {"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"}
FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass(frozen=True)
class Record:
    """One input record: where it came from (for reports) and the LLaVA-style object to write."""

    index: int  # position among all records of the input, 0-based
    where: str  # "line 12", "record 11", "row 12": how a user finds it in the input file
    value: object  # the parsed record: a dict with conversations (and image, id, ...) when well formed


@dataclass(frozen=True)
class Checked:
    """A record that passed every check, ready to be written as a sample."""

    index: int
    key: str  # WebDataset key: unique, in input order, no dots or slashes
    json_bytes: bytes
    image_path: str | None
    image_ext: str | None
    image_bytes_len: int


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


def check(record: Record, images: Path) -> Checked:
    """The sample a record becomes, or RecordProblem saying why it cannot train."""
    value = record.value
    if not isinstance(value, dict):
        raise RecordProblem("not_an_object", f"a record must be a JSON object, found {type(value).__name__}")
    markers = _check_conversations(value.get("conversations"))
    image = value.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise RecordProblem("multi_image", f"{len(image)} images in one record are not supported")
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise RecordProblem("bad_image_field", f"'image' must be a path, found {type(image).__name__}")
    wanted = 1 if image else 0
    if markers != wanted:
        raise RecordProblem("marker_mismatch", f"{markers} {IMAGE_TOKEN} markers for {wanted} images")
    key = sample_key(record.index, value.get("id"))
    json_bytes = json.dumps(value, ensure_ascii=False).encode()
    if not image:
        return Checked(record.index, key, json_bytes, None, None, 0)
    path = images / image
    ext, size = _check_image(path, image)
    return Checked(record.index, key, json_bytes, str(path), ext, size)


def _check_conversations(turns: object) -> int:
    """The number of `<image>` markers of a well-formed conversation."""
    if not isinstance(turns, list) or not turns:
        raise RecordProblem("no_conversations", "no 'conversations' list, or an empty one")
    markers = 0
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordProblem("bad_turn", f"turn {number} is not an object with a string 'value'")
        role = turn.get("from")
        if role not in ROLES:
            raise RecordProblem("bad_role", f"turn {number} is from {role!r}; expected one of {list(ROLES)}")
        count = turn["value"].count(IMAGE_TOKEN)
        if count and role != "human":
            raise RecordProblem("marker_mismatch", f"turn {number}: {IMAGE_TOKEN} in an answer")
        markers += count
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise RecordProblem("no_answer", "no non-empty 'gpt' turn: nothing to train on")
    return markers


def _check_image(path: Path, name: str) -> tuple[str, int]:
    """(extension, byte size) of an image file that decodes completely."""
    try:
        data = path.read_bytes()
    except OSError:
        raise RecordProblem("missing_image", f"{name} is not a readable file under the image folder") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.draft("RGB", (256, 256))  # JPEGs decode at a reduced scale: still reads every byte
            image.load()
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, ValueError, bomb errors)
        raise RecordProblem("undecodable_image", f"{name}: {type(err).__name__}: {err}") from None
    suffix = path.suffix.lower().lstrip(".")
    return (suffix if suffix in IMAGE_SUFFIXES else FORMAT_SUFFIX.get(image_format, "img")), len(data)


def check_or_skip(record: Record, images: Path) -> Checked | RejectedRecord:
    try:
        return check(record, images)
    except RecordProblem as problem:
        record_id = record.value.get("id") if isinstance(record.value, dict) else None
        record_id = None if record_id is None else str(record_id)
        return RejectedRecord(record.index, record.where, record_id, problem.reason, problem.detail)
