"""Build a VisionLanguageModel from a composed config; each component from its own section."""

from __future__ import annotations

from torch import nn

from vlm_train.config import Config, VisionConfig
from vlm_train.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, load_tokenizer
from vlm_train.errors import ConfigError
from vlm_train.models import VisionLanguageModel, VisionTower, build_connector, build_llm, build_vision_tower
from vlm_train.models.anyres import AnyResLayout
from vlm_train.models.connectors import load_connector_weights


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
    vision = build_vision_tower(cfg.vision)
    llm = _build_decoder(cfg, len(tokenizer), layout)
    connector = build_connector(
        cfg.connector, vision_dim=vision.hidden_size, llm_dim=llm.hidden_size, num_patches=vision.num_features
    )
    anyres = build_anyres(cfg.vision, vision, llm.hidden_size)
    video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) if cfg.data.video else None
    model = VisionLanguageModel(
        vision, connector, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), anyres, video_token_id
    )
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
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("vision, llm and connector are all frozen: nothing would train")
    _enable_activation_checkpointing(model, cfg)
    return model


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
