"""vlm_train: train vision-language models from a laptop CPU to a DGX SuperPOD.

`compose(overrides)` gives the config the CLI would build; `build_model(cfg)` builds its model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_train.config import compose
from vlm_train.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlm_train.config import Config
    from vlm_train.models.vlm import VisionLanguageModel

__version__ = "0.1.0"


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None) -> VisionLanguageModel:
    """See `vlm_train.build.build_model` (imported lazily: transformers is heavy)."""
    from vlm_train.build import build_model as _build_model

    return _build_model(cfg, tokenizer)


__all__ = ["UserError", "build_model", "compose"]
