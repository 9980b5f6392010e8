"""Samples read for pretraining objectives (data.read_as, set from the objective):

- `document` (objective=lm): a text, `<key>.txt` or the JSON's "text"; every token is a label. The
  tokenizer's BOS (when it has one) starts it and its EOS ends it; a text longer than data.max_length
  is cut there (the cut part is not trained on: pre-chunk long documents, or use data.packing to fill
  rows with short ones).
- `caption` (objective=clip|siglip): an image and its caption, `<key>.txt` (LAION / CC layout) or the
  JSON's "caption"; the caption's ids end with EOS, where the text tower pools. No image slots: the
  image goes to the image tower, not into the text.

Both return what `SampleEncoder.encode` returns: (key, pixels, Encoded), or a counted skip.
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from vlm_train.data.reader import SkippedSample, skipped
from vlm_train.data.templates import Encoded
from vlm_train.models.decoder import IGNORE_INDEX

TEXT_MEMBER = "txt"


def text_of(raw: dict, field: str) -> str:
    """`<key>.txt`, else the JSON record's `field`; KeyError/ValueError when neither is a usable string."""
    if TEXT_MEMBER in raw:
        value: Any = raw[TEXT_MEMBER]
        value = value.decode() if isinstance(value, bytes) else value
    else:
        value = json.loads(raw["json"]).get(field) if "json" in raw else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"no text: a {TEXT_MEMBER} member or a JSON '{field}' string")
    return value


def encode_document(encoder: Any, raw: dict) -> tuple[str, Any, Encoded] | SkippedSample:
    """objective=lm: BOS + the text's tokens + EOS, labels on every token but BOS, cut to data.max_length."""
    key = raw.get("__key__", "?")
    try:
        text = text_of(raw, "text")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return skipped("missing_field", key, str(err))
    tokenizer = encoder.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels]
    limit = encoder.cfg.max_length
    return key, encoder.pixels(None), Encoded(ids[:limit], labels[:limit], 0)


def encode_caption(encoder: Any, raw: dict) -> tuple[str, Any, Encoded] | SkippedSample:
    """objective=clip|siglip: the image's pixels [1, 3, S, S] and its caption's ids (+ EOS, cut to
    data.max_length keeping the EOS), labels = ids (a row with labels is a real pair)."""
    key = raw.get("__key__", "?")
    try:
        text = text_of(raw, "caption")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return skipped("missing_field", key, str(err))
    images = encoder.image_members(raw)
    if len(images) != 1:
        return skipped("image_token_mismatch", key, f"{len(images)} images: a caption pair has one")
    try:
        pixels = encoder.pixels(images[0])
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        return skipped("bad_image", key, f"image does not decode ({err})")
    tokenizer = encoder.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids[: encoder.cfg.max_length - 1] + [tokenizer.eos_token_id]
    return key, pixels, Encoded(ids, list(ids), 1)
