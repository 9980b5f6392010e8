"""Typed config schemas and `compose`, the one way a config is built (CLI, notebooks, tests).

The YAML tree under `configs/` is composed by Hydra over these dataclasses in struct mode: an
unknown key is an error, never a silent default. Library code receives the dataclasses, and each
component only its own section. This module imports Hydra lazily so that `vlm_train.models` (which
reads these dataclasses) never pulls it in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlm_train.errors import ConfigError

MISSING: Any = "???"  # omegaconf's marker for a required value

QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # native-resolution towers, M-RoPE decoders
CONFIG_DIR = Path(os.environ.get("VLM_TRAIN_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


@dataclass
class LoRAConfig:
    """LoRA on a component's linear layers (models/lora.py): its base weights frozen, a rank-`rank`
    update B A x (alpha / rank) trained. rank 0: no LoRA."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # linear layers by name: a module whose name is a target or ends in ".<target>" (PEFT's
    # target_modules); "all-linear": every nn.Linear but the output head
    targets: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class VisionConfig:
    """A Hugging Face CLIP or SigLIP vision tower."""

    name: str = "clip-tiny"  # readable id, e.g. clip-vit-l-336px
    # clip | siglip (| blip2 | idefics2: towers imported from those VLMs, path only) | qwen2_vl | qwen2_5_vl |
    # qwen3_vl (native resolution: the path is a whole Qwen-VL folder, the same as llm.path; docs/qwen_vl.md)
    family: str = "clip"
    path: str | None = MISSING  # local HF checkpoint dir; null: build from the size fields below
    image_size: int = 48
    patch_size: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    select_layer: int = -1  # hidden state fed to the connector (LLaVA-1.5 uses -2)
    drop_cls: bool = True  # drop the CLS token where the tower has one (CLIP)
    freeze: bool = False
    activation_checkpointing: bool = False  # recompute each layer in backward (HF gradient checkpointing)
    # AnyRes tiling: null (one image_size view) | anyres (LLaVA-NeXT) | anyres_max_N (LLaVA-OneVision:
    # feature maps over N tiles' worth of tokens are shrunk bilinearly)
    anyres: str | None = None
    # tile grids (rows, columns) an image may be resized to; LLaVA-NeXT's pinpoints / image_size
    anyres_grids: list[list[int]] = field(default_factory=lambda: [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]])
    # Native resolution (qwen2_vl, qwen2_5_vl, qwen3_vl): images resized to multiples of patch x 2 px (28; Qwen3:
    # 32) within these pixel counts (the Qwen processor's min_pixels / max_pixels); Qwen2.5-VL's window
    # attention: window in pixels and the layers that attend over the whole image instead
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    window_size: int = 112
    full_attention_layers: list[int] = field(default_factory=list)
    # Qwen3-VL: the tower layers whose features DeepStack adds to the decoder's first layers (8B: [8, 16, 24]),
    # and its learned absolute position grid (2304 = 48 x 48, interpolated to each image's grid)
    deepstack_layers: list[int] = field(default_factory=list)
    num_position_embeddings: int = 2304
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class LLMConfig:
    """The language decoder: a Hugging Face causal LM (Llama family), local path or config."""

    name: str = "llama-tiny"
    backend: str = "auto"  # hf | megatron (megatron-core, tensor parallel) | auto: megatron when TP > 1, else hf
    family: str = "llama"  # llama | qwen2_vl | qwen2_5_vl | qwen3_vl (M-RoPE) build from the size fields; any causal LM from a path
    path: str | None = MISSING  # local HF checkpoint dir; null: build from the size fields below
    tokenizer: str | None = None  # local tokenizer dir; "toy" = the built-in toy tokenizer; None = path
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 344
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    tie_embeddings: bool = False
    # qwen2_vl/qwen2_5_vl/qwen3_vl: rotary pairs per (t, h, w); None: 1/4, 3/8, 3/8 (Qwen3: 3/8, 5/16, 5/16)
    mrope_section: list[int] | None = None
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    freeze: bool = False
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (HF gradient checkpointing)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ConnectorConfig:
    """Fields every connector has; each connector's schema extends it."""

    name: str = MISSING
    path: str | None = MISSING  # pretrained weights (safetensors or state-dict .bin/.pt); null: random init
    freeze: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA on its linear layers (docs/lora.md)


SchemaT = TypeVar("SchemaT", bound=type[ConnectorConfig])

# The one registry of connector names: name -> its config schema (Hydra's `connector` group; the
# `<name>_schema` a configs/connector/*.yaml builds on). The factory, models/connectors/__init__.py,
# keys its classes by the same schemas and refuses one this registry lacks.
CONNECTOR_SCHEMAS: dict[str, type[ConnectorConfig]] = {}


def connector_schema(schema: SchemaT) -> SchemaT:
    """Register a connector's config schema under its `name` default (the connector's name)."""
    name = schema.name
    if not isinstance(name, str) or name == MISSING or name in CONNECTOR_SCHEMAS:
        raise TypeError(f"{schema.__name__}: a connector schema needs a `name` default of its own, not {name!r}")
    CONNECTOR_SCHEMAS[name] = schema
    return schema


@connector_schema
@dataclass
class MLPConnectorConfig(ConnectorConfig):
    """LLaVA-style projector: Linear, then (GELU, Linear) x (depth - 1). depth 1 = linear."""

    name: str = "mlp"
    depth: int = 2


@connector_schema
@dataclass
class QFormerConnectorConfig(ConnectorConfig):
    """BLIP-2's Q-Former: learned queries, BERT-style layers, cross-attention to the image."""

    name: str = "qformer"
    num_queries: int = 32  # visual tokens per image
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2  # a cross-attention to the image every N layers


@connector_schema
@dataclass
class PerceiverConnectorConfig(ConnectorConfig):
    """Idefics2's modality-projection MLP then a Perceiver resampler of `num_latents` latents."""

    name: str = "perceiver"
    num_latents: int = 64  # visual tokens per image
    depth: int = 3
    num_heads: int = 16
    head_dim: int = 96
    num_kv_heads: int = 4
    intermediate_size: int = 0  # modality-projection MLP width; 0: 4 x the LLM width


@connector_schema
@dataclass
class CrossAttentionConnectorConfig(ConnectorConfig):
    """Flamingo's tanh-gated cross-attention blocks inside the decoder (gates start at zero)."""

    name: str = "cross_attention"
    every: int = 4  # a block before every k-th decoder layer (Flamingo-3B/9B: 4; 1: before every layer)
    num_heads: int = 8
    ff_mult: int = 4
    media: str = "most_recent"  # the images a text token reads: most_recent (Flamingo) | all_preceding
    resampler: str | None = None  # perceiver: Flamingo's Perceiver resampler makes each image's media; null: linear
    resampler_latents: int = 64  # media tokens per image with the resampler (Flamingo: 64)
    resampler_depth: int = 6  # Flamingo: 6
    resampler_heads: int = 8
    resampler_head_dim: int = 64


@connector_schema
@dataclass
class LNAdapterConnectorConfig(ConnectorConfig):
    """LayerNorm (no affine) + per-channel scale and shift + one linear map to the LLM width."""

    name: str = "ln_adapter"
    train_projection: bool = True  # false: the linear map stays at its random initialisation
    modality_norms: bool = False  # a second affine per LLM norm at image positions; LLM frozen


@connector_schema
@dataclass
class PatchMergerConnectorConfig(ConnectorConfig):
    """Qwen2-VL's PatchMerger: norm, then each merge_size x merge_size block of patches through an MLP."""

    name: str = "patch_merger"
    merge_size: int = 2
    norm: str = "layernorm"  # layernorm (Qwen2-VL) | rmsnorm (Qwen2.5-VL)


@dataclass
class MixtureSource:
    """One more source of a data mixture: a shard pattern and its relative weight."""

    urls: str = MISSING
    weight: float = 1.0


@dataclass
class DataConfig:
    """WebDataset shards and how samples become token sequences."""

    urls: str = MISSING  # shard pattern, brace expansion: data/train-{000000..000009}.tar
    eval_urls: str | None = None  # held-out shards for the end-of-run evaluation
    synthetic_dir: str | None = None  # generate the toy scenes here when `urls` matches nothing
    synthetic_train: int = 20000  # toy scenes to generate (train split)
    synthetic_eval: int = 400  # toy scenes to generate (held-out split)
    # square (48 px scenes) | sizes (several aspect ratios, small objects) | video | preference (objective=dpo
    # pairs) | text (scenes told in words: documents for objective=lm) | captions (image + caption: objective=clip)
    # | relations (2-3 objects: binding, counting, relations; bench/connectors.py)
    synthetic_layout: str = "square"
    # plain (LLaVA stage 1) | vicuna_v1 (LLaVA-1.5) | hf (the tokenizer's chat_template) | chat (the toy's)
    template: str = "chat"
    image_aspect_ratio: str = "crop"  # crop (short side, centre crop) | pad (LLaVA's expand2square) | resize
    jpeg_draft: bool = False  # decode large JPEGs at 1/2-1/8 size before the resize: faster, inexact
    group_by_modality_length: bool = False  # batches of image samples and of text-only samples (LLaVA's sampler)
    max_length: int = 128  # tokens per sample, visual tokens included; text is truncated first
    max_visual_tokens: int | None = None  # visual tokens per sample; over it: see over_visual_budget
    over_visual_budget: str = "downscale"  # downscale (images shrunk, videos' frames cut, until they fit) | drop
    # Video (docs/video.md): samples with a `<video>` marker and a video file (data.video_key) or frame sequence
    # (`<key>.frame.<n>.png`); the tokenizer gains `<video>`; needs vision.anyres (LLaVA-OneVision's layout).
    video: bool = False
    max_frames: int = 32  # frames read per video, evenly spread (LLaVA-Video's frames_upbound)
    video_key: str = "mp4;webm;mkv;mov;avi"
    decode_timeout_s: float = 30.0  # a video that takes longer to decode is a counted skip (decode_timeout)
    video_timestamps: bool = False  # LLaVA-Video's time instruction (duration, frame times) before the question
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_block: int = 512  # samples shuffled together within a worker's stream
    image_key: str = "png;jpg;jpeg;webp"
    text_key: str = "json"
    eval_samples: int = 400  # held-out samples scored at the end of a run
    max_new_tokens: int = 20  # greedy decoding budget per evaluation answer
    max_skip_fraction: float = 0.01  # abort (DataError) when skipped bad samples / samples seen exceeds this
    weight: float = 1.0  # relative weight of data.urls when data.mixture adds sources
    mixture: list[MixtureSource] = field(default_factory=list)  # more sources, e.g. [{urls: b/{0..9}.tar, weight: 0.5}]
    samples_per_shard: int | None = None  # samples in each remote (pipe:, http) shard; local ones are counted
    packing: bool = False  # several samples per row up to max_length, attention and positions kept per sample
    # padded tokens (rows x longest row, visual tokens included) per forward: each loaded micro-batch runs as
    # as many forwards as it needs, longest samples together (docs/data_pipeline.md); at least data.max_length
    max_tokens_per_batch: int | None = None
    log_keys: str | None = None  # debug: a folder where each rank appends the sample keys of every batch it takes
    preference: bool = False  # samples are chosen/rejected pairs (set from objective=dpo, not by hand)
    # what a sample is read as (set from the objective, not by hand): conversation (sft, dpo) | document
    # (objective=lm: a text, every token a label) | caption (objective=clip|siglip: an image and its caption)
    read_as: str = "conversation"


@dataclass
class ParallelConfig:
    """Process layout: data parallel x tensor parallel, and ZeRO sharding."""

    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    tensor_parallel: int = 1  # decoder split across this many ranks (megatron-core decoder, llm.backend=megatron)
    sequence_parallel: bool = False  # megatron sequence parallel; needs Transformer Engine or apex norms
    backend: str = "auto"  # auto (nccl with GPUs, gloo without) | nccl | gloo
    timeout_s: int = 1800  # collective timeout
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's stage3_param_persistence_threshold;
    # None: its default, 1e5 elements); 0 shards every one (tests use it: toy parameters are all below 1e5)
    zero3_persistence_threshold: int | None = None


@dataclass
class TrainConfig:
    """Optimisation and the step loop."""

    max_steps: int = 100  # optimizer steps; derived from the shards when train.epochs is set
    epochs: float | None = None  # train this many passes over data.urls (steps from the shards' sample counts)
    micro_batch_size: int = 8  # per rank
    global_batch_size: int | None = None  # samples per optimizer step, any rank count: grad_accum is derived
    grad_accum: int = 1  # micro-batches per optimizer step (derived when global_batch_size is set)
    grad_reduce_dtype: str = "fp32"  # dtype gradients accumulate and all-reduce in under bf16: fp32 | bf16
    optimizer: str = "adamw"  # adamw | sgd (plain SGD, no momentum: tests where Adam would hide a gradient scale)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    warmup_ratio: float | None = None  # warmup as a fraction of the steps (LLaVA: 0.03); overrides warmup_steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept (the one `latest` names is never deleted); 0 keeps all
    async_save: bool = False  # write checkpoints in a background thread while training goes on (host RAM: one copy)
    requeue: bool = False  # under Slurm, requeue the job when SIGTERM/SIGUSR1 or the deadline stops it
    # Stop in time by itself (training/deadline.py): save and exit 75 when one more step and a
    # save would not fit before the deadline. stop_at: auto (the job's end: slurm/common.sh's
    # VLM_STOP_AT or Slurm's SLURM_JOB_END_TIME) | none | epoch seconds | ISO 8601 time.
    stop_at: str = "auto"
    max_minutes: float | None = None  # wall-clock minutes from the process start (Megatron's --exit-duration-in-mins)
    stop_margin_s: float = 60.0  # kept free beyond the measured step and save times (the exit, a first save)
    max_bad_steps: int = 10  # steps skipped for a non-finite loss before the run stops (exit 3)
    log_every: int = 10
    eval: bool = True  # score held-out samples at the end (needs data.eval_urls)
    eval_every: int = 0  # also score them every N steps (0: at the end only)
    peak_tflops: float | None = None  # per-device peak for MFU; None: data-sheet table (GPU) or a matmul probe (CPU)
    compile: bool = False  # torch.compile the model before DeepSpeed wraps it


@dataclass
class RunConfig:
    """Where the run lives. A run dir holding a complete checkpoint is resumed."""

    dir: str = "runs/default"
    seed: int = 0
    # One job per run dir (training/run_lock.py): "fcntl" = an fcntl lock plus a heartbeat (for
    # filesystems whose locks do not reach other nodes), "heartbeat" = the heartbeat alone (Lustre
    # `localflock`, BeeGFS without global locks), "off" = no check.
    lock: str = "fcntl"
    lock_stale_s: float = 300.0  # a holder on another host silent this long is dead: its lock is taken over


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "vlm_train"
    entity: str | None = None


@dataclass
class DPOConfig:
    """objective=dpo (training/dpo.py): TRL's sigmoid DPO loss."""

    beta: float = 0.1  # the KL penalty's weight: how far the policy may move from the reference
    label_smoothing: float = 0.0  # conservative DPO: the chance a preference label is wrong (< 0.5)


@dataclass
class ContrastiveConfig:
    """objective=clip|siglip (training/contrastive.py): the text tower and the embedding both towers map
    into. The image tower is `vision` (vision.path continues a pretrained one)."""

    embed_dim: int = 64  # the shared embedding's width (CLIP: a projection of each tower; SigLIP: the towers' own)
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 256
    # learnable temperature t = exp(log_scale) and (siglip) bias b; null: the papers' starting values
    # (CLIP: t = 1/0.07, SigLIP: t = 10, b = -10)
    init_scale: float | None = None
    init_bias: float | None = None


@dataclass
class Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    connector: Any = MISSING  # one of the connector schemas, chosen by the `connector` group
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # sft: next-token loss on the answers | dpo: preference pairs (chosen / rejected replies), docs/dpo.md |
    # lm: text-only language-model pretraining of the decoder (no tower) | clip, siglip: contrastive image-text
    # pretraining of the tower (softmax / sigmoid loss, negatives from every data-parallel rank), docs/pretraining.md
    objective: str = "sft"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)


_CHOICES = {
    "vision.family": ("clip", "siglip", "blip2", "idefics2", *QWEN_VL_FAMILIES),
    "objective": ("sft", "dpo", "lm", "clip", "siglip"),
    "llm.backend": ("auto", "hf", "megatron"),
    "llm.family": ("llama", "mistral", "opt", *QWEN_VL_FAMILIES),
    "data.template": ("chat", "plain", "vicuna_v1", "hf"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.grad_reduce_dtype": ("fp32", "bf16"),
    "train.optimizer": ("adamw", "sgd"),
    "data.image_aspect_ratio": ("crop", "pad", "resize"),
    "data.synthetic_layout": ("square", "sizes", "video", "preference", "text", "captions", "relations"),
    "data.over_visual_budget": ("downscale", "drop"),
    "wandb.mode": ("disabled", "offline", "online"),
    "run.lock": ("fcntl", "heartbeat", "off"),
}


def _register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for name, schema in CONNECTOR_SCHEMAS.items():
        store.store(group="connector", name=f"{name}_schema", node=schema)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Return the config the CLI builds for these Hydra overrides, validated.

    Raises ConfigError (one line, names the problem) on an unknown key, a bad value, a missing
    required field or an unknown group option.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            raw = hydra_compose("config", overrides=[_quote_braces(o) for o in overrides])
        missing = sorted(OmegaConf.missing_keys(raw))
        if missing:
            raise ConfigError(f"required but not set: {', '.join(missing)} (give them as key=value overrides)")
        cfg = OmegaConf.to_object(raw)
        assert isinstance(cfg, Config)  # a structured config's object is its dataclass
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg)
    resolve_llm_backend(cfg)
    return cfg


def resolve_llm_backend(cfg: Config) -> None:
    """`llm.backend=auto`: the HF decoder at TP=1, the megatron-core decoder at TP > 1."""
    if cfg.llm.backend == "auto":
        cfg.llm.backend = "megatron" if cfg.parallel.tensor_parallel > 1 else "hf"


def validate(cfg: Config) -> None:
    """Checks that need more than a type: allowed values and ranges."""
    for dotted, allowed in _CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage} is out of range: use 0, 1, 2 or 3")
    positive = (
        "parallel.tensor_parallel",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.max_steps",
        "data.max_length",
        "train.log_every",
    )
    for dotted in positive:
        if _get(cfg, dotted) < 1:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)} must be at least 1")
    if min(cfg.data.num_workers, cfg.train.save_every, cfg.train.keep_last, cfg.train.max_bad_steps) < 0:
        raise ConfigError(
            "data.num_workers, train.save_every, train.keep_last and train.max_bad_steps must not be negative"
        )
    if cfg.train.eval_every < 0:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} must not be negative (0: at the end only)")
    if not cfg.run.lock_stale_s > 0:
        raise ConfigError(f"run.lock_stale_s={cfg.run.lock_stale_s} must be positive (seconds)")
    _validate_data(cfg)
    _validate_objective(cfg)
    for component in ("vision", "llm", "connector"):
        lora = _get(cfg, f"{component}.lora")
        if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or (lora.rank and not lora.targets):
            raise ConfigError(
                f"{component}.lora: rank={lora.rank} (0: none), alpha={lora.alpha} (> 0), dropout={lora.dropout} "
                f"(0 to 1) and targets={list(lora.targets)} (at least one) are out of range"
            )


READ_AS = {"sft": "conversation", "dpo": "conversation", "lm": "document", "clip": "caption", "siglip": "caption"}


def _validate_objective(cfg: Config) -> None:
    cfg.data.preference = cfg.objective == "dpo"
    cfg.data.read_as = READ_AS[cfg.objective]
    if cfg.objective in ("clip", "siglip"):
        _validate_contrastive(cfg)
    if cfg.objective != "dpo":
        return
    if not cfg.dpo.beta > 0 or not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.beta={cfg.dpo.beta} must be > 0 and dpo.label_smoothing in [0, 0.5)")
    if cfg.data.packing or cfg.data.max_tokens_per_batch is not None:
        raise ConfigError(
            "objective=dpo reads each pair as two rows: data.packing and data.max_tokens_per_batch are off"
        )


def _validate_contrastive(cfg: Config) -> None:
    if cfg.vision.family not in ("clip", "siglip"):
        raise ConfigError(
            f"objective={cfg.objective} trains a clip or siglip tower, not vision.family={cfg.vision.family}"
        )
    if cfg.parallel.tensor_parallel > 1 or cfg.data.packing or cfg.data.max_tokens_per_batch is not None:
        raise ConfigError(
            f"objective={cfg.objective} takes one image and one caption per row: parallel.tensor_parallel=1, "
            "data.packing=false, data.max_tokens_per_batch=null"
        )


def _validate_data(cfg: Config) -> None:
    data = cfg.data
    if not 0 <= data.max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction={data.max_skip_fraction} must be between 0 and 1")
    if min([data.weight] + [m.weight for m in data.mixture]) <= 0:
        raise ConfigError("data.weight and every data.mixture weight must be positive")
    if data.samples_per_shard is not None and data.samples_per_shard < 1:
        raise ConfigError(f"data.samples_per_shard={data.samples_per_shard} must be at least 1")
    native = cfg.vision.family in QWEN_VL_FAMILIES
    if data.video and cfg.vision.anyres is None and not native:
        raise ConfigError(
            "data.video=true lays frames out as LLaVA-OneVision does: set vision.anyres (e.g. anyres_max_9)"
        )
    if data.max_frames < 1 or not data.decode_timeout_s > 0:
        raise ConfigError(f"data.max_frames={data.max_frames} must be at least 1 and data.decode_timeout_s positive")
    if data.max_tokens_per_batch is not None and data.max_tokens_per_batch < data.max_length:
        raise ConfigError(
            f"data.max_tokens_per_batch={data.max_tokens_per_batch} must hold one sample of data.max_length="
            f"{data.max_length} tokens: raise it or lower data.max_length"
        )
    if native and data.max_tokens_per_batch is not None:
        raise ConfigError(
            f"vision.family={cfg.vision.family}: data.max_tokens_per_batch does not split native-resolution "
            "patches yet (docs/qwen_vl.md)"
        )
    if cfg.vision.min_pixels < 1 or cfg.vision.max_pixels < cfg.vision.min_pixels:
        raise ConfigError(f"vision.min_pixels={cfg.vision.min_pixels} must be >= 1 and <= vision.max_pixels")
    if cfg.connector.name == "cross_attention":
        _validate_cross_attention(cfg.connector)
    if data.synthetic_layout in ("relations", "text", "captions") and cfg.llm.tokenizer == "toy":
        raise ConfigError(
            f"data.synthetic_layout={data.synthetic_layout} asks about relations and counts: use "
            "llm.tokenizer=toy-relations (the toy's words and those)"
        )
    if data.packing and cfg.connector.name == "cross_attention":
        raise ConfigError("data.packing needs a connector whose visual tokens sit in the sequence, not cross_attention")
    if data.packing and (cfg.llm.backend == "megatron" or cfg.parallel.tensor_parallel > 1):
        # the megatron decoder takes no attention mask: packed samples would attend to each other
        raise ConfigError("data.packing needs the Hugging Face decoder (llm.backend=hf, parallel.tensor_parallel=1)")


def _validate_cross_attention(connector: CrossAttentionConnectorConfig) -> None:
    if connector.media not in ("most_recent", "all_preceding"):
        raise ConfigError(f"connector.media={connector.media!r} is not one of most_recent, all_preceding")
    if connector.resampler not in (None, "perceiver"):
        raise ConfigError(f"connector.resampler={connector.resampler!r} is not one of perceiver, null")
    if connector.every < 1:
        raise ConfigError(f"connector.every={connector.every} must be at least 1")


def load_yaml(path: str | Path) -> Config:
    """A resolved config written by a run (`<run.dir>/config.yaml`), typed again."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(path)
    schema = CONNECTOR_SCHEMAS[raw.connector.name]
    merged = OmegaConf.merge(OmegaConf.structured(Config(connector=schema())), raw)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)  # a structured config's object is its dataclass
    return cfg


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _quote_braces(override: str) -> str:
    """`data.urls=shards/{000..009}.tar` as users type it: Hydra's grammar would read the braces
    as a dict, so an unquoted value holding a brace range is passed to Hydra as a quoted string."""
    key, sep, value = override.partition("=")
    if sep and "{" in value and ".." in value and value[:1] not in "'\"[":  # a list (data.mixture) quotes its own
        return f"{key}='{value}'"
    return override


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__
