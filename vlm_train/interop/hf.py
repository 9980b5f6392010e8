"""Hugging Face <-> vlm_train, for the families that made each connector famous:

    LlavaForConditionalGeneration      <-> mlp        (CLIP/SigLIP tower, Llama-family decoder)
    LlavaNextForConditionalGeneration  <-> mlp + AnyRes tiles (vision.anyres)
    LlavaOnevisionForConditionalGeneration <-> mlp + AnyRes, anyres_max_N
    Blip2ForConditionalGeneration      <-> qformer    (BLIP-2 ViT, OPT decoder)
    Idefics2ForConditionalGeneration   <-> perceiver  (Idefics2 ViT, Mistral decoder)

Conversion moves modules, not tensors through renamed keys: our tower, connector and decoder wrap
the very transformers modules these models are made of (and the connectors use their parameter
names), so an import is a re-parenting and an export builds the HF model on the meta device and
hands it our modules. Logits match the HF model's to float rounding (tests/test_interop.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm_train.errors import ConfigError
from vlm_train.interop.peft import ADAPTER_FOLDER, save_peft_adapter
from vlm_train.models import CausalLM, VisionLanguageModel, VisionTower
from vlm_train.models.anyres import AnyResLayout
from vlm_train.models.connectors.mlp import MLPConnector
from vlm_train.models.connectors.patch_merger import PatchMergerConnector
from vlm_train.models.connectors.perceiver import PerceiverConnector
from vlm_train.models.connectors.qformer import QFormerConnector
from vlm_train.models.lora import merge_lora, strip_lora

if TYPE_CHECKING:
    from transformers import LlavaProcessor, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin


def from_hf(path: str | Path) -> VisionLanguageModel:
    """Import a local HF checkpoint directory of a LLaVA(-NeXT/-OneVision), BLIP-2 or Idefics2 model."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path} has no config.json: give a local Hugging Face checkpoint directory")
    model_type = json.loads(config_file.read_text()).get("model_type")
    importers = {
        "llava": _from_llava,
        "llava_next": _from_llava,
        "llava_onevision": _from_llava,
        "blip-2": _from_blip2,
        "idefics2": _from_idefics2,
        "qwen2_vl": _from_qwen_vl,
        "qwen2_5_vl": _from_qwen_vl,
        "qwen3_vl": _from_qwen_vl,
    }
    if model_type not in importers:
        raise ConfigError(f"{path} is a '{model_type}' model; vlm_train imports {', '.join(importers)}")
    return importers[model_type](path)


def to_hf(
    model: VisionLanguageModel,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: str = "vicuna_v1",
    image_aspect_ratio: str = "crop",
    lora: str = "merge",
) -> None:
    """Write `model` as the HF family of its connector; `from_pretrained` then loads it. LoRA updates
    (vision.lora, llm.lora) are merged into their weights first (`lora="merge"`), or taken off and
    written as a PEFT adapter in `path`/lora (`lora="adapter"`, interop/peft.py); in place either way.

    With the `tokenizer`, a LLaVA export also ships its processor (`AutoProcessor` and
    `pipeline("image-text-to-text")` work on the folder): an image processor that prepares images
    as `image_aspect_ratio` did in training, the tokenizer, and a chat template that renders the
    training `template` (data.template), so prompts are tokenized as vlm_train tokenized them.
    """
    if lora not in ("merge", "adapter"):
        raise ConfigError(f"--lora {lora}: use merge (into the weights) or adapter (a PEFT adapter folder)")
    updates = strip_lora(model) if lora == "adapter" else []
    merge_lora(model)
    if isinstance(model.connector, PatchMergerConnector):
        hf_qwen = _to_qwen_vl(model, path, tokenizer)
        if updates:
            save_peft_adapter(hf_qwen, updates, Path(path) / ADAPTER_FOLDER)
        return
    exporters = {MLPConnector: _to_llava, QFormerConnector: _to_blip2, PerceiverConnector: _to_idefics2}
    exporter = exporters.get(type(model.connector))
    if exporter is None:
        raise ConfigError(
            f"no Hugging Face family takes a {type(model.connector).__name__}: export mlp, qformer, perceiver "
            "or patch_merger"
        )
    if model.anyres is not None and exporter is not _to_llava:
        raise ConfigError(
            f"no Hugging Face family reads AnyRes tiles through a {type(model.connector).__name__}: "
            "only mlp + vision.anyres exports (LLaVA-NeXT / OneVision)"
        )
    hf_model = exporter(model)
    if tokenizer is not None:
        _set_generation_tokens(hf_model, tokenizer)
    hf_model.save_pretrained(path)
    if updates:
        save_peft_adapter(hf_model, updates, Path(path) / ADAPTER_FOLDER)
    if tokenizer is None:
        return
    if exporter is _to_llava and model.anyres is not None:
        save_anyres_processor(model, tokenizer, template, path)
    elif exporter is _to_llava:
        llava_processor(model, tokenizer, template, image_aspect_ratio).save_pretrained(path)
    else:
        tokenizer.save_pretrained(path)


def _from_qwen_vl(path) -> VisionLanguageModel:
    from vlm_train.interop.qwen_vl import from_qwen_vl

    return from_qwen_vl(path)


def _to_qwen_vl(model: VisionLanguageModel, path, tokenizer) -> PreTrainedModel:
    from vlm_train.interop.qwen_vl import save_qwen_vl_processor, to_qwen_vl

    hf_model = to_qwen_vl(model, tokenizer)
    if tokenizer is not None:
        _set_generation_tokens(hf_model, tokenizer)
    hf_model.save_pretrained(path)
    if tokenizer is not None:
        save_qwen_vl_processor(model, tokenizer, path)
    return hf_model


def _set_generation_tokens(hf_model: PreTrainedModel, tokenizer) -> None:
    """`generate` stops where vlm_train's evaluation stops: at the tokenizer's end-of-sequence."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(hf_model.generation_config, name, getattr(tokenizer, name))


def _causal_lm(text_config, body: nn.Module, lm_head: nn.Module) -> CausalLM:
    """A *ForCausalLM around an existing decoder body and head (built on meta, nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    lm.model, lm.lm_head = body, lm_head
    return CausalLM(lm)


def _family_of(vision_config) -> str:
    return {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}[vision_config.model_type]


def _hf_decoder(model: VisionLanguageModel) -> PreTrainedModel:
    """The transformers causal LM of `model`'s decoder: an export hands over HF modules."""
    if not isinstance(model.llm, CausalLM):
        raise ConfigError(f"export the Hugging Face decoder (llm.backend=hf), not a {type(model.llm).__name__}")
    return model.llm.hf_model


# --- LLaVA <-> mlp -----------------------------------------------------------------------------


_LLAVA_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def _from_llava(path) -> VisionLanguageModel:
    """LLaVA-1.5, and LLaVA-NeXT / LLaVA-OneVision with their AnyRes layout and `image_newline`."""
    import transformers

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    hf_class = getattr(transformers, _LLAVA_CLASSES[model_type])
    hf = hf_class.from_pretrained(path, torch_dtype=torch.float32)
    config = hf.config
    if config.projector_hidden_act != "gelu" or not isinstance(config.vision_feature_layer, int):
        raise ConfigError("vlm_train imports LLaVA projectors with GELU and one vision feature layer")
    tower = VisionTower(
        hf.model.vision_tower,
        _family_of(config.vision_config),
        config.vision_feature_layer,
        drop_cls=config.vision_feature_select_strategy == "default",
    )
    projector = hf.model.multi_modal_projector
    connector = MLPConnector(tower.hidden_size, config.text_config.hidden_size, depth=2, num_patches=tower.num_features)
    connector[0], connector[2] = projector.linear_1, projector.linear_2
    llm = _causal_lm(config.text_config, hf.model.language_model, hf.lm_head)
    anyres = None
    if model_type != "llava":
        anyres = _anyres_layout(config, tower, max_tiles=_max_tiles(getattr(config, "vision_aspect_ratio", None)))
        anyres.image_newline = hf.model.image_newline
    video_token_id = getattr(config, "video_token_id", None)  # LLaVA-OneVision's
    return VisionLanguageModel(tower, connector, llm, config.image_token_id, anyres, video_token_id)


def _anyres_layout(config, tower: VisionTower, max_tiles: int | None) -> AnyResLayout:
    grid = tower.image_size // tower.patch_size
    if tower.num_features != grid * grid:
        raise ConfigError("AnyRes stitches patch grids: the tower's features must be its patches only (drop CLS)")
    return AnyResLayout(config.image_grid_pinpoints, tower.image_size, grid, config.text_config.hidden_size, max_tiles)


def _max_tiles(vision_aspect_ratio: str | None) -> int | None:
    """OneVision's "anyres_max_N" -> N; LLaVA-NeXT (no such field) -> None."""
    if vision_aspect_ratio is None:
        return None
    if not vision_aspect_ratio.startswith("anyres_max_"):
        raise ConfigError(f"vision_aspect_ratio={vision_aspect_ratio}: vlm_train imports anyres_max_N")
    return int(vision_aspect_ratio.removeprefix("anyres_max_"))


def _to_llava(model: VisionLanguageModel) -> PreTrainedModel:
    """LLaVA without AnyRes, LLaVA-NeXT with it, LLaVA-OneVision with anyres_max_N."""
    import transformers

    connector, decoder, anyres = model.connector, _hf_decoder(model), model.anyres
    assert isinstance(connector, MLPConnector), "to_hf picks the exporter by the connector's type"
    if len(connector) != 3 or not isinstance(connector[1], nn.GELU):
        raise ConfigError("LLaVA's projector is Linear-GELU-Linear: export an mlp connector of depth 2")
    fields = dict(
        vision_config=model.vision.hf_model.config.to_dict(),
        text_config=decoder.config.to_dict(),
        vision_feature_layer=model.vision.select_layer,
        vision_feature_select_strategy="default" if model.vision.drop_cls else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=connector[0].bias is not None,
    )
    if anyres is None:
        config = transformers.LlavaConfig(**fields, image_token_id=model.image_token_id)
    elif anyres.max_tiles is None:
        config = transformers.LlavaNextConfig(
            **fields, image_token_index=model.image_token_id, image_grid_pinpoints=anyres.grid_pinpoints
        )
    else:
        config = transformers.LlavaOnevisionConfig(
            **fields,
            image_token_index=model.image_token_id,
            image_grid_pinpoints=anyres.grid_pinpoints,
            vision_aspect_ratio=f"anyres_max_{anyres.max_tiles}",
            **({"video_token_index": model.video_token_id} if model.video_token_id is not None else {}),
        )
    with torch.device("meta"):
        hf = getattr(transformers, _LLAVA_CLASSES[config.model_type])(config)
    hf.model.vision_tower = model.vision.hf_model
    hf.model.multi_modal_projector.linear_1, hf.model.multi_modal_projector.linear_2 = connector[0], connector[2]
    hf.model.language_model, hf.lm_head = decoder.model, decoder.lm_head
    if anyres is not None:
        hf.model.image_newline = anyres.image_newline
    return hf


# --- BLIP-2 <-> qformer ------------------------------------------------------------------------


def _from_blip2(path) -> VisionLanguageModel:
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32)
    config = hf.config
    if config.use_decoder_only_language_model is False:
        raise ConfigError("vlm_train imports BLIP-2 with a decoder-only language model (OPT), not T5")
    tower = VisionTower(hf.vision_model, "blip2", select_layer=-1, drop_cls=False)
    connector = QFormerConnector(hf.qformer, config.num_query_tokens, config.text_config.hidden_size)
    connector.query_tokens, connector.language_projection = hf.query_tokens, hf.language_projection
    return VisionLanguageModel(tower, connector, CausalLM(hf.language_model), config.image_token_index)


def _to_blip2(model: VisionLanguageModel) -> PreTrainedModel:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if model.vision.family != "blip2":
        raise ConfigError("BLIP-2 checkpoints carry a BLIP-2 vision model: export a model imported from BLIP-2")
    connector, decoder = model.connector, _hf_decoder(model)
    assert isinstance(connector, QFormerConnector), "to_hf picks the exporter by the connector's type"
    config = Blip2Config(
        vision_config=model.vision.hf_model.config.to_dict(),
        qformer_config=connector.qformer.config.to_dict(),
        text_config=decoder.config.to_dict(),
        num_query_tokens=connector.num_tokens,
        image_token_index=model.image_token_id,
    )
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(config)
    hf.vision_model, hf.qformer = model.vision.hf_model, connector.qformer
    hf.query_tokens, hf.language_projection = connector.query_tokens, connector.language_projection
    hf.language_model = decoder
    return hf


# --- Idefics2 <-> perceiver --------------------------------------------------------------------


def _from_idefics2(path) -> VisionLanguageModel:
    from transformers import Idefics2ForConditionalGeneration

    hf = Idefics2ForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32)
    config = hf.config
    tower = VisionTower(hf.model.vision_model, "idefics2", select_layer=-1, drop_cls=False)
    hf_connector = hf.model.connector
    connector = PerceiverConnector(
        hf_connector.modality_projection, hf_connector.perceiver_resampler, config.perceiver_config.resampler_n_latents
    )
    llm = _causal_lm(config.text_config, hf.model.text_model, hf.lm_head)
    return VisionLanguageModel(tower, connector, llm, config.image_token_id)


def _to_idefics2(model: VisionLanguageModel) -> PreTrainedModel:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    if model.vision.family != "idefics2":
        raise ConfigError("Idefics2 checkpoints carry an Idefics2 vision model: export a model imported from Idefics2")
    connector, decoder = model.connector, _hf_decoder(model)
    assert isinstance(connector, PerceiverConnector), "to_hf picks the exporter by the connector's type"
    resampler = connector.perceiver_resampler
    assert isinstance(resampler, Idefics2PerceiverResampler), "a perceiver connector holds Idefics2's resampler"
    config = Idefics2Config(
        vision_config=model.vision.hf_model.config.to_dict(),
        perceiver_config=resampler.config.to_dict(),
        text_config=decoder.config.to_dict(),
        image_token_id=model.image_token_id,
    )
    with torch.device("meta"):
        hf = Idefics2ForConditionalGeneration(config)
    hf.model.vision_model = model.vision.hf_model
    hf.model.connector.modality_projection = connector.modality_projection
    hf.model.connector.perceiver_resampler = resampler
    hf.model.text_model, hf.lm_head = decoder.model, decoder.lm_head
    return hf


# --- LLaVA's processor: image processor, tokenizer, chat template -------------------------------

# Each chat template renders what vlm_train.data.templates renders, so that transformers, which
# tokenizes the rendered text in one piece, gets the very ids training used (tests/test_recipe.py).
# One difference needs care: LLaVA tokenizes the text after each `<image>` as a new text (its
# `tokenizer_image_token`), which gives it SentencePiece's leading "▁"; a tokenizer that does not
# prefix text after a special token (Llama-2's non-legacy normalisation, Vicuna v1.5's) gets the
# same "▁" only from a space written out after `<image>`. AFTER_IMAGE is that space, or nothing.
# For the same reason BOS is not rendered: the processor's tokenizer adds it, and the text after it
# is then the start of a text, as in training.
_MESSAGE_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set images = message['content'].count('<image>') -%}"
    "{%- set text = message['content'].replace('<image>', '') if images else message['content'] -%}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endif -%}"
)
_TEMPLATES = {
    # LLaVA-1.5 (conv_vicuna_v1, separator style TWO): "<system> USER: <image>\n<question> ASSISTANT:
    # <answer></s>USER: ... ASSISTANT:", the image moved before the question (preprocess_multimodal).
    "vicuna_v1": (
        "{%- set system = SYSTEM -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string"
        " else messages[0]['content'] | map(attribute='text') | join(' ') -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- endif -%}"
        "{{- system + ' ' -}}"
        "{%- for message in messages -%}" + _MESSAGE_PARTS + "{%- if message['role'] == 'user' -%}"
        "{{- 'USER: ' + (('<image>' + AFTER_IMAGE + '\n') * images + (text | trim) if images else text) + ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- 'ASSISTANT: ' + text + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    ),
    # LLaVA's stage 1 (conv_llava_plain): the image, then the caption and "\n"; questions are dropped.
    "plain": (
        "{%- set state = namespace(after_image=false) -%}"
        "{%- for message in messages -%}" + _MESSAGE_PARTS + "{%- if message['role'] == 'user' -%}"
        "{{- '<image>' * images -}}"
        "{%- set state.after_image = images > 0 -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- (AFTER_IMAGE if state.after_image else '') + text + '\n' -}}"
        "{%- set state.after_image = false -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # The toy's template: "USER: <question> ASSISTANT: <answer></s>" (word-level: spaces do not matter).
    "chat": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}" + _MESSAGE_PARTS + "{%- if message['role'] == 'user' -%}"
        "{{- 'USER: ' + ('<image>\n' * images + (text | trim) if images else text) + ' ASSISTANT:' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- ' ' + text + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}


def chat_template(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja chat template that renders vlm_train's `data.template` for transformers: the same
    text, tokenized by `tokenizer` into the same ids as training (`hf`: the tokenizer's own)."""
    from vlm_train.data.templates import VICUNA_SYSTEM, prefix_space_after_special

    if template == "hf":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template=hf but the tokenizer has no chat_template to export")
        return tokenizer.chat_template
    if template not in _TEMPLATES:
        raise ConfigError(f"no chat template for data.template={template}: one of hf, {', '.join(_TEMPLATES)}")
    after_image = "" if template == "chat" or prefix_space_after_special(tokenizer) else " "
    constants = "{%- set SYSTEM = " + json.dumps(VICUNA_SYSTEM) + " -%}"
    constants += "{%- set AFTER_IMAGE = " + json.dumps(after_image) + " -%}"
    return constants + _TEMPLATES[template]


def llava_processor(
    model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, template: str, image_aspect_ratio: str
) -> LlavaProcessor:
    """A LlavaProcessor that prepares what vlm_train's data pipeline prepared in training."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from vlm_train.data.tokenizer import IMAGE_TOKEN
    from vlm_train.models.vision import HAS_CLS

    vision, size = model.vision, model.vision.image_size
    # pad = LLaVA's expand2square with the mean colour, then CLIP's resize + centre crop; resize =
    # a plain S x S resize. (Saved as "LlavaImageProcessor": the torchvision one where installed.)
    image_processor = LlavaImageProcessorPil(
        do_pad=image_aspect_ratio == "pad",
        size={"height": size, "width": size} if image_aspect_ratio == "resize" else {"shortest_edge": size},
        do_center_crop=image_aspect_ratio != "resize",
        crop_size={"height": size, "width": size},
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.hf_model.config.patch_size,
        vision_feature_select_strategy="default" if vision.drop_cls else "full",
        chat_template=chat_template(template, tokenizer),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(HAS_CLS[vision.family]),  # the CLS token, dropped by "default"
    )


def save_anyres_processor(model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, template: str, path) -> None:
    """LLaVA-NeXT's (or OneVision's) processor for an AnyRes model: the tiles AnyResTransform makes
    (normalised with the tower's stats) and `anyres.num_tokens` image tokens per image.

    transformers builds a LlavaOnevisionProcessor only with torchvision (its video processor);
    without it the image processor and the tokenizer (with the chat template) are saved on their
    own, which `AutoImageProcessor` and `AutoTokenizer` load."""
    import transformers
    from transformers.utils import is_torchvision_available

    from vlm_train.data.tokenizer import IMAGE_TOKEN
    from vlm_train.models.vision import HAS_CLS

    vision, anyres = model.vision, model.anyres
    assert anyres is not None, "only AnyRes models export an AnyRes processor"
    size = {"height": vision.image_size, "width": vision.image_size}
    images = dict(
        size=size,
        crop_size=size,
        image_grid_pinpoints=anyres.grid_pinpoints,
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    )
    text = dict(
        tokenizer=tokenizer,
        vision_feature_select_strategy="default" if vision.drop_cls else "full",
        chat_template=chat_template(template, tokenizer),
        image_token=IMAGE_TOKEN,
    )
    processor: ProcessorMixin
    if anyres.max_tiles is None:
        processor = transformers.LlavaNextProcessor(
            image_processor=transformers.LlavaNextImageProcessorPil(**images),
            patch_size=vision.patch_size,
            num_additional_image_tokens=int(HAS_CLS[vision.family]),  # the CLS token, dropped by "default"
            **text,
        )
    elif is_torchvision_available():
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessorPil(**images),
            num_image_tokens=anyres.tile_grid**2,
            vision_aspect_ratio=f"anyres_max_{anyres.max_tiles}",
            **text,
        )
    else:
        transformers.LlavaOnevisionImageProcessorPil(**images).save_pretrained(path)
        tokenizer.save_pretrained(path)
        (Path(path) / "chat_template.jinja").write_text(text["chat_template"])  # AutoTokenizer reads it
        return
    processor.save_pretrained(path)
