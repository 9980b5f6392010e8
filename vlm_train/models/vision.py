"""Vision towers: Hugging Face CLIP and SigLIP vision models, from a local path or a config.

Legend: I images, C channels, H/W pixels, P patches (visual tokens per image), Dv tower width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm_train.config import VisionConfig
from vlm_train.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Normalisation each family was trained with (used when the checkpoint ships no preprocessor).
IMAGE_STATS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "blip2": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "idefics2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
HAS_CLS = {"clip": True, "siglip": False, "blip2": True, "idefics2": False}
# BLIP-2 and Idefics2 feed their connectors the post-layernormed last layer (last_hidden_state).
USES_LAST_HIDDEN_STATE = {"blip2", "idefics2"}


class VisionTower(nn.Module):
    """Runs a HF vision model and returns one hidden layer's patch features [I, P, Dv].

    `select_layer` indexes `hidden_states` (-1 = last layer, -2 = penultimate as in LLaVA-1.5);
    `drop_cls` removes the CLS token of towers that have one. BLIP-2 and Idefics2 towers give
    their post-layernormed last layer instead, as those models do.
    """

    def __init__(self, hf_model: PreTrainedModel, family: str, select_layer: int, drop_cls: bool):
        super().__init__()
        self.hf_model = hf_model
        self.family = family
        self.select_layer = select_layer
        self.drop_cls = drop_cls and HAS_CLS[family]
        config = hf_model.config
        self.hidden_size: int = config.hidden_size
        self.image_size: int = config.image_size
        self.patch_size: int = config.patch_size
        patches = (config.image_size // config.patch_size) ** 2
        self.num_features: int = patches + int(HAS_CLS[family] and not self.drop_cls)  # tokens per image
        self.image_mean, self.image_std = IMAGE_STATS[family]

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the selected features never depend on: layers after `select_layer`, the
        post-layernorm and SigLIP's pooling head. Kept (checkpoints stay loadable), never trained."""
        body = getattr(self.hf_model, "vision_model", self.hf_model)  # transformers 4 nests it
        if self.family in USES_LAST_HIDDEN_STATE:
            unused = []
        else:
            layers = body.encoder.layers
            selected = self.select_layer % (len(layers) + 1)  # index into hidden_states (0 = embeddings)
            unused = [*layers[selected:], body.post_layernorm]
        if getattr(body, "head", None) is not None:
            unused.append(body.head)
        return [p for module in unused for p in module.parameters()]

    def normalize(self, pixels_ICHW: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, as the data loader sends them -> the floats this tower expects."""
        return normalize_pixels(pixels_ICHW, self.image_mean, self.image_std)

    def forward(self, pixels_ICHW: torch.Tensor, patch_mask_IHW: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_mask_IHW` (True: the patch holds image, not padding) is read by Idefics2's tower,
        the one family that takes images padded to a common size."""
        if patch_mask_IHW is not None:
            if self.family != "idefics2":
                raise ValueError(f"pixel_attention_mask marks padded pixels, which a {self.family} tower cannot mask")
            return self.hf_model(pixel_values=pixels_ICHW, patch_attention_mask=patch_mask_IHW).last_hidden_state
        if self.family in USES_LAST_HIDDEN_STATE:
            features_IPDv = self.hf_model(pixel_values=pixels_ICHW).last_hidden_state
        else:
            features_IPDv = self.hf_model(pixel_values=pixels_ICHW, output_hidden_states=True).hidden_states[
                self.select_layer
            ]
        if self.drop_cls:
            features_IPDv = features_IPDv[:, 1:]
        return features_IPDv


def normalize_pixels(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """A tower from `cfg.path` (local HF checkpoint) or, without a path, from the size fields."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if cfg.family in ("blip2", "idefics2"):
        return _imported_tower(cfg)
    model_cls, config_cls = {
        "clip": (CLIPVisionModel, CLIPVisionConfig),
        "siglip": (SiglipVisionModel, SiglipVisionConfig),
    }[cfg.family]
    if cfg.path:
        _require_dir(cfg.path, "vision.path")
        hf_model = model_cls.from_pretrained(cfg.path, torch_dtype=torch.float32)
    else:
        hf_config = config_cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_channels=3,
        )
        hf_model = model_cls(hf_config)
    tower = VisionTower(hf_model, cfg.family, cfg.select_layer, cfg.drop_cls)
    if cfg.path:
        tower.image_mean, tower.image_std = _checkpoint_image_stats(cfg.path, tower)
    return tower


def _imported_tower(cfg: VisionConfig) -> VisionTower:
    """BLIP-2's and Idefics2's own towers, as `vlm-convert from-hf` writes them."""
    from transformers import Blip2VisionModel
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    if not cfg.path:
        raise ConfigError(f"vision.family={cfg.family} loads from vision.path only (see vlm-convert from-hf)")
    _require_dir(cfg.path, "vision.path")
    model_cls = Blip2VisionModel if cfg.family == "blip2" else Idefics2VisionTransformer
    return VisionTower(model_cls.from_pretrained(cfg.path, torch_dtype=torch.float32), cfg.family, -1, drop_cls=False)


def _checkpoint_image_stats(path: str, tower: VisionTower) -> tuple[tuple, tuple]:
    processor_file = Path(path) / "preprocessor_config.json"
    if not processor_file.exists():
        return tower.image_mean, tower.image_std
    processor = json.loads(processor_file.read_text())
    return (
        tuple(processor.get("image_mean", tower.image_mean)),
        tuple(processor.get("image_std", tower.image_std)),
    )


def _require_dir(path: str, key: str) -> None:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}={path} is not a directory: give a local Hugging Face checkpoint dir")
