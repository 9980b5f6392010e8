"""The five connectors: each builds, trains and handles text-only batches; cross-attention and
modality norms leave the plain LLM exactly as it was where no image is involved."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_models import make_batch
from vlm_train import build_model, compose
from vlm_train.data.tokenizer import build_toy_tokenizer
from vlm_train.models.connectors import CONNECTORS, count_trainable
from vlm_train.models.vlm import IGNORE_INDEX

TOKENIZER = build_toy_tokenizer()


def toy_model(connector: str, *extra: str):
    torch.manual_seed(0)
    return build_model(compose(["experiment=toy", f"connector={connector}", *extra]), TOKENIZER)


ANSWERS = ("red", "green", "blue")  # one colour fills each image: the answer is in the pixels only


def colour_images(count: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """`count` uint8 images, each one noisy colour, the colours in turn (balanced), with that colour's name."""
    from vlm_train.data.synthetic import COLORS

    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        colour = ANSWERS[i % len(ANSWERS)]
        noise = torch.randint(-20, 21, (3, 48, 48), generator=generator)
        images.append(((torch.tensor(COLORS[colour]).view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8), colour))
    return images


def colour_batch(model, images: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, ...]:
    """Every sample asks the same question; only its image tells the answer (the last token, the only label)."""
    question = TOKENIZER("what color is the image ?", add_special_tokens=False).input_ids
    slots = [model.image_token_id] * model.num_image_tokens
    ids, labels = [], []
    for _, colour in images:
        answer = TOKENIZER.convert_tokens_to_ids(colour)
        ids.append([TOKENIZER.bos_token_id, *slots, *question, answer])
        labels.append([IGNORE_INDEX] * (len(ids[-1]) - 1) + [answer])
    ids_BT = torch.tensor(ids)
    return torch.stack([pixels for pixels, _ in images]), ids_BT, torch.ones_like(ids_BT), torch.tensor(labels)


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_connector_trains_with_and_without_images(connector):
    """10 steps on images whose colour is the answer, then held-out images: the loss beats ln 3, the
    least any image-blind model can reach on balanced answers to one question, and swapping the
    images between samples makes it worse (an image-blind connector fails both)."""
    model = toy_model(connector, "vision.freeze=false")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    train, held_out = colour_images(24, seed=1), colour_images(12, seed=2)
    losses = []
    for step in range(10):
        out = model(*colour_batch(model, train[8 * (step % 3) : 8 * (step % 3) + 8]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    pixels, input_ids, mask, labels = colour_batch(model, held_out)
    with torch.no_grad():
        seen = model(pixels, input_ids, mask, labels).loss.item()
        swapped = model(pixels.roll(1, 0), input_ids, mask, labels).loss.item()  # every image now another colour
        accuracy = (model(pixels, input_ids, mask).logits[:, -2].argmax(-1) == labels[:, -1]).float().mean().item()
    assert seen < math.log(len(ANSWERS)) - 0.2 and swapped > seen + 0.5, (seen, swapped)
    assert accuracy >= 2 / 3, accuracy  # a blind model answers one colour for all: 1/3
    text_only = model(*make_batch(model, TOKENIZER, with_image=(False, False)))
    text_only.loss.backward()  # the vision path stays in the graph (ZeRO-3 needs it), contributing 0
    assert count_trainable(model.connector) > 0


def test_connectors_report_their_visual_tokens():
    assert toy_model("mlp").num_image_tokens == 9  # one per patch
    assert toy_model("qformer", "connector.num_queries=5").num_image_tokens == 5
    assert toy_model("perceiver", "connector.num_latents=4").num_image_tokens == 4
    assert toy_model("cross_attention").num_image_tokens == 1  # marks where the image is


def plain_llm_logits(model, input_ids, mask):
    return model.llm(model.llm.embed(input_ids), mask)


def test_cross_attention_starts_as_the_plain_llm():
    model = toy_model("cross_attention").eval()
    pixel_values, input_ids, mask, _ = make_batch(model, TOKENIZER)
    assert len(model.connector.blocks) == len(model.llm.decoder_layers())
    torch.testing.assert_close(
        model(pixel_values, input_ids, mask).logits, plain_llm_logits(model, input_ids, mask), rtol=0, atol=0
    )


def test_cross_attention_gates_receive_gradients():
    model = toy_model("cross_attention")
    model(*make_batch(model, TOKENIZER)).loss.backward()
    for block in model.connector.blocks:
        assert block.attn_gate.grad.abs().item() > 0 and block.ff_gate.grad.abs().item() > 0


def test_cross_attention_tokens_before_an_image_do_not_see_it():
    model = toy_model("cross_attention").eval()
    for block in model.connector.blocks:  # open the gates so images matter
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(1.0)
    pixel_values, input_ids, mask, _ = make_batch(model, TOKENIZER)
    image_at = int((input_ids[0] == model.image_token_id).nonzero()[0])
    assert image_at > 1
    a = model(pixel_values, input_ids, mask).logits
    b = model(torch.randn_like(pixel_values), input_ids, mask).logits
    torch.testing.assert_close(a[:, :image_at], b[:, :image_at], rtol=0, atol=0)
    assert (a[:, image_at:] - b[:, image_at:]).abs().max() > 1e-3
    # and a sample only sees its own image: changing sample 1's image leaves sample 0 alone
    other = pixel_values.clone()
    other[1] = torch.randn_like(other[1])
    torch.testing.assert_close(model(other, input_ids, mask).logits[0], a[0], rtol=0, atol=0)


def test_ln_adapter_modality_norms_train_alone_and_leave_text_exact():
    model = toy_model("ln_adapter", "connector.modality_norms=true", "connector.train_projection=false")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector.scale", "connector.shift"} | {
        name for name, _ in model.connector.image_norms.named_parameters(prefix="connector.image_norms")
    }
    assert len(model.connector.image_norms) == len(model.llm.norm_modules()) == 2 * 2 + 1
    model.eval()
    for affine in model.connector.image_norms:  # as after training: image affines differ
        affine.weight.data.mul_(1.5)
    pixel_values, input_ids, mask, labels = make_batch(model, TOKENIZER, with_image=(False, False))
    torch.testing.assert_close(
        model(pixel_values, input_ids, mask).logits, plain_llm_logits(model, input_ids, mask), rtol=0, atol=0
    )
    pixel_values, input_ids, mask, labels = make_batch(model, TOKENIZER)
    image_at = int((input_ids[0] == model.image_token_id).nonzero()[0])
    with_images = model(pixel_values, input_ids, mask).logits
    torch.testing.assert_close(with_images[:, :image_at], plain_llm_logits(model, input_ids, mask)[:, :image_at])
    model(pixel_values, input_ids, mask, labels).loss.backward()
    assert all(p.grad is not None for p in model.connector.image_norms.parameters())


def test_ln_adapter_is_tiny():
    mlp, adapter = toy_model("mlp"), toy_model("ln_adapter", "connector.train_projection=false")
    assert count_trainable(adapter.connector) == 2 * 64  # scale and shift over the tower width
    assert count_trainable(adapter.connector) <= 0.05 * count_trainable(mlp.connector)


@pytest.fixture(scope="module")
def half_text_only_shards(tmp_path_factory) -> str:
    """Two shards of 32: one of image samples, one of text-only samples. With 2 ranks each rank
    gets one whole shard, so at every step one rank's micro-batch has no image at all."""
    import json
    import random

    import webdataset as wds

    from vlm_train.data.synthetic import make_sample

    folder, rng = tmp_path_factory.mktemp("mixed"), random.Random(0)
    with wds.TarWriter(str(folder / "part-0.tar")) as sink:
        for i in range(32):
            png, record = make_sample(rng)
            sink.write({"__key__": f"img{i:03d}", "png": png, "json": json.dumps(record).encode()})
    with wds.TarWriter(str(folder / "part-1.tar")) as sink:
        for i in range(32):
            turns = [{"from": "human", "value": "what color is the circle ?"}, {"from": "gpt", "value": "red"}]
            sink.write({"__key__": f"txt{i:03d}", "json": json.dumps({"conversations": turns}).encode()})
    return str(folder / "part-{0..1}.tar")


@pytest.mark.slow
@pytest.mark.parametrize("connector", [*sorted(CONNECTORS), "ln_adapter connector.modality_norms=true"])
def test_connector_trains_under_zero3_when_a_rank_has_no_image(connector, half_text_only_shards, tmp_path):
    from tests.helpers import run_cli, step_losses

    name, *options = connector.split()
    overrides = [
        "experiment=toy",
        f"connector={name}",
        *options,
        f"data.urls={half_text_only_shards}",
        f"run.dir={tmp_path}",
        "parallel.zero_stage=3",
        "vision.freeze=false",
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.max_steps=8",
        "train.warmup_steps=1",
        "train.lr=2e-3",
        "train.log_every=1",
        "train.eval=false",
    ]
    result = run_cli(overrides, nproc=2, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2
