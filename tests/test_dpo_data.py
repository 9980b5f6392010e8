"""Preference pairs through the data pipeline (objective=dpo): both record layouts, each reply encoded
as any sample is, a pair as two rows (chosen, rejected) with the pair's image on each, and pairs
that are no pairs counted as skips."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from vlm_train.data.preference import PairError, preference_turns

PROMPT = [{"from": "human", "value": "<image>\nwhat color is the circle ?"}]


def test_both_layouts_give_the_prompt_and_the_two_replies():
    record = {"conversations": PROMPT, "chosen": "red", "rejected": "blue"}
    prompt, chosen, rejected = preference_turns(record)
    assert prompt == PROMPT and chosen == {"from": "gpt", "value": "red"} and rejected["value"] == "blue"
    trl = {
        "chosen": [*PROMPT, {"from": "gpt", "value": "red"}],
        "rejected": [*PROMPT, {"from": "gpt", "value": "blue"}],
    }
    assert preference_turns(trl) == (prompt, chosen, rejected)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"conversations": PROMPT, "chosen": "red", "rejected": "red"}, "identical_pair"),
        ({"chosen": [*PROMPT, {"from": "gpt", "value": "red"}],
          "rejected": [{"from": "human", "value": "<image>\nwhich shape ?"}, {"from": "gpt", "value": "blue"}]},
         "prompt_mismatch"),
        ({"conversations": PROMPT, "chosen": "red"}, "not_a_pair"),
        ({"chosen": "red", "rejected": "blue"}, "not_a_pair"),
    ],
)  # fmt: skip
def test_pairs_that_are_not_pairs_name_their_skip_reason(record, reason):
    with pytest.raises(PairError) as caught:
        preference_turns(record)
    assert caught.value.reason == reason


def pair_sample(key: str, chosen="red", rejected="blue", colour=(220, 40, 40)) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format="PNG")
    record = {"conversations": PROMPT, "chosen": chosen, "rejected": rejected}
    return {"__key__": key, "png": buffer.getvalue(), "json": json.dumps(record).encode()}


def test_a_pair_is_two_rows_with_the_image_on_each_and_bad_pairs_are_counted_skips():
    from tests.helpers import TOKENIZER, TRANSFORM
    from vlm_train.config import compose
    from vlm_train.data.reader import SkippedSample
    from vlm_train.data.samples import SampleEncoder, collate, placeholder

    cfg = compose(["experiment=toy-dpo"])
    assert cfg.data.preference
    encoder = SampleEncoder(cfg.data, TOKENIZER, TRANSFORM, image_tokens=9)
    pairs = [encoder.encode(pair_sample("a")), encoder.encode(pair_sample("b", "green", "yellow", (40, 170, 60)))]
    batch = collate(pairs, TOKENIZER.pad_token_id)
    assert batch["keys"] == ["a", "a", "b", "b"] and batch["pixel_values"].shape[0] == 4
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    answers = [TOKENIZER.decode([t for t in row if t >= 0]) for row in batch["labels"].tolist()]
    assert [a.split()[0] for a in answers] == ["red", "blue", "green", "yellow"]
    prompts = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    assert torch.equal(batch["input_ids"][0][prompts[0]], batch["input_ids"][1][prompts[1]])  # one prompt
    stand_in = collate([placeholder(pairs[0], TOKENIZER.pad_token_id, batch["pixel_values"][:0])], 0)
    assert (stand_in["labels"] == -100).all() and stand_in["input_ids"].shape[0] == 2
    same = encoder.encode(pair_sample("c", "red", "red"))
    assert isinstance(same, SkippedSample) and same.reason == "identical_pair"
    sft = encoder.encode({**pair_sample("d"), "json": json.dumps({"conversations": PROMPT}).encode()})
    assert isinstance(sft, SkippedSample) and sft.reason == "not_a_pair"


def test_vlm_shards_preference_converts_rlaif_v_trl_llava_rlhf_and_ours_and_reports_bad_pairs(tmp_path):
    """Four layouts (RLAIF-V, ours, TRL, LLaVA-RLHF) of the same pair become the same sample; an identical pair, different prompts and
    a record without a pair are left out and reported; the shards train (the encoder reads each pair)."""
    from tests.helpers import TOKENIZER, TRANSFORM
    from tests.shard_helpers import read_shards
    from vlm_train.config import compose
    from vlm_train.data.samples import SampleEncoder
    from vlm_train.data.shards import main

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 48), (220, 40, 40)).save(images / "a.png")
    question = "what color is the circle ?"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    records = [
        {"id": "rlaif", "image": "a.png", "question": question, "chosen": "red", "rejected": "blue"},
        {"id": "ours", "image": "a.png", "conversations": PROMPT, "chosen": "red", "rejected": "blue"},
        {"id": "trl", "images": ["a.png"], "prompt": [user],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
        {"id": "rlhf", "image": "a.png", "preference": 2, "conversations": [*PROMPT, {"from": "gpt", "value": "x"}],
         "output_1": {"from": "llava", "value": "blue"}, "output_2": {"from": "llava", "value": "red"}},
        {"id": "same", "image": "a.png", "question": question, "chosen": "red", "rejected": "red"},
        {"id": "mismatch", "image": "a.png",
         "chosen": [*PROMPT, {"from": "gpt", "value": "red"}],
         "rejected": [{"from": "human", "value": "<image>\nwhich shape ?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "half", "image": "a.png", "question": question, "chosen": "red"},
    ]  # fmt: skip
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    assert (
        main(["preference", "--json", str(source), "--images", str(images), "--out", str(out), "--workers", "1"]) == 0
    )
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [
        ("same", "identical_pair"), ("mismatch", "prompt_mismatch"), ("half", "not_a_pair"),
    ]  # fmt: skip
    samples = read_shards(out)
    bodies = [{k: v for k, v in json.loads(s["json"]).items() if k != "id"} for s in samples]
    assert len(samples) == 4 and bodies[0] == bodies[1] == bodies[2] == bodies[3]
    assert bodies[0]["conversations"] == PROMPT and (bodies[0]["chosen"], bodies[0]["rejected"]) == ("red", "blue")
    encoder = SampleEncoder(compose(["experiment=toy-dpo"]).data, TOKENIZER, TRANSFORM, image_tokens=9)
    assert all(encoder.encode(sample)[2].rejected is not None for sample in samples)
