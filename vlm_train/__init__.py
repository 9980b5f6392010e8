"""vlm_train: train vision-language models from a laptop CPU to a DGX SuperPOD.

`compose(overrides)` gives the config the CLI would build; `build_model(cfg)` builds its model.
"""

from vlm_train.config import compose
from vlm_train.errors import UserError

__version__ = "0.1.0"


def build_model(cfg, tokenizer=None):
    """See `vlm_train.build.build_model` (imported lazily: transformers is heavy)."""
    from vlm_train.build import build_model as _build_model

    return _build_model(cfg, tokenizer)


__all__ = ["UserError", "build_model", "compose"]
