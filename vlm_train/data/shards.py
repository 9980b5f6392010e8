"""`vlm-shards`: turn a dataset into the WebDataset shards `vlm-train` reads.

    vlm-shards llava --json data.json --images DIR --out OUT [--videos DIR] [--max-count N] [--max-size 1G] [--workers K]
    vlm-shards captions --csv pairs.csv --images DIR --out OUT [--image-column image] [--caption-column caption]
    vlm-shards captions --jsonl pairs.jsonl --images DIR --out OUT
    vlm-shards preference --json pairs.jsonl --images DIR --out OUT   preference pairs (objective=dpo):
               RLAIF-V, TRL or vlm_train layout (data/shard_preference.py)
    vlm-shards manifest DIR    count the samples of existing shards (LAION/CC style) into DIR/manifest.json

A sample is `<key>.json` (the LLaVA record: id, image, conversations) plus `<key>.<ext>` holding
the image file's bytes unchanged; text-only records have no image member. A video record (LLaVA-Video's
`"video"`) has `<key>.mp4` (webm, mkv, mov, avi) holding the video file's bytes, or, for a folder
of frames, `<key>.frame.<n>.<ext>` for n = 0, 1, ... in sorted name order; its conversation marks
the video `<video>`. Shards are
`OUT/shard-NNNNNN.tar`, closed at --max-count samples or before --max-size bytes, in input order
whatever the number of workers. `OUT/manifest.json` gives the sample count of every shard (the
pipeline reads it instead of scanning the tars); `OUT/skipped.jsonl` says which records were left
out and why. Records are checked and images decoded in parallel, then shards written in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from vlm_train.data.shard_manifest import manifest_command
from vlm_train.data.shard_preference import check_pair, read_preference
from vlm_train.data.shard_records import Checked, Record, RejectedRecord, check_or_skip, read_captions, read_llava
from vlm_train.data.shard_util import DEFAULT_IMAGE_KEYS, brace_pattern, parallel_map, shell_words
from vlm_train.errors import DataError, UserError, report

BLOCK = 512  # tar header and data granularity
RECORD = 20 * BLOCK  # a tar stream is padded to whole records of this size
VIDEOS = ("video", "frames")  # the Checked.kind of a video file, and of a folder of frames


def parse_size(text: str) -> int:
    """Bytes from `123`, `500K`, `256M` or `1G` (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1000000, 500M or 1G")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " ")


def _member_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def _tar_bytes(content: int) -> int:
    """File size of a tar stream whose members take `content` bytes (end marker and padding added)."""
    return -(-(content + 2 * BLOCK) // RECORD) * RECORD


def plan_shards(samples: list[Checked], max_count: int, max_size: int) -> list[list[Checked]]:
    """Consecutive groups of at most `max_count` samples whose tar stays within `max_size` bytes
    (a single sample larger than that gets a shard of its own)."""
    shards: list[list[Checked]] = []
    current: list[Checked] = []
    content = 0
    for sample in samples:
        size = _member_bytes(len(sample.json_bytes)) + sum(_member_bytes(m.size) for m in sample.media)
        if current and (len(current) == max_count or _tar_bytes(content + size) > max_size):
            shards.append(current)
            current, content = [], 0
        current.append(sample)
        content += size
    if current:
        shards.append(current)
    return shards


def write_shard(job: tuple[str, list[Checked]]) -> int:
    """Write one shard (to a temporary name first, so a crash never leaves a plausible tar)."""
    import webdataset as wds  # lazy: it imports torch (seconds), which `vlm-shards manifest` never needs

    path, samples = job
    partial_path = f"{path}.partial"
    with wds.TarWriter(partial_path, encoder=False, mtime=0) as sink:  # fixed mtime: reproducible bytes
        for sample in samples:
            member = {"__key__": sample.key, "json": sample.json_bytes}
            for media in sample.media:
                data = Path(media.path).read_bytes()
                if len(data) != media.size:
                    raise DataError(f"{media.path} changed while converting; run vlm-shards again")
                member[media.suffix] = data
            sink.write(member)
    os.replace(partial_path, path)
    return len(samples)


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    old = sorted(out.glob("shard-*.tar")) + [p for p in (out / "manifest.json", out / "skipped.jsonl") if p.exists()]
    if old and not force:
        raise DataError(f"{out} already holds shards ({old[0].name}, ...): choose another --out or pass --force")
    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def convert(
    records: list[Record],
    images: Path,
    out: Path,
    max_count: int,
    max_size: int,
    workers: int,
    videos: Path | None = None,
    check=check_or_skip,
) -> dict:
    """Check, shard and write `records` (video paths relative to `videos`, by default `images`);
    returns the manifest (written with skipped.jsonl)."""
    for option, folder in (("--images", images), ("--videos", videos)):
        if folder is not None and not folder.is_dir():
            raise DataError(f"{option} {folder} is not a folder")
    check_one = partial(check, images=images, videos=videos or images)
    results = parallel_map(check_one, records, workers, chunksize=64)
    checked = [r for r in results if isinstance(r, Checked)]
    skipped = [r for r in results if isinstance(r, RejectedRecord)]
    with open(out / "skipped.jsonl", "w") as report:
        for skip in skipped:
            report.write(json.dumps(asdict(skip), ensure_ascii=False) + "\n")
    if not checked:
        raise DataError(f"all {len(records)} records were skipped, e.g. {_example(skipped[0])} (see {report.name})")
    groups = plan_shards(checked, max_count, max_size)
    names = [f"shard-{i:06d}.tar" for i in range(len(groups))]
    counts = parallel_map(write_shard, [(str(out / n), g) for n, g in zip(names, groups)], workers)
    manifest = _manifest(dict(zip(names, counts)), checked, skipped)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _print_report(out, manifest, skipped, len(records))
    return manifest


def _manifest(shards: dict[str, int], checked: list[Checked], skipped: list[RejectedRecord]) -> dict:
    frames = [m for c in checked if c.kind == "frames" for m in c.media]
    return {
        "shards": shards,
        "total": sum(shards.values()),
        "skipped": _counts(s.reason for s in skipped),
        "image_extensions": _counts(c.media[0].suffix for c in checked if c.kind == "image"),
        "videos": _counts(c.media[0].suffix if c.kind == "video" else "frames" for c in checked if c.kind in VIDEOS),
        "frame_extensions": _counts(m.suffix.rpartition(".")[2] for m in frames),  # counts frames, not samples
        "text_only": sum(c.kind == "text" for c in checked),
    }


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _example(skip: RejectedRecord) -> str:
    return f"{skip.where}{f' (id {skip.id})' if skip.id else ''}: {skip.detail}"


def _print_report(out: Path, manifest: dict, skipped: list[RejectedRecord], total: int) -> None:
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {out}")
    if skipped:
        print(f"skipped {len(skipped)} of {total} records (all in {out / 'skipped.jsonl'}):")
        for reason, count in manifest["skipped"].items():
            first = next(s for s in skipped if s.reason == reason)
            print(f"  {reason:<18} {count:>8}  e.g. {_example(first)}")
    overrides = [f"data.urls={brace_pattern(out, list(manifest['shards']))}"]
    # The loader reads images, and the frames of a frame sequence, only under the data.image_key extensions.
    extra = {*manifest.get("image_extensions", {}), *manifest.get("frame_extensions", {})} - DEFAULT_IMAGE_KEYS
    if extra:
        overrides.append(f"data.image_key={';'.join(sorted(DEFAULT_IMAGE_KEYS | extra))}")
    print(f"train on them with: {shell_words(overrides)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "manifest":
            manifest_command(args.folder, args.workers)
            return 0
        if args.command == "llava":
            records = read_llava(args.json)
        elif args.command == "preference":
            records = read_preference(args.json)
        else:
            records = read_captions(args.csv or args.jsonl, args.image_column, args.caption_column)
        prepare_out(args.out, args.force)
        check = partial(check_or_skip, check=check_pair) if args.command == "preference" else check_or_skip
        convert(records, args.images, args.out, args.max_count, args.max_size, args.workers, args.videos, check)
    except UserError as err:
        return report("vlm-shards", err)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    llava = commands.add_parser("llava", help="LLaVA-format JSON/JSONL + an image folder -> shards")
    llava.add_argument("--json", type=Path, required=True, help="a JSON list of records, or JSON lines (.jsonl)")
    llava.add_argument("--videos", type=Path, help="video paths are relative to this folder (default: --images)")
    preference = commands.add_parser("preference", help="preference pairs (RLAIF-V, TRL) -> shards for DPO")
    preference.add_argument("--json", type=Path, required=True, help="a JSON list of records, or JSON lines")
    preference.set_defaults(videos=None)
    captions = commands.add_parser("captions", help="image-caption pairs (CSV or JSON lines) -> shards")
    source = captions.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="a CSV file with a header row")
    source.add_argument("--jsonl", type=Path, help="one JSON object per line")
    captions.add_argument("--image-column", default="image", help="the field holding the image path")
    captions.add_argument("--caption-column", default="caption", help="the field holding the caption")
    captions.set_defaults(videos=None)
    for command in (llava, preference, captions):
        command.add_argument("--images", type=Path, required=True, help="image paths are relative to this folder")
        command.add_argument("--out", type=Path, required=True, help="folder for shard-NNNNNN.tar and manifest.json")
        command.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
        command.add_argument("--max-size", type=parse_size, default="1G", help="bytes per shard at most (500M, 1G)")
        command.add_argument("--force", action="store_true", help="replace shards already in --out")
    manifest = commands.add_parser("manifest", help="count the samples of existing shards into manifest.json")
    manifest.add_argument("folder", type=Path)
    for command in (llava, preference, captions, manifest):
        command.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes")
    return parser


if __name__ == "__main__":
    sys.exit(main())
