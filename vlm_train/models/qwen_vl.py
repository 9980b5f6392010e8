"""The Qwen-VL family's parts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), as transformers' own modules re-parented:

- `NativeResolutionTower`: the ViT that reads an image at its own size (any multiple of 28 px; Qwen3:
  32) as a sequence of 14 px (16 px) patches, with 2-D RoPE, Qwen2.5's window attention, Qwen3's
  interpolated absolute position embeddings; its output is every patch's features in merge-unit
  order (each 2 x 2 block of patches, four rows in a row), the order its PatchMerger reads
  (connectors/patch_merger.py), and for Qwen3 (DeepStack) also those of its `deepstack_layers`;
- `MRopeCausalLM`: the decoder whose rotary positions are 3-D (temporal, height, width: M-RoPE;
  Qwen3: interleaved), and which adds Qwen3's DeepStack features to the visual tokens' hidden
  states after its first layers (`deepstack`);
- `mrope_positions`: those positions, as transformers' `get_rope_index` computes them, per sample
  (packed rows restart at every sample).

Legend: N patches of the batch's images and videos, K = C x temporal patch x patch x patch values
per patch, Dv tower width, B rows, T tokens, Dl decoder width.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_train.models.vision import VisionTower

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Qwen2-VL's and Qwen2.5-VL's normalisation (OpenAI CLIP's), as their image processors apply it;
# Qwen3-VL's is [-1, 1] (mean and std 0.5, its preprocessor_config.json).
QWEN_IMAGE_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
QWEN3_IMAGE_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# the processors' default pixel ranges (Qwen3-VL's preprocessor_config.json: 256 to 16384 merge units)
DEFAULT_PIXELS = {"qwen2_vl": (56 * 56, 28 * 28 * 1280), "qwen2_5_vl": (56 * 56, 28 * 28 * 1280)}
DEFAULT_PIXELS["qwen3_vl"] = (65536, 16777216)


class MergeUnits(nn.Module):
    """Stands in for the ViT's own merger: each merge unit's patches [u, Dv] as one row [u * Dv],
    so transformers' forward (Qwen2.5's window un-permutation included) returns them in order."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, patches_NDv: torch.Tensor) -> torch.Tensor:
        return patches_NDv.reshape(-1, self.unit * patches_NDv.shape[-1])


class NativeResolutionTower(VisionTower):
    """Qwen2-VL's / Qwen2.5-VL's / Qwen3-VL's ViT without its mergers: patches [N, K] and each image's
    (or video's) grid (t, h, w) in patches -> features [N, Dv], merge-unit order; with DeepStack
    (Qwen3-VL) [1 + k, N, Dv]: the last layer's, then each of the k `deepstack_layers`' (which the
    connector's DeepStack mergers read). `image_size` is the smallest image (one merge unit): the
    blank image a rank without media runs under ZeRO-3."""

    native_resolution = True

    def __init__(self, hf_model: PreTrainedModel, family: str):
        nn.Module.__init__(self)
        config = hf_model.config
        self.hf_model = hf_model
        self.family = family
        self.select_layer, self.drop_cls = -1, False
        self.merge_size: int = config.spatial_merge_size
        self.temporal_patch_size: int = config.temporal_patch_size
        self.patch_size: int = config.patch_size
        self.hidden_size: int = config.embed_dim if family == "qwen2_vl" else config.hidden_size
        self.image_size = self.patch_size * self.merge_size
        self.num_features = self.merge_size**2
        self.image_mean, self.image_std = QWEN3_IMAGE_STATS if family == "qwen3_vl" else QWEN_IMAGE_STATS
        # the processor's pixel range images are resized into (vision.min_pixels / max_pixels)
        self.min_pixels, self.max_pixels = DEFAULT_PIXELS[family]
        self.deepstack_layers: list[int] = list(getattr(config, "deepstack_visual_indexes", []))
        hf_model.merger = MergeUnits(self.merge_size**2)
        if self.deepstack_layers:
            hf_model.deepstack_merger_list = nn.ModuleList(
                MergeUnits(self.merge_size**2) for _ in self.deepstack_layers
            )

    @property
    def patch_values(self) -> int:
        """K: the values of one patch (channels x temporal patch x patch x patch)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def unused_parameters(self) -> list[nn.Parameter]:
        return []

    def normalize(self, patches_NK: torch.Tensor) -> torch.Tensor:
        """uint8 patches (channel-major, as the processor flattens them) -> normalised floats."""
        mean = torch.tensor(self.image_mean, device=patches_NK.device).view(1, 3, 1)
        std = torch.tensor(self.image_std, device=patches_NK.device).view(1, 3, 1)
        values = patches_NK.float().view(len(patches_NK), 3, -1) / 255.0
        return ((values - mean) / std).view(len(patches_NK), -1)

    def forward(self, patches_NK: torch.Tensor, grids_G3: torch.Tensor | None = None) -> torch.Tensor:
        if grids_G3 is None:
            raise ValueError("a native-resolution tower needs each image's grid (image_grid_thw / video_grid_thw)")
        out = self.hf_model(patches_NK, grid_thw=grids_G3)
        features_NDv = out.pooler_output.reshape(-1, self.hidden_size)
        if not self.deepstack_layers:
            return features_NDv
        return torch.stack([features_NDv, *(units.reshape(-1, self.hidden_size) for units in out.deepstack_features)])

    def blank(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One smallest black image's patches and grid (a rank without media runs it under ZeRO-3)."""
        grid = torch.tensor([[1, self.merge_size, self.merge_size]], device=device)
        return torch.zeros(self.merge_size**2, self.patch_values, device=device), grid


def build_native_tower(family: str, path: str | None, sizes: dict[str, Any]) -> NativeResolutionTower:
    """`vision.family=qwen2_vl|qwen2_5_vl|qwen3_vl`: the ViT of a Qwen2(.5)-VL folder (`vision.path`, as
    `vlm-convert from-hf` writes it) or, without a path, one built from the size fields."""
    model_cls, config_cls = _vision_classes(family)
    if path:
        return NativeResolutionTower(model_cls.from_pretrained(path, torch_dtype=torch.float32), family)
    return NativeResolutionTower(model_cls._from_config(config_cls(**sizes)), family)


def _vision_classes(family: str) -> tuple[Any, Any]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

    return {
        "qwen2_vl": (qwen2.Qwen2VisionTransformerPretrainedModel, qwen2.Qwen2VLVisionConfig),
        "qwen2_5_vl": (qwen2_5.Qwen2_5_VisionTransformerPretrainedModel, qwen2_5.Qwen2_5_VLVisionConfig),
        "qwen3_vl": (qwen3.Qwen3VLVisionModel, qwen3.Qwen3VLVisionConfig),
    }[family]


class MRopeCausalLM(nn.Module):
    """Qwen2(.5)/3-VL's language model and head as a causal LM (transformers has no such class): what
    `CausalLM` wraps. Positions [3, B, T] (M-RoPE) or [B, T] (text: the three the same). Inside
    `deepstack(...)`, a Qwen3-VL decoder adds the DeepStack features to the visual tokens' hidden
    states after its first layers, as transformers' Qwen3VLTextModel does."""

    supports_gradient_checkpointing = True

    def __init__(self, model: PreTrainedModel, lm_head: nn.Linear):
        super().__init__()
        self.model = model
        self.lm_head = lm_head
        self.config = model.config
        self._deepstack: dict[str, Any] = {}

    @contextlib.contextmanager
    def deepstack(self, visual_BT: torch.Tensor, features: list[torch.Tensor]) -> Iterator[None]:
        """Forwards in this context add `features[i]` [X, Dl] (X = visual tokens, row-major order of
        `visual_BT`) to the hidden states at `visual_BT` after decoder layer i."""
        self._deepstack = {"visual_pos_masks": visual_BT, "deepstack_visual_embeds": features}
        try:
            yield
        finally:
            self._deepstack = {}

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def forward(self, inputs_embeds: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        hidden_BTDl = self.model(inputs_embeds=inputs_embeds, **kwargs, **self._deepstack).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden_BTDl))


MROPE_TEXT_MODELS = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")  # transformers' M-RoPE decoders


def _text_classes(family: str) -> tuple[Any, Any]:
    """transformers' (text model, text config) classes of a Qwen-VL family."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

    return {
        "qwen2_vl": (qwen2.Qwen2VLTextModel, qwen2.Qwen2VLTextConfig),
        "qwen2_5_vl": (qwen2_5.Qwen2_5_VLTextModel, qwen2_5.Qwen2_5_VLTextConfig),
        "qwen3_vl": (qwen3.Qwen3VLTextModel, qwen3.Qwen3VLTextConfig),
    }[family]


def mrope_causal_lm(config: Any) -> MRopeCausalLM:
    """An M-RoPE causal LM of a Qwen-VL text config, randomly initialised (weights to be loaded)."""
    model = _text_classes(config.model_type.removesuffix("_text"))[0]._from_config(config)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if config.tie_word_embeddings:
        lm_head.weight = model.embed_tokens.weight
    return MRopeCausalLM(model, lm_head)


def build_mrope_llm(family: str, sizes: dict[str, Any], attn_implementation: str, tie: bool) -> MRopeCausalLM:
    """A Qwen-VL decoder from the size fields (`llm.family=qwen2_vl|qwen2_5_vl|qwen3_vl`)."""
    model_cls, config_cls = _text_classes(family)
    config = config_cls(**sizes, tie_word_embeddings=tie)
    config._attn_implementation = attn_implementation
    model = model_cls._from_config(config, attn_implementation=attn_implementation)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if tie:
        lm_head.weight = model.embed_tokens.weight
    else:
        nn.init.normal_(lm_head.weight, std=config.initializer_range)
    return MRopeCausalLM(model, lm_head)


def per_frame_grids(video_grids_V3: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's video grids as its positions read them: each temporal patch a (1, h, w) grid of its
    own (the text gives each its timestamp and <|vision_start|> ... <|vision_end|>)."""
    grids = video_grids_V3.repeat_interleave(video_grids_V3[:, 0], dim=0).clone()
    grids[:, 0] = 1
    return grids


def mrope_positions(
    input_ids_BT: torch.Tensor,
    segments_BT: torch.Tensor | None,
    media_ids: tuple[int, int | None],
    grids: tuple[torch.Tensor | None, torch.Tensor | None],
    merge_size: int,
    video_steps: list[float] | None = None,
) -> torch.Tensor:
    """M-RoPE positions [3, B, T] of each sample, as transformers' `get_rope_index` computes them:
    a text token's three positions are its index; an image's tokens (each a merged 2 x 2 block) take
    (t, row, column) offset by the position it starts at, and the text after it continues at that
    position + max(rows, columns). `segments_BT` numbers each row's samples (1, 2, ...; 0 padding,
    position 0) as packed rows do, or is a 0/1 mask; every sample starts at 0. `media_ids` are the
    image and video token ids, `grids` their grids in slot order; `video_steps` each video's
    temporal position step (Qwen2.5-VL: tokens_per_second x seconds per grid step; default 1)."""
    if segments_BT is None:
        segments_BT = torch.ones_like(input_ids_BT)
    queues = (
        iter([] if grids[0] is None else grids[0].tolist()),
        iter([] if grids[1] is None else grids[1].tolist()),
        iter(video_steps or itertools.repeat(1.0)),
    )
    positions = torch.zeros(3, *input_ids_BT.shape, dtype=torch.long)
    for row, (ids, segments) in enumerate(zip(input_ids_BT.tolist(), segments_BT.tolist())):
        start = 0
        for segment, run in itertools.groupby(segments):
            length = len(list(run))
            if segment:
                sample = _sample_positions(ids[start : start + length], media_ids, queues, merge_size)
                positions[:, row, start : start + length] = sample
            start += length
    return positions.to(input_ids_BT.device)


def _sample_positions(ids: list[int], media_ids: tuple[int, int | None], queues: tuple, merge: int) -> torch.Tensor:
    parts, position, index = [], 0, 0
    while index < len(ids):
        kind = media_ids.index(ids[index]) if ids[index] in media_ids else None
        if kind is None:
            run = index
            while run < len(ids) and ids[run] not in media_ids:
                run += 1
            parts.append(torch.arange(position, position + run - index).expand(3, -1))
            position += run - index
            index = run
            continue
        grid = next(queues[kind], None)
        if grid is None:
            raise ValueError(f"input_ids hold more {('image', 'video')[kind]} tokens than the grids give images")
        step = next(queues[2]) if kind == 1 else 1.0
        grid_positions = _grid_positions(grid, merge, step) + position
        tokens = grid_positions.shape[1]
        if ids[index : index + tokens] != [ids[index]] * tokens:
            raise ValueError(f"a {('image', 'video')[kind]} of grid {grid} needs {tokens} consecutive tokens")
        parts.append(grid_positions)
        position += max(grid[1], grid[2]) // merge
        index += tokens
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def _grid_positions(grid: list[int], merge: int, step: float) -> torch.Tensor:
    """(t, row, column) of each merged token of a grid (t, h, w), t scaled by `step` ([3, n])."""
    frames, rows, columns = grid[0], grid[1] // merge, grid[2] // merge
    t, h, w = torch.meshgrid(
        (torch.arange(frames) * step).long(), torch.arange(rows), torch.arange(columns), indexing="ij"
    )
    return torch.stack([t, h, w]).reshape(3, -1)
