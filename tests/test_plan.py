"""The planner (vlm_train/plan.py): parameter counts exact, model states vs what DeepSpeed holds,
the activation estimate vs a measured CPU step, the LLaVA-1.5-7B stage-2 plan from config-only
folders, and the start-up refusal."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from tests.helpers import REPO, run_cli, toy_model, toy_overrides, write_config_only_folders
from vlm_train.build import build_model
from vlm_train.config import compose
from vlm_train.errors import ConfigError
from vlm_train.models.vlm import IGNORE_INDEX
from vlm_train.plan import (
    activation_bytes,
    build_meta_model,
    check_fits,
    main,
    model_state_bytes,
    parameter_counts,
)


@pytest.mark.parametrize(
    "extra",
    [
        ["connector=mlp"],
        ["connector=qformer", "llm.freeze=true"],
        ["connector=ln_adapter", "connector.modality_norms=true"],
        ["connector=cross_attention", "vision.freeze=false", "vision.select_layer=-2"],
    ],
)
def test_planner_parameter_counts_are_exact(extra):
    cfg = compose(["experiment=toy", *extra])
    built, meta = toy_model(*extra), build_meta_model(cfg)
    assert next(meta.parameters()).device.type == "meta"
    counts = parameter_counts(meta)
    assert counts == parameter_counts(built)
    assert sum(c.trainable for c in counts.values()) == sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert sum(c.total for c in counts.values()) == sum(p.numel() for p in built.parameters())


def test_planner_reads_checkpoint_dirs_without_loading_weights(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlm_train.data.tokenizer import build_toy_tokenizer

    llama = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    LlamaForCausalLM(llama).save_pretrained(tmp_path / "llm")
    build_toy_tokenizer().save_pretrained(tmp_path / "llm")
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=16
    )
    CLIPVisionModel(clip).save_pretrained(tmp_path / "vision")
    cfg = compose(
        ["experiment=toy", f"llm.path={tmp_path / 'llm'}", "llm.tokenizer=null", f"vision.path={tmp_path / 'vision'}"]
    )
    meta = build_meta_model(cfg)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert parameter_counts(meta) == parameter_counts(build_model(cfg))


def test_model_state_formulas_shard_as_zero_does():
    model = build_meta_model(compose(["experiment=toy"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    z0 = model_state_bytes(model, "bf16", 0, dp=8)
    assert (z0.weights, z0.grads, z0.optimizer) == (2 * total, 2 * trainable, 12 * trainable)
    z2 = model_state_bytes(model, "bf16", 2, dp=8)
    assert (z2.weights, z2.grads, z2.optimizer) == (2 * total, 2 * trainable / 8, 12 * trainable / 8)
    # train.grad_reduce_dtype=fp32: DeepSpeed keeps ZeRO 2-3 gradient partitions in fp32 (ZeRO 0-1: bf16)
    assert model_state_bytes(model, "bf16", 2, dp=8, grad_reduce_dtype="fp32").grads == 4 * trainable / 8
    assert model_state_bytes(model, "bf16", 1, dp=8, grad_reduce_dtype="fp32").grads == 2 * trainable / 8
    # the toy's tensors are all under ZeRO-3's persistence threshold: weights stay whole
    assert model_state_bytes(model, "fp32", 3, dp=8).weights == 4 * total


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage that ops inside create and that are alive at once: every op's
    outputs are seen here (forward and backward: autograd runs CPU backward on this thread), a
    storage counts once (views and in-place ops share it) until it is freed (a weakref callback).
    Storages that exist before (weights, gradients, inputs) are registered and never counted.
    Kernel-internal scratch that never becomes a tensor, and allocator overhead, are not seen."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.current = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in existing:
            self._seen[tensor.untyped_storage()] = True

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self._seen:
                storage = tensor.untyped_storage()
                self._seen[storage] = True
                self.current += storage.nbytes()
                weakref.finalize(storage, self._freed, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out


def measured_activation_peak(model, batch: int, length: int, dtype: torch.dtype) -> int:
    """Peak bytes beyond weights and gradients of one forward + backward of `model` on CPU, as
    PeakTensorMemory counts them. Gradients are allocated beforehand (as DeepSpeed's buffers are),
    so backward adds into them."""
    model = model.to(dtype).train()
    ids = torch.randint(5, 15, (batch, length))
    ids[:, : model.num_image_tokens] = model.image_token_id
    labels = ids.masked_fill(ids == model.image_token_id, IGNORE_INDEX)
    pixels = torch.randn(batch, 3, model.vision.image_size, model.vision.image_size, dtype=dtype)
    mask = torch.ones_like(ids)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    existing = [*model.parameters(), *model.buffers(), ids, labels, pixels, mask]
    existing += [p.grad for p in model.parameters() if p.grad is not None]
    with PeakTensorMemory(existing) as memory:
        out = model(pixels, ids, mask, labels)
        out.loss.backward()  # `out` (its logits) held through backward, as the training loop holds it
        del out
    assert memory.current < 0.01 * memory.peak  # everything the step made was freed: nothing escaped the count
    return memory.peak


@pytest.mark.parametrize(
    "precision,checkpointing,extra",
    [
        ("fp32", False, []),
        ("fp32", True, []),
        # bf16 matmuls are slow on CPU (about 20 s each on 2 cores): the quick loop skips them
        pytest.param("bf16", False, [], marks=pytest.mark.slow),
        pytest.param("bf16", True, [], marks=pytest.mark.slow),
        pytest.param("bf16", False, ["llm.freeze=true"], marks=pytest.mark.slow),  # LLaVA stage 1
    ],
)
def test_activation_estimate_within_25_percent_of_a_measured_cpu_step(precision, checkpointing, extra):
    """Toy-plus: a 3-layer Llama decoder of width 256, 2 x 256 tokens, a 2,000-word vocabulary
    (so the logits weigh as they do at 7B with checkpointing), the tower frozen as in LLaVA."""
    from vlm_train.data.tokenizer import build_toy_tokenizer

    batch, length = 2, 256
    cfg = compose(
        [
            "experiment=toy",
            "llm.hidden_size=256",
            "llm.intermediate_size=704",
            "llm.num_layers=3",
            "llm.num_heads=4",
            "llm.num_kv_heads=4",
            f"data.max_length={length}",
            f"train.micro_batch_size={batch}",
            f"llm.activation_checkpointing={str(checkpointing).lower()}",
            *extra,
        ]
    )
    tokenizer = build_toy_tokenizer()
    tokenizer.add_tokens([f"word{i}" for i in range(2000)])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    estimate = activation_bytes(model, cfg, precision)
    measured = measured_activation_peak(model, batch, length, torch.bfloat16 if precision == "bf16" else torch.float32)
    assert abs(estimate / measured - 1) <= 0.25, (estimate, measured)


def test_vlm_plan_prints_llava15_7b_stage2_from_config_only_folders(tmp_path, capsys):
    llm, vision = write_config_only_folders(tmp_path)
    code = main(
        [
            "--gpus",
            "8",
            "experiment=llava15-7b-stage2",
            f"vision.path={vision}",
            f"llm.path={llm}",
            f"connector.path={tmp_path / 'stage1-not-run-yet' / 'mm_projector.bin'}",  # a plan reads no weights
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and "vlm-plan: error" not in err
    assert "6,738,423,808" in out  # Llama-2-7B + one row each in embeddings and LM head for <image>
    assert "303,507,456" in out  # CLIP ViT-L/14-336's vision tower, frozen
    assert "checkpointing off" in out and "checkpointing on" in out
    rows = {}
    for line in out.splitlines():
        fields = line.replace("|", " ").split()
        if len(fields) == 13 and fields[:3] != ["ZeRO", "TP", "DP"] and fields[0].isdigit():
            rows[int(fields[0]), int(fields[1])] = fields
    assert sorted(stage for stage, tp in rows if tp == 1) == [0, 1, 2, 3]
    # 16 x 2048 tokens at 7B: nothing fits without checkpointing at TP=1; with it, ZeRO 1-3 fit 80 GB
    for stage in range(4):
        fields = rows[stage, 1]
        off, on = float(fields[7]), float(fields[10])
        assert 150 < off < 300 and 15 < on < 35, fields  # activations, GB
        assert fields[9] == "none"
        assert fields[12] == ("141GB" if stage == 0 else "80GB")
    assert "this config (ZeRO-3, TP=1, llm.activation_checkpointing=true)" in out


def test_check_fits_refuses_in_one_line():
    cpu = torch.device("cpu")
    huge = compose(["experiment=toy", "llm.hidden_size=16384", "llm.num_layers=64", "llm.intermediate_size=53248"])
    with pytest.raises(ConfigError, match=r"model states \d+\.\d GB .*raise parallel.zero_stage") as err:
        check_fits(huge, tp=1, dp=1, device=cpu)
    assert "\n" not in str(err.value)
    # tiny model states, but activations of 1024 x 32768 tokens (some 700 GB) cannot fit either
    long = ["experiment=toy", "train.micro_batch_size=1024", "data.max_length=32768"]
    with pytest.raises(ConfigError, match=r"activations \d+\.\d GB .*set llm.activation_checkpointing=true") as err:
        check_fits(compose(long), tp=1, dp=1, device=cpu)
    assert "\n" not in str(err.value) and "model states 0.0 GB" in str(err.value)
    need = check_fits(compose(["experiment=toy"]), tp=1, dp=1, device=cpu)  # the toy fits
    assert need > activation_bytes(build_meta_model(compose(["experiment=toy"])), compose(["experiment=toy"]), "fp32")


@pytest.mark.slow
def test_zero_memory_planner_within_10_percent_of_deepspeed():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import zero_memory
    finally:
        sys.path.pop(0)
    measured = zero_memory.measure(dp=2, precision="fp32")
    planned = zero_memory.planned(dp=2, precision="fp32")
    for stage in range(4):
        held = zero_memory.model_states(measured[stage])
        assert abs(planned[stage] / held - 1) <= 0.10, (stage, planned[stage], held)
    # ZeRO-3 shards what ZeRO-0 keeps whole: at DP=2 about half of DP=1 (the planner's DP=1)
    dp1 = zero_memory.planned(dp=1, precision="fp32")[3]
    assert zero_memory.model_states(measured[3]) <= 0.55 * dp1


@pytest.mark.slow
def test_vlm_train_refuses_a_layout_that_cannot_fit(toy_data, tmp_path):
    overrides = toy_overrides(toy_data, tmp_path / "run", "train.micro_batch_size=1024", "data.max_length=32768")
    done = run_cli([*overrides, "train.max_steps=1"])
    assert done.returncode == 2, done.stderr[-2000:]
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("vlm-train: error:")]
    assert len(error_lines) == 1 and "the run needs" in error_lines[0] and "activations" in error_lines[0]
    assert "Traceback" not in done.stderr


# A run's own order: vlm-train plans (a meta-size build) before it builds, in a process that has not
# imported transformers' Auto classes yet.
PLAN_THEN_BUILD = """
import sys, torch
from safetensors.torch import load_file
from vlm_train.build import build_model
from vlm_train.config import compose
from vlm_train.plan import build_meta_model
cfg = compose(["experiment=toy", "llm.path=" + sys.argv[1]])
build_meta_model(cfg)
built = build_model(cfg).llm.hf_model.state_dict()
saved = load_file(sys.argv[1] + "/model.safetensors")
wrong = [name for name in saved if not torch.equal(built[name], saved[name])]
sys.exit(f"weights not loaded: {wrong[:3]}" if wrong else 0)
"""


def test_a_plan_before_the_build_leaves_llm_path_loading_its_weights(tmp_path):
    """Regression: planning swaps from_pretrained for a config-only build; an Auto class created during
    the plan copied the stand-in, and the run's decoder then started from random weights, not llm.path's."""
    import subprocess

    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_train.data.tokenizer import build_toy_tokenizer

    config = LlamaConfig(vocab_size=len(build_toy_tokenizer()), hidden_size=128, intermediate_size=344,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "decoder")
    command = [sys.executable, "-c", PLAN_THEN_BUILD, str(tmp_path / "decoder")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
