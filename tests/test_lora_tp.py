"""LoRA on the megatron decoder: TP=2 trains as TP=1 (ZeRO 1 and 3, per-step losses 1e-5), the updates
merge into the exported weights (transformers gives the trained TP model's logits), and TP=2's export
equals TP=1's. The runs go through the real training function under torchrun (this file is the
worker, as in tests/test_tensor_parallel.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if __name__ != "__main__":
    from tests.helpers import REPO, step_losses, torchrun, toy_overrides

pytestmark = pytest.mark.slow

LORA = ("llm.lora.rank=4", "llm.lora.alpha=8", "train.max_steps=8", "train.precision=fp32", "train.lr=3e-3",
        "train.warmup_steps=1", "train.save_every=8")  # fmt: skip


def launch(plan: list[dict], nproc: int) -> None:
    plan_file = Path(plan[0]["dir"]).parent / f"plan{nproc}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    command = torchrun(nproc, str(Path(__file__)), str(plan_file))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_lora_at_tp2_trains_as_at_tp1_and_exports_merged(toy_data, tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    def run(name: str, *extra: str) -> dict:
        overrides = toy_overrides(toy_data, tmp_path / name, *LORA, *extra)
        return {"kind": "train", "dir": str(tmp_path / name), "overrides": overrides}

    launch([run("tp1", "llm.backend=megatron"), {"kind": "logits", "dir": str(tmp_path / "tp1")}], nproc=1)
    tp2 = ("parallel.tensor_parallel=2",)
    launch([run("tp2_zero1", *tp2, "parallel.zero_stage=1"), run("tp2_zero3", *tp2, "parallel.zero_stage=3")], nproc=2)
    reference = step_losses(tmp_path / "tp1")
    assert sorted(reference) == list(range(1, 9)) and reference[8] < reference[1]
    for name in ("tp2_zero1", "tp2_zero3"):
        losses = step_losses(tmp_path / name)
        assert all(losses[s] == pytest.approx(reference[s], rel=1e-5) for s in reference), (name, losses, reference)
    convert = [f"main(['to-hf', {str(tmp_path / n)!r}, {str(tmp_path / f'hf_{n}')!r}])" for n in ("tp1", "tp2_zero3")]
    code = f"import sys; from vlm_train.convert import main; sys.exit({' or '.join(convert)})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = torch.load(tmp_path / "tp1" / "ours.pt")
    batch = {"input_ids": ours["input_ids"], "pixel_values": ours["pixel_values"]}
    with torch.no_grad():
        exported = [
            LlavaForConditionalGeneration.from_pretrained(tmp_path / f"hf_{n}").eval()(**batch).logits
            for n in ("tp1", "tp2_zero3")
        ]
    assert (exported[0] - ours["logits"]).abs().max() < 1e-4  # the merged export is the trained LoRA model
    assert (exported[1] - exported[0]).abs().max() < 1e-4  # TP=2's slices merge and join to TP=1's
    assert (ours["logits"] - ours["base_logits"]).abs().max() > 1e-3  # and the updates did train


@pytest.mark.parametrize(
    ("extra", "message"),
    [(("llm.lora.targets=[qkv]",), "llm.lora.targets=['qkv']: ['qkv']"),
     (("llm.lora.dropout=0.1",), "llm.lora.dropout with llm.backend=megatron")],
)  # fmt: skip
def test_megatron_lora_mistakes_end_in_one_line(toy_data, tmp_path, extra, message):
    from tests.helpers import run_cli

    overrides = toy_overrides(toy_data, tmp_path / "run", "llm.backend=megatron", "llm.lora.rank=4", *extra)
    result = run_cli(overrides)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("vlm-train: error:") and message in last, result.stderr[-2000:]


def worker(plan: list[dict]) -> None:
    import torch.distributed as dist

    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import _quiet_libraries, _train

    env = launch_env()
    _quiet_libraries(env.rank)
    device = init_distributed(compose(plan[0]["overrides"]).parallel, env)
    for step in plan:
        if step["kind"] == "train":
            cfg = compose(step["overrides"])
            _train(cfg, Layout.from_config(cfg, world=env.world, rank=env.rank), device)
        else:
            save_trained_logits(Path(step["dir"]), env)
        dist.barrier()
    shutdown()


def save_trained_logits(run_dir: Path, env) -> None:
    """The trained TP model (its LoRA updates on) rebuilt from its checkpoint: its logits on one
    example, and with the updates off."""
    import torch

    from vlm_train.build import build_model
    from vlm_train.config import load_yaml
    from vlm_train.models.lora import lora_disabled
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import seed_everything
    from vlm_train.training.checkpoint import latest_checkpoint

    folder = latest_checkpoint(run_dir)
    cfg = load_yaml(folder / "config.yaml")
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    layout.build_groups()
    seed_everything(cfg.run.seed)  # the frozen base weights (not in checkpoints) are rebuilt as the run built them
    model = build_model(cfg, layout=layout).eval()
    states = torch.load(folder / f"mp_rank_{layout.tp_rank:02d}_model_states.pt", weights_only=False)["module"]
    model.load_state_dict(states, strict=False)  # frozen weights are rebuilt, not saved
    generator = torch.Generator().manual_seed(3)
    size = model.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    text = torch.randint(3, model.image_token_id, (12,), generator=generator)
    ids = torch.cat([torch.full((model.num_image_tokens,), model.image_token_id), text])[None]
    with torch.no_grad():
        logits = model(pixels, ids).logits
        with lora_disabled(model):
            base = model(pixels, ids).logits
    if env.rank == 0:
        saved = {"pixel_values": pixels, "input_ids": ids, "logits": logits, "base_logits": base}
        torch.save(saved, run_dir / "ours.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import run_worker

    run_worker(worker)
