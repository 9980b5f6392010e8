"""Tokenizers: the built-in toy tokenizer, or a Hugging Face tokenizer from a local path.

Either way the tokenizer gains the `<image>` token (one id per visual-token slot) and a pad token;
with video (data.video) also `<video>`, and the toy tokenizer the words of the video toy's questions.
"""

from __future__ import annotations

from vlm_train.config import LLMConfig
from vlm_train.data.synthetic import RELATION_VOCABULARY, VOCABULARY
from vlm_train.errors import ConfigError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# The Qwen-VL family's own media tokens: an image is <|vision_start|><|image_pad|>...<|vision_end|>,
# one <|image_pad|> per visual token (a video: <|video_pad|>). A tokenizer that has them uses them
# for `<image>` / `<video>` markers (`media_tokens`) and gains no `<image>` of its own.
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"
TOY_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
TOY_CHAT_WORDS = ["USER", "ASSISTANT", ":"]
TOY_TOKENIZERS = ("toy", "toy-relations")  # llm.tokenizer names of the built-in word-level tokenizers


def build_toy_tokenizer(video: bool = False, relations: bool = False):
    """A word-level tokenizer over the synthetic scenes' vocabulary, as a HF fast tokenizer. With
    `relations` (llm.tokenizer=toy-relations) the relations task's words follow, with `video` the video
    toy's words and `<video>` after all others: the toy's ids stay as they were."""
    # Lazy: transformers takes seconds to import, and `vlm-shards` imports this module (IMAGE_TOKEN).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = TOY_SPECIAL + TOY_CHAT_WORDS + [w for w in VOCABULARY if w not in TOY_CHAT_WORDS]
    words += RELATION_VOCABULARY if relations else []
    if video:
        from vlm_train.data.synthetic_video import VIDEO_VOCABULARY

        words += list(VIDEO_VOCABULARY)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *([VIDEO_TOKEN] if video else [])]})
    return tokenizer


def load_tokenizer(cfg: LLMConfig, video: bool = False):
    """The decoder's tokenizer: "toy" ("toy-relations": with the relations task's words), a local dir
    (`llm.tokenizer`), or the one beside `llm.path`; with `video` (data.video) it also has `<video>`."""
    source = cfg.tokenizer or cfg.path
    if source in TOY_TOKENIZERS:
        return build_toy_tokenizer(video, relations=source == "toy-relations")
    if not source:
        raise ConfigError("llm.tokenizer is required when llm.path is not set (use llm.tokenizer=toy for the toy)")
    from transformers import AutoTokenizer  # lazy, as above

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(f"cannot load a tokenizer from {source}: {err}") from None
    if is_qwen_vl_tokenizer(tokenizer):
        video = False  # <|video_pad|> is there already
    missing = [t for t in media_tokens(tokenizer)[: 1 + video] if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def is_qwen_vl_tokenizer(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in (QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END))


def media_tokens(tokenizer) -> tuple[str, str]:
    """The (image, video) slot tokens of `tokenizer`: Qwen-VL's pads where it has them, else ours."""
    if is_qwen_vl_tokenizer(tokenizer):
        return QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN
    return IMAGE_TOKEN, VIDEO_TOKEN


def media_token_ids(tokenizer) -> tuple[int, int | None]:
    """The ids of `media_tokens` (the video one None where the tokenizer has no video token)."""
    image, video = media_tokens(tokenizer)
    video_id = tokenizer.get_vocab().get(video)
    return tokenizer.convert_tokens_to_ids(image), video_id
