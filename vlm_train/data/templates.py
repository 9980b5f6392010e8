"""Conversation templates: LLaVA-style turns -> token ids, with labels on answer tokens only.

A conversation is a list of {"from": "human"|"gpt", "value": str}; `<image>` in a human turn
marks where an image goes and is expanded to one image-token id per visual token.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_train.data.tokenizer import IMAGE_TOKEN
from vlm_train.models.vlm import IGNORE_INDEX


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int


def conversation_pieces(turns: list[dict], template: str, eos: str) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces. chat: Vicuna v1 turns; plain: LLaVA pretraining (image, caption)."""
    pieces: list[tuple[str, bool]] = []
    for turn in turns:
        value = turn["value"]
        if turn["from"] == "human":
            if template == "plain":
                pieces.append((IMAGE_TOKEN * value.count(IMAGE_TOKEN), False))
            else:
                pieces.append((f"USER: {value} ASSISTANT:", False))
        elif template == "plain":
            pieces.append((f"{value}{eos}", True))
        else:
            pieces.append((f" {value}{eos}", True))
    return pieces


def encode(
    turns: list[dict], tokenizer, template: str, image_tokens: int, add_generation_prompt: bool = False
) -> Encoded:
    """Token ids and labels; each `<image>` becomes `image_tokens` image-token ids (no labels).

    With `add_generation_prompt`, `turns` ends on a human turn and the ids end ready for the answer.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    num_images = 0
    for text, is_answer in conversation_pieces(turns, template, tokenizer.eos_token or ""):
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            copies = image_tokens if token == image_id else 1
            num_images += token == image_id
            ids += [token] * copies
            labels += [token if is_answer else IGNORE_INDEX] * copies
    if add_generation_prompt and turns and turns[-1]["from"] != "human":
        raise ValueError("a generation prompt must end on a human turn")
    return Encoded(ids, labels, num_images)


def truncate(encoded: Encoded, max_length: int, image_token_id: int) -> Encoded | None:
    """Cut text beyond `max_length`; None when that would cut into visual tokens or leave no answer."""
    if len(encoded.input_ids) <= max_length:
        return encoded
    ids, labels = encoded.input_ids[:max_length], encoded.labels[:max_length]
    if ids.count(image_token_id) != encoded.input_ids.count(image_token_id):
        return None
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(ids, labels, encoded.num_images)
