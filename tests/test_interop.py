"""Hugging Face parity on tiny random configs: HF model -> from_hf -> our logits equal HF's, and
our model -> to_hf -> transformers.from_pretrained -> the same logits again."""

from __future__ import annotations

import pytest
import torch

from vlm_train.errors import ConfigError
from vlm_train.interop import from_hf, to_hf

IMAGE_TOKEN = 60
VOCAB = 64


def tiny_llava(image_token: int = IMAGE_TOKEN):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token)
    return LlavaForConditionalGeneration(config), 4  # 2x2 patches, CLS dropped


def tiny_blip2(image_token: int = IMAGE_TOKEN):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32
        ),
        text_config=OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
        ).to_dict(),
        num_query_tokens=5,
        image_token_index=image_token,
    )
    return Blip2ForConditionalGeneration(config), 5


def tiny_idefics2(image_token: int = IMAGE_TOKEN):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        perceiver_config=dict(
            hidden_size=32,
            resampler_n_latents=3,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=8,
            num_key_value_heads=2,
        ),
        text_config=dict(
            model_type="mistral",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_token_id=image_token,
    )
    return Idefics2ForConditionalGeneration(config), 3


FAMILIES = {"llava": tiny_llava, "blip2": tiny_blip2, "idefics2": tiny_idefics2}


def inputs(tokens_per_image: int, image_token: int = IMAGE_TOKEN):
    """Two samples, one image each, text around the expanded image-token slots."""
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 28, 28)
    rows = []
    for offset in (0, 7):
        text_before = [(offset + i) % 40 + 10 for i in range(3)]
        text_after = [(offset + i) % 40 + 15 for i in range(4)]
        rows.append(text_before + [image_token] * tokens_per_image + text_after)
    return pixel_values, torch.tensor(rows)


def hf_logits(family: str, hf_model, pixel_values, input_ids):
    if family == "idefics2":
        pixel_values = pixel_values[:, None]  # [B, images per sample, C, H, W]
    with torch.no_grad():
        return hf_model(pixel_values=pixel_values, input_ids=input_ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_and_export_keep_the_logits(family, tmp_path):
    from transformers import AutoConfig

    torch.manual_seed(0)
    hf_model, tokens_per_image = FAMILIES[family]()
    hf_model.eval().save_pretrained(tmp_path / "hf")
    pixel_values, input_ids = inputs(tokens_per_image)
    reference = hf_logits(family, hf_model, pixel_values, input_ids)

    assert (
        hf_logits(family, hf_model, pixel_values.flip(0), input_ids) - reference
    ).abs().max() > 1e-4  # images matter
    ours = from_hf(tmp_path / "hf").eval()
    assert ours.num_image_tokens == tokens_per_image
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values, input_ids).logits, reference, rtol=0, atol=1e-4)

    to_hf(ours, tmp_path / "exported")
    hf_class = type(hf_model)
    assert AutoConfig.from_pretrained(tmp_path / "exported").model_type == hf_model.config.model_type
    reloaded = hf_class.from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(hf_logits(family, reloaded, pixel_values, input_ids), reference, rtol=0, atol=1e-4)


def test_trained_llava_exports_what_it_learned(tmp_path):
    torch.manual_seed(0)
    hf_model, tokens_per_image = tiny_llava()
    hf_model.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    pixel_values, input_ids = inputs(tokens_per_image)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    for _ in range(3):
        loss = ours(pixel_values, input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ours.eval()
    to_hf(ours, tmp_path / "trained")
    reloaded = type(hf_model).from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            hf_logits("llava", reloaded, pixel_values, input_ids),
            ours(pixel_values, input_ids).logits,
            rtol=0,
            atol=1e-4,
        )
        assert (
            hf_logits("llava", hf_model.eval(), pixel_values, input_ids) - ours(pixel_values, input_ids).logits
        ).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vlm_convert_from_hf_gives_pieces_vlm_train_builds_again(family, tmp_path):
    """HF VLM -> `vlm-convert from-hf` -> the printed overrides -> build_model: the HF logits."""
    import contextlib
    import io

    from vlm_train import build_model, compose
    from vlm_train.convert import main as convert
    from vlm_train.data.tokenizer import IMAGE_TOKEN as IMAGE
    from vlm_train.data.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids(IMAGE)
    torch.manual_seed(0)
    hf_model, tokens_per_image = FAMILIES[family](image_token)
    hf_model.eval().save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "pieces")]) == 0
    overrides = printed.getvalue().split()
    ours = build_model(compose(["experiment=toy", *overrides])).eval()
    pixel_values, input_ids = inputs(tokens_per_image, image_token)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixel_values, input_ids).logits,
            hf_logits(family, hf_model, pixel_values, input_ids),
            rtol=0,
            atol=1e-4,
        )


def test_idefics2_takes_its_processors_split_padded_multi_image_batches(tmp_path):
    """Idefics2's image processor output as is: images split into 4 crops + the whole, padded to the
    batch's largest ([B, images, 3, H, W] with `pixel_attention_mask`), a sample with two images
    next to one with one (all-zero padding images). Logits equal transformers' both directions."""
    import numpy as np
    from transformers import Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil

    torch.manual_seed(0)
    hf_model, latents = tiny_idefics2()
    hf_model.eval().save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sample] for sample in SPLIT_SIZES]
    processor = Idefics2ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 56, "shortest_edge": 28})
    inputs = dict(processor(images, return_tensors="pt"))
    assert inputs["pixel_values"].shape[:2] == (2, 10) and not inputs["pixel_attention_mask"].all()
    slots = [[IMAGE_TOKEN] * (5 * latents * len(sample)) for sample in SPLIT_SIZES]  # 5 views per image
    rows = [[11, 12, *slots[0], 13], [14, *slots[1], 15, 16, 17]]
    input_ids = torch.tensor([row + [0] * (len(rows[0]) - len(row)) for row in rows])
    with torch.no_grad():
        reference = hf_model(input_ids=input_ids, **inputs).logits
        ours = from_hf(tmp_path / "hf").eval()
        torch.testing.assert_close(ours(input_ids=input_ids, **inputs).logits, reference, rtol=0, atol=1e-4)
        unmasked = {**inputs, "pixel_attention_mask": torch.ones_like(inputs["pixel_attention_mask"])}
        assert (ours(input_ids=input_ids, **unmasked).logits - reference).abs().max() > 1e-4  # the mask matters
    to_hf(ours, tmp_path / "exported")
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, **inputs).logits, reference, rtol=0, atol=1e-4)


SPLIT_SIZES = [[(40, 90), (70, 30)], [(50, 50)]]  # (height, width) per image, per sample


def test_inputs_a_model_cannot_read_are_one_line_errors(tmp_path):
    """A LLaVA model given Idefics2-style padded images, or AnyRes image_sizes, says why in one line."""
    torch.manual_seed(0)
    hf_model, tokens = tiny_llava()
    hf_model.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    pixel_values, input_ids = inputs(tokens)
    padded = torch.ones(2, 28, 28, dtype=torch.long)
    padded[:, :, 20:] = 0
    with pytest.raises(ValueError, match="a clip tower cannot mask") as raised:
        ours(pixel_values, input_ids, pixel_attention_mask=padded)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="image_sizes are for AnyRes models"):
        ours(pixel_values, input_ids, image_sizes=torch.tensor([[28, 28], [28, 28]]))
    with pytest.raises(ValueError, match="expected \\[images, 3, H, W\\]"):
        ours(pixel_values[None, None], input_ids)


def test_unknown_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="'gpt2' model"):
        from_hf(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf(tmp_path / "missing")


@pytest.mark.slow
def test_vlm_convert_exports_a_trained_zero3_run(toy_data, tmp_path):
    """A run trained under ZeRO-3 -> `vlm-convert to-hf` -> transformers' LLaVA gives our logits."""
    import subprocess
    import sys

    from transformers import LlavaForConditionalGeneration

    from tests.helpers import make_batch, run_cli, toy_overrides
    from vlm_train.convert import rebuild_trained_model
    from vlm_train.training.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    result = run_cli(toy_overrides(toy_data, run_dir, "parallel.zero_stage=3", "train.max_steps=2"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    convert = [sys.executable, "-m", "vlm_train.convert", "to-hf", str(run_dir), str(tmp_path / "hf")]
    assert subprocess.run(convert, capture_output=True, text=True).returncode == 0

    # Checkpoints leave the frozen tower out: it is rebuilt from the run's seed, trained weights loaded.
    _, tokenizer, ours = rebuild_trained_model(latest_checkpoint(run_dir))
    ours.eval()
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pixel_values, input_ids, mask, _ = make_batch(ours, tokenizer)
    with torch.no_grad():
        expected = ours(pixel_values, input_ids, mask).logits
        got = hf_model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
