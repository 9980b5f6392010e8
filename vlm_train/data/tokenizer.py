"""Tokenizers: the built-in toy tokenizer, or a Hugging Face tokenizer from a local path.

Either way the tokenizer gains the `<image>` token (one id per visual-token slot) and a pad token;
with video (data.video) also `<video>`, and the toy tokenizer the words of the video toy's questions.
"""

from __future__ import annotations

from vlm_train.config import LLMConfig
from vlm_train.data.synthetic import VOCABULARY
from vlm_train.errors import ConfigError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
TOY_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
TOY_CHAT_WORDS = ["USER", "ASSISTANT", ":"]


def build_toy_tokenizer(video: bool = False):
    """A word-level tokenizer over the synthetic scenes' vocabulary, as a HF fast tokenizer (with
    `video`, the video toy's words and `<video>` after all others: image-only ids stay as they were)."""
    # Lazy: transformers takes seconds to import, and `vlm-shards` imports this module (IMAGE_TOKEN).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = TOY_SPECIAL + TOY_CHAT_WORDS + [w for w in VOCABULARY if w not in TOY_CHAT_WORDS]
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
    """The decoder's tokenizer: "toy", a local dir (`llm.tokenizer`), or the one beside `llm.path`;
    with `video` (data.video) it also has `<video>`."""
    source = cfg.tokenizer or cfg.path
    if source == "toy":
        return build_toy_tokenizer(video)
    if not source:
        raise ConfigError("llm.tokenizer is required when llm.path is not set (use llm.tokenizer=toy for the toy)")
    from transformers import AutoTokenizer  # lazy, as above

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(f"cannot load a tokenizer from {source}: {err}") from None
    missing = [t for t in (IMAGE_TOKEN, *([VIDEO_TOKEN] if video else [])) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
