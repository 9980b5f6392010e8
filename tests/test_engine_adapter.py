"""`TrainEngine` (vlm_train/parallel/engine.py), the trainer's one door to DeepSpeed, on real
single-rank engines in this process: a skipped step leaves weights and optimizer state as they
were while the LR schedule advances as after a real update, whichever side cancels the update
(the optimizer, asked by the trainer, or DeepSpeed itself on a non-finite gradient norm)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn


def build(stage: int):
    """A tiny model behind a real engine (toy config: fp32 on CPU, warmup, clipping), 2 micro-batches a step."""
    from vlm_train.config import compose
    from vlm_train.parallel.engine import TrainEngine, build_engine
    from vlm_train.parallel.layout import Layout

    cfg = compose(["experiment=toy", "train.grad_accum=2", "train.micro_batch_size=2", f"parallel.zero_stage={stage}"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    raw = build_engine(model, cfg, Layout(1, 0, tp=1, zero_stage=stage), torch.device("cpu"))
    return raw, TrainEngine(raw, grad_clip=cfg.train.grad_clip)


def one_step(engine, loss_factor: float = 1.0, skip: bool = False):
    """Two micro-batches, then the step; `loss_factor` nan makes every gradient non-finite."""
    for micro in range(2):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(micro))
        engine.backward(engine(x).pow(2).mean() * loss_factor)
        if micro == 0:
            engine.micro_step()
    return engine.step(skip=skip, grad_norm=True)


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("stage", [0, 1])
def test_a_skipped_step_keeps_the_weights_and_advances_the_schedule(one_rank, stage):
    reference_raw, reference = build(stage)
    raw, engine = build(stage)
    one_step(reference), one_step(engine)  # the schedule's first step leaves the LR at 0
    lr_before = engine.lr
    done = one_step(reference)
    assert done.updated and done.grad_norm is not None and done.grad_norm > 0
    assert reference.lr != lr_before  # in warmup: the schedule moves every step

    before = weights(engine)
    skipped = one_step(engine, loss_factor=float("nan"), skip=True)  # what the trainer asks on a NaN loss
    assert not skipped.updated and skipped.grad_norm is None
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
    assert engine.lr == reference.lr  # the schedule follows the trainer's step count

    again = one_step(engine)  # the next step trains normally from the kept weights
    assert again.updated and math.isfinite(again.grad_norm or math.nan)
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
    for built in (reference_raw, raw):
        built.destroy()


def test_zero_cancels_a_non_finite_step_itself_and_the_schedule_still_advances(one_rank):
    """ZeRO 1-3 see the non-finite gradient norm and cancel the update before the optimizer runs
    (DeepSpeed then leaves its LR schedule behind: the adapter steps it)."""
    reference_raw, reference = build(1)
    raw, engine = build(1)
    one_step(reference), one_step(engine), one_step(reference)
    before = weights(engine)
    result = one_step(engine, loss_factor=float("nan"), skip=False)
    assert not result.updated
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
    assert engine.lr == reference.lr
    for built in (reference_raw, raw):
        built.destroy()


def test_the_step_is_taken_only_after_the_last_micro_batch(one_rank):
    raw, engine = build(0)
    x = torch.randn(2, 8)
    engine.backward(engine(x).pow(2).mean())
    with pytest.raises(AssertionError, match="micro_step"):
        engine.step()
    engine.micro_step()
    engine.backward(engine(x).pow(2).mean())
    with pytest.raises(AssertionError, match="call step"):
        engine.micro_step()
    assert engine.step().updated
    raw.destroy()


class SometimesUsed(nn.Module):
    """`gate` reaches the loss only on odd steps, `unused` never: parameters without a gradient,
    as a connector has on a text-only batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.gate = nn.Parameter(torch.ones(1))
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor, use_gate: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out * self.gate if bool(use_gate) else out


def deepspeeds_own_path(model: nn.Module, cfg):
    """The engine as DeepSpeed runs fp32 ZeRO-0 by itself: its gradient all-reduce and its clipping."""
    import deepspeed

    from vlm_train.parallel.engine import build_optimizer, deepspeed_config
    from vlm_train.parallel.kernels import probe_kernels
    from vlm_train.parallel.layout import Layout

    config = deepspeed_config(cfg, Layout(1, 0, tp=1, zero_stage=0), "fp32") | {
        "gradient_clipping": cfg.train.grad_clip
    }
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train, probe_kernels("cpu"))
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_one_rank_zero_0_updates_as_deepspeed_without_its_all_reduce_and_clipping(one_rank, grad_clip):
    """At fp32 ZeRO-0 with one data-parallel rank the adapter switches off DeepSpeed's gradient
    all-reduce (a flatten, a reduce over a group of one and a copy back, each step) and clips with
    torch's foreach kernels instead of DeepSpeed's per-tensor loop. The all-reduce pass also gives
    every trainable parameter without a gradient a zero one, which AdamW then steps (weight decay,
    moments, its step count): the adapter must do the same. Weights after several steps match
    DeepSpeed's own path: bit for bit without clipping, to float rounding of the norm with it
    (0.05 clips every step here)."""
    from vlm_train.config import compose
    from vlm_train.parallel.engine import build_train_engine
    from vlm_train.parallel.layout import Layout

    overrides = ["experiment=toy", "train.micro_batch_size=2", "train.weight_decay=0.1", "train.warmup_steps=0"]
    cfg = compose([*overrides, f"train.grad_clip={grad_clip}"])
    torch.manual_seed(0)
    reference = deepspeeds_own_path(SometimesUsed(), cfg)
    torch.manual_seed(0)
    adapter = build_train_engine(SometimesUsed(), cfg, Layout(1, 0, tp=1, zero_stage=0), torch.device("cpu"))
    assert reference.enable_backward_allreduce and not adapter._engine.enable_backward_allreduce
    for step in range(4):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(step))
        use_gate = torch.tensor(step % 2 == 1)
        reference.backward(reference(x, use_gate).pow(2).mean())
        reference.step()
        adapter.backward(adapter(x, use_gate).pow(2).mean())
        result = adapter.step(grad_norm=True)
        assert result.updated and result.grad_norm is not None
        if grad_clip:
            assert result.grad_norm > grad_clip  # this step was clipped
    expected, got = reference.module.state_dict(), adapter.module.state_dict()
    assert expected["unused"].lt(1).all()  # decayed: the zero gradient was stepped
    for name in expected:
        if grad_clip:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(expected[name], got[name]), name
    reference.destroy(), adapter._engine.destroy()
