"""Qwen2-VL's PatchMerger: each 2 x 2 block of patches -> one visual token (a quarter of the tokens).

The merger is transformers' own module (Qwen2-VL: LayerNorm; Qwen2.5-VL: RMSNorm, `norm=rmsnorm`;
Qwen3-VL: its own, with one more merger per DeepStack layer of the tower, `deepstack`), so a Qwen-VL
import hands it over as it is. It reads merge units: a native-resolution tower
(models/qwen_vl.py) gives its patches in that order already (`merge_units`); a fixed-grid tower's
patch grid [I, G*G, Dv] is regrouped into 2 x 2 blocks first (`forward`), so the connector works
with CLIP and SigLIP towers too (G even).

Legend: I images, P = G*G patches per image, N patches (merge-unit order), Dv tower width,
Dl decoder width, m the merge size (2).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_train.config import PatchMergerConnectorConfig
from vlm_train.errors import ConfigError
from vlm_train.models.connectors.base import Connector


class PatchMergerConnector(Connector[PatchMergerConnectorConfig]):
    config_class = PatchMergerConnectorConfig

    def __init__(self, merger: nn.Module, merge_size: int, num_patches: int, deepstack: nn.ModuleList | None = None):
        super().__init__()
        self.merger = merger
        self.merge_size = merge_size
        self.num_tokens = num_patches // merge_size**2
        self.deepstack = deepstack if deepstack is not None else nn.ModuleList()

    @classmethod
    def qwen3(cls, tower_config, deepstack_layers: int) -> PatchMergerConnector:
        """Qwen3-VL's merger (LayerNorm before the 2 x 2 shuffle) and one merger per DeepStack layer
        (LayerNorm after it), from the tower's transformers config."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

        merger = Qwen3VLVisionPatchMerger(tower_config, use_postshuffle_norm=False)
        deepstack = nn.ModuleList(
            Qwen3VLVisionPatchMerger(tower_config, use_postshuffle_norm=True) for _ in range(deepstack_layers)
        )
        merge = tower_config.spatial_merge_size
        return cls(merger, merge, merge**2, deepstack)

    @classmethod
    def from_config(
        cls, cfg: PatchMergerConnectorConfig, vision_dim: int, llm_dim: int, num_patches: int
    ) -> PatchMergerConnector:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

        if cfg.norm not in ("layernorm", "rmsnorm") or cfg.merge_size < 1:
            raise ConfigError(f"connector.norm={cfg.norm}, merge_size={cfg.merge_size}: use layernorm|rmsnorm, >= 1")
        merger_cls = PatchMerger if cfg.norm == "layernorm" else Qwen2_5_VLPatchMerger
        return cls(merger_cls(llm_dim, vision_dim, cfg.merge_size), cfg.merge_size, num_patches)

    def merge_units(self, patches_NDv: torch.Tensor) -> torch.Tensor:
        """Patches in merge-unit order [N, Dv] -> visual tokens [N / m^2, Dl]."""
        return self.merger(patches_NDv)

    def merge_deepstack(self, layer: int, patches_NDv: torch.Tensor) -> torch.Tensor:
        """The k-th DeepStack layer's patches (merge-unit order) [N, Dv] -> its tokens [N / m^2, Dl]."""
        return self.deepstack[layer](patches_NDv)

    def forward(self, features_IPDv: torch.Tensor) -> torch.Tensor:
        """A fixed-grid tower's patch grid [I, G*G, Dv] -> [I, G*G / m^2, Dl], blocks in row-major order."""
        images, patches, width = features_IPDv.shape
        grid, m = int(round(patches**0.5)), self.merge_size
        if grid * grid != patches or grid % m:
            raise ConfigError(
                f"connector=patch_merger merges {m} x {m} blocks of a square patch grid: {patches} patches is not "
                f"one whose side is a multiple of {m} (drop the CLS token: vision.drop_cls=true)"
            )
        blocks = features_IPDv.view(images, grid // m, m, grid // m, m, width).transpose(2, 3)
        return self.merge_units(blocks.reshape(-1, width)).view(images, patches // m**2, -1)
