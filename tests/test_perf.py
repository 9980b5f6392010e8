"""Performance pieces: FLOP count vs a hand-derived formula, peak FLOPS, kernels report,
activation checkpointing, and the loss-curve PNG (the planner: tests/test_plan.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import toy_model
from vlm_train.config import compose
from vlm_train.errors import ConfigError
from vlm_train.models.vlm import IGNORE_INDEX
from vlm_train.plan import build_meta_model
from vlm_train.training.flops import TrainingFlops, gpu_peak_tflops, measured_matmul_flops, peak_flops, training_flops


def hand_counted_forward(model, lengths: list[int], images: int) -> tuple[float, float, float]:
    """Forward FLOPs of the toy VLM (CLIP tower, 2-layer MLP projector, Llama decoder) from the
    config sizes alone, per the convention in flops.py: 2·N·T + 2·2·T²·D per attention layer."""
    v = compose(["experiment=toy"]).vision
    l_cfg = compose(["experiment=toy"]).llm
    dv, iv, patches = v.hidden_size, v.intermediate_size, (v.image_size // v.patch_size) ** 2
    seq_v = patches + 1  # CLIP's CLS
    clip_layer = 4 * (dv * dv + dv) + (dv * iv + iv) + (iv * dv + dv) + 2 * 2 * dv  # attn, mlp, 2 LayerNorms
    tower_n = 3 * v.patch_size**2 * dv + 2 * dv + v.num_layers * clip_layer  # conv (no bias), pre-LN, layers
    tower = images * (2 * tower_n * seq_v + v.num_layers * 4 * seq_v**2 * dv)
    dl = l_cfg.hidden_size
    connector = images * 2 * (dv * dl + dl * dl) * patches  # matmuls only (FlopCounterMode counts no bias)
    vocab = model.llm.vocab_size
    llama_layer = 4 * dl * dl + 3 * dl * l_cfg.intermediate_size + 2 * dl
    llm_n = l_cfg.num_layers * llama_layer + dl + vocab * dl  # layers, final norm, LM head
    tokens = sum(lengths)
    llm = 2 * llm_n * tokens + l_cfg.num_layers * 4 * sum(t * t for t in lengths) * dl
    return float(tower), float(connector), float(llm)


def test_training_flops_match_a_hand_derived_count():
    model = toy_model()
    lengths = [40, 25, 31]
    mask = torch.zeros(3, 40, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    batch = {"attention_mask": mask, "pixel_values": torch.zeros(2, 3, 48, 48)}
    tower, connector, llm = hand_counted_forward(model, lengths, images=2)
    # the toy: frozen tower (forward only), connector and LLM train (3x)
    assert training_flops(model, batch) == pytest.approx(tower + 3 * connector + 3 * llm, rel=1e-9)
    # frozen LLM under a trainable connector: its input-gradient half only (2x)
    for p in model.llm.parameters():
        p.requires_grad_(False)
    assert training_flops(model, batch) == pytest.approx(tower + 3 * connector + 2 * llm, rel=1e-9)
    # tower trains: 3x, and the gradient crosses the (frozen) connector: 2x
    for p in model.vision.parameters():
        p.requires_grad_(p not in set(model.vision.unused_parameters()))
    for p in model.connector.parameters():
        p.requires_grad_(False)
    assert training_flops(model, batch) == pytest.approx(3 * tower + 2 * connector + 2 * llm, rel=1e-9)
    # no images in the batch: one blank image is still encoded
    no_images = {"attention_mask": mask, "pixel_values": torch.zeros(0, 3, 48, 48)}
    tower1, connector1, _ = hand_counted_forward(model, lengths, images=1)
    assert training_flops(model, no_images) == pytest.approx(3 * tower1 + 2 * connector1 + 2 * llm, rel=1e-9)


def test_packed_batch_counts_attention_per_sample():
    """data.packing=true: the mask numbers the samples of a row; attention is per sample (T² each)."""
    model = toy_model()
    packed = torch.tensor([[1] * 40 + [2] * 25 + [0] * 7, [1] * 31 + [0] * 41])
    batch = {"attention_mask": packed, "pixel_values": torch.zeros(2, 3, 48, 48)}
    tower, connector, llm = hand_counted_forward(model, [40, 25, 31], images=2)
    assert training_flops(model, batch) == pytest.approx(tower + 3 * connector + 3 * llm, rel=1e-9)


def test_flops_on_meta_model_equal_built_model_and_cross_attention_counts_media():
    for connector in ("mlp", "qformer", "cross_attention"):
        cfg = compose(["experiment=toy", f"connector={connector}"])
        batch = {"attention_mask": torch.ones(2, 50, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 48, 48)}
        built = TrainingFlops.of(toy_model(f"connector={connector}"))
        assert built == TrainingFlops.of(build_meta_model(cfg))
        assert built(batch) > 0
    # cross-attention: the text's attention over media grows with the number of images
    assert built.forward_flops(4, 100, 5000)[1] > built.forward_flops(2, 100, 5000)[1]


def test_peak_flops_table_override_and_cpu_probe():
    assert gpu_peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu_peak_tflops("Some Future GPU", "bf16") is None
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "fp32", override_tflops=2.5) == 2.5e12
    probed = peak_flops(cpu, "fp32")
    assert 1e8 < probed < 1e13  # a real measurement of this CPU
    assert measured_matmul_flops(cpu, "fp32") == probed  # cached: probed once per process


def test_kernels_probe_reports_apex_exactly_when_it_is_installed():
    """True here (no apex: the fallback) and in the NGC image the Dockerfile uses (apex installed)."""
    import importlib.util

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from vlm_train.parallel.kernels import probe_kernels
    from vlm_train.parallel.tensor_parallel import layer_spec

    installed = importlib.util.find_spec("apex") is not None
    kernels = probe_kernels("cpu")
    assert probe_kernels("cpu") is kernels  # probed once
    assert kernels.apex == installed
    line = kernels.report("sdpa")
    assert line.startswith("kernels: attention sdpa")
    assert ("norms torch (apex present, unused)" if installed else "norms torch (apex absent)") in line
    # the optimizer does not depend on apex: torch's AdamW, fused (one multi-tensor kernel) on CUDA
    assert kernels.optimizer_kwargs() == {}
    assert probe_kernels("cuda").optimizer_kwargs() == {"fused": True}
    # megatron's local spec has no apex RMSNorm: Llama's norms are torch's with or without apex
    assert layer_spec().submodules.input_layernorm is WrappedTorchNorm
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        kernels.check_attention("flash_attention_2")  # refused on CPU whatever is installed


def test_compile_refused_under_zero3_and_overlap_comm_only_on_gpu():
    from vlm_train.parallel.engine import deepspeed_config
    from vlm_train.parallel.kernels import compile_model
    from vlm_train.parallel.layout import Layout

    with pytest.raises(ConfigError, match="train.compile=true is not supported with parallel.zero_stage=3"):
        compile_model(torch.nn.Linear(2, 2), zero_stage=3)
    cfg = compose(["experiment=toy", "parallel.zero_stage=2"])
    layout = Layout.from_config(cfg, world=1, rank=0)
    assert deepspeed_config(cfg, layout, "bf16", on_gpu=True)["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(cfg, layout, "fp32")["zero_optimization"]["overlap_comm"] is False


def test_compile_per_block_gives_the_same_loss_and_gradients():
    """train.compile compiles every decoder block and tower layer (not the glue between them) and
    the compiled model computes what the plain one does. The test compiles through dynamo and AOT
    autograd (backend aot_eager): the capture is what this code decides; inductor's code
    generation is torch's, and costs ~2 minutes on 2 cores."""
    import torch._dynamo

    from vlm_train.parallel.kernels import compile_model

    torch._dynamo.reset()
    plain, compiled = toy_model("vision.freeze=false"), toy_model("vision.freeze=false")
    blocks = compile_model(compiled, zero_stage=2, backend="aot_eager")
    assert blocks == len(compiled.llm.decoder_layers()) + compiled.vision.hf_model.config.num_hidden_layers
    ids = torch.randint(5, 15, (3, 24))
    ids[:, :9] = plain.image_token_id
    labels = ids.masked_fill(ids == plain.image_token_id, IGNORE_INDEX)
    pixels = torch.randn(3, 3, 48, 48)
    losses = [model(pixels, ids, torch.ones_like(ids), labels).loss for model in (plain, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    grads = dict(compiled.named_parameters())
    for name, param in plain.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_activation_checkpointing_gives_the_same_gradients():
    extra = ["vision.freeze=false", "vision.activation_checkpointing=true", "llm.activation_checkpointing=true"]
    plain, checkpointed = toy_model("vision.freeze=false"), toy_model(*extra)
    assert checkpointed.llm.hf_model.is_gradient_checkpointing
    ids = torch.randint(5, 15, (3, 24))
    ids[:, :9] = plain.image_token_id
    labels = ids.masked_fill(ids == plain.image_token_id, IGNORE_INDEX)
    pixels = torch.randn(3, 3, 48, 48)
    for model in (plain, checkpointed):
        model.train()
        model(pixels, ids, torch.ones_like(ids), labels).loss.backward()
    grads = {n: p.grad for n, p in checkpointed.named_parameters() if p.grad is not None}
    assert any(n.startswith("vision.") for n in grads)
    for name, param in plain.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7)


def test_loss_curve_png_and_mfu_in_the_console(tmp_path, capsys):
    from PIL import Image

    from vlm_train.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, compose(["experiment=toy", "train.max_steps=30"]), enabled=True)
    for step in range(1, 31):
        record = {"step": step, "loss": 3.0 / step, "lr": 1e-3, "samples_per_s": 10.0, "tokens_per_s": 900.0}
        logger.log({**record, "mfu": 0.0123} if step > 1 else record)
    logger.log({"step": 30, "eval_loss": 0.1, "eval_accuracy": 0.9})
    logger.close()
    assert "mfu 1.23%" in capsys.readouterr().out
    with Image.open(tmp_path / "loss_curve.png") as image:
        assert image.size == (800, 500)
        pixels = image.convert("RGB").getdata()
        assert sum(1 for p in pixels if p == (31, 119, 180)) > 200  # the curve was drawn
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["mfu"] == 0.0123


def test_cross_entropy_takes_only_labelled_positions_to_fp32():
    """The loss equals cross-entropy over every position with ignored labels, and no fp32 tensor of
    every position's logits is ever made, in forward or backward (bf16 logits, 3 labelled positions
    of 2 x 50; every op's outputs are watched)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from vlm_train.models.decoder import token_cross_entropy

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.largest = max(self.largest, t.numel())
            return out

    torch.manual_seed(0)
    logits = torch.randn(2, 50, 300, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((2, 50), IGNORE_INDEX)
    labels[0, 10], labels[1, 20], labels[1, 49] = 5, 7, 9
    with LargestFloat32() as watch:
        loss_sum, count = token_cross_entropy(logits, labels)
        loss_sum.backward()
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert int(count) == 3
    torch.testing.assert_close(loss_sum, full, rtol=1e-6, atol=0)
    assert watch.largest == 3 * 300
    assert logits.grad is not None and int((logits.grad.abs().sum(-1) > 0).sum()) == 3


def test_fused_adamw_on_cuda_steps_as_the_for_each_one():
    """On CUDA the optimizer is torch's fused AdamW (one kernel for all tensors); its steps equal the
    for-each AdamW the CPU runs (checked here with torch's CPU fused kernel, 10 steps, 1e-6)."""
    from vlm_train.parallel.engine import build_optimizer
    from vlm_train.parallel.kernels import Kernels

    train = compose(["experiment=toy"]).train
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    sides = {}
    for device_type in ("cpu", "cuda"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = build_optimizer(
            params, train, Kernels(device_type, apex=False, flash_attn=False, transformer_engine=False)
        )
        assert optimizer.defaults["fused"] is (True if device_type == "cuda" else None)
        for step in range(10):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            optimizer.step()
        sides[device_type] = params
    for fused, for_each in zip(sides["cuda"], sides["cpu"]):
        torch.testing.assert_close(fused, for_each, rtol=1e-6, atol=1e-7)
        assert not torch.equal(fused, start[0] if fused.dim() == 2 else start[1])


def test_a_frozen_tower_runs_without_autograd_and_in_the_run_precision():
    """A frozen tower (LLaVA's) runs under no_grad: its activations are not kept for a backward that
    never comes; in a bf16 run its weights are bf16 (DeepSpeed casts the whole module) and the
    uint8 pixels are normalised into that dtype. A tower that trains keeps its graph."""
    seen = []
    for freeze in ("true", "false"):
        model = toy_model(f"vision.freeze={freeze}").to(torch.bfloat16)
        handle = model.vision.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out)))
        pixels = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
        model.encode_images(pixels)
        handle.remove()
    (frozen_input, frozen_out), (_, trained_out) = seen
    assert frozen_input == torch.bfloat16 and frozen_out.dtype == torch.bfloat16
    assert not frozen_out.requires_grad and frozen_out.grad_fn is None
    assert trained_out.requires_grad
