"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL) against transformers: logit parity of the import and the
export on tiny random models, with images of three sizes, a multi-image sample and a video; and a
packed batch's per-token losses against the unpacked batch's (M-RoPE positions per sample)."""

from __future__ import annotations

import pytest
import torch

from tests.qwen_helpers import END, FAMILIES, IMAGE, START, TINY, qwen_batch, tiny_hf
from vlm_train.interop import from_hf, to_hf
from vlm_train.models.vlm import IGNORE_INDEX

SAMPLES = {
    "three sizes": [
        [5, 6, ("image", (1, 4, 6)), 7, 8],
        [9, ("image", (1, 6, 4)), 10, 11, 12, 13],
        [14, 15, 16, ("image", (1, 2, 8)), 17],
    ],
    "multi-image": [[5, ("image", (1, 4, 4)), 6, ("image", (1, 2, 6)), 7, 8], [9, 10, 11]],
    "video": [[5, 6, ("video", (2, 4, 4)), 7, 8, 9], [10, ("image", (1, 4, 2)), 11]],
}


def ours(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    return model(inputs.pop("pixel_values", None), **inputs).logits


def real(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_and_export_give_transformers_logits(family, tmp_path):
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf").eval()
    to_hf(model, tmp_path / "export")
    import transformers

    exported = getattr(transformers, type(hf).__name__).from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        for name, samples in SAMPLES.items():
            batch = qwen_batch(samples, family=family)
            expected = real(hf(**batch).logits, batch)
            got = real(ours(model, batch), batch)
            assert (got - expected).abs().max() < 1e-4, name
            back = real(exported(**batch).logits, batch)
            assert (back - expected).abs().max() < 1e-4, name


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_are_transformers_rope_index(family):
    hf = tiny_hf(family)
    model = from_hf_model(hf)
    for samples in SAMPLES.values():
        batch = qwen_batch(samples, family=family)
        expected, _ = hf.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"),
            batch.get("video_grid_thw"), attention_mask=batch["attention_mask"],
        )  # fmt: skip
        grids = (batch.get("image_grid_thw"), batch.get("video_grid_thw"))
        got = model.mrope_positions(batch["input_ids"], batch["attention_mask"], grids, None)
        mask = batch["attention_mask"].bool()
        assert torch.equal(got[:, mask], expected[:, mask])


def from_hf_model(hf):
    from vlm_train.interop.qwen_vl import qwen_vl_model

    return qwen_vl_model(hf).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_batch_gives_the_unpacked_per_token_losses(family):
    """Three samples (multi-image, video, text) in one packed row: each token's loss equals its loss
    in the unpacked batch (1e-5), so M-RoPE positions restart per sample and attention stays in it."""
    from vlm_train.models.llm import CausalLM
    from vlm_train.models.varlen_attention import register_varlen_attention

    model = from_hf_model(tiny_hf(family))
    assert isinstance(model.llm, CausalLM)
    model.llm.hf_model.model.config._attn_implementation = register_varlen_attention()
    samples = SAMPLES["multi-image"][:1] + SAMPLES["video"][:1] + [[20, 21, 22, 23, 24]]
    batch = qwen_batch(samples, family=family)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    lengths = batch["attention_mask"].sum(1).tolist()
    packed = {k: v for k, v in batch.items() if "grid" in k or "pixel" in k}
    ids = [batch["input_ids"][row, :n] for row, n in enumerate(lengths)]
    packed["input_ids"] = torch.cat(ids)[None]
    packed["attention_mask"] = torch.cat([torch.full((n,), row + 1) for row, n in enumerate(lengths)])[None]
    with torch.no_grad():
        unpacked_logits = ours(model, batch)
        packed_logits = ours(model, packed)
    per_token = torch.nn.functional.cross_entropy
    expected = torch.cat(
        [per_token(unpacked_logits[row, : n - 1], labels[row, 1:n], reduction="none") for row, n in enumerate(lengths)]
    )
    starts = torch.tensor([0, *lengths]).cumsum(0)
    got = torch.cat(
        [per_token(packed_logits[0, s : e - 1], packed["input_ids"][0, s + 1 : e], reduction="none")
         for s, e in zip(starts[:-1].tolist(), starts[1:].tolist())]
    )  # fmt: skip
    assert (got - expected).abs().max() < 1e-5


def test_vlm_plan_sizes_qwen2_5_vl_7b_from_a_config_only_folder(tmp_path, capsys):
    """The preset composes and builds at meta size: 8,292,166,656 parameters (Qwen2.5-VL-7B's, the
    count transformers' own model has), the ViT frozen, merger and decoder trained, ZeRO-3 fits 80 GB."""
    import transformers

    from tests.helpers import QWEN2_5_VL_7B_CONFIG, QWEN2_VL_TOKENIZER, write_config_only_folder
    from vlm_train.plan import main

    folder = write_config_only_folder(tmp_path / "qwen2_5-vl-7b", QWEN2_5_VL_7B_CONFIG, QWEN2_VL_TOKENIZER)
    code = main(["experiment=qwen2_5-vl-7b-sft", f"vision.path={folder}", f"llm.path={folder}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    with torch.device("meta"):
        config = transformers.Qwen2_5_VLConfig.from_pretrained(folder)
        reference = sum(p.numel() for p in transformers.Qwen2_5_VLForConditionalGeneration(config).parameters())
    assert reference == 8_292_166_656
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.split()[:1] in (["vision"], ["connector"], ["llm"], ["total"])
    }
    assert rows["vision"] == ["0", "631,975,680"] and rows["connector"] == ["44,574,464", "0"]
    assert sum(int(n.replace(",", "")) for n in rows["total"]) == reference
    assert "this config (ZeRO-3, TP=1, llm.activation_checkpointing=true)" in out and "fits 80GB" in out


def test_vlm_plan_sizes_qwen3_vl_8b_from_a_config_only_folder(tmp_path, capsys):
    """experiment=qwen3-vl-8b-sft builds at meta size: 8,767,123,696 parameters, transformers' own count
    (its ViT 415,891,440 frozen; the merger and the three DeepStack mergers 160,496,896)."""
    import transformers

    from tests.helpers import QWEN2_VL_TOKENIZER, QWEN3_VL_8B_CONFIG, write_config_only_folder
    from vlm_train.plan import main

    folder = write_config_only_folder(tmp_path / "qwen3-vl-8b", QWEN3_VL_8B_CONFIG, QWEN2_VL_TOKENIZER)
    code = main(["experiment=qwen3-vl-8b-sft", f"vision.path={folder}", f"llm.path={folder}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    with torch.device("meta"):
        config = transformers.Qwen3VLConfig.from_pretrained(folder)
        reference = sum(p.numel() for p in transformers.Qwen3VLForConditionalGeneration(config).parameters())
    assert reference == 8_767_123_696
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.split()[:1] in (["vision"], ["connector"], ["total"])
    }
    assert rows["vision"] == ["0", "415,891,440"] and rows["connector"] == ["160,496,896", "0"]
    assert sum(int(n.replace(",", "")) for n in rows["total"]) == reference


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_tiny_qwen_vl_builds_from_sizes_and_exports(family, tmp_path):
    """`vision.family=qwen2_5_vl|qwen3_vl` from the size fields: a model transformers loads back after
    export, with the same logits, and whose gradient reaches tower, merger(s) and decoder."""
    import transformers

    from tests.helpers import toy_model
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.interop.qwen_vl import QWEN_VL_CLASSES

    model = toy_model(*TINY[family], "vision.freeze=false").eval()
    tokenizer = build_toy_tokenizer()
    image = model.image_token_id
    batch = qwen_batch([[5, 6, ("image", (1, 4, 6)), 7], [8, ("image", (1, 2, 2)), 9, 10]], family=family)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, image)
    batch["input_ids"] = batch["input_ids"].masked_fill((batch["input_ids"] == START) | (batch["input_ids"] == END), 7)
    batch["mm_token_type_ids"] = (batch["input_ids"] == image).int()
    out = ours_with_labels(model, batch)
    out.loss.backward()
    for part in (model.vision, model.connector, model.llm):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad), type(part).__name__
    to_hf(model, tmp_path / "export", tokenizer)
    exported = getattr(transformers, QWEN_VL_CLASSES[family]).from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (real(exported(**batch).logits, batch) - real(ours(model, batch), batch)).abs().max() < 1e-4


def ours_with_labels(model, batch: dict):
    inputs = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    return model(inputs.pop("pixel_values"), **inputs, labels=labels)


@pytest.mark.parametrize(("family", "video"), [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", True)])
def test_a_text_only_batch_runs_the_tower_on_a_blank_image(family, video):
    """A rank whose micro-batch has no image and no video still runs tower and merger(s) (on one blank
    28 px image, weight zero): under ZeRO-3 every rank must gather the same parameters, or it hangs."""
    from tests.helpers import toy_model

    model = toy_model(*TINY[family], "vision.freeze=false", *(["data.video=true"] if video else []))
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    out = model(None, ids, mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX))
    out.loss.backward()
    tower_grads = [p.grad for p in model.vision.parameters() if p.requires_grad]
    assert tower_grads and all(g is not None and not g.any() for g in tower_grads)  # reached, with zeros
    assert all(p.grad is not None for p in model.connector.parameters())  # Qwen3: its DeepStack mergers too
