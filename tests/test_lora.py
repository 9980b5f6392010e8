"""LoRA (vision.lora, llm.lora): the base model exactly at the start, only the updates train, the same
losses at ZeRO-0 and ZeRO-3, checkpoints holding only what trains, the updates merged into the
export (transformers gives the trained model's logits), an exact resume after kill -9, and targets
that match nothing refused in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import make_batch, run_cli, step_losses, toy_model, toy_overrides

LORA = ("llm.lora.rank=4", "llm.lora.alpha=8", "vision.lora.rank=2", "vision.lora.targets=[q_proj,v_proj]")


def test_lora_starts_from_the_base_model_exactly_and_only_the_updates_train():
    """B = 0: the same logits, bit for bit; the decoder's 14 linear layers (not its output head) and
    the tower's q/v projections carry updates; the base weights are frozen, the connector trains."""
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.models.lora import lora_layers

    tokenizer = build_toy_tokenizer()
    base, lora = toy_model(tokenizer=tokenizer).eval(), toy_model(*LORA, tokenizer=tokenizer).eval()
    batch = make_batch(base, tokenizer)
    with torch.no_grad():
        assert torch.equal(base(*batch[:3]).logits, lora(*batch[:3]).logits)
    names = [name for name, _ in lora_layers(lora)]
    assert sum(name.startswith("llm.") for name in names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert sorted({n.rsplit(".", 1)[-1] for n in names if n.startswith("vision.")}) == ["q_proj", "v_proj"]
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert all(".lora." in name for name in trainable if not name.startswith("connector."))
    assert any(name.startswith("connector.") for name in trainable)
    with torch.no_grad():
        for _, layer in lora_layers(lora):
            layer.lora.lora_B.weight.normal_()
        moved = lora(*batch[:3]).logits
        from vlm_train.models.lora import lora_disabled

        with lora_disabled(lora):
            assert torch.equal(lora(*batch[:3]).logits, base(*batch[:3]).logits)
    assert not torch.allclose(moved, base(*batch[:3]).logits)


def test_connector_lora_trains_only_its_updates_and_starts_from_the_connector():
    """connector.lora: the MLP projector's two linear layers carry updates, only they train there, and
    the model starts as it was (B = 0); a target that is no layer of the connector is one line."""
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.errors import ConfigError
    from vlm_train.models.lora import lora_layers

    tokenizer = build_toy_tokenizer()
    base, model = toy_model(tokenizer=tokenizer).eval(), toy_model("connector.lora.rank=4", tokenizer=tokenizer).eval()
    assert len([n for n, _ in lora_layers(model) if n.startswith("connector.")]) == 2
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("connector.")]
    assert trained and all(".lora." in n for n in trained)
    batch = make_batch(base, tokenizer)
    with torch.no_grad():
        assert torch.equal(base(*batch[:3]).logits, model(*batch[:3]).logits)
    with pytest.raises(ConfigError, match=r"connector.lora.targets=\['q_proj'\]"):
        toy_model("connector.lora.rank=4", "connector.lora.targets=[q_proj]")


def test_the_updates_export_as_a_peft_adapter_that_peft_puts_back_on_the_base(tmp_path):
    """`to_hf(..., lora="adapter")`: the base LLaVA in the folder (LoRA'd layers at their base weights),
    the updates in folder/lora; peft.PeftModel on that base gives the trained model's logits (1e-5),
    with the tower's rank (2) and the decoder's (4) told apart (rank_pattern)."""
    import json

    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.interop import to_hf
    from vlm_train.models.lora import lora_layers

    tokenizer = build_toy_tokenizer()
    model = toy_model(*LORA, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.lora_B.weight.normal_(std=0.05)
    pixel_values, input_ids, mask, _ = make_batch(model, tokenizer)
    with torch.no_grad():
        expected = model(pixel_values, input_ids, mask).logits
    to_hf(model, tmp_path / "hf", tokenizer, template="chat", lora="adapter")
    config = json.loads((tmp_path / "hf" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2} and len(config["target_modules"]) == 18
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask)
    with torch.no_grad():
        assert (base(**inputs).logits - expected).abs().max() > 1e-3  # the base alone is not the trained model
        got = PeftModel.from_pretrained(base, tmp_path / "hf" / "lora").eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lora_targets_that_match_nothing_are_one_line_errors():
    from vlm_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"llm.lora.targets=\['q_proj', 'qkv'\]: \['qkv'\] matches no linear layer"):
        toy_model("llm.lora.rank=4", "llm.lora.targets=[q_proj,qkv]")
    result = run_cli(["experiment=toy", "llm.lora.rank=4", "llm.lora.targets=[attn]", "train.max_steps=1"])
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("vlm-train: error: llm.lora")
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="llm.lora: rank=-1"):
        toy_model("llm.lora.rank=-1")
    from vlm_train.models.lora import lora_layers

    fused = toy_model("llm.lora.rank=4", "llm.lora.targets=[linear_qkv]")  # megatron's name for q/k/v
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(fused)}) == ["k_proj", "q_proj", "v_proj"]


@pytest.mark.slow
def test_lora_trains_alike_at_zero_0_and_3_keeps_only_the_updates_and_exports_them_merged(toy_data, tmp_path):
    """fp32, 2 ranks, 8 steps: ZeRO-3's per-step losses equal ZeRO-0's (1e-6 relative) and fall; a
    LoRA checkpoint holds the updates and the connector only (a small fraction of a full fine-tune's);
    `vlm-convert to-hf` of the ZeRO-3 run merges the updates: transformers' LLaVA gives the trained
    model's logits (1e-4), which differ from the base model's."""
    from transformers import LlavaForConditionalGeneration

    from vlm_train.convert import rebuild_trained_model
    from vlm_train.models.lora import lora_disabled
    from vlm_train.training.checkpoint import latest_checkpoint

    common = (
        "train.max_steps=8",
        "train.precision=fp32",
        "train.lr=2e-3",
        "train.warmup_steps=1",
        "train.save_every=4",
    )
    losses, sizes = {}, {}
    for name, extra in {"zero0": ("parallel.zero_stage=0", *LORA), "zero3": ("parallel.zero_stage=3", *LORA),
                        "full": ("parallel.zero_stage=0",)}.items():  # fmt: skip
        result = run_cli(toy_overrides(toy_data, tmp_path / name, *common, *extra), nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = list(step_losses(tmp_path / name).values())
        sizes[name] = sum(
            f.stat().st_size for f in (tmp_path / name / "checkpoints" / "step_8").rglob("*") if f.is_file()
        )
    assert losses["zero3"] == pytest.approx(losses["zero0"], rel=1e-6, abs=0)
    assert sum(losses["zero0"][-2:]) < sum(losses["zero0"][:2])
    assert sizes["zero0"] < 0.25 * sizes["full"], sizes  # numbers in docs/lora.md
    convert = [sys.executable, "-m", "vlm_train.convert", "to-hf", str(tmp_path / "zero3"), str(tmp_path / "hf")]
    assert subprocess.run(convert, capture_output=True, text=True).returncode == 0
    _, tokenizer, ours = rebuild_trained_model(latest_checkpoint(tmp_path / "zero3"))
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pixel_values, input_ids, mask, _ = make_batch(ours.eval(), tokenizer)
    with torch.no_grad():
        expected = ours(pixel_values, input_ids, mask).logits
        got = exported(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits
        with lora_disabled(ours):
            base = ours(pixel_values, input_ids, mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (expected - base).abs().max() > 1e-3  # the updates trained, and the export carries them


@pytest.mark.slow
def test_a_lora_run_resumes_bit_identical_after_kill_9(toy_data, tmp_path):
    """2 ranks, ZeRO-3, LoRA on tower and decoder: SIGKILLed after step 9, restarted from its step-8
    checkpoint, it logs the uninterrupted run's 20 losses exactly."""
    from tests.helpers import kill_9_and_resume

    def overrides(run_dir):
        return toy_overrides(
            toy_data, run_dir, *LORA, "parallel.zero_stage=3", "train.max_steps=20", "train.save_every=4",
            "train.precision=fp32", "train.warmup_steps=2", "data.shuffle_block=8", f"data.log_keys={run_dir}/keys",
        )  # fmt: skip

    kill_9_and_resume(overrides, nproc=2, root=tmp_path, timeout=400)
