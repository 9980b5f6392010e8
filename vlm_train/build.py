"""Build a VisionLanguageModel from a composed config; each component from its own section."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_train.config import QWEN_VL_FAMILIES, Config, LLMConfig, VisionConfig
from vlm_train.data.tokenizer import load_tokenizer, media_token_ids
from vlm_train.errors import ConfigError
from vlm_train.models import (
    CausalLM,
    VisionLanguageModel,
    VisionTower,
    build_connector,
    build_llm,
    build_vision_tower,
)
from vlm_train.models.anyres import AnyResLayout
from vlm_train.models.connectors import Connector, load_connector_weights
from vlm_train.models.connectors.patch_merger import PatchMergerConnector
from vlm_train.models.dual_encoder import INITIAL_SCALE_BIAS, DualEncoder
from vlm_train.models.language_model import LanguageModel
from vlm_train.models.qwen_vl import NativeResolutionTower
from vlm_train.models.varlen_attention import register_varlen_attention


def build_model(cfg: Config, tokenizer=None, layout=None) -> VisionLanguageModel:
    """The model the config describes: tower, connector and decoder, frozen as configured.

    `tokenizer` defaults to `cfg.llm`'s; the decoder's vocabulary grows to fit it (image token).
    `llm.backend=megatron` needs the run's `layout` (its groups built): the decoder is sharded
    for this rank's place in its TP group; tower and connector are whole on every rank.
    """
    if cfg.llm.backend == "megatron" and cfg.llm.activation_checkpointing:
        from vlm_train.parallel.tensor_parallel import ACTIVATION_CHECKPOINTING_REFUSED

        raise ConfigError(ACTIVATION_CHECKPOINTING_REFUSED)  # before building: no test proves it there
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.llm, video=cfg.data.video)
    image_token_id, video_token_id = media_token_ids(tokenizer)
    llm: Any
    vision: VisionTower
    if cfg.vision.family in QWEN_VL_FAMILIES:
        native, connector, llm = build_qwen_vl_parts(cfg, len(tokenizer), layout, (image_token_id, video_token_id))
        native.min_pixels, native.max_pixels = cfg.vision.min_pixels, cfg.vision.max_pixels
        vision, anyres = native, None
    else:
        vision = build_vision_tower(cfg.vision)
        llm = _build_decoder(cfg, len(tokenizer), layout)
        connector = build_connector(
            cfg.connector, vision_dim=vision.hidden_size, llm_dim=llm.hidden_size, num_patches=vision.num_features
        )
        anyres = build_anyres(cfg.vision, vision, llm.hidden_size)
        video_token_id = video_token_id if cfg.data.video else None
    model = VisionLanguageModel(vision, connector, llm, image_token_id, anyres, video_token_id)
    if cfg.connector.path:  # after attaching (cross_attention's blocks exist then), before TP splits them
        load_connector_weights(connector, cfg.connector.path)
    if cfg.llm.backend == "megatron":
        from vlm_train.parallel.tensor_parallel import shard_connector

        shard_connector(connector, llm)  # blocks inside the decoder are split over TP as its layers are
    llm_frozen = cfg.llm.freeze or connector.freezes_llm()
    vision_frozen = cfg.vision.freeze or connector.freezes_llm()
    for module, frozen in ((vision, vision_frozen), (llm, llm_frozen), (connector, cfg.connector.freeze)):
        _set_trainable(module, not frozen)
    if anyres is not None and anyres.resampled is None:  # image_newline is part of the bridge: trains with it
        _set_trainable(anyres, not cfg.connector.freeze)
    # Never trained: tower parts no gradient reaches (ZeRO would wait for it), fixed connector parts.
    for param in vision.unused_parameters() + connector.fixed_parameters():
        param.requires_grad_(False)
    _add_lora(cfg, model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("vision, llm and connector are all frozen: nothing would train")
    _enable_activation_checkpointing(model, cfg)
    return model


def build_run_model(cfg: Config, tokenizer=None, layout=None) -> nn.Module:
    """The model `cfg.objective` trains: a VLM (sft, dpo), the decoder alone (lm), or an image and a
    text tower (clip, siglip)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.llm, video=cfg.data.video)
    if cfg.objective == "lm":
        return build_language_model(cfg, tokenizer, layout)
    if cfg.objective in ("clip", "siglip"):
        return build_dual_encoder(cfg, tokenizer)
    return build_model(cfg, tokenizer, layout)


def build_language_model(cfg: Config, tokenizer, layout=None) -> LanguageModel:
    """objective=lm: the decoder `cfg.llm` describes (llm.path continues a pretrained one), alone."""
    model = LanguageModel(_build_decoder(cfg, len(tokenizer), layout))
    if cfg.llm.lora.rank:
        _add_lora(cfg, model)
    elif cfg.llm.freeze:
        raise ConfigError("objective=lm trains the decoder: llm.freeze=true leaves nothing to train")
    if cfg.llm.activation_checkpointing:
        model.llm.enable_activation_checkpointing()
    return model


def build_dual_encoder(cfg: Config, tokenizer) -> DualEncoder:
    """objective=clip|siglip: transformers' CLIPModel (vision.family=clip) or SiglipModel (siglip) whose
    image tower is `cfg.vision`'s (vision.path: a pretrained one; vision.freeze: locked, as LiT) and
    whose text tower reads the run's tokenizer (contrastive.* sizes)."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    tower, sizes = build_vision_tower(cfg.vision), cfg.contrastive
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden_size,
        intermediate_size=sizes.text_intermediate_size,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=cfg.data.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = tower.hf_model.config.to_dict()
    if cfg.vision.family == "clip":
        hf_model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.embed_dim))
    else:  # SigLIP has no projections: the text head maps to the image tower's width
        text["projection_size"] = tower.hidden_size
        hf_model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    hf_model.vision_model.load_state_dict(tower.hf_model.state_dict())
    if cfg.vision.freeze:
        _set_trainable(hf_model.vision_model, False)
    initial = INITIAL_SCALE_BIAS[cfg.objective]
    scale_bias = (sizes.init_scale or initial[0], initial[1] if sizes.init_bias is None else sizes.init_bias)
    return DualEncoder(hf_model, cfg.vision.family, cfg.objective, (tower.image_mean, tower.image_std), scale_bias)


def _add_lora(cfg: Config, model: VisionLanguageModel | LanguageModel) -> None:
    """vision.lora / llm.lora / connector.lora: the component's weights frozen, LoRA updates on its
    linear layers."""
    from vlm_train.models.lora import add_lora

    if cfg.connector.lora.rank and model.connector is not None:
        _set_trainable(model.connector, False)
        add_lora(model.connector, cfg.connector.lora, "connector.lora", model.connector.fixed_parameters())
    if cfg.vision.lora.rank and model.vision is not None:
        _set_trainable(model.vision, False)
        add_lora(model.vision, cfg.vision.lora, "vision.lora", model.vision.unused_parameters())
    if cfg.llm.lora.rank and cfg.llm.backend == "megatron":
        from vlm_train.parallel.lora_tp import add_megatron_lora

        _set_trainable(model.llm, False)
        llm: Any = model.llm  # a MegatronCausalLM
        add_megatron_lora(llm.gpt, cfg.llm.lora, llm.tp, llm.tp_rank)
    elif cfg.llm.lora.rank:
        _set_trainable(model.llm, False)
        add_lora(model.llm, cfg.llm.lora, "llm.lora")


def build_qwen_vl_parts(
    cfg: Config, vocab_size: int, layout, media_ids: tuple[int, int | None]
) -> tuple[NativeResolutionTower, Connector, Any]:
    """vision.family=qwen2_vl|qwen2_5_vl|qwen3_vl: the native-resolution tower, the patch merger(s) and
    the M-RoPE decoder, from a whole Qwen-VL folder (vision.path = llm.path) or from the size fields."""
    from vlm_train.interop.qwen_vl import load_qwen_vl_parts
    from vlm_train.models.qwen_vl import build_mrope_llm, build_native_tower

    family = cfg.vision.family
    if cfg.connector.name != "patch_merger" or cfg.llm.family != family:
        raise ConfigError(f"vision.family={family} needs connector=patch_merger and llm.family={family}")
    attn = cfg.llm.attn_implementation
    if cfg.data.packing and attn == "sdpa":
        attn = register_varlen_attention()
    if cfg.vision.path or cfg.llm.path:
        if cfg.vision.path != cfg.llm.path:
            raise ConfigError(f"vision.family={family}: vision.path and llm.path name the same Qwen-VL folder")
        tower, connector, llm = load_qwen_vl_parts(str(cfg.vision.path), vocab_size, attn, media_ids)
    else:
        tower = build_native_tower(family, None, native_tower_sizes(cfg))
        sizes = mrope_llm_sizes(cfg.llm, vocab_size, family)
        llm = CausalLM(build_mrope_llm(family, sizes, attn, cfg.llm.tie_embeddings))
        connector = build_native_connector(cfg, tower, llm.hidden_size)
    if cfg.llm.backend != "megatron":
        return tower, connector, llm
    if layout is None:
        raise ConfigError("llm.backend=megatron builds inside a run (it needs the run's layout): use llm.backend=hf")
    from vlm_train.parallel.engine import run_precision
    from vlm_train.parallel.tensor_parallel import from_hf_decoder

    return tower, connector, from_hf_decoder(llm, layout, precision=run_precision(cfg))  # the tower stays whole


def build_native_connector(cfg: Config, tower: NativeResolutionTower, llm_dim: int) -> Connector:
    """connector=patch_merger for a native-resolution tower: Qwen3-VL's (LayerNorm, and one merger per
    DeepStack layer) or the configured one (Qwen2-VL: LayerNorm, Qwen2.5-VL: RMSNorm)."""
    if tower.family != "qwen3_vl":
        return build_connector(cfg.connector, tower.hidden_size, llm_dim, tower.num_features)
    if cfg.connector.norm != "layernorm":
        raise ConfigError("vision.family=qwen3_vl: Qwen3-VL's patch merger normalises with connector.norm=layernorm")
    return PatchMergerConnector.qwen3(tower.hf_model.config, len(tower.deepstack_layers))


def native_tower_sizes(cfg: Config) -> dict:
    """transformers' vision config fields of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL ViT from vision.* sizes."""
    vision, width = cfg.vision, cfg.vision.hidden_size
    common = dict(depth=vision.num_layers, num_heads=vision.num_heads, patch_size=vision.patch_size)
    if vision.family == "qwen2_vl":
        return common | dict(
            embed_dim=width, mlp_ratio=vision.intermediate_size / width, hidden_size=cfg.llm.hidden_size
        )
    common |= dict(hidden_size=width, intermediate_size=vision.intermediate_size, out_hidden_size=cfg.llm.hidden_size)
    if vision.family == "qwen3_vl":
        return common | dict(
            num_position_embeddings=vision.num_position_embeddings,
            deepstack_visual_indexes=list(vision.deepstack_layers),
        )
    return common | dict(window_size=vision.window_size, fullatt_block_indexes=list(vision.full_attention_layers))


def mrope_llm_sizes(llm: LLMConfig, vocab_size: int, family: str = "qwen2_5_vl") -> dict:
    """transformers' text config fields of a Qwen-VL decoder; M-RoPE sections default to Qwen's split
    of the rotary pairs (1/4 temporal, 3/8 height, 3/8 width: 16/24/24 at head width 128; Qwen3-VL,
    interleaved: 24/20/20)."""
    pairs = llm.hidden_size // llm.num_heads // 2
    section = llm.mrope_section or _default_mrope_section(pairs, family)
    if sum(section) != pairs:
        raise ConfigError(f"llm.mrope_section={section} must sum to the head width / 2 = {pairs}")
    rope = {"rope_type": "default", "rope_theta": llm.rope_theta, "mrope_section": section}
    qwen3 = dict(head_dim=2 * pairs, rope_parameters=rope | {"mrope_interleaved": True}) if family == "qwen3_vl" else {}
    return (
        dict(
            vocab_size=vocab_size,
            hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads,
            max_position_embeddings=llm.max_position_embeddings,
            rope_parameters=rope,
            bos_token_id=None,  # Qwen's ids; the run's tokenizer gives its own to generation
            eos_token_id=None,
        )
        | qwen3
    )


def _default_mrope_section(pairs: int, family: str) -> list[int]:
    if family == "qwen3_vl":
        height = pairs * 5 // 16
        return [pairs - 2 * height, height, height]
    temporal = pairs // 4
    return [temporal, (pairs - temporal) // 2, pairs - temporal - (pairs - temporal) // 2]


def build_anyres(cfg: VisionConfig, tower: VisionTower, llm_dim: int) -> AnyResLayout | None:
    """vision.anyres: LLaVA-NeXT's tiling (`anyres`) or OneVision's (`anyres_max_N`), or None."""
    if cfg.anyres is None:
        return None
    max_tiles = None
    if cfg.anyres != "anyres":
        count = cfg.anyres.removeprefix("anyres_max_")
        if not cfg.anyres.startswith("anyres_max_") or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"vision.anyres={cfg.anyres}: use anyres (LLaVA-NeXT) or anyres_max_N (OneVision), N >= 1"
            )
        max_tiles = int(count)
    if any(len(grid) != 2 or min(grid) < 1 for grid in cfg.anyres_grids) or not cfg.anyres_grids:
        raise ConfigError(f"vision.anyres_grids={cfg.anyres_grids}: give [rows, columns] pairs of at least 1")
    grid = tower.image_size // tower.patch_size
    if tower.num_features != grid * grid:
        raise ConfigError(
            "vision.anyres stitches patch grids: the tower must give its patches only (vision.drop_cls=true)"
        )
    pinpoints = [[rows * tower.image_size, columns * tower.image_size] for rows, columns in cfg.anyres_grids]
    return AnyResLayout(pinpoints, tower.image_size, grid, llm_dim, max_tiles)


def _enable_activation_checkpointing(model: VisionLanguageModel, cfg: Config) -> None:
    """Per component, each layer's activations are recomputed in backward instead of kept (HF
    gradient checkpointing, non-reentrant: frozen layers and ZeRO-3 hooks work as usual). The
    decoder's recomputation replays the connector's per-forward state (modality norms' image
    positions, cross-attention media) through the connector's `checkpoint_context_fn`."""
    if cfg.vision.activation_checkpointing:
        hf_model = model.vision.hf_model
        if not getattr(hf_model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{cfg.vision.name} does not support activation_checkpointing")
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.llm.activation_checkpointing:
        model.llm.enable_activation_checkpointing(model.connector.checkpoint_context_fn())


def _build_decoder(cfg: Config, vocab_size: int, layout):
    if cfg.llm.backend != "megatron":
        return build_llm(cfg.llm, vocab_size=vocab_size, packing=cfg.data.packing)
    if layout is None:
        raise ConfigError("llm.backend=megatron builds inside a run (it needs the run's layout): use llm.backend=hf")
    from vlm_train.parallel.engine import run_precision
    from vlm_train.parallel.tensor_parallel import build_megatron_llm

    return build_megatron_llm(cfg.llm, vocab_size, layout, precision=run_precision(cfg))  # bf16: fp32 softmax


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)
