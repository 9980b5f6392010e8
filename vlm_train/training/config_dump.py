"""The config as the run dir keeps it (`config.yaml`, a checkpoint's copy, wandb's config), with
the value of every secret-looking environment variable redacted."""

from __future__ import annotations

import os
import re

from vlm_train.config import Config, to_yaml

# Environment variables whose values never reach a file of the run dir.
SECRET_NAME = re.compile(r"^(WANDB_API_KEY|HF_TOKEN)$|_TOKEN$|_SECRET|SECRET_|_KEY$|PASSWORD")


def redact_secrets(text: str) -> str:
    """`text` with the value of every secret-looking environment variable replaced by its name."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8:  # short values ("1", "true") are not secrets
            text = text.replace(value, f"<redacted:{name}>")
    return text


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted: what every config.yaml of a run holds."""
    return redact_secrets(to_yaml(cfg))
