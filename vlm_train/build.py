"""Build a VisionLanguageModel from a composed config; each component from its own section."""

from __future__ import annotations

from torch import nn

from vlm_train.config import Config
from vlm_train.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from vlm_train.errors import ConfigError
from vlm_train.models import VisionLanguageModel, build_connector, build_llm, build_vision_tower


def build_model(cfg: Config, tokenizer=None) -> VisionLanguageModel:
    """The model the config describes: tower, connector and decoder, frozen as configured.

    `tokenizer` defaults to `cfg.llm`'s; the decoder's vocabulary grows to fit it (image token).
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.llm)
    vision = build_vision_tower(cfg.vision)
    llm = build_llm(cfg.llm, vocab_size=len(tokenizer))
    connector = build_connector(
        cfg.connector, vision_dim=vision.hidden_size, llm_dim=llm.hidden_size, num_patches=vision.num_features
    )
    model = VisionLanguageModel(vision, connector, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    llm_frozen = cfg.llm.freeze or connector.freezes_llm()
    vision_frozen = cfg.vision.freeze or connector.freezes_llm()
    for module, frozen in ((vision, vision_frozen), (llm, llm_frozen), (connector, cfg.connector.freeze)):
        _set_trainable(module, not frozen)
    # Never trained: tower parts no gradient reaches (ZeRO would wait for it), fixed connector parts.
    for param in vision.unused_parameters() + connector.fixed_parameters():
        param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("vision, llm and connector are all frozen: nothing would train")
    return model


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)
