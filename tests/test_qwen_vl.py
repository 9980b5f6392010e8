"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL) against transformers: logit parity of the import and the
export on tiny random models, with images of three sizes, a multi-image sample and a video; and a
packed batch's per-token losses against the unpacked batch's (M-RoPE positions per sample)."""

from __future__ import annotations

import pytest
import torch

from vlm_train.interop import from_hf, to_hf
from vlm_train.models.vlm import IGNORE_INDEX

IMAGE, VIDEO, START, END = 290, 291, 292, 293
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def tiny_hf(family: str):
    """A tiny random Qwen2-VL or Qwen2.5-VL (Qwen2.5: window attention in layer 0, full in layer 1)."""
    import transformers

    torch.manual_seed(0)
    text = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, window_size=56,
            fullatt_block_indexes=[1], tokens_per_second=2,
        )  # fmt: skip
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    model = model_cls(config).eval()
    with torch.no_grad():  # biases and norms away from their 0/1 init, so a dropped one shows
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name or "ln_q" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def qwen_batch(samples: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
    """Samples of text ids and ("image" | "video", (t, h, w)) parts -> a right-padded batch in
    Qwen's processor layout (patches [N, 3*2*14*14] random, grids, mm_token_type_ids)."""
    generator = torch.Generator().manual_seed(seed)
    rows, patches, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
    for sample in samples:
        ids: list[int] = []
        for part in sample:
            if isinstance(part, int):
                ids.append(part)
                continue
            kind, grid = part
            t, h, w = grid
            ids += [START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [END]
            patches[kind].append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=generator))
            grids[kind].append(list(grid))
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in rows]),
        "mm_token_type_ids": (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int(),
    }
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if patches[kind]:
            batch[key] = torch.cat(patches[kind])
            batch[f"{kind}_grid_thw"] = torch.tensor(grids[kind])
    return batch


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
            batch = qwen_batch(samples)
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
        batch = qwen_batch(samples)
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
    batch = qwen_batch(samples)
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


TINY_QWEN = [
    "vision.family=qwen2_5_vl", "vision.path=null", "vision.patch_size=14", "vision.hidden_size=32",
    "vision.intermediate_size=64", "vision.num_heads=4", "vision.window_size=56", "vision.full_attention_layers=[1]",
    "llm.family=qwen2_5_vl", "llm.hidden_size=64", "llm.num_heads=4", "llm.num_kv_heads=2",
    "llm.intermediate_size=128", "connector=patch_merger", "connector.norm=rmsnorm",
]  # fmt: skip


def test_a_tiny_qwen2_5_vl_builds_from_sizes_and_exports(tmp_path):
    """`vision.family=qwen2_5_vl` from the size fields: a model transformers loads back after export,
    with the same logits, and whose gradient reaches tower, merger and decoder."""
    import transformers

    from tests.helpers import toy_model
    from vlm_train.data.tokenizer import build_toy_tokenizer

    model = toy_model(*TINY_QWEN, "vision.freeze=false").eval()
    tokenizer = build_toy_tokenizer()
    image = model.image_token_id
    batch = qwen_batch([[5, 6, ("image", (1, 4, 6)), 7], [8, ("image", (1, 2, 2)), 9, 10]])
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, image)
    batch["input_ids"] = batch["input_ids"].masked_fill((batch["input_ids"] == START) | (batch["input_ids"] == END), 7)
    batch["mm_token_type_ids"] = (batch["input_ids"] == image).int()
    out = ours_with_labels(model, batch)
    out.loss.backward()
    for part in (model.vision, model.connector, model.llm):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad), type(part).__name__
    to_hf(model, tmp_path / "export", tokenizer)
    exported = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (real(exported(**batch).logits, batch) - real(ours(model, batch), batch)).abs().max() < 1e-4


def ours_with_labels(model, batch: dict):
    inputs = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    return model(inputs.pop("pixel_values"), **inputs, labels=labels)
