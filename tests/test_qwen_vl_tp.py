"""A tiny Qwen2.5-VL on the megatron backend: the decoder (M-RoPE, q/k/v biases) split over TP=2, the
tower and merger whole on every rank. Logits equal transformers' at TP=1 and TP=2; TP=2 x DP=2 trains
20 steps on images of many sizes and resumes bit-identically after kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if __name__ != "__main__":
    from tests.helpers import REPO, read_metrics, step_losses, torchrun

pytestmark = pytest.mark.slow


def test_megatron_qwen_decoder_gives_transformers_logits_at_tp1_and_tp2(tmp_path):
    """Biases and norms perturbed (so a dropped q/k/v bias shows), RoPE base 100 (so positions
    matter): max |logit difference| to the HF decoder under 1e-5 at TP=1 and TP=2, on samples with
    images of three sizes; the TP shards joined back are the HF weights."""
    report_file, plan = tmp_path / "report.json", tmp_path / "plan.json"
    plan.write_text(json.dumps({"report": str(report_file)}))
    command = torchrun(2, str(Path(__file__)), str(plan))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert sorted(report) == ["tp1", "tp2"]
    for tp, diff in report.items():
        assert diff < 1e-5, (tp, diff)


def parity_report(report_file: Path, env) -> None:
    import torch

    from tests.qwen_helpers import END, IMAGE, START, TINY_QWEN, qwen_batch
    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.models.vlm import VisionLanguageModel
    from vlm_train.parallel.layout import Layout
    from vlm_train.parallel.tensor_parallel import from_hf_decoder

    report = {}
    for tp in (1, 2):
        torch.manual_seed(0)
        reference = build_model(compose(["experiment=toy", *TINY_QWEN, "llm.rope_theta=100"])).eval()
        with torch.no_grad():
            for name, param in reference.llm.named_parameters():
                if "bias" in name or "norm" in name:
                    param.add_(torch.randn_like(param) * 0.3)
        layout = Layout(world=env.world, rank=env.rank, tp=tp, zero_stage=0, backend="megatron")
        layout.build_groups()
        decoder = from_hf_decoder(reference.llm, layout)
        ours = VisionLanguageModel(reference.vision, reference.connector, decoder, reference.image_token_id).eval()
        batch = qwen_batch(
            [[5, 6, ("image", (1, 4, 6)), 7], [8, ("image", (1, 2, 2)), 9, 10, ("image", (1, 6, 2)), 11]]
        )
        ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, reference.image_token_id)
        ids = ids.masked_fill((ids == START) | (ids == END), 7)
        inputs = dict(attention_mask=batch["attention_mask"], image_grid_thw=batch["image_grid_thw"])
        with torch.no_grad():
            expected = reference(batch["pixel_values"], ids, **inputs).logits
            got = ours(batch["pixel_values"], ids, **inputs).logits
        real = batch["attention_mask"].bool()
        report[f"tp{tp}"] = float((got[real] - expected[real]).abs().max())
        exported = decoder.to_hf().hf_model.state_dict()
        for name, tensor in reference.llm.hf_model.state_dict().items():
            assert torch.equal(exported[name], tensor), (tp, name)
    if env.rank == 0:
        report_file.write_text(json.dumps(report))


def tp_run(urls: str, run_dir) -> list[str]:
    from tests.qwen_helpers import resumable_run

    return resumable_run(urls, run_dir, "parallel.tensor_parallel=2", "parallel.zero_stage=1")


def test_tp2_dp2_trains_a_tiny_qwen2_5_vl_and_resumes_bit_identical_after_kill_9(tmp_path):
    """4 ranks (TP=2 x DP=2, ZeRO-1), images of five sizes: 20 steps without a hang, the loss falls;
    SIGKILLed after step 9, the job restarts from its last checkpoint and logs the uninterrupted run's
    losses exactly, each data-parallel rank reading the same samples in order."""
    from tests.helpers import kill_9_and_resume
    from tests.qwen_helpers import write_sized_shards

    (tmp_path / "shards").mkdir()
    urls = write_sized_shards(tmp_path / "shards")
    whole = kill_9_and_resume(lambda run_dir: tp_run(urls, run_dir), nproc=4, root=tmp_path)
    losses = list(step_losses(whole).values())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert len({r["visual_tokens"] for r in read_metrics(whole) if "loss" in r}) > 3  # sizes vary


def worker(plan: dict) -> None:
    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown
    from vlm_train.train import _quiet_libraries

    env = launch_env()
    _quiet_libraries(env.rank)
    init_distributed(compose(["experiment=toy"]).parallel, env)
    parity_report(Path(plan["report"]), env)
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import run_worker  # also sets the same environment defaults as pytest

    run_worker(worker)
