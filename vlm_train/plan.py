"""The planner: `vlm-plan [--gpus N] [overrides...]` sizes a run before it starts.

The model is built on the meta device (shapes only, no memory), so a 7B plan costs a second.
Reported: parameters per component (trainable / frozen), training FLOPs per sample, model-state
memory per GPU for ZeRO 0-3 x tensor-parallel sizes, an activation estimate, and which layouts
fit an 80 GB or 141 GB GPU. `vlm-train` runs the same model-state check at start-up
(`check_fits`) and refuses a layout that cannot fit.

Model states follow what DeepSpeed actually holds per rank (measured by bench/zero_memory.py):
- weights: every parameter, frozen ones included, in the run's precision (bf16: 2 bytes,
  fp32: 4); ZeRO-3 shards them over data parallel, except tensors smaller than DeepSpeed's
  persistence threshold (1e5 elements), which stay whole on every rank;
- gradients of trainable parameters, in the run's precision: whole at ZeRO 0, sharded from
  ZeRO 1 on (DeepSpeed keeps only this rank's partition);
- optimizer: Adam's two moments in fp32 (8 bytes), plus an fp32 master copy (4 bytes) whenever
  DeepSpeed keeps one (bf16 at every stage; fp32 at ZeRO 1-3, whose flat partitions are copies);
  sharded from ZeRO 1 on.
Tensor parallelism divides the decoder's tensors by the TP size (tower and connector stay whole).
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vlm_train.config import Config
from vlm_train.errors import ConfigError

GB = 1e9
GPU_SIZES_GB = (80, 141)  # H100 / A100-80GB, and H200
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
TP_SIZES = (1, 2, 4, 8)
USAGE = """usage: vlm-plan [--gpus N] [key=value ...]

Sizes the run the overrides describe (the same overrides as vlm-train) without building weights:
parameters, FLOPs per sample, and memory per GPU for ZeRO 0-3 x tensor-parallel sizes on N GPUs
(default 8)."""


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


def build_meta_model(cfg: Config):
    """The run's VisionLanguageModel with meta tensors: real shapes and freezing, no memory.

    The decoder is the HF one whatever `llm.backend` says: TP sharding is applied by arithmetic.
    """
    from vlm_train.build import build_model

    cfg = copy.deepcopy(cfg)
    cfg.llm.backend = "hf"
    with torch.device("meta"), _configs_instead_of_weights():
        return build_model(cfg)


@contextmanager
def _configs_instead_of_weights():
    """Inside, `from_pretrained(path)` builds the model from `path`'s config alone: transformers
    refuses to load weights on the meta device, and a plan needs only the shapes."""
    from transformers import AutoConfig, PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def model_from_config(cls, path, *args, **kwargs):
        return cls._from_config(cls.config_class.from_pretrained(path))

    def auto_from_config(cls, path, *args, **kwargs):
        config = AutoConfig.from_pretrained(path)
        return cls.from_config(config, attn_implementation=kwargs.get("attn_implementation"))

    originals = PreTrainedModel.__dict__["from_pretrained"], _BaseAutoModelClass.__dict__["from_pretrained"]
    PreTrainedModel.from_pretrained = classmethod(model_from_config)
    _BaseAutoModelClass.from_pretrained = classmethod(auto_from_config)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained, _BaseAutoModelClass.from_pretrained = originals


def parameter_counts(model) -> dict[str, ComponentParams]:
    """Trainable and frozen parameters of the tower, the connector and the decoder."""
    counts = {}
    connector_ids = {id(p) for p in model.connector.parameters()}
    for name, module in (("vision", model.vision), ("connector", model.connector), ("llm", model.llm)):
        params = [p for p in module.parameters() if name == "connector" or id(p) not in connector_ids]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        counts[name] = ComponentParams(trainable, sum(p.numel() for p in params) - trainable)
    return counts


def model_state_bytes(model, precision: str, zero_stage: int, dp: int, tp: int = 1) -> ModelStates:
    """Bytes of weights, gradients and optimizer states one rank holds (see the module docstring)."""
    weight_bytes = 2 if precision == "bf16" else 4
    master_bytes = 4 if precision == "bf16" or zero_stage > 0 else 0
    llm_ids = {id(p) for p in model.llm.parameters()} - {id(p) for p in model.connector.parameters()}
    weights = grads = optimizer = 0.0
    for param in model.parameters():
        numel = param.numel() / tp if id(param) in llm_ids else float(param.numel())
        sharded_weights = zero_stage == 3 and numel >= PERSISTENCE_THRESHOLD
        weights += weight_bytes * numel / (dp if sharded_weights else 1)
        if param.requires_grad:
            share = numel / (dp if zero_stage > 0 else 1)
            grads += weight_bytes * share
            optimizer += (8 + master_bytes) * share
    return ModelStates(weights, grads, optimizer)


def activation_bytes(model, cfg: Config, precision: str, tp: int = 1) -> float:
    """A rough estimate of the activations one micro-batch keeps for backward, after Korthikanti
    et al. 2022: 34·T·D bytes per layer and sequence in 16-bit, plus 5·H·T² for the attention
    scores unless a fused kernel (sdpa, flash) never stores them; with activation checkpointing,
    only each layer's input (2·T·D) plus one layer's worth while it is recomputed. For the decoder
    and a tower that trains, plus the fp32 logits and their gradient."""
    scale = 1.0 if precision == "bf16" else 2.0
    batch = cfg.train.micro_batch_size
    llm_config = model.llm.hf_model.config
    stores_scores = cfg.llm.attn_implementation == "eager"
    layer = _layer_activations(
        cfg.data.max_length, llm_config.hidden_size, llm_config.num_attention_heads, stores_scores
    )
    layers = len(model.llm.decoder_layers())
    llm = _stack(layer, 2.0 * cfg.data.max_length * llm_config.hidden_size, layers, cfg.llm.activation_checkpointing)
    total = batch * llm * scale / tp + 2 * 4 * batch * cfg.data.max_length * model.llm.vocab_size / tp
    if any(p.requires_grad for p in model.vision.parameters()):
        vision_config = model.vision.hf_model.config
        seq, width = model.vision.num_features, vision_config.hidden_size
        layer = _layer_activations(seq, width, vision_config.num_attention_heads, stores_scores=True)
        total += (
            batch
            * scale
            * _stack(layer, 2.0 * seq * width, vision_config.num_hidden_layers, cfg.vision.activation_checkpointing)
        )
    return total


def _layer_activations(seq: int, width: int, heads: int, stores_scores: bool) -> float:
    return 34.0 * seq * width + (5.0 * heads * seq * seq if stores_scores else 0.0)


def _stack(layer: float, layer_input: float, layers: int, checkpointed: bool) -> float:
    return layers * layer_input + layer if checkpointed else layers * layer


def resolve_precision(cfg: Config, device: torch.device | None = None) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    on_gpu = device.type == "cuda" if device is not None else True  # a plan is for GPUs
    return "bf16" if on_gpu else "fp32"


def flops_per_sample(model, cfg: Config) -> float:
    """Training FLOPs of one sample of `data.max_length` tokens and one image (flops.py)."""
    from vlm_train.training.flops import training_flops

    batch = {
        "attention_mask": torch.ones(1, cfg.data.max_length, dtype=torch.long),
        "pixel_values": torch.zeros(1, 3, model.vision.image_size, model.vision.image_size, device="meta"),
    }
    return training_flops(model, batch)


def check_fits(cfg: Config, tp: int, dp: int, device: torch.device, ranks_on_node: int = 1) -> ModelStates:
    """Refuse (ConfigError) a layout whose model states cannot fit this rank's memory.

    On a GPU the limit is the device's memory; on CPU, the RAM the OS reports available, shared
    by the `ranks_on_node` ranks of this machine. Activations are not part of the check.
    """
    model = build_meta_model(cfg)
    precision = resolve_precision(cfg, device)
    states = model_state_bytes(model, precision, cfg.parallel.zero_stage, dp, tp)
    limit, what = device_memory_bytes(device, ranks_on_node)
    if states.total > limit:
        raise ConfigError(
            f"model states need {states.total / GB:.1f} GB per rank (weights {states.weights / GB:.1f}, grads "
            f"{states.grads / GB:.1f}, optimizer {states.optimizer / GB:.1f}) at ZeRO-{cfg.parallel.zero_stage}, "
            f"TP={tp}, DP={dp}, {precision}, but {what} has {limit / GB:.1f} GB: raise parallel.zero_stage, "
            "use more GPUs or freeze more (see vlm-plan)"
        )
    return states


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
    """The plan as text: parameters, FLOPs, and a memory table over ZeRO stages x TP sizes."""
    model = build_meta_model(cfg)
    precision = resolve_precision(cfg)
    lines = [f"vlm-plan: {cfg.vision.name} + {cfg.connector.name} + {cfg.llm.name}, {precision}, {gpus} GPUs"]
    lines.append(f"{'component':<10} {'trainable':>15} {'frozen':>15}")
    counts = parameter_counts(model)
    for name, count in counts.items():
        lines.append(f"{name:<10} {count.trainable:>15,} {count.frozen:>15,}")
    total = ComponentParams(sum(c.trainable for c in counts.values()), sum(c.frozen for c in counts.values()))
    lines.append(f"{'total':<10} {total.trainable:>15,} {total.frozen:>15,}")
    lines.append(
        f"training FLOPs per sample ({cfg.data.max_length} tokens, 1 image): {flops_per_sample(model, cfg):.3e}"
    )
    lines.append(
        f"\nper GPU, GB (micro-batch {cfg.train.micro_batch_size}; activations are an estimate, no recomputation)"
    )
    lines.append(
        f"{'ZeRO':>4} {'TP':>3} {'DP':>3} {'weights':>8} {'grads':>8} {'optim':>8} {'states':>8} {'activ':>8}  fits"
    )
    for tp in (t for t in TP_SIZES if gpus % t == 0):
        activations = activation_bytes(model, cfg, precision, tp)
        for stage in range(4):
            states = model_state_bytes(model, precision, stage, gpus // tp, tp)
            need = states.total + activations
            fits = " ".join(f"{size}GB" for size in GPU_SIZES_GB if need <= size * GB) or "-"
            lines.append(
                f"{stage:>4} {tp:>3} {gpus // tp:>3} {states.weights / GB:>8.2f} {states.grads / GB:>8.2f} "
                f"{states.optimizer / GB:>8.2f} {states.total / GB:>8.2f} {activations / GB:>8.2f}  {fits}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from vlm_train.config import compose
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
    try:
        print(describe(compose(args), gpus))
    except UserError as err:
        return report("vlm-plan", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
