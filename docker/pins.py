"""The install inputs of docker/Dockerfile, also read by its dry run (docker/dry_run.py):

    python docker/pins.py OUT_DIR   ->  OUT_DIR/requirements.txt  pyproject.toml's dependencies
                                        OUT_DIR/pins.txt          the ML stack's lock lines from
                                                                  constraints.txt (torch, numpy and
                                                                  pillow stay the base image's)

Run from the repository root (the Dockerfile's WORKDIR holds both files). Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# What the lock pins in the image: the libraries vlm_train is written against. Everything else
# (their own dependencies included) resolves within the base image's /etc/pip/constraint.txt.
LOCKED = (
    "deepspeed",
    "megatron-core",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "webdataset",
    "wandb",
    "hydra-core",
    "omegaconf",
)


def pins(constraints: str) -> list[str]:
    found = [line.strip() for line in constraints.splitlines() if re.match(rf"^({'|'.join(LOCKED)})==", line)]
    missing = set(LOCKED) - {line.split("==")[0] for line in found}
    if missing:
        sys.exit(f"docker/pins.py: constraints.txt has no pin for {', '.join(sorted(missing))}")
    return found


def main(out: str) -> None:
    root = Path.cwd()
    requirements = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    Path(out, "requirements.txt").write_text("\n".join(requirements) + "\n")
    Path(out, "pins.txt").write_text("\n".join(pins((root / "constraints.txt").read_text())) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
