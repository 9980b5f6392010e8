"""CONTRIBUTING.md is followed once here, so it cannot rot silently.

The "Add a connector" recipe is done step by step from outside the package (a plugin's way:
schema registered with `@connector_schema`, class with `register_connector`, its YAML in a copy of
configs/), and the tiny VLM built with that connector trains on images. Every file path and every
`from vlm_train... import` line the document names must still exist.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vlm_train.config
from tests.helpers import REPO, make_batch
from vlm_train import build_model, compose
from vlm_train.config import CONFIG_DIR, CONNECTOR_SCHEMAS, ConnectorConfig, connector_schema
from vlm_train.data.tokenizer import build_toy_tokenizer
from vlm_train.errors import ConfigError
from vlm_train.models.connectors import CONNECTORS, Connector, register_connector

DOC = REPO / "CONTRIBUTING.md"
TOKENIZER = build_toy_tokenizer()

# The recipe's step 3: configs/connector/<name>.yaml builds on the schema registered as <name>_schema.
IDENTITY_YAML = """\
# Patch features as they are: one visual token per patch (tower width = LLM width).
defaults:
  - identity_schema
  - _self_
path: null
"""


@pytest.fixture
def identity_connector() -> Iterator[type[Connector]]:
    """Steps 1 and 2 of the recipe, registered for one test and unregistered after it."""
    assert "identity" not in CONNECTOR_SCHEMAS and "identity" not in CONNECTORS

    @connector_schema
    @dataclass
    class IdentityConnectorConfig(ConnectorConfig):
        """Patch features as visual tokens, unchanged (vision.hidden_size must equal llm.hidden_size)."""

        name: str = "identity"

    class IdentityConnector(Connector[IdentityConnectorConfig]):
        """features [I, P, Dv] -> tokens [I, P, Dl] with Dv = Dl: one visual token per patch."""

        config_class = IdentityConnectorConfig

        def __init__(self, num_patches: int):
            super().__init__()
            self.num_tokens = num_patches

        @classmethod
        def from_config(
            cls, cfg: IdentityConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int
        ) -> IdentityConnector:
            if vision_dim != llm_dim:
                raise ConfigError(
                    f"connector=identity needs vision.hidden_size={vision_dim} equal to the LLM's {llm_dim}"
                )
            return cls(num_patches)

        def forward(self, features_IPDv: torch.Tensor) -> torch.Tensor:
            return features_IPDv

    register_connector(IdentityConnector)
    try:
        yield IdentityConnector
    finally:
        CONNECTORS.pop("identity", None)
        CONNECTOR_SCHEMAS.pop("identity", None)


@pytest.fixture
def configs_with_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Step 3 in a copy of configs/ (what VLM_TRAIN_CONFIGS points a run at), not in the repo."""
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "connector" / "identity.yaml").write_text(IDENTITY_YAML)
    monkeypatch.setattr(vlm_train.config, "CONFIG_DIR", configs)
    return configs


def test_connector_recipe_gives_a_connector_that_trains_on_images(identity_connector, configs_with_identity):
    """`connector=identity` composes and builds; forward + backward on images; the loss depends on
    the pixels and their gradient reaches the tower through the connector."""
    torch.manual_seed(0)
    cfg = compose(["experiment=toy", "connector=identity", "vision.hidden_size=128", "vision.freeze=false"])
    model = build_model(cfg, TOKENIZER)
    assert isinstance(model.connector, identity_connector)
    pixels, input_ids, mask, labels = make_batch(model, TOKENIZER)
    out = model(pixels, input_ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        other = model(torch.randn_like(pixels), input_ids, attention_mask=mask, labels=labels).loss
    assert abs(other.item() - out.loss.item()) > 1e-4, (out.loss.item(), other.item())
    out.loss.backward()
    patch_grad = model.vision.hf_model.embeddings.patch_embedding.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0


def test_connector_recipe_width_check_is_one_line(identity_connector, configs_with_identity):
    with pytest.raises(ConfigError, match="connector=identity needs vision.hidden_size=64"):
        build_model(compose(["experiment=toy", "connector=identity"]), TOKENIZER)


# --- the document names what exists -----------------------------------------------------------

PATH = re.compile(r"`((?:vlm_train|configs|tests|docs|launch|bench)/[^`\s]*|[A-Za-z_]+\.(?:md|toml|txt)|Makefile)`")
IMPORT = re.compile(r"^\s*(from vlm_train[\w.]* import [\w, ]+)$", re.MULTILINE)


def test_every_path_in_contributing_exists():
    """A backticked path must exist; one with a <placeholder> must have its folder."""
    paths = PATH.findall(DOC.read_text())
    assert len(paths) >= 20, paths  # the recipes name their files
    missing = []
    for path in paths:
        concrete = path.split("<")[0].rsplit("/", 1)[0] if "<" in path else path.split("::")[0]
        if not (REPO / concrete).exists():
            missing.append(path)
    assert not missing, missing


def test_every_import_in_contributing_works():
    """The recipes' code imports names that exist (a renamed API fails here, not in a reader's hands)."""
    lines = IMPORT.findall(DOC.read_text())
    assert len(lines) >= 3, lines
    for line in lines:
        exec(line, {})


NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def test_every_name_in_contributing_exists_in_the_code():
    """A backticked name (`register_connector`, `Placement.SEQUENCE`, `data.samples_per_shard`) is
    still spelled somewhere in the package, its tests, configs or Makefile: a rename shows here."""
    sources = [
        *(REPO / "vlm_train").rglob("*.py"),
        *(REPO / "tests").rglob("*.py"),
        *(REPO / "configs").rglob("*.yaml"),
    ]
    words = set(re.findall(r"\w+", "\n".join(p.read_text() for p in [*sources, REPO / "Makefile"])))
    names = NAME.findall(DOC.read_text())
    assert len(names) >= 30, names
    unknown = sorted({name for name in names if not set(name.split(".")) <= words})
    assert not unknown, unknown
