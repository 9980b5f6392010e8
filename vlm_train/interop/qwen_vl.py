"""Hugging Face <-> vlm_train for the Qwen-VL family:

    Qwen2VLForConditionalGeneration    <-> vision.family=qwen2_vl,   connector=patch_merger (LayerNorm)
    Qwen2_5_VLForConditionalGeneration <-> vision.family=qwen2_5_vl, connector=patch_merger (RMSNorm)
    Qwen3VLForConditionalGeneration    <-> vision.family=qwen3_vl,   connector=patch_merger (+ DeepStack)

As for LLaVA (interop/hf.py), conversion moves transformers' modules: the ViT (its merger taken
out) becomes the native-resolution tower, the merger (Qwen3: and its DeepStack mergers) the connector, the language model and head
the M-RoPE decoder; an export builds the HF model on the meta device and hands them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlm_train.errors import ConfigError
from vlm_train.models import CausalLM, VisionLanguageModel
from vlm_train.models.connectors import Connector
from vlm_train.models.connectors.patch_merger import PatchMergerConnector
from vlm_train.models.qwen_vl import MRopeCausalLM, NativeResolutionTower

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

QWEN_VL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
_CONFIG_CLASSES = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig"}
_MERGERS = ("merger", "deepstack_merger_list")  # the ViT's children that the connector holds


def from_qwen_vl(path: str | Path) -> VisionLanguageModel:
    """A local Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint folder -> a VisionLanguageModel (fp32)."""
    import transformers

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    hf_class = getattr(transformers, QWEN_VL_CLASSES[model_type])
    return qwen_vl_model(hf_class.from_pretrained(path, torch_dtype=torch.float32))


def qwen_vl_model(hf: PreTrainedModel) -> VisionLanguageModel:
    """Re-parent a Qwen-VL model's modules (the model given is taken apart)."""
    config = hf.config
    merger, deepstack = hf.model.visual.merger, getattr(hf.model.visual, "deepstack_merger_list", None)
    tower = NativeResolutionTower(hf.model.visual, config.model_type)
    connector = PatchMergerConnector(merger, tower.merge_size, tower.num_features, deepstack)
    llm = CausalLM(MRopeCausalLM(hf.model.language_model, hf.lm_head))
    return VisionLanguageModel(tower, connector, llm, config.image_token_id, None, config.video_token_id)


def to_qwen_vl(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """`model` as its Qwen-VL family's HF model (sharing its modules)."""
    import transformers

    tower, connector, llm = model.vision, model.connector, model.llm
    if not isinstance(tower, NativeResolutionTower):
        raise ConfigError(
            "Qwen-VL checkpoints carry a native-resolution ViT: export vision.family=qwen2_vl|qwen2_5_vl|qwen3_vl"
        )
    assert isinstance(connector, PatchMergerConnector), "to_hf picks the exporter by the connector's type"
    if not isinstance(llm, CausalLM) or not isinstance(llm.hf_model, MRopeCausalLM):
        raise ConfigError("Qwen-VL checkpoints carry an M-RoPE decoder: export llm.family=qwen2_vl|qwen2_5_vl|qwen3_vl")
    decoder = llm.hf_model
    vision_config = tower.hf_model.config.to_dict()
    width_key = "hidden_size" if tower.family == "qwen2_vl" else "out_hidden_size"
    vision_config[width_key] = decoder.config.hidden_size  # the merger's output width
    config = getattr(transformers, _CONFIG_CLASSES[tower.family])(
        vision_config=vision_config,
        text_config=decoder.config.to_dict(),
        image_token_id=model.image_token_id,
        **({"video_token_id": model.video_token_id} if model.video_token_id is not None else {}),
        tie_word_embeddings=decoder.lm_head.weight is decoder.model.embed_tokens.weight,
        **_vision_marks(tokenizer),
    )
    with torch.device("meta"):
        hf = getattr(transformers, QWEN_VL_CLASSES[tower.family])(config)
    for name, child in tower.hf_model.named_children():
        if name not in _MERGERS:
            setattr(hf.model.visual, name, child)
    hf.model.visual.merger = connector.merger
    if tower.deepstack_layers:
        hf.model.visual.deepstack_merger_list = connector.deepstack
    hf.model.language_model, hf.lm_head = decoder.model, decoder.lm_head
    return hf


def _vision_marks(tokenizer: PreTrainedTokenizerBase | None) -> dict[str, int]:
    """The ids of <|vision_start|> and <|vision_end|> in `tokenizer` (generation reads them)."""
    if tokenizer is None:
        return {}
    marks = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in marks.items()}
    return {key: i for key, i in ids.items() if i is not None and i != tokenizer.unk_token_id}


def load_qwen_vl_parts(
    path: str, vocab_size: int, attn_implementation: str, media_ids: tuple[int, int | None]
) -> tuple[NativeResolutionTower, Connector, CausalLM]:
    """(tower, connector, decoder) of a whole Qwen-VL folder, for build_model (vision.path =
    llm.path); the decoder attends with `attn_implementation` (the tower keeps sdpa)."""
    import transformers

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"vision.path={path} has no config.json: give a local Qwen2-VL / Qwen2.5-VL folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in QWEN_VL_CLASSES:
        raise ConfigError(f"vision.path={path} is a '{model_type}' model, not one of {', '.join(QWEN_VL_CLASSES)}")
    hf = getattr(transformers, QWEN_VL_CLASSES[model_type]).from_pretrained(path, torch_dtype=torch.float32)
    hf.model.language_model.config._attn_implementation = attn_implementation
    rows = hf.model.language_model.embed_tokens.weight.shape[0]
    if vocab_size > rows:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens, more than {path}'s {rows} embedding rows")
    if (hf.config.image_token_id, hf.config.video_token_id) != media_ids:
        raise ConfigError(
            f"the tokenizer's <|image_pad|>/<|video_pad|> ids {media_ids} are not {path}'s image/video token ids "
            f"{(hf.config.image_token_id, hf.config.video_token_id)}: use the tokenizer saved with the checkpoint"
        )
    model = qwen_vl_model(hf)
    assert isinstance(model.vision, NativeResolutionTower) and isinstance(model.llm, CausalLM)
    return model.vision, model.connector, model.llm


def qwen_vl_overrides(path: str | Path) -> list[str] | None:
    """The overrides that train a Qwen-VL folder as it is; None for any other folder."""
    config_file = Path(path) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type not in QWEN_VL_CLASSES:
        return None
    norm = "rmsnorm" if model_type == "qwen2_5_vl" else "layernorm"
    return [
        f"vision.family={model_type}",
        f"vision.path={path}",
        f"llm.family={model_type}",
        f"llm.path={path}",
        f"llm.tokenizer={path}",
        "connector=patch_merger",
        f"connector.norm={norm}",
        "data.template=hf",
    ]


def save_qwen_vl_processor(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """The image processor that prepares images as training did (vision.min/max_pixels, Qwen's
    normalisation) and the tokenizer with its chat template. transformers builds a Qwen2VLProcessor
    only with torchvision (its video processor): the two are saved on their own, which
    `AutoImageProcessor` and `AutoTokenizer` load."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tower = model.vision
    assert isinstance(tower, NativeResolutionTower), "only native-resolution models export Qwen's processor"
    Qwen2VLImageProcessorPil(
        min_pixels=tower.min_pixels,
        max_pixels=tower.max_pixels,
        patch_size=tower.patch_size,
        temporal_patch_size=tower.temporal_patch_size,
        merge_size=tower.merge_size,
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
