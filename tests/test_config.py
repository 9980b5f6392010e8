"""Configs: every preset composes and builds; user mistakes are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_train import build_model, compose
from vlm_train.config import CONFIG_DIR
from vlm_train.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny HF checkpoints on disk standing in for CLIP ViT-L and Vicuna-7B (with a tokenizer)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlm_train.data.tokenizer import build_toy_tokenizer

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(root / "clip")
    tokenizer = build_toy_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return {"vision": root / "clip", "llm": root / "llama", "root": root}


def test_presets_are_found():
    assert {"toy", "llava15-7b-stage1", "llava15-7b-stage2"} <= set(EXPERIMENTS)


def test_toy_composes_and_builds():
    cfg = compose(["experiment=toy"])
    assert cfg.connector.name == "mlp" and cfg.train.max_steps > 0
    model = build_model(cfg)
    assert model.num_image_tokens == (cfg.vision.image_size // cfg.vision.patch_size) ** 2


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("llava")])
def test_real_recipe_needs_paths(experiment):
    with pytest.raises(ConfigError, match=r"required but not set: .*llm\.path.*vision\.path"):
        compose([f"experiment={experiment}"])
    if experiment.endswith("stage2"):
        with pytest.raises(ConfigError, match=r"connector\.path"):
            compose([f"experiment={experiment}", "vision.path=v", "llm.path=l", "data.urls=d"])


def test_llava_stages_build_from_local_checkpoints(tiny_checkpoints, tmp_path):
    """Stage 1 trains only the projector; stage 2 loads stage 1's projector and trains the LLM too."""
    paths = [
        f"vision.path={tiny_checkpoints['vision']}",
        f"llm.path={tiny_checkpoints['llm']}",
        "data.urls=unused-{0..1}.tar",
    ]
    stage1 = compose(["experiment=llava15-7b-stage1", *paths])
    assert stage1.train.lr == 1e-3 and stage1.vision.select_layer == -2
    model1 = build_model(stage1)
    trainable = {n.split(".")[0] for n, p in model1.named_parameters() if p.requires_grad}
    assert trainable == {"connector"}
    projector = tmp_path / "mm_projector.bin"  # saved the way LLaVA saves it
    torch.save({f"model.mm_projector.{k}": v for k, v in model1.connector.state_dict().items()}, projector)

    stage2 = compose(["experiment=llava15-7b-stage2", *paths, f"connector.path={projector}"])
    assert stage2.train.lr == 2e-5 and stage2.parallel.zero_stage == 3
    model2 = build_model(stage2)
    trainable = {n.split(".")[0] for n, p in model2.named_parameters() if p.requires_grad}
    assert trainable == {"connector", "llm"}
    for key, value in model1.connector.state_dict().items():
        torch.testing.assert_close(model2.connector.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.no_such_key=1", "no_such_key"),
        ("parallel.zero_stage=4", "parallel.zero_stage=4 is out of range"),
        ("experiment=no_such_experiment", "no_such_experiment"),
        ("connector=no_such_connector", "no_such_connector"),
        ("train.precision=fp8", "train.precision='fp8' is not one of"),
        ("train.max_steps=abc", "max_steps"),
    ],
)
def test_bad_overrides_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["experiment=toy", override])
    with pytest.raises(ConfigError) as caught:
        compose(["experiment=toy", override])
    assert "\n" not in str(caught.value)
