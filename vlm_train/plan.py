"""The planner: `vlm-plan [--gpus N] [overrides...]` sizes a run before it starts.

The model is built on the meta device (shapes only, no memory), so a 7B plan costs seconds, and
from config-only checkpoint folders (`config.json` + tokenizer files, no weights): a plan reads no
weights, `connector.path` and `data.urls` included. Reported: parameters per component (trainable
/ frozen), training FLOPs per sample, and per GPU the model states for ZeRO 0-3 x tensor-parallel
sizes plus the activation peak with checkpointing off and on, and which GPU (80 / 141 GB) holds
it. `vlm-train` runs the same check at start-up (`check_fits`) and refuses a layout that cannot fit.

Model states follow what DeepSpeed actually holds per rank (measured by bench/zero_memory.py):
- weights: every parameter, frozen ones included, in the run's precision (bf16: 2 bytes,
  fp32: 4); ZeRO-3 shards them over data parallel, except tensors smaller than DeepSpeed's
  persistence threshold (1e5 elements), which stay whole on every rank;
- gradients of trainable parameters, in the run's precision (fp32 at ZeRO 2-3 under bf16 with
  train.grad_reduce_dtype=fp32, the default): whole at ZeRO 0, sharded from ZeRO 1 on (DeepSpeed
  keeps only this rank's partition);
- optimizer: Adam's two moments in fp32 (8 bytes), plus an fp32 master copy (4 bytes) whenever
  DeepSpeed keeps one (bf16 at every stage; fp32 at ZeRO 1-3, whose flat partitions are copies);
  sharded from ZeRO 1 on.
Tensor parallelism divides the decoder's tensors by the TP size (tower and connector stay whole).
Activations: `activation_bytes` (counted per saved tensor; measured within a few % on CPU).
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlm_train.config import Config
from vlm_train.errors import ConfigError

if TYPE_CHECKING:
    from vlm_train.models.vlm import VisionLanguageModel

GB = 1e9
GPU_SIZES_GB = (80, 141)  # H100 / A100-80GB, and H200
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
TP_SIZES = (1, 2, 4, 8)
PLAN_UNREAD = {"data.urls": "unread-by-vlm-plan", "connector.path": "null"}  # keys a plan needs no value for
USAGE = """usage: vlm-plan [--gpus N] [key=value ...]

Sizes the run the overrides describe (the same overrides as vlm-train) without reading weights:
parameters, FLOPs per sample, and memory per GPU (model states + activations, checkpointing off
and on) for ZeRO 0-3 x tensor-parallel sizes on N GPUs (default 8). Checkpoint folders need only
config.json and the tokenizer files; connector.path and data.urls may be left out."""


@dataclass(frozen=True)
class ComponentParams:
    """Parameter counts of one component (vision, connector or llm)."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass(frozen=True)
class ModelStates:
    """Bytes one rank holds for weights, gradients and optimizer states."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def build_meta_model(cfg: Config) -> VisionLanguageModel:
    """The run's VisionLanguageModel with meta tensors: real shapes and freezing, no memory.

    The decoder is the HF one whatever `llm.backend` says: TP sharding is applied by arithmetic.
    """
    from vlm_train.build import build_model

    cfg = copy.deepcopy(cfg)
    cfg.llm.backend = "hf"
    cfg.connector.path = None  # trained connector weights change no shape: not read
    with torch.device("meta"), _configs_instead_of_weights():
        return build_model(cfg)


@contextmanager
def _configs_instead_of_weights():
    """Inside, `from_pretrained(path)` builds the model from `path`'s config alone: transformers
    refuses to load weights on the meta device, and a plan needs only the shapes."""
    from transformers import AutoConfig, PreTrainedModel
    from transformers.models.auto import modeling_auto  # noqa: F401  (see below)
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def model_from_config(cls, path, *args, **kwargs):
        return cls._from_config(cls.config_class.from_pretrained(path))

    def auto_from_config(cls, path, *args, **kwargs):
        config = AutoConfig.from_pretrained(path)
        return cls.from_config(config, attn_implementation=kwargs.get("attn_implementation"))

    # Each Auto class holds its own copy of _BaseAutoModelClass.from_pretrained, made when modeling_auto
    # is imported (imported above, so that no class copies the stand-in): every copy is swapped, and restored.
    autos = [_BaseAutoModelClass, *_subclasses(_BaseAutoModelClass)]
    originals = {
        cls: cls.__dict__["from_pretrained"] for cls in [PreTrainedModel, *autos] if "from_pretrained" in cls.__dict__
    }
    for cls in originals:
        cls.from_pretrained = classmethod(model_from_config if cls is PreTrainedModel else auto_from_config)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.from_pretrained = original


def _subclasses(cls: type) -> list[type]:
    direct: list[type] = cls.__subclasses__()
    return [sub for child in direct for sub in (child, *_subclasses(child))]


def parameter_counts(model: VisionLanguageModel) -> dict[str, ComponentParams]:
    """Trainable and frozen parameters of the tower, the connector and the decoder."""
    counts = {}
    connector_ids = {id(p) for p in model.connector.parameters()}
    for name, module in (("vision", model.vision), ("connector", model.connector), ("llm", model.llm)):
        params = [p for p in module.parameters() if name == "connector" or id(p) not in connector_ids]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        counts[name] = ComponentParams(trainable, sum(p.numel() for p in params) - trainable)
    return counts


def model_state_bytes(
    model: VisionLanguageModel,
    precision: str,
    zero_stage: int,
    dp: int,
    tp: int = 1,
    grad_reduce_dtype: str = "bf16",
    persistence_threshold: int | None = None,
) -> ModelStates:
    """Bytes of weights, gradients and optimizer states one rank holds (see the module docstring).

    `grad_reduce_dtype="fp32"` (train.grad_reduce_dtype): under bf16, ZeRO 2-3 keep their gradient
    partitions in fp32 (docs/performance.md, Precision); ZeRO 0-1 store them in bf16 regardless.
    """
    weight_bytes = 2 if precision == "bf16" else 4
    grad_bytes = 4 if zero_stage >= 2 and grad_reduce_dtype == "fp32" else weight_bytes
    master_bytes = 4 if precision == "bf16" or zero_stage > 0 else 0
    llm_ids = {id(p) for p in model.llm.parameters()} - {id(p) for p in model.connector.parameters()}
    threshold = PERSISTENCE_THRESHOLD if persistence_threshold is None else persistence_threshold
    weights = grads = optimizer = 0.0
    for param in model.parameters():
        numel = param.numel() / tp if id(param) in llm_ids else float(param.numel())
        sharded_weights = zero_stage == 3 and numel >= threshold
        weights += weight_bytes * numel / (dp if sharded_weights else 1)
        if param.requires_grad:
            share = numel / (dp if zero_stage > 0 else 1)
            grads += grad_bytes * share
            optimizer += (8 + master_bytes) * share
    return ModelStates(weights, grads, optimizer)


def activation_bytes(
    model: VisionLanguageModel, cfg: Config, precision: str, tp: int = 1, checkpointing: bool | None = None
) -> float:
    """Peak bytes one micro-batch's forward and backward hold beyond the model states, per rank.

    Counted tensor by tensor from what autograd saves in a Hugging Face Llama-style layer (RMSNorm
    upcast to fp32, SwiGLU MLP, fused attention) and checked against a measured CPU step
    (tests/test_plan.py); the derivation is in docs/performance.md. `checkpointing` defaults to
    the config's `llm.activation_checkpointing` (and `vision.activation_checkpointing`).
    """
    width = 2 if precision == "bf16" else 4  # bytes of an activation element in the run's precision
    llm_ckpt = cfg.llm.activation_checkpointing if checkpointing is None else checkpointing
    total = _decoder_peak(model, cfg, width, forward_tokens(cfg), tp, llm_ckpt)
    if any(p.requires_grad for p in model.vision.parameters()):
        vision_ckpt = cfg.vision.activation_checkpointing if checkpointing is None else checkpointing
        total += _tower_bytes(model, cfg.train.micro_batch_size, width, vision_ckpt)
    return total


def forward_tokens(cfg: Config) -> int:
    """Padded tokens of one forward: a micro-batch of data.max_length samples, or fewer under
    data.max_tokens_per_batch."""
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    budget = cfg.data.max_tokens_per_batch
    return tokens if budget is None else min(tokens, budget)


def _decoder_peak(model, cfg: Config, width: int, tokens: int, tp: int, checkpointed: bool) -> float:
    """The decoder's peak: at the start of backward (the saved tensors, the logits and their
    gradients) or inside the last layer's backward (its saved tensors, gradients of its MLP)."""
    config = model.llm.hf_model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = len(model.llm.decoder_layers())
    eager = cfg.llm.attn_implementation == "eager"
    frozen = not any(p.requires_grad for p in model.llm.parameters())  # LLaVA stage 1: gradients only cross it
    layer = tokens * _decoder_layer_bytes(config, width, cfg.data.max_length, eager, tp, frozen)
    # logits in the run's precision and the loss's fp32 log-softmax stay until backward, which
    # starts with two more fp32 tensors of that size (the loss's and the logits' gradients)
    vocab_elements = tokens * model.llm.vocab_size / tp
    final_norm = tokens * (4 if frozen else 4 + 2 * width) * hidden
    backward_starts = final_norm + (width + 4) * vocab_elements + 8 * vocab_elements
    # later, of the logits only the output's own tensor is held; a layer's backward adds the
    # gradient flowing back and two MLP-wide gradients at once
    in_layer = width * vocab_elements + tokens * width * (hidden + 2 * intermediate / tp)
    if not checkpointed:
        return layers * layer + max(backward_starts, in_layer)
    inputs = layers * tokens * width * hidden  # each layer keeps only its input; one is recomputed at a time
    return inputs + max(backward_starts, in_layer + layer)


def _decoder_layer_bytes(config, width: int, seq: int, eager: bool, tp: int, frozen: bool = False) -> float:
    """Bytes one Llama-style decoder layer saves for backward, per token. Each RMSNorm keeps its
    input in fp32, the normalised value and its output (4 + 2w)·D; attention keeps q, k, v and
    its output 4w·D; the SwiGLU MLP gate, silu(gate), up and their product 4w·I. A frozen layer
    keeps no input of its linear layers (their weight gradients are not needed): norms 4·D, MLP
    3w·I. Eager attention adds the scores: the fp32 softmax, and its cast back in a 16-bit run
    (H·T per token). Tensor parallelism splits attention and MLP, not the norms."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    norms = 2 * (4 if frozen else 4 + 2 * width) * hidden
    split = 4 * width * hidden + (3 if frozen else 4) * width * intermediate
    if eager:
        split += (4 + (width if width != 4 else 0)) * config.num_attention_heads * seq
    return norms + split / tp


def _tower_bytes(model, batch: int, width: int, checkpointed: bool) -> float:
    """A tower that trains (CLIP/SigLIP: LayerNorm, GELU MLP): per layer two norms' inputs and
    outputs 4w·D, q, k, v and the attention output 4w·D, the MLP's two intermediates 2w·I."""
    config = model.vision.hf_model.config
    seq, hidden = batch * model.vision.num_features, config.hidden_size
    layer = seq * width * (8 * hidden + 2 * config.intermediate_size)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        layer += batch * (4 + width) * config.num_attention_heads * model.vision.num_features**2
    layers = config.num_hidden_layers
    return layers * seq * width * hidden + layer if checkpointed else layers * layer


def resolve_precision(cfg: Config, device: torch.device | None = None) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    on_gpu = device.type == "cuda" if device is not None else True  # a plan is for GPUs
    return "bf16" if on_gpu else "fp32"


def flops_per_sample(model: VisionLanguageModel, cfg: Config) -> float:
    """Training FLOPs of one sample of `data.max_length` tokens and one image (flops.py); a
    native-resolution tower's image has vision.max_pixels."""
    from vlm_train.models.qwen_vl import NativeResolutionTower
    from vlm_train.training.flops import training_flops

    vision = model.vision
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device="meta")
    if isinstance(vision, NativeResolutionTower):  # one image of vision.max_pixels, as patches
        pixels = torch.zeros(cfg.vision.max_pixels // vision.patch_size**2, vision.patch_values, device="meta")
    batch = {"attention_mask": torch.ones(1, cfg.data.max_length, dtype=torch.long), "pixel_values": pixels}
    return training_flops(model, batch)


def check_fits(cfg: Config, tp: int, dp: int, device: torch.device, ranks_on_node: int = 1) -> float:
    """Refuse (ConfigError, one line) a layout whose model states plus activations cannot fit this
    rank's memory; return the bytes it needs.

    On a GPU the limit is the device's memory; on CPU, the RAM the OS reports available, shared
    by the `ranks_on_node` ranks of this machine.
    """
    model = build_meta_model(cfg)
    precision = resolve_precision(cfg, device)
    states = model_state_bytes(
        model,
        precision,
        cfg.parallel.zero_stage,
        dp,
        tp,
        cfg.train.grad_reduce_dtype,
        cfg.parallel.zero3_persistence_threshold,
    )
    activations = activation_bytes(model, cfg, precision, tp)
    limit, what = device_memory_bytes(device, ranks_on_node)
    need = states.total + activations
    if need > limit:
        raise ConfigError(
            f"the run needs {need / GB:.1f} GB per rank but {what} has {limit / GB:.1f} GB: model states "
            f"{states.total / GB:.1f} GB (weights {states.weights / GB:.1f}, grads {states.grads / GB:.1f}, optimizer "
            f"{states.optimizer / GB:.1f}; ZeRO-{cfg.parallel.zero_stage}, TP={tp}, DP={dp}, {precision}) + "
            f"activations {activations / GB:.1f} GB ({forward_tokens(cfg)} tokens a forward, "
            f"llm.activation_checkpointing={str(cfg.llm.activation_checkpointing).lower()}"
            f"): {_remedy(cfg, states.total, limit)} (see vlm-plan)"
        )
    return need


def _remedy(cfg: Config, states: float, limit: float) -> str:
    if states > limit:
        return "raise parallel.zero_stage, use more GPUs or freeze more"
    if not cfg.llm.activation_checkpointing:
        return "set llm.activation_checkpointing=true or lower train.micro_batch_size"
    return (
        "lower train.micro_batch_size (train.global_batch_size keeps the batch by accumulation), data.max_length "
        "or data.max_tokens_per_batch"
    )


def device_memory_bytes(device: torch.device, ranks_on_node: int = 1) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), torch.cuda.get_device_name(device)
    return _available_ram() / max(
        ranks_on_node, 1
    ), f"each of the {ranks_on_node} rank(s) sharing this machine's available RAM"


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def describe(cfg: Config, gpus: int = 8) -> str:
    """The plan as text: parameters, FLOPs, and per GPU a memory table over ZeRO stages x TP
    sizes, with activation checkpointing off and on."""
    model = build_meta_model(cfg)
    precision = resolve_precision(cfg)
    lines = [f"vlm-plan: {cfg.vision.name} + {cfg.connector.name} + {cfg.llm.name}, {precision}, {gpus} GPUs"]
    if cfg.connector.path:
        lines.append(f"connector.path={cfg.connector.path} is not read: a plan needs shapes only")
    lines.append(f"{'component':<10} {'trainable':>15} {'frozen':>15}")
    counts = parameter_counts(model)
    for name, count in counts.items():
        lines.append(f"{name:<10} {count.trainable:>15,} {count.frozen:>15,}")
    total = ComponentParams(sum(c.trainable for c in counts.values()), sum(c.frozen for c in counts.values()))
    lines.append(f"{'total':<10} {total.trainable:>15,} {total.frozen:>15,}")
    lines.append(
        f"training FLOPs per sample ({cfg.data.max_length} tokens, 1 image): {flops_per_sample(model, cfg):.3e}"
    )
    lines += _memory_table(model, cfg, precision, gpus)
    return "\n".join(lines)


def _memory_table(model, cfg: Config, precision: str, gpus: int) -> list[str]:
    batch = f"micro-batch {cfg.train.micro_batch_size} x {cfg.data.max_length} tokens per GPU"
    if cfg.train.global_batch_size:
        batch += f", global batch {cfg.train.global_batch_size}"
    lines = [
        f"\nper GPU, GB ({batch}); activ: the estimated activation peak;",
        f"fits: the smallest GPU ({' or '.join(f'{size} GB' for size in GPU_SIZES_GB)}) that holds states + activ",
        f"{'':>41} | {'checkpointing off':^22} | {'checkpointing on':^22}",
        f"{'ZeRO':>4} {'TP':>3} {'DP':>3} {'weights':>7} {'grads':>6} {'optim':>6} {'states':>6} | "
        + " | ".join(f"{'activ':>6} {'total':>6} {'fits':>8}" for _ in range(2)),
    ]
    chosen = None
    for tp in (t for t in TP_SIZES if gpus % t == 0):
        activations = [activation_bytes(model, cfg, precision, tp, checkpointing=on) for on in (False, True)]
        for stage in range(4):
            states = model_state_bytes(
                model,
                precision,
                stage,
                gpus // tp,
                tp,
                cfg.train.grad_reduce_dtype,
                cfg.parallel.zero3_persistence_threshold,
            )
            columns = [
                f"{a / GB:>6.2f} {(states.total + a) / GB:>6.2f} {_fits(states.total + a):>8}" for a in activations
            ]
            lines.append(
                f"{stage:>4} {tp:>3} {gpus // tp:>3} {states.weights / GB:>7.2f} {states.grads / GB:>6.2f} "
                f"{states.optimizer / GB:>6.2f} {states.total / GB:>6.2f} | " + " | ".join(columns)
            )
            if (stage, tp) == (cfg.parallel.zero_stage, cfg.parallel.tensor_parallel):
                chosen = states.total + activations[int(cfg.llm.activation_checkpointing)]
    if chosen is not None:
        on = str(cfg.llm.activation_checkpointing).lower()
        lines.append(
            f"this config (ZeRO-{cfg.parallel.zero_stage}, TP={cfg.parallel.tensor_parallel}, "
            f"llm.activation_checkpointing={on}): {chosen / GB:.2f} GB per GPU, fits {_fits(chosen)}"
        )
    return lines


def _fits(need: float) -> str:
    return next((f"{size}GB" for size in GPU_SIZES_GB if need <= size * GB), "none")


def compose_for_plan(overrides: list[str]) -> Config:
    """The config `vlm-train` would build, minus what a plan never reads: `data.urls` and
    `connector.path` may be left out (a stage-2 plan before stage 1 has run, before data exists)."""
    from vlm_train.config import compose

    given = {arg.split("=", 1)[0].lstrip("+~") for arg in overrides if "=" in arg}
    unread = [f"{key}={value}" for key, value in PLAN_UNREAD.items() if key not in given]
    return compose([*overrides, *unread])


def main(argv: list[str] | None = None) -> int:
    from vlm_train.errors import UserError, report

    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    gpus = 8
    if "--gpus" in args:
        index = args.index("--gpus")
        try:
            gpus = int(args[index + 1])
        except (IndexError, ValueError):
            print("vlm-plan: error: --gpus needs a number", file=sys.stderr)
            return 2
        del args[index : index + 2]
    if gpus < 1:
        print("vlm-plan: error: --gpus needs a positive number", file=sys.stderr)
        return 2
    try:
        print(describe(compose_for_plan(args), gpus))
    except UserError as err:
        return report("vlm-plan", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
