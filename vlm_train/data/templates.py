"""Conversation templates: LLaVA-style turns -> token ids, with labels on the answers only.

A conversation is a list of {"from": "human"|"gpt", "value": str}; `<image>` marks where an image
goes and becomes `image_tokens` copies of the tokenizer's `<image>` id (never supervised).

- `plain`     LLaVA stage 1, as LLaVA's `preprocess_plain`: each human turn becomes its `<image>`
              (its text is dropped), each answer is followed by "\\n" (conv_llava_plain's separator,
              no EOS); labels on everything but BOS and images. Documents (several images and texts
              in any order) follow the same rule.
- `vicuna_v1` LLaVA-1.5, as LLaVA's `preprocess_v1` with `conv_vicuna_v1`: the system prompt, every
              `<image>` moved to the front of its turn with "\\n" (`preprocess_multimodal`), the whole
              conversation rendered then tokenized once (`tokenizer_image_token`), labels masked by
              LLaVA's round arithmetic, its legacy/non-legacy branch included.
- `hf`        the tokenizer's own `chat_template` (ChatML, Llama-3, ...): the whole conversation
              rendered then tokenized once; labels on exactly the assistant contents and the
              end-of-turn token that follows each.
- `chat`      the toy's Vicuna-like turns, each piece tokenized alone (word-level toy tokenizer).

`encode_conversation` is the one entry point; the training pipeline and evaluation both use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from vlm_train.data.tokenizer import (
    IMAGE_TOKEN,
    QWEN_IMAGE_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    VIDEO_TOKEN,
    is_qwen_vl_tokenizer,
    media_token_ids,
)
from vlm_train.errors import ConfigError
from vlm_train.models.vlm import IGNORE_INDEX

TEMPLATES = ("chat", "plain", "vicuna_v1", "hf")
ROLES = ("human", "gpt")
HF_ROLES = {"human": "user", "gpt": "assistant"}
# llava/conversation.py conv_vicuna_v1 (sep_style TWO) and conv_llava_plain (sep_style PLAIN).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = {"human": "USER", "gpt": "ASSISTANT"}
VICUNA_SEP, VICUNA_SEP2 = " ", "</s>"
PLAIN_SEP = "\n"


class ConversationError(ValueError):
    """A conversation the template cannot encode (turns that do not alternate, a template mismatch)."""


class ImageCountError(ConversationError):
    """More `<image>` (`<video>`) markers than per-image (per-video) token counts were given."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) per image, AnyRes only
    num_videos: int = 0
    videos: torch.Tensor | None = None  # the sample's video frames [F, 3, S, S] (data.video), in slot order
    video_frames: list[int] = field(default_factory=list)  # frames per video
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)  # (t, h, w) patches: native resolution
    positions: torch.Tensor | None = None  # M-RoPE positions [3, L] (native resolution), per sample from 0
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)  # native resolution: each video's
    video_seconds: list[float] = field(default_factory=list)  # and its seconds per temporal patch
    rejected: Encoded | None = None  # objective=dpo: the pair's rejected reply (this one: the chosen)


def encode_conversation(
    turns: list[dict], tokenizer, template: str, image_tokens: int | Sequence[int], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """What a conversation becomes for training: `(input_ids, labels)`, labels `-100` where no loss.

    `turns`: LLaVA-style `[{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt",
    "value": "A cat."}, ...]`, alternating human/gpt from a human turn (`plain` also takes documents:
    any order). `template`: plain | vicuna_v1 | hf | chat. Each `<image>` becomes `image_tokens`
    copies of the tokenizer's `<image>` id (a sequence: one count per image, in order, as AnyRes
    images of different sizes need). With `add_generation_prompt` the turns end on a human
    turn and the ids end where the answer would start (labels all -100). Raises `ValueError` for a
    conversation the template cannot encode. Example:

        >>> ids, labels = encode_conversation(turns, tokenizer, "vicuna_v1", image_tokens=576)
        >>> tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
        'A cat.</s>'
    """
    encoded = encode(turns, tokenizer, template, image_tokens, add_generation_prompt)
    return encoded.input_ids, encoded.labels


def encode(
    turns: list[dict],
    tokenizer,
    template: str,
    image_tokens: int | Sequence[int],
    add_generation_prompt: bool = False,
    video_tokens: Sequence[int] = (),
    video_timestamps: Sequence[Sequence[float]] = (),
) -> Encoded:
    """`encode_conversation`, with the number of images (the pipeline checks it against the sample's).
    `<video>` markers (data.video) become `video_tokens[k]` copies of the `<video>` id for the k-th
    video; templates place them as they place images (rendered as `<image>`, same length). With
    `video_timestamps` (Qwen3-VL: each video's temporal patches' times in seconds), the k-th video
    is written as Qwen3-VL's processor writes it: each temporal patch after its timestamp, in its
    own <|vision_start|> ... <|vision_end|> (`video_tokens[k]` split evenly over them)."""
    if template not in RENDERERS:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    check_turns(turns, template, add_generation_prompt)
    image_id, video_id = media_token_ids(tokenizer)
    media = media_kinds(turns)
    videos = media.count(VIDEO_TOKEN)
    if video_timestamps:
        turns, media, video_tokens = timestamped_videos(turns, video_tokens, video_timestamps)
    if VIDEO_TOKEN in media:
        turns = [{**turn, "value": turn["value"].replace(VIDEO_TOKEN, IMAGE_TOKEN)} for turn in turns]
    if template == "hf" and is_qwen_vl_tokenizer(tokenizer):  # as Qwen-VL's chat template renders an image item
        wrapped = QWEN_VISION_START + QWEN_IMAGE_TOKEN + QWEN_VISION_END
        turns = [{**turn, "value": turn["value"].replace(IMAGE_TOKEN, wrapped)} for turn in turns]
    ids, labels = RENDERERS[template](turns, tokenizer, image_id, add_generation_prompt)
    if VIDEO_TOKEN in media and video_id is None:
        raise ConversationError(
            f"a {VIDEO_TOKEN} marker, but the tokenizer has no video token (data.video=true adds it)"
        )
    video = (video_id, video_tokens) if VIDEO_TOKEN in media and video_id is not None else None
    encoded = expand_images(ids, labels, image_id, image_tokens, media, video)
    if video_timestamps:  # the videos, not their temporal patches
        encoded.num_videos = videos
    return encoded


def timestamped_videos(
    turns: list[dict], video_tokens: Sequence[int], timestamps: Sequence[Sequence[float]]
) -> tuple[list[dict], list[str], list[int]]:
    """Each of the first len(timestamps) `<video>` markers -> one `<{t:.1f} seconds><video>` per
    temporal patch (Qwen3-VL's processor's text, its timestamps to one decimal); the markers in
    order and the tokens per marker, to match."""
    videos = iter(enumerate(timestamps))

    def frames(match: re.Match) -> str:
        index, times = next(videos, (None, ()))
        return "".join(f"<{t:.1f} seconds>{VIDEO_TOKEN}" for t in times) if index is not None else match.group(0)

    out = [{**turn, "value": re.sub(re.escape(VIDEO_TOKEN), frames, turn["value"])} for turn in turns]
    per_patch = [
        [count // len(timestamps[index])] * len(timestamps[index]) if index < len(timestamps) else [count]
        for index, count in enumerate(video_tokens)
    ]
    return out, media_kinds(out), [count for counts in per_patch for count in counts]


MEDIA_MARKER = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")


def media_kinds(turns: list[dict]) -> list[str]:
    """`<image>` and `<video>` markers in the order they appear (turn by turn)."""
    return [m for turn in turns for m in MEDIA_MARKER.findall(turn["value"])]


def check_turns(turns: list[dict], template: str, add_generation_prompt: bool) -> None:
    """Roles human/gpt, alternating from a human turn, ending on gpt (on human for a generation prompt)."""
    roles = [turn["from"] for turn in turns]
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ConversationError(f"unknown role {unknown[0]!r}: turns are from 'human' or 'gpt'")
    if template == "plain":  # images and texts in any order: documents are conversations too
        return
    for index, role in enumerate(roles):
        if role != ROLES[index % 2]:
            order = " -> ".join(roles)
            raise ConversationError(f"turns must alternate human, gpt, human, ... from a human turn; got {order}")
    last = "human" if add_generation_prompt else "gpt"
    if not roles or roles[-1] != last:
        what = (
            "a generation prompt must end on a human turn" if add_generation_prompt else "the last turn must be gpt's"
        )
        raise ConversationError(f"{what}; got {' -> '.join(roles) or 'no turns'}")


def expand_images(
    ids: list[int],
    labels: list[int],
    image_id: int,
    image_tokens: int | Sequence[int],
    media: Sequence[str] = (),
    video: tuple[int, Sequence[int]] | None = None,
) -> Encoded:
    """Each image id -> `image_tokens` image ids without labels (per image, when a sequence). With
    `media` (the markers in order) and `video` = (video id, tokens per video), the markers that are
    videos become `video[1][k]` video ids for the k-th video instead."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    num_images = num_videos = 0
    for token, label in zip(ids, labels):
        if token != image_id:
            out_ids.append(token)
            out_labels.append(label)
            continue
        marker = num_images + num_videos
        if video is not None and marker < len(media) and media[marker] == VIDEO_TOKEN:
            slot, count = video[0], _count_of(video[1], num_videos, "videos")
            num_videos += 1
        else:
            slot = image_id
            count = image_tokens if isinstance(image_tokens, int) else _count_of(image_tokens, num_images)
            num_images += 1
        out_ids += [slot] * count
        out_labels += [IGNORE_INDEX] * count
    return Encoded(out_ids, out_labels, num_images, num_videos=num_videos)


def _count_of(counts: Sequence[int], index: int, what: str = "images") -> int:
    if index >= len(counts):
        marker = VIDEO_TOKEN if what == "videos" else IMAGE_TOKEN
        raise ImageCountError(f"more {marker} markers than the sample's {len(counts)} {what}")
    return counts[index]


def tokenize_with_images(text: str, tokenizer, image_id: int) -> list[int]:
    """LLaVA's `tokenizer_image_token`: the text between `<image>`s tokenized piece by piece (special
    tokens added, so SentencePiece prefixes each piece with "▁"), BOS kept on the first piece only,
    one image id per `<image>`."""
    chunks = [tokenizer(chunk).input_ids for chunk in text.split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    skip = int(bos is not None and bool(chunks[0]) and chunks[0][0] == bos)
    ids = chunks[0][:skip]
    for index, chunk in enumerate(chunks):
        ids += ([image_id] if index else []) + chunk[skip:]
    return ids


def _mask(labels: list[int], start: int, stop: int | None = None) -> None:
    stop = len(labels) if stop is None else min(stop, len(labels))
    labels[start:stop] = [IGNORE_INDEX] * max(0, stop - start)  # (torch-like: never grows the list)


# --- plain: LLaVA stage 1 (llava/train/train.py preprocess_plain) -------------------------------


def _plain(turns: list[dict], tokenizer, image_id: int, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    parts = [
        IMAGE_TOKEN * t["value"].count(IMAGE_TOKEN) if t["from"] == "human" else t["value"] + PLAIN_SEP for t in turns
    ]
    ids = tokenize_with_images("".join(parts), tokenizer, image_id)
    labels = [IGNORE_INDEX if token == image_id else token for token in ids]
    if ids and ids[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE_INDEX
    if add_generation_prompt:
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


# --- vicuna_v1: LLaVA-1.5 (preprocess_multimodal + preprocess_v1, conv_vicuna_v1) ---------------


def images_first(value: str) -> str:
    """LLaVA's `preprocess_multimodal`: a turn's `<image>` moved to its front, followed by "\\n"
    (LLaVA keeps one; several stay several here, LLaVA-1.5 never has more than one)."""
    count = value.count(IMAGE_TOKEN)
    if not count:
        return value
    return ((IMAGE_TOKEN + "\n") * count + value.replace(IMAGE_TOKEN, "").strip()).strip()


def vicuna_prompt(turns: list[dict], add_generation_prompt: bool = False) -> str:
    """conv_vicuna_v1.get_prompt(): "SYSTEM USER: q ASSISTANT: a</s>USER: ..." (a falsy message
    renders as "ROLE:", which is also the generation prompt "... ASSISTANT:")."""
    messages = [(VICUNA_ROLES[t["from"]], t["value"]) for t in turns]
    if add_generation_prompt:
        messages.append((VICUNA_ROLES["gpt"], None))
    seps = (VICUNA_SEP, VICUNA_SEP2)
    prompt = VICUNA_SYSTEM + seps[0]
    for index, (role, message) in enumerate(messages):
        prompt += f"{role}: {message}{seps[index % 2]}" if message else f"{role}:"
    return prompt


def prefix_space_after_special(tokenizer) -> bool:
    """Whether text right after a special token gets SentencePiece's "▁" as at the start of a text.

    This is what LLaVA's `tokenizer.legacy` means for the slow Llama tokenizer it trains with (flag
    and behaviour always agree there); a fast tokenizer's behaviour comes from its tokenizer.json
    (legacy normaliser: yes; Metaspace prepend_scheme=first: no), so it is measured, not read.
    """
    sep = tokenizer(VICUNA_SEP2, add_special_tokens=False).input_ids
    after = tokenizer(VICUNA_SEP2 + VICUNA_ROLES["human"], add_special_tokens=False).input_ids[len(sep) :]
    return after == tokenizer(VICUNA_ROLES["human"], add_special_tokens=False).input_ids


def vicuna_labels(prompt: str, ids: list[int], tokenizer, image_id: int) -> list[int]:
    """LLaVA's `preprocess_v1` masking, round by round, with its token-count arithmetic."""
    labels = list(ids)
    legacy = prefix_space_after_special(tokenizer)
    sep = VICUNA_SEP + VICUNA_ROLES["gpt"] + ": "
    cur = 1  # BOS
    _mask(labels, 0, cur)
    for index, rou in enumerate(prompt.split(VICUNA_SEP2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokenize_with_images(rou, tokenizer, image_id))
        instruction_len = len(tokenize_with_images(parts[0] + sep, tokenizer, image_id)) - 2  # BOS, trailing "▁"
        if index != 0 and not legacy:  # the round's "USER" follows "</s>" without the "▁" it gets alone
            round_len -= 1
            instruction_len -= 1
        _mask(labels, cur, cur + instruction_len)
        cur += round_len
    _mask(labels, cur)
    total = sum(token != tokenizer.pad_token_id for token in ids)
    if cur != total:  # LLaVA masks the whole sample ("tokenization mismatch"); we skip it instead
        raise ConversationError(f"tokenization mismatch: LLaVA's round lengths give {cur} tokens, the text {total}")
    return [IGNORE_INDEX if token == image_id else label for token, label in zip(ids, labels)]


def _vicuna_v1(turns: list[dict], tokenizer, image_id: int, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    if any(IMAGE_TOKEN in t["value"] for t in turns):  # LLaVA moves images only in samples with an image
        turns = [{**t, "value": images_first(t["value"])} for t in turns]
    prompt = vicuna_prompt(turns, add_generation_prompt)
    ids = tokenize_with_images(prompt, tokenizer, image_id)
    if add_generation_prompt:
        return ids, [IGNORE_INDEX] * len(ids)
    return ids, vicuna_labels(prompt, ids, tokenizer, image_id)


# --- hf: the tokenizer's own chat_template -------------------------------------------------------


def _render(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    # A template's own raise_exception("...") arrives as this. Lazy: only data.template=hf renders
    # with jinja2 (a dependency of transformers' chat templates), and it costs ~0.5 s to import.
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise ConversationError(f"the chat template refuses this conversation: {err}") from None


def _answer_spans(messages: list[dict], text: str, tokenizer) -> list[tuple[int, int]]:
    """Character spans of each assistant content in the rendered `text`: it starts where the
    generation prompt of the conversation so far ends (templates may trim the content)."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(messages[:index], tokenizer, add_generation_prompt=True)
        content = message["content"].strip()
        start = text.find(content, len(prefix)) if text.startswith(prefix) else -1
        if start < 0 or text[len(prefix) : start].strip():
            raise ConversationError(
                f"the chat template does not render assistant turn {index} right after its generation prompt"
            )
        spans.append((start, start + len(content)))
    return spans


def _hf(turns: list[dict], tokenizer, image_id: int, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    messages = [{"role": HF_ROLES[t["from"]], "content": t["value"]} for t in turns]
    text = _render(messages, tokenizer, add_generation_prompt)
    spans = [] if add_generation_prompt else _answer_spans(messages, text, tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # BOS is the template's
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for index, (token_start, token_end) in enumerate(offsets):
            if token_start < end and token_end > start and ids[index] != image_id:
                labels[index] = ids[index]
        after = next((i for i, (token_start, _) in enumerate(offsets) if token_start >= end), None)
        if after is not None and ids[after] in special and ids[after] != image_id:  # <|im_end|>, <|eot_id|>, </s>
            labels[after] = ids[after]
    return ids, labels


# --- chat: the toy's turns ------------------------------------------------------------------------


def _chat(turns: list[dict], tokenizer, image_id: int, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token or ""
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for turn in turns:
        answer = turn["from"] == "gpt"
        text = f" {turn['value']}{eos}" if answer else f"USER: {turn['value']} ASSISTANT:"
        pieces = tokenizer(text, add_special_tokens=False).input_ids
        ids += pieces
        labels += pieces if answer else [IGNORE_INDEX] * len(pieces)
    return ids, labels


Renderer = Callable[[list[dict], object, int, bool], tuple[list[int], list[int]]]
RENDERERS: dict[str, Renderer] = {"chat": _chat, "plain": _plain, "vicuna_v1": _vicuna_v1, "hf": _hf}


def check_template(tokenizer, template: str) -> None:
    """Start-up check: the `hf` template needs a tokenizer that has a chat template."""
    if template != "hf" and is_qwen_vl_tokenizer(tokenizer):
        raise ConfigError(
            f"data.template={template}: a Qwen-VL tokenizer writes images as <|vision_start|><|image_pad|>..."
            "<|vision_end|> through its own chat template: use data.template=hf"
        )
    if template == "hf" and not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(
            f"data.template=hf needs a tokenizer with a chat template, and {where} has none "
            "(add a chat_template.jinja there, or use data.template=vicuna_v1|plain)"
        )


VIDEO_INPUTS = ("pixel_values_videos", "video_frames")  # a video batch's model inputs (image_sizes_of)
NATIVE_INPUTS = (
    "image_grid_thw",
    "video_grid_thw",
    "second_per_grid_ts",
    "position_ids",
)  # a native-resolution (Qwen-VL) batch's own model inputs


def image_sizes_of(encoded: list[Encoded], cat=torch.cat) -> dict:
    """{"image_sizes": [I, 2]} for AnyRes samples (each image's height and width, in slot order;
    nothing for fixed-size images), {"image_grid_thw": [I, 3]} for native-resolution ones; with videos, {"pixel_values_videos": [sum F, 3, S, S] (concatenated
    by `cat`), "video_frames": [V]}."""
    sizes = [size for enc in encoded for size in enc.image_sizes]
    media = {"image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2)} if sizes else {}
    grids = [grid for enc in encoded for grid in enc.image_grids]
    if grids:
        media["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    videos = [enc.videos for enc in encoded if enc.videos is not None]
    if videos:
        media["pixel_values_videos"] = cat(videos)
        video_grids = [grid for enc in encoded for grid in enc.video_grids]
        if video_grids:  # native resolution: patches of all videos, each one's grid and time step
            media["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
            media["second_per_grid_ts"] = torch.tensor([s for enc in encoded for s in enc.video_seconds])
        else:
            media["video_frames"] = torch.tensor([n for enc in encoded for n in enc.video_frames], dtype=torch.long)
    return media


def truncate(encoded: Encoded, max_length: int, *visual_ids: int) -> Encoded | None:
    """Cut text beyond `max_length`; None when that would cut into visual tokens (`visual_ids`:
    the image and video token ids) or leave no answer."""
    if len(encoded.input_ids) <= max_length:
        return encoded
    ids, labels = encoded.input_ids[:max_length], encoded.labels[:max_length]
    if any(ids.count(visual) != encoded.input_ids.count(visual) for visual in visual_ids):
        return None
    if all(label == IGNORE_INDEX for label in labels):
        return None
    positions = None if encoded.positions is None else encoded.positions[:, :max_length]
    return replace(encoded, input_ids=ids, labels=labels, positions=positions)


def position_ids_of(encoded: list[Encoded], rows: list[list[int]], length: int) -> dict:
    """{"position_ids": [3, R, T]} when the samples carry M-RoPE positions (native resolution):
    row r holds its samples' positions end to end (`rows`: sample indices per row), each from 0
    as computed for the sample alone; a sample without any (a text placeholder) counts 0, 1, ..."""
    if all(enc.positions is None for enc in encoded):
        return {}
    positions = torch.zeros(3, len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            enc, n = encoded[index], len(encoded[index].input_ids)
            own = enc.positions if enc.positions is not None else torch.arange(n).expand(3, -1)
            positions[:, r, offset : offset + n] = own
            offset += n
    return {"position_ids": positions}
