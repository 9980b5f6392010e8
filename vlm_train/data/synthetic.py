"""Synthetic scenes: coloured shapes on a 3x3 grid, each image with a caption or a question.

A learnable but not trivial task for the toy VLM: from the visual tokens alone it must tell
5 colours, 3 shapes and 9 positions, and describe all three in a caption (see CHANCE for
the accuracy of guessing). `--objects 2` makes scenes that also need binding of attributes. Written as WebDataset shards (`<key>.png` + `<key>.json`,
the JSON in LLaVA's conversation format) plus a `manifest.json` of sample counts.

    python -m vlm_train.data.synthetic --out data/toy --train 20000 --eval 400

`--layout sizes` renders each scene at one of several aspect ratios and sizes (SIZES: 48 to 144
px a side) with an object as small as the square scenes' (10-13 px), for AnyRes
(experiment=toy-anyres): a centre crop to the tower's 48 px loses the object when it sits outside
the middle and halves it otherwise; tiles at the image's own resolution keep it whole.

`--layout preference` writes preference pairs for objective=dpo (experiment=toy-dpo): a square scene,
"what color is the <shape> ?", the right colour chosen and another one, drawn at random, rejected.

`--layout relations` is the harder task (bench/connectors.py): two or three objects per scene, and
questions that need binding ("what color is the triangle ?" among several), counting ("how many
shapes ?") and relations ("what color is the shape left of the circle ?").

`--layout text` writes text documents for objective=lm (experiment=toy-lm): the toy's conversations
(half single-object scenes, half the relations task) with the image told in words, "USER: a red circle
top left . what color is the circle ? ASSISTANT: red", so that a decoder learns the tasks' language
(and to answer from a description) before it meets images. `--layout captions` writes image-caption
pairs of one to three objects (`<key>.png` + `<key>.txt`, the LAION layout) for objective=clip|siglip
(experiment=toy-clip).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL = 16  # pixels per grid cell; the image is 3 x 3 cells
SIZES = ((48, 144), (144, 48), (96, 96), (48, 96), (96, 48))  # (height, width) of `--layout sizes` scenes
LAYOUTS = ("square", "sizes", "preference", "text", "captions", "relations")
QUESTION_KINDS = ("caption", "color", "shape", "position")
# `--layout relations`: two or three objects; attributes of a named object (binding), counting, relations
RELATION_KINDS = ("color", "shape", "position", "count", "relation")
NUMBERS = ("one", "two", "three")
# a relation: (target row, column) vs (anchor row, column) -> holds
RELATIONS = {
    "left of": lambda t, a: t[1] < a[1],
    "right of": lambda t, a: t[1] > a[1],
    "above": lambda t, a: t[0] < a[0],
    "below": lambda t, a: t[0] > a[0],
}
# Accuracy of a uniform guess over each question's answers (captions: effectively zero; count: 2 or 3).
CHANCE = {
    "caption": 0.0,
    "color": 1 / len(COLORS),
    "shape": 1 / len(SHAPES),
    "position": 1 / len(POSITIONS),
    "count": 1 / 2,
    "relation": 1 / len(COLORS),
}
PROMPT_WORDS = "describe the image . what color is which shape where a and ?".split()
VOCABULARY = sorted(set(PROMPT_WORDS) | set(COLORS) | set(SHAPES) | {w for p in POSITIONS for w in p.split()})
# The relations task's words the single-object toy lacks (the toy tokenizer adds them after VOCABULARY).
RELATION_VOCABULARY = sorted({"how", "many", "shapes", "of", "above", "below", *NUMBERS} - set(VOCABULARY))


def make_scene(rng: random.Random, max_objects: int = 1, min_objects: int = 1) -> list[dict]:
    """`min_objects` to `max_objects` objects with distinct colours, shapes and cells, in reading order."""
    count = rng.randint(min_objects, max_objects)
    colors = rng.sample(sorted(COLORS), count)
    shapes = rng.sample(SHAPES, count)
    cells = sorted(rng.sample(range(9), count))
    return [{"color": c, "shape": s, "cell": cell} for c, s, cell in zip(colors, shapes, cells)]


def render(scene: list[dict], rng: random.Random) -> Image.Image:
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (3 * CELL, 3 * CELL), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for obj in scene:
        size = rng.randint(10, 13)
        x0 = (obj["cell"] % 3) * CELL + rng.randint(0, CELL - size)
        y0 = (obj["cell"] // 3) * CELL + rng.randint(0, CELL - size)
        _draw_shape(draw, obj, x0, y0, size)
    return image


def render_sized(scene: list[dict], rng: random.Random, size_hw: tuple[int, int]) -> Image.Image:
    """`scene` on a `size_hw` canvas (multiples of 3 cells of CELL px a side): each object as in the
    square scenes (10-13 px inside one CELL x CELL cell), in a random cell of its third of the canvas
    (its `cell`: top left ... bottom right), so it is small next to the canvas."""
    height, width = size_hw
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (width, height), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    per_third_x, per_third_y = width // CELL // 3, height // CELL // 3
    for obj in scene:
        size = rng.randint(10, 13)
        column = (obj["cell"] % 3) * per_third_x + rng.randrange(per_third_x)
        row = (obj["cell"] // 3) * per_third_y + rng.randrange(per_third_y)
        x0 = column * CELL + rng.randint(0, CELL - size)
        y0 = row * CELL + rng.randint(0, CELL - size)
        _draw_shape(draw, obj, x0, y0, size)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict, x0: int, y0: int, size: int) -> None:
    box = (x0, y0, x0 + size - 1, y0 + size - 1)
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=fill)


def caption(scene: list[dict]) -> str:
    parts = [f"a {o['color']} {o['shape']} {POSITIONS[o['cell']]}" for o in scene]
    return " and ".join(parts)


def question(scene: list[dict], kind: str, rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair of the given kind about a random object of the scene."""
    obj = rng.choice(scene)
    if kind == "caption":
        return "describe the image .", caption(scene)
    if kind == "color":
        return f"what color is the {obj['shape']} ?", obj["color"]
    if kind == "shape":
        return f"which shape is {obj['color']} ?", obj["shape"]
    if kind == "count":
        return "how many shapes ?", NUMBERS[len(scene) - 1]
    if kind == "relation":
        return relation_question(scene, rng) or question(scene, "color", rng)
    return f"where is the {obj['color']} {obj['shape']} ?", POSITIONS[obj["cell"]]


def relation_question(scene: list[dict], rng: random.Random) -> tuple[str, str] | None:
    """ "what color is the shape <relation> the <anchor shape> ?" for a relation exactly one other object
    of the scene holds to the anchor; None when no relation singles one out (one object)."""
    grid = [divmod(obj["cell"], 3) for obj in scene]
    candidates = []
    for a, anchor in enumerate(scene):
        for name, holds in RELATIONS.items():
            targets = [t for t in range(len(scene)) if t != a and holds(grid[t], grid[a])]
            if len(targets) == 1:
                candidates.append((scene[targets[0]], anchor, name))
    if not candidates:
        return None
    target, anchor, name = rng.choice(candidates)
    return f"what color is the shape {name} the {anchor['shape']} ?", target["color"]


def make_sample(rng: random.Random, max_objects: int = 1, layout: str = "square") -> tuple[bytes | None, dict]:
    """PNG bytes and a LLaVA-style record with one question of a random kind about the image
    (`layout`: square 48 px scenes, or `sizes`: see the module docstring).

    One question per image: with several, earlier answers would give later ones away in text
    ("which shape is red?" after "red"), and the model would learn to copy instead of to look.
    """
    relations = layout == "relations" or (layout == "text" and rng.random() < 0.5)  # text: both tasks' documents
    scene = make_scene(rng, 3, 2) if relations else make_scene(rng, 3 if layout == "captions" else max_objects)
    if layout == "preference":
        return preference_sample(scene, rng)
    if layout == "text":
        return text_sample(scene, rng, RELATION_KINDS if relations else QUESTION_KINDS)
    if layout == "captions":
        return caption_sample(scene, rng)
    kind = rng.choice(RELATION_KINDS if relations else QUESTION_KINDS)
    q, a = question(scene, kind, rng)
    conversations = [{"from": "human", "value": f"<image>\n{q}", "kind": kind}, {"from": "gpt", "value": a}]
    buffer = io.BytesIO()
    if layout == "sizes":
        size_hw = rng.choice(SIZES)
        render_sized(scene, rng, size_hw).save(buffer, format="PNG")
    else:
        render(scene, rng).save(buffer, format="PNG")
    return buffer.getvalue(), {"conversations": conversations, "scene": scene}


def preference_sample(scene: list[dict], rng: random.Random) -> tuple[bytes, dict]:
    """A colour question with the right colour chosen and a wrong one rejected (data/preference.py)."""
    q, answer = question(scene, "color", rng)
    wrong = rng.choice([colour for colour in COLORS if colour != answer])
    prompt = [{"from": "human", "value": f"<image>\n{q}", "kind": "color"}]
    buffer = io.BytesIO()
    render(scene, rng).save(buffer, format="PNG")
    return buffer.getvalue(), {"conversations": prompt, "chosen": answer, "rejected": wrong, "scene": scene}


def text_sample(scene: list[dict], rng: random.Random, kinds: tuple[str, ...]) -> tuple[None, dict]:
    """A toy conversation about `scene` with the image told in words (no image)."""
    kind = rng.choice(kinds)
    q, a = question(scene, kind, rng)
    return None, {"text": f"USER: {caption(scene)} . {q} ASSISTANT: {a}", "kind": kind, "scene": scene}


def caption_sample(scene: list[dict], rng: random.Random) -> tuple[bytes, dict]:
    buffer = io.BytesIO()
    render(scene, rng).save(buffer, format="PNG")
    return buffer.getvalue(), {"caption": caption(scene), "scene": scene}


def write_split(
    out: Path, split: str, count: int, shard_size: int, seed: int, max_objects: int, layout: str = "square"
) -> dict[str, int]:
    """Write `count` samples as `<split>-NNNNNN.tar` shards; returns {shard name: samples}."""
    import webdataset as wds  # lazy: it imports torch (seconds); the rest of this module does not

    rng = random.Random(f"{seed}-{split}")
    counts: dict[str, int] = {}
    for shard_index, start in enumerate(range(0, count, shard_size)):
        name = f"{split}-{shard_index:06d}.tar"
        n = min(shard_size, count - start)
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(start, start + n):
                png, record = make_sample(rng, max_objects, layout)
                sample = {"__key__": f"{split}-{i:08d}", "json": json.dumps(record).encode()}
                if png is not None:
                    sample["png"] = png
                if "text" in record or "caption" in record:
                    sample["txt"] = (record.get("text") or record["caption"]).encode()
                sink.write(sample)
        counts[name] = n
    return counts


def generate(
    out: str | Path,
    train: int,
    eval: int,
    shards: int = 10,
    seed: int = 0,
    max_objects: int = 1,
    layout: str = "square",
) -> Path:
    """Write the train split in `shards` shards and the held-out split in one, plus a manifest."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = write_split(out, "train", train, -(-train // shards), seed, max_objects, layout)
    counts |= write_split(out, "eval", eval, max(eval, 1), seed, max_objects, layout)
    manifest = {"shards": counts, "total": sum(counts.values())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=int, default=1, help="at most this many objects per scene (1-3)")
    parser.add_argument("--layout", choices=LAYOUTS, default="square", help="square 48 px scenes, or several sizes")
    args = parser.parse_args()
    out = generate(args.out, args.train, args.eval, args.shards, args.seed, args.objects, args.layout)
    print(f"wrote {args.train} train and {args.eval} held-out scenes to {out}")


if __name__ == "__main__":
    main()
