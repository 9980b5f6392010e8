"""Pretraining objectives (docs/pretraining.md): objective=lm (the decoder alone on text) and
objective=clip|siglip (contrastive image-text towers with negatives from every data-parallel rank);
and train.eval_every, which the connector study reads its learning curves from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ != "__main__":  # a launched worker (parity_worker) imports what it needs itself
    from tests.helpers import REPO, read_metrics, run_cli, torchrun

ROWS = 8  # the global micro-batch of the DP parity test


def contrastive_model(objective: str):
    from vlm_train.build import build_dual_encoder
    from vlm_train.config import compose
    from vlm_train.data.tokenizer import build_toy_tokenizer

    family = "siglip" if objective == "siglip" else "clip"
    cfg = compose(["experiment=toy-clip", f"objective={objective}", f"vision.family={family}", "train.precision=fp32"])
    torch.manual_seed(0)
    return build_dual_encoder(cfg, build_toy_tokenizer(relations=True))


def parity_batch() -> dict[str, torch.Tensor]:
    """8 image-caption rows of different caption lengths; row 5 is a placeholder (labels masked)."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (ROWS, 3, 48, 48), dtype=torch.uint8, generator=generator)
    ids = torch.randint(5, 30, (ROWS, 7), generator=generator)
    lengths = torch.tensor([7, 5, 6, 3, 7, 4, 6, 2])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    ids[torch.arange(ROWS), lengths - 1] = 3  # </s> ends each caption
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[5] = -100
    return {"pixel_values": pixels, "input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def loss_and_grads(objective: str, rows: slice) -> tuple[float, dict[str, torch.Tensor]]:
    """The global loss and the summed gradients when this process holds `rows` of the batch (all
    ranks together hold all of it), as the trainer computes them: loss sums over ranks / real pairs."""
    import torch.distributed as dist

    from vlm_train.training.contrastive import contrastive_forward, real_pairs

    model, batch = contrastive_model(objective), parity_batch()
    mine = {key: value[rows] for key, value in batch.items()}
    loss_sum, _ = contrastive_forward(model, mine, objective)
    pairs = real_pairs(batch["labels"]).sum().double()
    (loss_sum / pairs).backward()
    total = loss_sum.detach().double().clone()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if dist.is_initialized():
        dist.all_reduce(total)
        for grad in grads.values():
            dist.all_reduce(grad)
    return float(total / pairs), grads


def parity_worker(plan: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, half = dist.get_rank(), ROWS // 2
    for objective in ("clip", "siglip"):
        loss, grads = loss_and_grads(objective, slice(rank * half, (rank + 1) * half))
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, Path(plan["dir"]) / f"{objective}.pt")
    dist.destroy_process_group()


def test_contrastive_loss_and_gradients_on_two_ranks_equal_one_rank(tmp_path):
    """Acceptance: DP=2 (4 rows each, negatives gathered) == DP=1 (all 8 rows): loss and every gradient,
    fp32, 1e-6; for CLIP's and SigLIP's losses, with a placeholder row left out of both."""
    import subprocess

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"dir": str(tmp_path)}))
    done = subprocess.run(
        torchrun(2, str(Path(__file__)), str(plan)), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for objective in ("clip", "siglip"):
        loss, grads = loss_and_grads(objective, slice(0, ROWS))
        two = torch.load(tmp_path / f"{objective}.pt")
        assert abs(two["loss"] - loss) <= 1e-6 * max(1.0, abs(loss)), (objective, two["loss"], loss)
        assert set(two["grads"]) == set(grads) and len(grads) > 20
        for name, grad in grads.items():
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=f"{objective} {name}")
        assert grads["logit.log_scale"].abs().item() > 0 and (objective == "clip") == ("logit.bias" not in grads)


def test_clip_loss_matches_the_papers_formula():
    """One rank: CLIP's loss = mean over pairs of (CE image->texts + CE text->images) / 2 (open_clip's
    ClipLoss), SigLIP's = -sum log sigmoid(z (t x.y + b)) / N (big_vision's sigmoid loss)."""
    import torch.nn.functional as F

    from vlm_train.training.contrastive import clip_loss_sum, siglip_loss_sum

    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale, bias, real = torch.tensor(12.0), torch.tensor(-3.0), torch.ones(6, dtype=torch.bool)
    logits = scale * images @ texts.T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(clip_loss_sum(images, texts, scale, real) / 6, expected, atol=1e-6)
    signs = 2 * torch.eye(6) - 1
    expected = -F.logsigmoid(signs * (logits + bias)).sum() / 6
    assert torch.allclose(siglip_loss_sum(images, texts, scale, bias, real) / 6, expected, atol=1e-6)


def test_retrieval_scores_count_a_same_text_caption_as_right():
    from vlm_train.training.pretraining import retrieval_scores

    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0.9, 0.1]])  # image 1 -> caption 2, image 2 -> caption 1
    scores = retrieval_scores(images, texts, [("a",), ("b",), ("b",)])  # captions 1 and 2 are the same text
    assert scores["eval_retrieval_i2t"] == 1.0 and scores["eval_retrieval_t2i"] == 1.0
    scores = retrieval_scores(images, texts, [("a",), ("b",), ("c",)])
    assert scores["eval_retrieval_i2t"] == pytest.approx(1 / 3)
    assert scores["eval_retrieval_chance"] == pytest.approx(1 / 3)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import run_worker

    run_worker(parity_worker)


def pretraining_overrides(experiment: str, data: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"experiment={experiment}",
        f"data.synthetic_dir={data}",
        "data.synthetic_train=600",
        "data.synthetic_eval=64",
        "data.eval_samples=64",
        "data.num_workers=1",
        f"run.dir={run}",
        "train.micro_batch_size=16",
        "train.log_every=1",
        "train.save_every=0",
        "train.warmup_steps=2",
        *extra,
    ]


def test_lm_run_scores_perplexity_and_writes_a_decoder_llm_path_loads(tmp_path):
    """objective=lm trains the decoder alone (no tower in the checkpoint), reports held-out perplexity
    far below the untrained one, and <run.dir>/hf is a transformers decoder that a VLM's llm.path loads."""
    from safetensors.torch import load_file

    from vlm_train.build import build_model
    from vlm_train.config import compose

    run = tmp_path / "lm"
    overrides = pretraining_overrides("toy-lm", tmp_path / "text", run, "train.max_steps=40", "train.eval_every=15")
    done = run_cli(overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluations = [r for r in read_metrics(run) if "eval_perplexity" in r]
    assert [r["step"] for r in evaluations] == [15, 30, 40]  # train.eval_every, and the end
    evaluation = evaluations[-1]
    vocabulary = 45  # the toy tokenizer's words: an untrained decoder's perplexity is about this
    assert evaluation["eval_perplexity"] < 4, evaluation  # measured 2.3 after 40 steps
    saved = load_file(run / "hf" / "model.safetensors")
    assert not any("vision" in key or "connector" in key for key in saved) and vocabulary < len(saved) * 10
    vlm = build_model(compose(["experiment=toy", f"llm.path={run / 'hf'}"]))
    for name, tensor in vlm.llm.hf_model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_clip_on_two_ranks_trains_alike_at_zero_0_and_3_and_its_tower_loads_by_vision_path(tmp_path):
    """The trainer's contrastive step on 2 ranks (negatives gathered across them): ZeRO-0 and ZeRO-3 give
    the same losses step for step; the ZeRO-3 run's zero-shot retrieval is scored, and its <run.dir>/hf
    (gathered from partitioned weights) is a CLIPModel whose image tower vision.path loads into a VLM.
    (DP=2 == DP=1 on one global batch is test_contrastive_loss_and_gradients_on_two_ranks_equal_one_rank:
    the loader splits shards by rank, so runs at two DP sizes see other batches.)"""
    from safetensors.torch import load_file

    from vlm_train.build import build_model
    from vlm_train.config import compose

    common = ("train.max_steps=6", "train.precision=fp32", "train.micro_batch_size=8")
    data, runs = tmp_path / "captions", {0: tmp_path / "zero0", 3: tmp_path / "zero3"}
    for stage, run in runs.items():
        extra = ("parallel.zero3_persistence_threshold=0", "train.eval=true") if stage == 3 else ("train.eval=false",)
        overrides = pretraining_overrides("toy-clip", data, run, *common, f"parallel.zero_stage={stage}", *extra)
        done = run_cli(overrides, nproc=2, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    losses = [{r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r} for run in runs.values()]
    assert len(losses[0]) == 6 and losses[0][6] < losses[0][1]
    for step, loss in losses[0].items():
        assert abs(losses[1][step] - loss) < 1e-5, (step, losses)
    evaluation = [r for r in read_metrics(runs[3]) if "eval_retrieval_i2t" in r][-1]
    assert evaluation["eval_retrieval_chance"] < 0.1 and evaluation["eval_samples"] == 64
    saved = load_file(runs[3] / "hf" / "model.safetensors")
    assert "logit_scale" in saved and "text_model.embeddings.token_embedding.weight" in saved
    vlm = build_model(compose(["experiment=toy", f"vision.path={runs[3] / 'hf'}"]))
    for name, tensor in vlm.vision.hf_model.state_dict().items():
        assert torch.equal(tensor, saved[f"vision_model.{name}"]), name


def test_pretraining_samples_without_text_or_image_are_counted_skips():
    """A document without text, a caption pair without its caption or image: counted skips, not crashes."""
    from vlm_train.config import compose
    from vlm_train.data.pipeline import SampleEncoder
    from vlm_train.data.preprocess import ImageTransform
    from vlm_train.data.reader import SkippedSample
    from vlm_train.data.tokenizer import build_toy_tokenizer

    tokenizer, transform = build_toy_tokenizer(relations=True), ImageTransform(48, (0.5,) * 3, (0.5,) * 3)
    documents = SampleEncoder(compose(["experiment=toy-lm"]).data, tokenizer, transform, 0)
    key, pixels, encoded = documents({"__key__": "a", "txt": b"USER: a red circle top . ASSISTANT: red"})
    assert pixels.shape[0] == 0 and encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.labels[1:] == encoded.input_ids[1:] and encoded.input_ids[-1] == tokenizer.eos_token_id
    for bad in ({"__key__": "b", "json": b'{"conversations": []}'}, {"__key__": "c", "txt": b"  "}):
        assert documents.encode(bad) == SkippedSample("missing_field", bad["__key__"])
    captions = SampleEncoder(compose(["experiment=toy-clip"]).data, tokenizer, transform, 0)
    assert captions.encode({"__key__": "d", "txt": b"a red circle"}) == SkippedSample("image_token_mismatch", "d")
    assert captions.encode({"__key__": "e", "png": b"not a png", "txt": b"a red circle"}).reason == "bad_image"
