"""The global batch as the recipes state it: accumulation derived from micro-batch x data-parallel
ranks, steps from the shards' manifest, warmup as HF Trainer computes it, a one-line error when
the numbers cannot be met exactly, and a resume on another number of ranks that keeps the global
batch and continues the loss curve."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from tests.helpers import keep_only_checkpoint, run_cli, step_losses, toy_overrides
from vlm_train.config import compose, to_yaml
from vlm_train.errors import ConfigError
from vlm_train.parallel.engine import deepspeed_config
from vlm_train.parallel.layout import Layout
from vlm_train.training.resume_check import check_resumable
from vlm_train.training.schedule import plan_batch, resolve_schedule

# LLaVA-1.5's data: blip_laion_cc_sbu_558k.json and llava_v1_5_mix665k.json, samples per file.
LLAVA_SAMPLES = {"llava15-7b-stage1": 558_128, "llava15-7b-stage2": 665_298}
RECIPE_GLOBAL_BATCH = {"llava15-7b-stage1": 256, "llava15-7b-stage2": 128}


@pytest.fixture(scope="module")
def llava_presets(tmp_path_factory) -> dict:
    """Both presets composed once, each over empty shards whose manifest.json gives the real
    dataset's sample count (the tests resolve deep copies)."""
    presets = {}
    for experiment, samples in LLAVA_SAMPLES.items():
        folder, shards = tmp_path_factory.mktemp(experiment), 8
        names = [f"{i:06d}.tar" for i in range(shards)]
        for name in names:
            (folder / name).write_bytes(b"")
        sizes = [samples // shards + (i < samples % shards) for i in range(shards)]
        (folder / "manifest.json").write_text(json.dumps({"shards": dict(zip(names, sizes))}))
        overrides = [
            "vision.path=/models/clip",
            "llm.path=/models/vicuna",
            f"data.urls={folder}/{{000000..000007}}.tar",
        ]
        if experiment.endswith("stage2"):
            overrides.append("connector.path=/runs/stage1/mm_projector.bin")
        presets[experiment] = compose([f"experiment={experiment}", *overrides])
    return presets


@pytest.mark.parametrize("experiment", sorted(LLAVA_SAMPLES))
@pytest.mark.parametrize("nodes", [1, 2, 4, 16, 32])
def test_presets_train_at_the_recipe_global_batch_on_any_node_count(experiment, nodes, llava_presets):
    """slurm/pretrain.sh and finetune.sh at N nodes x 8 GPUs: global batch 256 / 128 exactly, one
    epoch of LLaVA's data, 3% warmup, in the resolved config and in DeepSpeed's config."""
    cfg = copy.deepcopy(llava_presets[experiment])
    wanted, dp, most = RECIPE_GLOBAL_BATCH[experiment], nodes * 8, cfg.train.micro_batch_size
    if dp > wanted:  # 32 nodes x 8 GPUs = 256 ranks cannot share 128 samples: refused, never more
        with pytest.raises(ConfigError, match=rf"global_batch_size={wanted} does not divide over {dp} data"):
            resolve_schedule(cfg, dp)
        return
    plan, line = resolve_schedule(cfg, dp)
    train = cfg.train
    assert plan.global_batch_size == train.micro_batch_size * dp * train.grad_accum == wanted
    assert train.micro_batch_size == min(most, wanted // dp)  # a per-rank maximum
    assert train.max_steps == LLAVA_SAMPLES[experiment] // wanted  # 2180 and 5197
    assert train.warmup_steps == -(-3 * train.max_steps // 100)  # ceil(0.03 x steps): 66 and 156
    assert f"global batch {wanted} = micro-batch {train.micro_batch_size} x {dp} data-parallel" in line
    assert f"max_steps: {train.max_steps}" in to_yaml(cfg)  # what config.yaml records
    ds = deepspeed_config(cfg, Layout(world=dp, rank=0, tp=1, zero_stage=cfg.parallel.zero_stage), "bf16", True)
    assert ds["train_batch_size"] == wanted
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp == wanted
    assert ds["scheduler"]["params"]["total_num_steps"] == train.max_steps
    assert ds["scheduler"]["params"]["warmup_num_steps"] == train.warmup_steps


def test_recipe_numbers_at_one_and_two_nodes(llava_presets):
    """The cases the issue names: stage 1 at 2 nodes lowers micro-batch 32 to 16 (not 512 samples)."""
    one = plan_batch(llava_presets["llava15-7b-stage1"].train, 8)
    two = plan_batch(llava_presets["llava15-7b-stage1"].train, 16)
    assert (one.micro_batch_size, one.grad_accum) == (32, 1)
    assert (two.micro_batch_size, two.grad_accum) == (16, 1)
    assert "lowered" in two.describe() and "lowered" not in one.describe()
    stage2 = plan_batch(llava_presets["llava15-7b-stage2"].train, 1)  # one GPU: accumulation does the rest
    assert (stage2.micro_batch_size, stage2.grad_accum, stage2.global_batch_size) == (16, 8, 128)


@pytest.mark.parametrize(
    ("overrides", "dp", "message"),
    [
        (["train.global_batch_size=256"], 24, "does not divide over 24 data-parallel ranks"),
        (["train.global_batch_size=128", "train.micro_batch_size=12"], 8, "divides 16 (e.g. 8)"),
        (["train.global_batch_size=64", "train.grad_accum=4"], 2, "train.grad_accum=4 contradicts"),
        (["train.global_batch_size=0"], 1, "must be at least 1"),
        (["train.epochs=0"], 1, "train.epochs=0 must be positive"),
        (["train.warmup_ratio=1.5"], 1, "train.warmup_ratio=1.5 must be in"),
    ],
)
def test_impossible_batch_numbers_are_one_line_errors(overrides, dp, message, toy_data):
    cfg = compose(["experiment=toy", f"data.synthetic_dir={toy_data}", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        resolve_schedule(cfg, dp)
    assert "\n" not in str(caught.value)


def test_without_a_global_batch_the_given_accumulation_is_kept():
    cfg = compose(["experiment=toy", "train.grad_accum=3", "train.micro_batch_size=5"])
    plan, line = resolve_schedule(cfg, 2)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, plan.global_batch_size) == (5, 3, 30)
    assert line == "global batch 30 = micro-batch 5 x 2 data-parallel rank(s) x 3 accumulation step(s)"


def test_resume_compares_the_global_batch_not_its_derived_factors(tmp_path):
    def resolved(dp: int, *extra: str):
        cfg = compose(["experiment=toy", "train.micro_batch_size=4", *extra])
        resolve_schedule(cfg, dp)
        return cfg

    saved = to_yaml(resolved(2, "train.global_batch_size=16"))  # accumulation 2 at 2 ranks
    check_resumable(saved, resolved(1, "train.global_batch_size=16"), tmp_path)  # 4 at 1 rank: same global batch
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 16 -> 32"):
        check_resumable(saved, resolved(1, "train.global_batch_size=32"), tmp_path)
    # Without a global batch, accumulation is the user's own setting and must not change.
    with pytest.raises(ConfigError, match=r"train.grad_accum: 1 -> 2"):
        check_resumable(to_yaml(resolved(2)), resolved(1, "train.grad_accum=2"), tmp_path)


@pytest.fixture(scope="module")
def one_batch_data(tmp_path_factory) -> Path:
    """8 scenes in 2 shards: with global batch 8 every step is one whole epoch, so every layout
    (2 ranks x 4, 1 rank x 2 x 4, 1 rank x 8) trains on the same samples at every step."""
    from vlm_train.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("one_batch"), train=8, eval=1, shards=2, seed=1)


def one_batch_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return toy_overrides(
        data,
        run_dir,
        f"data.urls={data}/train-{{000000..000001}}.tar",
        "train.global_batch_size=8",
        "train.precision=fp32",
        *extra,
    )


@pytest.mark.slow
def test_resume_on_fewer_ranks_keeps_the_global_batch_and_the_loss_curve(one_batch_data, tmp_path):
    """2 ranks (accumulation 1) stopped at step 3, resumed on 1 rank (accumulation 2): steps 4-6
    equal the uninterrupted 2-rank run's within fp32 noise (observed 1.1e-7 relative, asserted 1e-6).
    Steps 1-2 run at learning rate 0 (DeepSpeed's warmup starts there), so the checkpoint follows
    one update; its Adam moments and the data position (an epoch boundary) move to 1 rank."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # ZeRO-1: a checkpoint moves to another number of ranks through DeepSpeed's universal format
    common = ("train.epochs=6", "train.warmup_ratio=0.25", "train.save_every=3", "parallel.zero_stage=1")
    result = run_cli(one_batch_overrides(one_batch_data, whole, *common), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 = micro-batch 4 x 2 data-parallel rank(s) x 1 accumulation step(s)" in result.stdout
    assert "6 steps = 6 epoch(s) of 8 samples; warmup 2 steps" in result.stdout
    written = (whole / "config.yaml").read_text()
    assert "max_steps: 6" in written and "warmup_steps: 2" in written and "grad_accum: 1" in written

    keep_only_checkpoint(whole, resumed, 3)
    result = run_cli(one_batch_overrides(one_batch_data, resumed, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 = micro-batch 4 x 1 data-parallel rank(s) x 2 accumulation step(s)" in result.stdout
    assert "resumed from" in result.stdout
    expected, got = step_losses(whole), step_losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    assert expected[6] < expected[3] - 0.1  # the steps after the checkpoint do train


@pytest.mark.slow
def test_global_batch_that_does_not_divide_is_one_line(tmp_path, toy_data):
    result = run_cli(
        toy_overrides(toy_data, tmp_path / "run", "train.global_batch_size=10", "train.micro_batch_size=4")
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vlm-train: error:")]
    assert len(errors) == 1 and "train.global_batch_size=10 is not a multiple of" in errors[0], result.stderr


@pytest.mark.slow
def test_sbatch_checks_the_global_batch_against_the_jobs_gpus_before_starting():
    """slurm/common.sh composes the overrides on the submit node with the job's rank count: 24 ranks
    cannot make 256 (one line, nothing started); 16 can (the run dir is printed)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    script = """source slurm/common.sh; VLM_CONTAINER_ARGS=()
    for world in 24 16; do
      if VLM_WORLD=$world vlm_resolve_run_dir "$@"; then echo "$VLM_RUN_DIR"; else echo "refused at $world"; fi
    done"""
    overrides = ["experiment=llava15-7b-stage1", "vision.path=/m/clip", "llm.path=/m/vicuna", "data.urls=/d/{0..1}.tar"]
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", "-c", script, "bash", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines() == ["refused at 24", f"{REPO}/runs/llava15-7b-stage1"], result.stderr
    assert result.stderr.strip() == (
        "vlm-train: error: train.global_batch_size=256 does not divide over 24 data-parallel ranks: use a global "
        "batch that is a multiple of 24, or a number of ranks (GPUs / tensor_parallel) that divides 256"
    )


def test_sgd_is_plain_sgd_and_its_update_can_be_cancelled():
    """The normalisation test relies on train.optimizer=sgd: an update of exactly -lr x gradient
    (no momentum, no normalisation), cancelled by `skip_next` like SkippableAdamW's."""
    import torch

    from vlm_train.parallel.engine import SkippableSGD, build_optimizer
    from vlm_train.parallel.kernels import probe_kernels

    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    train = compose(["experiment=toy", "train.optimizer=sgd", "train.lr=0.5"]).train
    optimizer = build_optimizer([weight], train, probe_kernels("cpu"))
    assert isinstance(optimizer, SkippableSGD)
    weight.grad = torch.tensor([0.25, 1.0])
    optimizer.skip_next = True
    optimizer.step()
    assert weight.tolist() == [1.0, -2.0] and not optimizer.skip_next
    optimizer.step()
    assert weight.tolist() == [0.875, -2.5]
