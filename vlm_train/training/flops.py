"""Model FLOPs of a training step and the peak FLOPS they are measured against (MFU).

Convention (the one MFU papers use, so numbers compare with Megatron's and PaLM's):
- A matmul with a weight of N parameters applied to T tokens costs 2·N·T FLOPs forward. N counts
  every parameter the forward uses except embedding lookups (token, position, class embeddings);
  a tied LM head still counts its V·D matmul. Norm scales and biases are counted as if they were
  matmul weights (a rounding error at any real size).
- Self-attention adds 2·2·T²·D per layer and sequence (QKᵀ and AV, D = heads x head width), the
  full square even for causal attention, as Megatron and PaLM count it; per sequence, so padding
  neither adds tokens nor T².
- Backward: 2x forward for a component with parameters that train (input and weight gradients);
  1x forward (input gradients only) for a frozen component that a gradient must cross (a frozen
  LLM under a trainable connector); nothing for a frozen component no gradient reaches (a frozen
  tower: pixels need no gradient). Activation recomputation is not model work and is not counted.
- Real token counts come from `attention_mask`, images from `pixel_values` (a batch without
  images still encodes one blank image, as the model does).
- Connectors are too varied for one formula: a "sequence" connector is measured once per image
  with torch's FlopCounterMode (exact matmul FLOPs), when TrainingFlops is built; so are the
  cross-attention connector's media (projection, and resampler when it has one), while its blocks
  run inside the decoder and are counted as 2·N·T over the text tokens (N: the blocks' parameters)
  plus 2·2·T·M·D per block (M: the batch's media tokens, with the resampler its latents per image).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_train.models.connectors.cross_attention import CrossAttentionConnector
from vlm_train.models.decoder import Decoder
from vlm_train.models.vision import VisionTower
from vlm_train.models.vlm import VisionLanguageModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Dense (no sparsity) peak TFLOPS per GPU: (bf16 tensor cores, fp32 without TF32). Matched by
# substring of torch.cuda.get_device_name, most specific first. Sources: NVIDIA data sheets.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
)

_probed_peaks: dict[tuple[str, str], float] = {}


@dataclass(frozen=True)
class TrainingFlops:
    """The shape facts FLOPs depend on, read once from the whole model; calling it with a batch
    gives that micro-batch's training FLOPs. Build it before the engine wraps the model (ZeRO-3
    leaves partitioned parameters empty, and the connector is measured by running it)."""

    tower_weights: int
    tower_seq: int  # tokens per image through the tower (CLS included)
    tower_layers: int  # layers the selected features depend on
    tower_width: int
    connector_per_image: float  # measured forward FLOPs per image (cross-attention: of its media)
    connector_weights: int  # cross-attention connector: parameters run per text token (its blocks')
    cross_blocks: int
    media_per_image: int
    visual_per_image: int  # visual tokens an image adds to the decoder's work (slots, or cross-attended media)
    llm_weights: int  # non-embedding parameters plus the LM head
    llm_layers: int
    llm_width: int  # attention width: heads x head width
    multipliers: tuple[float, float, float]  # forward -> forward + backward, per component
    slot_ids: tuple[int, ...] = ()  # sequence connectors: the image (and video) token ids, one per visual token

    @classmethod
    def of(cls, model: VisionLanguageModel) -> TrainingFlops:
        tower, connector = model.vision, model.connector
        tower_trains, connector_trains, llm_trains = (_trains(m) for m in (tower, connector, model.llm))
        sequence = connector.placement == "sequence"
        # a native-resolution tower's inputs are patches: FLOPs per patch (attention within an
        # image or window, a few % at Qwen2.5-VL-7B's sizes, is left out)
        per_input = tower.num_features if getattr(tower, "native_resolution", False) else 1
        cross = connector if isinstance(connector, CrossAttentionConnector) else None
        media = tower.num_features if cross is None else cross.media_tokens(tower.num_features)
        return cls(
            tower_weights=_tower_weights(tower),
            tower_seq=1 if per_input > 1 else _tower_seq(tower),
            tower_layers=0 if per_input > 1 else _used_tower_layers(tower),
            tower_width=tower.hidden_size,
            connector_per_image=_connector_flops_per_image(model) / per_input,
            connector_weights=0 if cross is None else sum(_numel(p) for p in cross.blocks.parameters()),
            cross_blocks=0 if cross is None else len(cross.blocks),
            media_per_image=media,
            visual_per_image=connector.num_tokens if sequence else media,
            llm_weights=_llm_weights(model),
            llm_layers=len(model.llm.decoder_layers()),
            llm_width=_attention_width(_dense_decoder(model.llm).config),
            multipliers=(
                _step_multiplier(tower_trains, gradient_crosses=False),
                _step_multiplier(connector_trains, gradient_crosses=tower_trains),
                _step_multiplier(llm_trains, gradient_crosses=tower_trains or connector_trains),
            ),
            slot_ids=_slot_ids(model) if sequence else (),
        )

    def __call__(self, batch: dict) -> float:
        seq_lengths = sample_lengths(batch["attention_mask"]).double()
        tokens, tokens_squared = float(seq_lengths.sum()), float((seq_lengths**2).sum())
        forward = self.forward_flops(max(tower_inputs(batch), 1), tokens, tokens_squared)
        return sum(f * m for f, m in zip(forward, self.multipliers))

    def visual_tokens(self, batch: dict) -> int:
        """Visual tokens of this micro-batch (what a rank's share of image work is measured in): its
        visual-token slots with a sequence connector (exact for AnyRes tiles and video frames), else
        the media tokens its tower inputs give."""
        if self.slot_ids:
            input_ids = batch["input_ids"]
            return int(sum(int((input_ids == slot).sum()) for slot in self.slot_ids))
        return tower_inputs(batch) * self.visual_per_image

    def forward_flops(self, images: int, tokens: float, tokens_squared: float) -> tuple[float, float, float]:
        """Forward FLOPs of tower, connector and decoder for this many images and tokens."""
        seq = self.tower_seq
        tower = images * (2.0 * self.tower_weights * seq + self.tower_layers * 4.0 * seq * seq * self.tower_width)
        connector = images * self.connector_per_image
        if self.cross_blocks:  # cross-attention: text tokens attend to every media token of the batch
            media = images * self.media_per_image
            connector += (
                2.0 * self.connector_weights * tokens + self.cross_blocks * 4.0 * tokens * media * self.llm_width
            )
        llm = 2.0 * self.llm_weights * tokens + self.llm_layers * 4.0 * tokens_squared * self.llm_width
        return tower, connector, llm


def tower_inputs(batch: dict) -> int:
    """Images (AnyRes: tiles) and video frames that go through the tower in this micro-batch (a
    native-resolution tower's: patches)."""
    return sum(int(batch[key].shape[0]) for key in ("pixel_values", "pixel_values_videos") if key in batch)


def _slot_ids(model: VisionLanguageModel) -> tuple[int, ...]:
    return (model.image_token_id,) + ((model.video_token_id,) if model.video_token_id is not None else ())


def sample_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Tokens per sample. A packed batch's mask numbers the samples of a row (1, 2, ...; 0 pads):
    attention is per sample, so each sample's T² counts, not the row's."""
    per_row_and_sample = torch.nn.functional.one_hot(attention_mask.long()).sum(dim=1)
    return per_row_and_sample[:, 1:].flatten()


def training_flops(model: VisionLanguageModel, batch: dict) -> float:
    """FLOPs of one forward + backward of `model` on this micro-batch (see the module docstring)."""
    return TrainingFlops.of(model)(batch)


def mfu(global_flops: float, step_seconds: float, peak_per_device: float, world: int) -> float:
    """Model FLOPs utilisation: FLOPs of the step on all ranks over what `world` devices could do."""
    return global_flops / step_seconds / (peak_per_device * world)


def _tower_seq(tower: VisionTower) -> int:
    config = tower.hf_model.config
    patches = (config.image_size // config.patch_size) ** 2
    return patches + int(tower.family in ("clip", "blip2"))  # CLS runs through the layers even when dropped


def _tower_weights(tower: VisionTower) -> int:
    unused = {id(p) for p in tower.unused_parameters()}
    lookups = {id(p) for m in tower.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    lookups |= {id(p) for name, p in tower.named_parameters() if name.endswith("class_embedding")}
    return sum(_numel(p) for p in tower.parameters() if id(p) not in unused | lookups)


def _dense_decoder(llm: Decoder) -> PreTrainedModel:
    """The HF decoder, or for the tensor-parallel one (whose tensors are sharded) its dense HF
    equivalent on the meta device: FLOPs are those of the whole model."""
    hf_model = getattr(llm, "hf_model", None)
    if hf_model is not None:
        return hf_model
    from transformers import AutoModelForCausalLM

    from vlm_train.models.qwen_vl import MROPE_TEXT_MODELS, mrope_causal_lm

    hf_config: Any = llm.hf_config
    with torch.device("meta"):
        if hf_config.model_type in MROPE_TEXT_MODELS:
            return mrope_causal_lm(hf_config)
        return AutoModelForCausalLM.from_config(hf_config)


def _llm_weights(model: VisionLanguageModel) -> int:
    hf_model = _dense_decoder(model.llm)
    embedding = hf_model.get_input_embeddings().weight
    connector_params = {id(p) for p in model.connector.parameters()}  # hooked blocks live in the connector
    weights = sum(_numel(p) for p in hf_model.parameters() if id(p) not in connector_params) - _numel(embedding)
    head = hf_model.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the head's matmul still runs
        weights += _numel(embedding)
    return weights


def _attention_width(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves partitioned ones empty


def _connector_flops_per_image(model: VisionLanguageModel) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    connector = model.connector
    param = next(connector.parameters())
    features = torch.zeros(1, model.vision.num_features, model.vision.hidden_size, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    # autograd stays on (FlopCounterMode's module tracker hooks need grad_fns); the math SDPA
    # backend, as on the meta device, so that attention is counted as its matmuls on any device
    # on the meta device (vlm-plan), fake tensors: transformers' masks skip their data-dependent
    # checks (`mask.all()`) for those, which a meta tensor cannot answer (the perceivers' masks)
    fake = FakeTensorMode(allow_non_fake_inputs=True) if param.device.type == "meta" else nullcontext()
    with fake, counter, sdpa_kernel(SDPBackend.MATH):
        media = connector(features.to(param.device))
        if isinstance(connector, CrossAttentionConnector):  # its blocks are counted per text token
            connector.resample(media)
    return float(counter.get_total_flops())


def _used_tower_layers(tower: VisionTower) -> int:
    body = getattr(tower.hf_model, "vision_model", tower.hf_model)
    layers = len(body.encoder.layers)
    if tower.family in ("blip2", "idefics2"):
        return layers
    return tower.select_layer % (layers + 1)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _step_multiplier(trains: bool, gradient_crosses: bool) -> float:
    if trains:
        return 3.0
    return 2.0 if gradient_crosses else 1.0


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOPS of one device at `precision` (bf16 | fp32): `override_tflops` (train.peak_tflops)
    when given; on a GPU the data-sheet number for its name; on CPU, or a GPU not in the table, a
    measured matmul peak (a short probe, cached per process)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type == "cuda":
        tflops = gpu_peak_tflops(torch.cuda.get_device_name(device), precision)
        if tflops is not None:
            return tflops * 1e12
    return measured_matmul_flops(device, precision)


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """The data-sheet dense TFLOPS of a GPU by its name (bf16 or fp32), None when not in the table."""
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in device_name:
            return bf16 if precision == "bf16" else fp32
    return None


def measured_matmul_flops(device: torch.device, precision: str, size: int = 1024, seconds: float = 0.3) -> float:
    """Best matmul throughput over a short probe (about `seconds`), cached per device and precision."""
    key = (str(device), precision)
    if key not in _probed_peaks:
        dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == 0.0:
            _sync(device)
            started = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2.0 * size**3 / (time.perf_counter() - started))
        _probed_peaks[key] = best
    return _probed_peaks[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
