"""The model on tiny CLIP and SigLIP towers with a Llama decoder: forward, backward, contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_batch
from vlm_train import build_model, compose
from vlm_train.data.tokenizer import build_toy_tokenizer
from vlm_train.models.vlm import IGNORE_INDEX


@pytest.mark.parametrize("vision", ["clip-tiny", "siglip-tiny"])
def test_forward_backward(vision):
    torch.manual_seed(0)
    tokenizer = build_toy_tokenizer()
    model = build_model(compose(["experiment=toy", f"vision={vision}", "vision.freeze=false"]), tokenizer)
    pixel_values, input_ids, mask, labels = make_batch(model, tokenizer)
    out = model(pixel_values, input_ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (*input_ids.shape, len(tokenizer))
    # .loss is cross-entropy over answer tokens only
    shifted = labels[:, 1:]
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.num_label_tokens == (shifted != IGNORE_INDEX).sum()
    out.loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, f"{name}: gradient only where it trains"
    assert sum(p.requires_grad for p in model.vision.parameters()) > len(model.vision.unused_parameters())
    assert model.vision.hf_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_siglip_keeps_all_patches_and_clip_drops_cls():
    tokenizer = build_toy_tokenizer()
    for vision in ("clip-tiny", "siglip-tiny"):
        model = build_model(compose(["experiment=toy", f"vision={vision}"]), tokenizer)
        features = model.vision(torch.randn(2, 3, 48, 48))
        assert features.shape == (2, 9, 64)


def test_images_change_the_logits_only_after_their_position():
    torch.manual_seed(0)
    tokenizer = build_toy_tokenizer()
    model = build_model(compose(["experiment=toy"]), tokenizer).eval()
    pixel_values, input_ids, mask, _ = make_batch(model, tokenizer)
    first_slot = int((input_ids[0] == model.image_token_id).nonzero()[0])
    a = model(pixel_values, input_ids, mask).logits
    b = model(torch.randn_like(pixel_values), input_ids, mask).logits
    torch.testing.assert_close(a[:, :first_slot], b[:, :first_slot])
    assert (a[:, first_slot:] - b[:, first_slot:]).abs().max() > 1e-4


def test_text_only_batch_keeps_vision_in_the_graph():
    """A rank whose micro-batch has no image must still touch the tower (ZeRO-3 would hang)."""
    tokenizer = build_toy_tokenizer()
    model = build_model(compose(["experiment=toy", "vision.freeze=false"]), tokenizer)
    pixel_values, input_ids, mask, labels = make_batch(model, tokenizer, with_image=(False, False))
    assert pixel_values.shape[0] == 0
    model(pixel_values, input_ids, mask, labels).loss.backward()
    grad = model.vision.hf_model.embeddings.patch_embedding.weight.grad
    assert grad is not None and grad.abs().sum() == 0


def test_image_token_count_mismatch_is_reported():
    tokenizer = build_toy_tokenizer()
    model = build_model(compose(["experiment=toy"]), tokenizer)
    pixel_values, input_ids, mask, labels = make_batch(model, tokenizer, with_image=(True, False))
    with pytest.raises(ValueError, match="image-token slots"):
        model(torch.cat([pixel_values, pixel_values]), input_ids, mask, labels)


def test_freezing_follows_the_config():
    model = build_model(compose(["experiment=toy", "vision.freeze=true", "llm.freeze=true"]))
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector"}


def test_greedy_generation_never_emits_the_image_token():
    """A barely trained model may rank the image token first; generated, it would open an image
    slot with no pixels behind it and the next forward would fail."""
    from vlm_train.training.evaluate import greedy_generate

    tokenizer = build_toy_tokenizer()
    model = build_model(compose(["experiment=toy"]), tokenizer).eval()
    pixel_values, input_ids, _, _ = make_batch(model, tokenizer)

    def favour_the_image_token(_module, _inputs, out):
        out.logits[..., model.image_token_id] += 1e4
        return out

    model.register_forward_hook(favour_the_image_token)
    prompts = [row.tolist() for row in input_ids]
    answers = greedy_generate(
        model, pixel_values, prompts, 3, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu")
    )
    assert all(model.image_token_id not in answer for answer in answers)
