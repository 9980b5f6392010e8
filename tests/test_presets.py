"""Every preset under configs/ composes as `vlm-train` composes it, validates, and builds at meta size
(shapes only, no memory: vlm_train.plan.build_meta_model) into the model it promises. Presets that
name local checkpoints get folders holding only their config.json (tests/helpers.py), as vlm-plan
reads them; a preset whose checkpoint shapes are unknown here fails with the reason, never skips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.helpers import CHECKPOINT_CONFIGS, LLAMA2_TOKENIZER, QWEN2_VL_TOKENIZER, REPO, write_config_only_folder
from vlm_train.config import compose
from vlm_train.errors import ConfigError
from vlm_train.plan import build_meta_model

CONFIGS = REPO / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "connector_size")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def presets() -> dict[str, list[str]]:
    """{test id: overrides}: each option of each group on the default config; each connector_size
    option `<experiment>_<connector>` through the selection that picks it."""
    chosen = {
        f"{group}={option}": [f"{group}={option}", *COMPANIONS.get(f"{group}={option}", [])]
        for group in GROUPS
        for option in options(group)
    }
    for option in options("connector_size"):
        experiment, connector = option.split("_", 1)
        chosen[f"connector_size={option}"] = [f"experiment={experiment}", f"connector={connector}"]
    return chosen


# Options that build only together with others: the Qwen-VL parts are one model, and patch_merger merges
# 2 x 2 blocks of patches (the toy tower's 3 x 3 grid becomes 4 x 4)
QWEN_VL_7B = ["vision=qwen2_5-vl-7b", "llm=qwen2_5-vl-7b", "connector=patch_merger"]
QWEN3_VL_8B = ["vision=qwen3-vl-8b", "llm=qwen3-vl-8b", "connector=patch_merger"]
COMPANIONS = {
    "vision=qwen2_5-vl-7b": QWEN_VL_7B[1:],
    "llm=qwen2_5-vl-7b": QWEN_VL_7B[::2],
    "vision=qwen3-vl-8b": QWEN3_VL_8B[1:],
    "llm=qwen3-vl-8b": QWEN3_VL_8B[::2],
    "connector=patch_merger": ["vision.patch_size=12"],
}

# id: (total parameters within a factor of two, connector class, image-token slots per image)
EXPECTED = {
    "experiment=toy": (5.8e5, "MLPConnector", 9),
    "experiment=toy-anyres": (5.8e5, "MLPConnector", 24),  # a 48 px image: base view + 1 x 2 tiles unpadded
    "experiment=toy-video": (5.8e5, "MLPConnector", 24),  # AnyRes as toy-anyres (a video: 2 frames x 4 + 1)
    "experiment=llava15-7b-stage1": (7.06e9, "MLPConnector", 576),
    "experiment=llava15-7b-stage2": (7.06e9, "MLPConnector", 576),
    "experiment=qwen2_5-vl-7b-sft": (8.29e9, "PatchMergerConnector", 1),  # slots per 28 px merge unit
    "experiment=toy-qwen2_5-vl": (6.6e5, "PatchMergerConnector", 1),
    "vision=qwen2_5-vl-7b": (8.29e9, "PatchMergerConnector", 1),
    "llm=qwen2_5-vl-7b": (8.29e9, "PatchMergerConnector", 1),
    "experiment=qwen3-vl-8b-sft": (8.77e9, "PatchMergerConnector", 1),  # 8,767,123,696: transformers' count
    "experiment=toy-qwen3-vl": (6.6e5, "PatchMergerConnector", 1),
    "experiment=toy-dpo": (6.2e5, "MLPConnector", 9),  # the toy + LoRA updates on the decoder
    "experiment=toy-lm": (4.0e5, "LanguageModel", 0),  # objective=lm: the toy decoder alone
    "experiment=toy-clip": (1.8e5, "DualEncoder", 0),  # objective=clip: the toy tower + a text tower
    "experiment=toy-stage1": (5.9e5, "MLPConnector", 9),  # the toy with toy-clip's tower and toy-lm's decoder
    "vision=qwen3-vl-8b": (8.77e9, "PatchMergerConnector", 1),
    "llm=qwen3-vl-8b": (8.77e9, "PatchMergerConnector", 1),
    "connector=patch_merger": (5.8e5, "PatchMergerConnector", 4),
    "data=qwen-vl-sft": (5.8e5, "MLPConnector", 9),
    "vision=clip-tiny": (5.8e5, "MLPConnector", 9),
    "vision=siglip-tiny": (6.3e5, "MLPConnector", 9),
    "vision=clip-vit-l-336px": (3e8, "MLPConnector", 576),
    "vision=siglip-so400m-384px": (4.3e8, "MLPConnector", 729),
    "llm=llama-tiny": (5.8e5, "MLPConnector", 9),
    "llm=vicuna-7b": (6.76e9, "MLPConnector", 9),
    "connector=mlp": (5.8e5, "MLPConnector", 9),
    "connector=mlp-pretrained": (5.8e5, "MLPConnector", 9),
    "connector=qformer": (9.3e7, "QFormerConnector", 32),
    "connector=perceiver": (2.8e6, "PerceiverConnector", 64),
    "connector=ln_adapter": (5.6e5, "LNAdapterConnector", 9),
    "connector=cross_attention": (9.6e5, "CrossAttentionConnector", 1),
    "connector_size=toy_mlp": (5.8e5, "MLPConnector", 9),
    "connector_size=toy_qformer": (7e5, "QFormerConnector", 9),
    "connector_size=toy_perceiver": (1.1e6, "PerceiverConnector", 9),
    "connector_size=toy_ln_adapter": (5.6e5, "LNAdapterConnector", 9),
    "connector_size=toy_cross_attention": (8.3e5, "CrossAttentionConnector", 1),
    "connector_size=toy-stage1_mlp": (5.8e5, "MLPConnector", 9),  # toy-stage1: the toy's connector sizes
    "connector_size=toy-stage1_qformer": (7e5, "QFormerConnector", 9),
    "connector_size=toy-stage1_perceiver": (1.1e6, "PerceiverConnector", 9),
    "connector_size=toy-stage1_ln_adapter": (5.6e5, "LNAdapterConnector", 9),
    "connector_size=toy-stage1_cross_attention": (8.3e5, "CrossAttentionConnector", 1),
    "data=toy": (5.8e5, "MLPConnector", 9),
    "data=toy-anyres": (5.8e5, "MLPConnector", 9),
    "data=toy-video": (5.8e5, "MLPConnector", 9),
    "data=llava-pretrain": (5.8e5, "MLPConnector", 9),
    "data=llava-instruct": (5.8e5, "MLPConnector", 9),
    "parallel=default": (5.8e5, "MLPConnector", 9),
    "train=default": (5.8e5, "MLPConnector", 9),
}


def selected(group: str, overrides: list[str]) -> str:
    """The option of `group` the overrides select: given, else the experiment's, else config.yaml's."""
    given = dict(override.split("=", 1) for override in overrides)
    files = [CONFIGS / "experiment" / f"{given['experiment']}.yaml"] if "experiment" in given else []
    for file in files + [CONFIGS / "config.yaml"]:
        for entry in yaml.safe_load(file.read_text()).get("defaults", []):
            if isinstance(entry, dict):
                given.setdefault(next(iter(entry)).removeprefix("override /"), next(iter(entry.values())))
    return given[group]


def required_values(missing: list[str], overrides: list[str], root: Path) -> list[str]:
    """What a user would give for the keys `vlm-train` says are required: checkpoint folders (here
    config.json only), a shard pattern and a stage-1 connector file (neither read at meta size)."""
    values = []
    for key in missing:
        group = key.split(".")[0]
        if key in ("vision.path", "llm.path"):
            option = selected(group, overrides)
            if option not in CHECKPOINT_CONFIGS[group]:
                pytest.fail(
                    f"{group}={option} needs {key}: add its config.json to CHECKPOINT_CONFIGS in tests/helpers.py"
                )
            qwen = {"qwen2_5-vl-7b": QWEN2_VL_TOKENIZER, "qwen3-vl-8b": QWEN2_VL_TOKENIZER}
            tokenizer = {"vicuna-7b": LLAMA2_TOKENIZER, **qwen}.get(option)
            folder = write_config_only_folder(root / option, CHECKPOINT_CONFIGS[group][option], tokenizer)
            values.append(f"{key}={folder}")
        elif key == "data.urls":
            values.append(f"data.urls={root / 'shards'}/part-{{000..009}}.tar")
        elif key == "connector.path":
            values.append(f"connector.path={root / 'stage1-not-run-yet' / 'mm_projector.bin'}")
        else:
            pytest.fail(f"{overrides}: required key {key} has no stand-in in tests/test_presets.py")
    return values


def pretrained_toy_parts(overrides: list[str], root: Path) -> list[str]:
    """experiment=toy-stage1 loads what toy-clip and toy-lm write to <run.dir>/hf: config-only folders of
    those models (built at meta size from their presets) stand in for runs not made here."""
    try:
        cfg, given = compose(overrides), []
    except ConfigError:  # a preset with required keys: none of them loads a pretrained toy part
        return []
    if cfg.vision.path == "runs/toy-clip/hf" and not (REPO / cfg.vision.path).is_dir():
        towers = meta_pretraining_model(compose(["experiment=toy-clip"])).hf_model
        given.append(f"vision.path={write_config_only_folder(root / 'toy-clip', towers.config.to_dict())}")
    if cfg.llm.path == "runs/toy-lm/hf" and not (REPO / cfg.llm.path).is_dir():
        decoder = meta_pretraining_model(compose(["experiment=toy-lm"])).llm.hf_model
        given.append(f"llm.path={write_config_only_folder(root / 'toy-lm', decoder.config.to_dict())}")
    return given


def compose_preset(name: str, overrides: list[str], root: Path):
    """compose() as the CLI calls it; a missing required key is given as a user would give it, a
    pretrained toy part by a config-only folder."""
    overrides = [*overrides, *pretrained_toy_parts(overrides, root)]
    try:
        return compose(overrides)
    except ConfigError as err:
        if not str(err).startswith("required but not set: "):
            pytest.fail(f"preset {name} does not compose: {err}")
        missing = str(err).removeprefix("required but not set: ").split(" (")[0].split(", ")
    try:
        return compose([*overrides, *required_values(missing, overrides, root)])
    except ConfigError as err:
        pytest.fail(f"preset {name} does not compose: {err}")


def meta_pretraining_model(cfg):
    """objective=lm|clip|siglip: the model the run trains (no connector), with meta tensors."""
    import torch

    from vlm_train.build import build_run_model

    with torch.device("meta"):
        return build_run_model(cfg)


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_composes_validates_and_builds_at_meta_size(name, tmp_path):
    assert name in EXPECTED, f"preset {name} is new: add its expected sizes to EXPECTED in tests/test_presets.py"
    cfg = compose_preset(name, presets()[name], tmp_path)
    model = build_meta_model(cfg) if cfg.objective in ("sft", "dpo") else meta_pretraining_model(cfg)
    params, connector, image_tokens = EXPECTED[name]
    total = sum(p.numel() for p in model.parameters())
    assert abs(math.log10(total / params)) < math.log10(2), f"{name}: {total:,} parameters, expected ~{params:.2g}"
    assert type(model.connector or model).__name__ == connector, name
    assert model.num_image_tokens == image_tokens, name


def test_expected_table_names_only_existing_presets():
    assert sorted(EXPECTED) == sorted(presets())
