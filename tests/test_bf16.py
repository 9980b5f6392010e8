"""bf16 numerics as Megatron does them: gradients accumulate and are reduced in fp32 wherever
DeepSpeed allows it (`train.grad_reduce_dtype=fp32`, the default), the megatron decoder is built
for bf16 with its attention softmax in fp32, and 50 bf16 steps of the toy stay close to fp32.

The checks read the live objects: the DeepSpeed engine's optimizer wrapper, its gradient buffers
and the dtypes of the collectives it actually issues in backward, at ZeRO 0-3, on 2 gloo ranks.
All multi-process work is one launch of this file (it runs as the torchrun worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if __name__ != "__main__":
    from tests.helpers import REPO, step_losses, torchrun, toy_overrides

STEPS = 50
# Measured (toy, 2 gloo ranks, ZeRO-2, 2 x 2 micro-batches, 50 steps): largest per-step
# |bf16 - fp32| loss 0.0058 (0.011 with micro-batch 4); the bound leaves ~3x headroom.
LOSS_TOLERANCE = 0.02
REDUCE_DTYPES = ("fp32", "bf16")


def test_grad_reduce_dtype_defaults_to_fp32_and_reaches_deepspeed():
    """The config DeepSpeed gets: fp32 accumulation (ZeRO 2-3) and fp32 communication by default."""
    from vlm_train.config import compose
    from vlm_train.parallel.engine import deepspeed_config, precision_notes
    from vlm_train.parallel.layout import Layout

    cfg = compose(["experiment=toy"])
    assert cfg.train.grad_reduce_dtype == "fp32"
    for stage in (0, 1, 2, 3):
        ds = deepspeed_config(cfg, Layout(world=2, rank=0, tp=1, zero_stage=stage), "bf16")
        assert ds["communication_data_type"] == "fp32"
        # not asked where DeepSpeed refuses it (ZeRO-0) or its checkpoints cannot be exported (ZeRO-1); said
        assert ds.get("data_types") == (None if stage < 2 else {"grad_accum_dtype": "fp32"})
        assert bool(precision_notes("bf16", "fp32", stage)) == (stage < 2)
        assert not precision_notes("bf16", "bf16", stage) and not precision_notes("fp32", "fp32", stage)
    fp32 = deepspeed_config(cfg, Layout(world=2, rank=0, tp=1, zero_stage=2), "fp32")
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


@pytest.fixture(scope="module")
def bf16_runs(toy_data, tmp_path_factory) -> Path:
    """One 2-rank launch: engine dtypes at ZeRO 0-3, the megatron decoder at TP=2, 50-step runs."""
    root = tmp_path_factory.mktemp("bf16")
    common = (
        f"train.max_steps={STEPS}",
        "train.warmup_steps=5",
        "parallel.zero_stage=2",
        "train.grad_accum=2",
        "train.micro_batch_size=2",
    )
    plan = [{"kind": "dtypes", "dir": str(root / "dtypes")}]
    for name, extra in (("fp32", ("train.precision=fp32",)), ("bf16", ("train.precision=bf16",))):
        plan.append({"kind": "train", "overrides": toy_overrides(toy_data, root / name, *common, *extra)})
    plan.append({"kind": "megatron", "dir": str(root / "megatron")})
    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    command = torchrun(2, str(Path(__file__)), str(plan_file))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return root


@pytest.mark.slow
def test_gradients_accumulate_and_reduce_in_fp32_where_deepspeed_allows(bf16_runs):
    """Per ZeRO stage, the dtypes DeepSpeed really uses (the table in docs/performance.md)."""
    found = json.loads((bf16_runs / "dtypes" / "report.json").read_text())
    expected = {  # (optimizer wrapper, accumulation dtype, dtypes of the gradient collectives)
        "0/fp32": ("FP16_UnfusedOptimizer", "bf16", ["fp32"]),  # DeepSpeed: no fp32 accumulation at ZeRO-0
        "0/bf16": ("FP16_UnfusedOptimizer", "bf16", ["bf16"]),
        "1/fp32": ("DeepSpeedZeroOptimizer", "bf16", ["fp32"]),  # (its BF16_Optimizer: see engine.py)
        "1/bf16": ("DeepSpeedZeroOptimizer", "bf16", ["bf16"]),
        "2/fp32": ("DeepSpeedZeroOptimizer", "fp32", ["fp32"]),
        "2/bf16": ("DeepSpeedZeroOptimizer", "bf16", ["bf16"]),
        "3/fp32": ("DeepSpeedZeroOptimizer_Stage3", "fp32", ["fp32"]),
        "3/bf16": ("DeepSpeedZeroOptimizer_Stage3", "bf16", ["bf16"]),
    }
    for key, (wrapper, accumulation, collectives) in expected.items():
        assert found[key]["optimizer"] == wrapper, (key, found[key])
        assert found[key]["accumulation"] == accumulation, (key, found[key])
        assert found[key]["collectives"] == collectives, (key, found[key])
        assert found[key]["communication_data_type"] == collectives[0], (key, found[key])


@pytest.mark.slow
def test_megatron_decoder_is_built_for_bf16_with_fp32_softmax(bf16_runs):
    """TP=2: TransformerConfig says bf16, weights are bf16, and the attention softmax sees fp32."""
    found = json.loads((bf16_runs / "megatron" / "report.json").read_text())
    assert found["bf16"] == {
        "config": {"bf16": True, "fp16": False, "params_dtype": "torch.bfloat16", "attention_softmax_in_fp32": True},
        "param_dtypes": ["torch.bfloat16"],
        "softmax_inputs": ["torch.float32"],
        "logits": "torch.bfloat16",
    }
    # The old build (fp32 config, weights cast to bf16 by DeepSpeed): softmax in bf16, and the spy sees it
    assert found["fp32_cast"]["softmax_inputs"] == ["torch.bfloat16"], found["fp32_cast"]
    assert found["fp32"]["config"]["bf16"] is False and found["fp32"]["param_dtypes"] == ["torch.float32"]
    assert found["bf16_max_logit_diff"] < 0.05, found  # measured 0.0066 against the fp32 decoder
    assert found["run_bf16_bf16"] is True and found["run_auto_bf16"] is False  # vlm-train builds it so


@pytest.mark.slow
def test_fifty_bf16_steps_stay_within_tolerance_of_fp32(bf16_runs):
    """The toy at ZeRO-2 with 2 accumulated micro-batches on 2 ranks: bf16 (fp32 gradients) against
    fp32, step by step; the bf16 run's checkpoint still consolidates to fp32 weights (export)."""
    import torch

    from vlm_train.parallel.engine_checkpoint import consolidated_state_dict

    fp32, bf16 = step_losses(bf16_runs / "fp32"), step_losses(bf16_runs / "bf16")
    assert sorted(fp32) == sorted(bf16) == list(range(1, STEPS + 1))
    gap = max(abs(bf16[s] - fp32[s]) for s in fp32)
    print(
        f"largest |bf16 - fp32| step loss over {STEPS} steps: {gap:.4f}; final {bf16[STEPS]:.4f} vs {fp32[STEPS]:.4f}"
    )
    assert gap < LOSS_TOLERANCE, (gap, bf16, fp32)
    assert bf16 != fp32 and bf16[STEPS] < 0.5 * bf16[1]  # really bf16, and it learns
    weights = consolidated_state_dict(bf16_runs / "bf16" / "checkpoints" / f"step_{STEPS}", zero_stage=2)
    assert weights and {v.dtype for v in weights.values()} == {torch.float32}


# --- the torchrun worker --------------------------------------------------------------------------

_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}
_recorded: list[str] | None = None  # dtypes of gradient collectives while recording


def spy_on_reductions() -> None:
    """Wrap torch.distributed's reducing collectives to note the dtype of each tensor reduced
    (DeepSpeed's comm backend looks them up on the module at each call)."""
    import torch.distributed as dist

    def wrap(original):
        def collective(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if hasattr(a, "dtype")]
            tensors += [t for a in args if isinstance(a, list) for t in a if hasattr(t, "dtype")]
            if _recorded is not None:
                _recorded.extend(str(t.dtype) for t in tensors if t.numel() > 1)  # not norms/flags
            return original(*args, **kwargs)

        return collective

    for name in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced"):
        setattr(dist, name, wrap(getattr(dist, name)))


def accumulation_dtype(engine, stage: int) -> str:
    """Where this ZeRO stage accumulates gradients between micro-batches, read after the first."""
    optimizer = engine.optimizer
    if stage == 0:
        buffers = [p.grad for p in engine.module.parameters()]
    elif type(optimizer).__name__ == "BF16_Optimizer":
        buffers = optimizer.fp32_groups_gradients_flat
    elif stage == 3:
        buffers = [optimizer.grad_partitions_flat_buffer]
    elif getattr(optimizer, "use_grad_accum_attribute", False):
        buffers = [p.grad_accum for p in engine.module.parameters()]
    elif stage == 2 and optimizer.averaged_gradients:
        buffers = [g.flat_partition for g in optimizer.averaged_gradients.values()]  # fp32 partitions
    elif stage == 2:
        buffers = [t for group in optimizer.all_grad_tensors.values() for t in group or ()]  # reduced, summed
    else:
        buffers = [p.grad for p in engine.module.parameters()]  # reduced at the boundary, summed in place
    dtypes = {str(b.dtype) for b in buffers if b is not None}
    if len(dtypes) != 1:
        return f"?{stage} {type(optimizer).__name__} {dtypes} {vars(optimizer).keys() if stage else ''}"
    return _DTYPE_NAMES[dtypes.pop()]


def dtype_report(folder: Path, env) -> None:
    """Build a real engine per (ZeRO stage, grad_reduce_dtype) on a small model, run 2 micro-batches."""
    import torch
    from torch import nn

    from vlm_train.config import compose
    from vlm_train.parallel.engine import build_engine
    from vlm_train.parallel.layout import Layout

    global _recorded
    report = {}
    for stage in (0, 1, 2, 3):
        for reduce_dtype in REDUCE_DTYPES:
            cfg = compose(
                [
                    "experiment=toy",
                    "train.precision=bf16",
                    "train.grad_accum=2",
                    "train.micro_batch_size=2",
                    f"parallel.zero_stage={stage}",
                    f"train.grad_reduce_dtype={reduce_dtype}",
                ]
            )
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
            engine = build_engine(model, cfg, Layout(env.world, env.rank, tp=1, zero_stage=stage), torch.device("cpu"))
            seen, accumulated = [], None
            for micro in range(2):
                x = torch.randn(2, 16, generator=torch.Generator().manual_seed(env.rank * 10 + micro))
                loss = engine(x.to(torch.bfloat16)).float().pow(2).mean()
                _recorded = seen
                engine.backward(loss)
                _recorded = None
                if micro == 0:
                    accumulated = accumulation_dtype(engine, stage)
                engine.step()
            report[f"{stage}/{reduce_dtype}"] = {
                "optimizer": type(engine.optimizer).__name__,
                "accumulation": accumulated,
                "collectives": sorted({_DTYPE_NAMES[d] for d in seen}),
                "communication_data_type": _DTYPE_NAMES[str(engine.communication_data_type)],
            }
            engine.destroy()
    if env.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report))


def megatron_report(folder: Path, env) -> None:
    """The toy decoder at TP=2 built for bf16 and for fp32: config, weights, softmax input dtype."""
    import torch

    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.models.llm import build_llm
    from vlm_train.parallel.layout import Layout
    from vlm_train.parallel.tensor_parallel import from_hf_decoder

    layout = Layout(world=env.world, rank=env.rank, tp=2, zero_stage=0, backend="megatron")
    layout.build_groups()
    # megatron's own attention (kept under eager; sdpa runs torch's fused kernel, softmax inside it)
    cfg = compose(["experiment=toy", "llm.attn_implementation=eager"]).llm
    softmax_inputs: list[str] = []
    original = torch.nn.Softmax.forward

    def spy(module, x):  # megatron's unfused softmax path calls torch.nn.Softmax
        softmax_inputs.append(str(x.dtype))
        return original(module, x)

    report, logits = {}, {}
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    # fp32_cast: built for fp32, then cast to bf16 as DeepSpeed's bf16 engine casts every module
    for name, precision in (("bf16", "bf16"), ("fp32_cast", "fp32"), ("fp32", "fp32")):
        torch.manual_seed(0)
        decoder = from_hf_decoder(build_llm(cfg, 64), layout, precision=precision).eval()
        config, built_dtypes = decoder.gpt.config, sorted({str(p.dtype) for p in decoder.parameters()})
        if name != "fp32":
            decoder.to(torch.bfloat16)
        softmax_inputs.clear()
        torch.nn.Softmax.forward = spy
        try:
            with torch.no_grad():
                logits[name] = decoder.gather_logits(decoder(decoder.embed(ids)))
        finally:
            torch.nn.Softmax.forward = original
        report[name] = {
            "config": {
                "bf16": config.bf16,
                "fp16": config.fp16,
                "params_dtype": str(config.params_dtype),
                "attention_softmax_in_fp32": config.attention_softmax_in_fp32,
            },
            "param_dtypes": built_dtypes,
            "softmax_inputs": sorted(set(softmax_inputs)),
            "logits": str(logits[name].dtype),
        }
    # what a run builds (build.py): the decoder follows train.precision (auto: fp32 on CPU)
    for precision in ("bf16", "auto"):
        run_cfg = compose(["experiment=toy", "parallel.tensor_parallel=2", f"train.precision={precision}"])
        report[f"run_{precision}_bf16"] = build_model(run_cfg, layout=layout).llm.gpt.config.bf16
    for name in ("bf16", "fp32_cast"):
        report[f"{name}_max_logit_diff"] = float((logits[name].float() - logits["fp32"]).abs().max())
    if env.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report))


def worker(plan: list[dict]) -> None:
    import torch.distributed as dist

    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import _quiet_libraries, _train

    env = launch_env()
    _quiet_libraries(env.rank)
    spy_on_reductions()
    device = init_distributed(compose(["experiment=toy"]).parallel, env)
    for step in plan:
        if step["kind"] == "dtypes":
            dtype_report(Path(step["dir"]), env)
        elif step["kind"] == "megatron":
            megatron_report(Path(step["dir"]), env)
        else:
            cfg = compose(step["overrides"])
            _train(cfg, Layout.from_config(cfg, world=env.world, rank=env.rank), device)
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import run_worker  # also sets the same environment defaults as pytest

    run_worker(worker)
