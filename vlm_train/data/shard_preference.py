"""`vlm-shards preference`: preference pairs (objective=dpo) into shards, from the layouts they come in:

    RLAIF-V:            {"image": "a.jpg", "question": "...", "chosen": "...", "rejected": "..."}
    LLaVA-RLHF:         {"image": "a.jpg", "conversations": [...], "output_1": {"value": "..."},
                         "output_2": {"value": "..."}, "preference": 1}   (1 or 2: the preferred output)
    vlm_train / LLaVA:  {"image": "a.jpg", "conversations": [<human turns>], "chosen": "...", "rejected": "..."}
    TRL (conversational): {"images": ["a.jpg"], "prompt": [{"role": "user", "content": [{"type": "image"},
                         {"type": "text", "text": "..."}]}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
                         (or "chosen"/"rejected" as whole conversations, prompt included)

Each becomes the vlm_train layout (data/preference.py), its image member written as for `llava`. A
record whose replies are the same, whose two conversations have different prompts, or that has no
pair is skipped and reported (identical_pair, prompt_mismatch, not_a_pair), as are bad images.
"""

from __future__ import annotations

from pathlib import Path

from vlm_train.data.preference import PairError, preference_turns
from vlm_train.data.shard_records import (
    Checked,
    Record,
    RecordProblem,
    _check_conversations,
    _check_image,
    _image_field,
    _json_bytes,
    read_llava,
    sample_key,
)
from vlm_train.data.tokenizer import IMAGE_TOKEN

ROLE_OF = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


def read_preference(path: Path) -> list[Record]:
    """The records of a JSON list or JSON-lines file, each in the vlm_train layout."""
    return [Record(r.index, r.where, preference_record(r.value)) for r in read_llava(path)]


def preference_record(value: object) -> object:
    """RLAIF-V's and TRL's layouts as vlm_train's; anything else as it is (check_pair reports it)."""
    if not isinstance(value, dict):
        return value
    record = {key: value[key] for key in ("id", "image") if key in value}
    if "image" not in record and isinstance(value.get("images"), list) and len(value["images"]) == 1:
        record["image"] = value["images"][0]
    chosen, rejected = value.get("chosen"), value.get("rejected")
    if "preference" in value and "output_1" in value and "output_2" in value:  # LLaVA-RLHF
        chosen, rejected = _rlhf_outputs(value)
    prompt: object
    if "question" in value:  # RLAIF-V: one question about the image
        question = str(value["question"])
        marked = IMAGE_TOKEN in question or "image" not in record
        prompt = [{"from": "human", "value": question if marked else f"{IMAGE_TOKEN}\n{question}"}]
    elif "prompt" in value:  # TRL: prompt messages, replies as messages or strings
        prompt = [_turn(m) for m in value["prompt"]] if isinstance(value["prompt"], list) else value["prompt"]
    else:
        prompt = _up_to_last_question(value.get("conversations"))
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = [_turn(m) for m in chosen], [_turn(m) for m in rejected]
        if isinstance(prompt, list) and len(chosen) == 1 and len(rejected) == 1:  # TRL: replies apart from the prompt
            chosen, rejected = chosen[0]["value"], rejected[0]["value"]
    return {**record, "conversations": prompt, "chosen": chosen, "rejected": rejected}


def _rlhf_outputs(value: dict) -> tuple[object, object]:
    """LLaVA-RLHF's two outputs as (chosen, rejected) by its `preference` (1 or 2); else neither."""
    outputs = [value["output_1"], value["output_2"]]
    texts = [o.get("value") if isinstance(o, dict) else o for o in outputs]
    if value["preference"] not in (1, 2):
        return None, None
    first = value["preference"] - 1
    return texts[first], texts[1 - first]


def _up_to_last_question(turns: object) -> object:
    """The turns up to the last human one (LLaVA-RLHF keeps the original answer after it)."""
    if not isinstance(turns, list):
        return turns
    last = max((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == "human"), default=None)
    return turns if last is None else turns[: last + 1]


def _turn(message: object) -> dict:
    """A TRL/OpenAI message ({"role", "content"}) or a LLaVA turn as a LLaVA turn; images as `<image>`."""
    if not isinstance(message, dict) or "from" in message:
        return message  # type: ignore[return-value]
    content = message.get("content")
    if isinstance(content, list):
        parts = [IMAGE_TOKEN if p.get("type") == "image" else str(p.get("text", "")) for p in content]
        content = "\n".join(part for part in parts if part)
    return {"from": ROLE_OF.get(str(message.get("role")), str(message.get("role"))), "value": str(content)}


def check_pair(record: Record, images: Path, videos: Path | None = None) -> Checked:
    """A preference record as a sample (its prompt, the two replies, its image), or RecordProblem
    (`videos`: unused, pairs carry images; shard_records.check's signature)."""
    value = record.value
    if not isinstance(value, dict):
        raise RecordProblem("not_an_object", f"a record must be a JSON object, found {type(value).__name__}")
    try:
        prompt, chosen, rejected = preference_turns(value)
    except PairError as err:
        raise RecordProblem(err.reason, str(err)) from None
    markers, video_markers = _check_conversations([*prompt, chosen])
    _check_conversations([*prompt, rejected])
    image = _image_field(value)
    if video_markers or markers != (1 if image else 0):
        raise RecordProblem("marker_mismatch", f"{markers} {IMAGE_TOKEN} markers for {1 if image else 0} images")
    out = {"id": value.get("id"), "image": image, "conversations": prompt}
    out = {k: v for k, v in out.items() if v is not None} | {"chosen": chosen["value"], "rejected": rejected["value"]}
    key = sample_key(record.index, value.get("id"))
    if not image:
        return Checked(record.index, key, _json_bytes(out))
    return Checked(record.index, key, _json_bytes(out), "image", (_check_image(images / image, image),))
